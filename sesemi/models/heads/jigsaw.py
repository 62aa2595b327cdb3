"""The jigsaw-puzzle loss head: predict which tile permutation shuffled each image."""

from __future__ import annotations

from collections.abc import Mapping

import torch.nn.functional as F
from torch import Tensor, nn

from sesemi.models.heads.base import HeadInputs, LossHead


class JigsawPredictionLossHead(LossHead):
    """Classifies each jigsaw puzzle by the index of the permutation that shuffled its tiles.

    Reads `(images (B, C, H, W), permutation indices (B,))` batches as made by
    `sesemi.jigsaw.JigsawTransformer`; a linear layer on the backbone's pooled features predicts
    the index, and each puzzle's cross-entropy is returned. `num_permutations` must equal the
    collation's. Logs `top1`, the share of puzzles solved.

    References: Noroozi & Favaro, "Unsupervised Learning of Visual Representations by Solving
    Jigsaw Puzzles", arXiv:1603.09246; JiGen (Carlucci et al., arXiv:1903.06864) trains the
    reassembled-image puzzle jointly with the supervised loss, as here. Deviations from Noroozi &
    Favaro: one forward pass over the reassembled image through the shared backbone and a
    single linear classifier, instead of a per-tile siamese network with concatenated tile
    features and fully connected layers (see `sesemi.jigsaw.JigsawTransformer`).
    """

    def __init__(
        self, input_data: str, input_backbone: str = "backbone", num_permutations: int = 24
    ) -> None:
        """Initializes the head.

        Args:
            input_data: The loader name of the puzzle batches.
            input_backbone: The backbone to extract features with.
            num_permutations: The size of the collation's permutation set.
        """
        super().__init__(input_data, input_backbone)
        if num_permutations < 1:
            raise ValueError(f"num_permutations must be at least 1, got {num_permutations}")
        self.num_permutations = num_permutations
        self.fc: nn.Module = nn.Identity()
        self._checked = False

    def build(self, backbones: Mapping[str, nn.Module], heads: Mapping[str, nn.Module]) -> None:
        """Creates the permutation classifier on top of the backbone's features."""
        if self.input_backbone not in backbones:
            raise ValueError(
                f"JigsawPredictionLossHead reads the backbone '{self.input_backbone}', which the "
                f"learner does not offer (it has: {', '.join(backbones)})"
            )
        self.fc = nn.Linear(backbones[self.input_backbone].out_features, self.num_permutations)

    def forward(self, inputs: HeadInputs) -> Tensor:
        """Returns the permutation cross-entropy of each puzzle `(B,)`."""
        images, labels = inputs.data[self.input_data]
        if not self._checked and labels.numel() and int(labels.max()) >= self.num_permutations:
            raise ValueError(
                f"data.train.{self.input_data} has permutation index {int(labels.max())}, but "
                f"the head predicts {self.num_permutations}; give the head and the "
                "JigsawTransformer the same num_permutations"
            )
        self._checked = True  # checked on the first batch only: .max() syncs with the GPU
        logits = self.fc(inputs.backbones[self.input_backbone](images)).float()
        accuracy = (logits.argmax(dim=1) == labels).float().mean()
        self.log_values = {"top1": accuracy.detach()}
        return F.cross_entropy(logits, labels, reduction="none")
