"""Built-in regularization loss heads."""

from __future__ import annotations

from collections.abc import Mapping

import torch.nn.functional as F
from torch import Tensor, nn

from sesemi.models.heads.base import HeadInputs, LossHead


class RotationPredictionLossHead(LossHead):
    """Predicts by how many quarter turns each image was rotated (cross-entropy per image).

    Reads `(images (4B, C, H, W), rotation labels (4B,))` batches as made by
    `sesemi.collation.RotationTransformer`. Reference: Gidaris et al., arXiv:1803.07728; SESEMI
    (Tran, arXiv:1906.10343) trains it jointly with the supervised loss.
    """

    def __init__(
        self, input_data: str, input_backbone: str = "backbone", num_rotations: int = 4
    ) -> None:
        """Initializes the head.

        Args:
            input_data: The loader name of the rotated batches.
            input_backbone: The backbone to extract features with.
            num_rotations: The number of rotation classes.
        """
        super().__init__(input_data, input_backbone)
        self.num_rotations = num_rotations
        self.fc: nn.Module = nn.Identity()

    def build(self, backbones: Mapping[str, nn.Module], heads: Mapping[str, nn.Module]) -> None:
        """Creates the rotation classifier on top of the backbone's features."""
        self.fc = nn.Linear(backbones[self.input_backbone].out_features, self.num_rotations)

    def forward(self, inputs: HeadInputs) -> Tensor:
        """Returns the rotation cross-entropy of each rotated image `(4B,)`."""
        images, labels = inputs.data[self.input_data]
        features = inputs.backbones[self.input_backbone](images)
        logits = self.fc(features)
        accuracy = (logits.argmax(dim=1) == labels).float().mean()
        self.log_values = {"top1": accuracy.detach()}
        return F.cross_entropy(logits, labels, reduction="none")
