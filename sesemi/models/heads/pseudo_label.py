"""Training on a trained teacher's pseudo-labels, as the student of Noisy Student.

Reference: Xie et al., "Self-training with Noisy Student improves ImageNet classification",
arXiv:1911.04252. The teacher's labels come from `open_sesemi pseudo-label` (a `pseudo_labeled`
dataset); the student sees the images with noise (RandAugment, dropout, stochastic depth, set
in its config). Deviation: the paper mixes labeled and pseudo-labeled images in one batch; here
they are two loaders, and this head's weight sets their balance.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from sesemi.models.heads.base import HeadInputs, LossHead


class PseudoLabelLossHead(LossHead):
    """Cross-entropy of the classifier on pseudo-labeled images, hard or soft labels alike.

    Reads `(images (B, C, H, W), targets[, indices])` batches, targets being class indices `(B,)`
    or class probabilities `(B, num_classes)`. Logs "agreement", the share of images whose
    predicted class is the pseudo-label's.
    """

    def __init__(
        self,
        input_data: str = "pseudo",
        input_backbone: str = "backbone",
        input_head: str = "supervised_head",
    ) -> None:
        """Initializes the head.

        Args:
            input_data: The loader of pseudo-labeled images.
            input_backbone: The backbone to extract features with.
            input_head: The classifier that maps features to class logits.
        """
        super().__init__(input_data, input_backbone, input_head)

    def forward(self, inputs: HeadInputs) -> Tensor:
        """Returns each pseudo-labeled image's cross-entropy `(B,)`."""
        images, targets, _ = self.single_view(inputs)
        if targets is None:
            raise ValueError(f"data.train.{self.input_data} batches carry no pseudo-labels")
        logits = self.logits(inputs, images)
        hard = targets.argmax(dim=1) if targets.ndim == 2 else targets
        self.log_values = {"agreement": (logits.argmax(dim=1) == hard).float().mean().detach()}
        return F.cross_entropy(logits, targets, reduction="none")
