"""Transformation-prediction heads: classify which transformation made each image (rotation)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch.nn.functional as F
from torch import Tensor, nn

from sesemi.models.heads.base import HeadContext, HeadInputs, LossHead
from sesemi.models.net import frozen_batchnorm_statistics


class TransformationPredictionLossHead(LossHead):
    """A linear classifier on the backbone's features that predicts which of
    `num_transformations` transformations the collation applied to each image.

    Reads `(images (N, C, H, W), transformation labels (N,)[, indices])` batches, as made by a
    collate function (`sesemi.collation.RotationTransformer`, `JigsawTransformer`); returns each
    image's cross-entropy `(N,)` and logs `top1`, the share of transformations recognized. The
    first batch's labels are checked against `num_transformations` (later ones are not: `.max()`
    waits for the GPU). With `joint_forward`, the transformed images go through the backbone in
    the supervised batch's forward pass (one set of BatchNorm statistics for both, as USB's
    `use_cat` does for FixMatch) instead of a pass of their own. Without `update_bn_stats`, that
    pass of their own normalizes by the batch's statistics but leaves BatchNorm's running
    statistics, which evaluation uses, to the labeled images: transformed images (rotated digits)
    make the deeper layers' statistics unlike those of the upright images evaluated.
    """

    reads_classifier = False
    #: The subclass's name for `num_transformations` and its collation, for error messages.
    argument: ClassVar[str] = "num_transformations"
    collation: ClassVar[str] = "collate function"

    def __init__(
        self,
        input_data: str,
        input_backbone: str = "backbone",
        num_transformations: int = 4,
        joint_forward: bool = False,
        update_bn_stats: bool | None = True,
    ) -> None:
        """Initializes the head.

        Args:
            input_data: The loader name of the transformed batches.
            input_backbone: The backbone to extract features with.
            num_transformations: The number of transformation classes (the collation's).
            joint_forward: Put the transformed images through the backbone together with the
                supervised batch (needs `input_backbone: backbone`, the model trained).
            update_bn_stats: Whether the transformed images' own pass moves BatchNorm's running
                statistics (false: only the supervised pass does); None: false for a pass of
                their own, true for a joint one (which always moves them).
        """
        super().__init__(input_data, input_backbone)
        if num_transformations < 1:
            raise ValueError(f"{self.argument} must be at least 1, got {num_transformations}")
        if update_bn_stats is None:
            update_bn_stats = bool(joint_forward)
        for name, value in (("joint_forward", joint_forward), ("update_bn_stats", update_bn_stats)):
            if not isinstance(value, bool):
                raise ValueError(f"{name} must be true or false, got {value!r}")
        if joint_forward and not update_bn_stats:
            raise ValueError(
                "joint_forward puts the transformed images in the supervised pass, whose "
                "statistics BatchNorm keeps; use update_bn_stats: true with it"
            )
        if joint_forward and input_backbone != "backbone":
            raise ValueError(
                f"joint_forward runs the trained backbone, not '{input_backbone}'; "
                "use input_backbone: backbone or joint_forward: false"
            )
        self.num_transformations = num_transformations
        self.joint_forward = joint_forward
        self.update_bn_stats = update_bn_stats
        self.fc: nn.Module = nn.Identity()
        self._checked = False

    def build(self, context: HeadContext) -> None:
        """Creates the transformation classifier on top of the backbone's features."""
        super().build(context)
        in_features = context.backbones[self.input_backbone].out_features
        self.fc = nn.Linear(in_features, self.num_transformations)

    def joined_views(self, data: Mapping[str, Any]) -> list[Tensor]:
        """With `joint_forward`, the transformed images join the supervised forward pass."""
        if not self.joint_forward or self.input_data not in data:  # forward() says what's wrong
            return []
        return [data[self.input_data][0]]

    def forward(self, inputs: HeadInputs) -> Tensor:
        """Returns the cross-entropy of each transformed image `(N,)`."""
        images, labels, _ = self.single_view(inputs)
        if labels is None:
            raise ValueError(f"data.train.{self.input_data} batches carry no transformation labels")
        if not self._checked and labels.numel() and int(labels.max()) >= self.num_transformations:
            raise ValueError(
                f"data.train.{self.input_data} has transformation label {int(labels.max())}, "
                f"but the head predicts {self.num_transformations}; give the head and the "
                f"{self.collation} the same {self.argument}"
            )
        self._checked = True
        if self.joint_forward:
            [(features, _)] = inputs.features[f"joined/{self.name}"]  # the learner's joint pass
        elif self.update_bn_stats:
            features = self.features(inputs, images)
        else:
            with frozen_batchnorm_statistics(inputs.backbones[self.input_backbone]):
                features = self.features(inputs, images)
        logits = self.fc(features).float()
        accuracy = (logits.argmax(dim=1) == labels).float().mean()
        self.log_values = {"top1": accuracy.detach()}
        return F.cross_entropy(logits, labels, reduction="none")


class RotationPredictionLossHead(TransformationPredictionLossHead):
    """Predicts by how many quarter turns each image was rotated (cross-entropy per image).

    Reads `(images (4B, C, H, W), rotation labels (4B,))` batches as made by
    `sesemi.collation.RotationTransformer`. Reference: Gidaris et al., arXiv:1803.07728; SESEMI
    (Tran, arXiv:1906.10343) trains it jointly with the supervised loss.
    """

    argument = "num_rotations"
    collation = "RotationTransformer"

    def __init__(
        self,
        input_data: str,
        input_backbone: str = "backbone",
        num_rotations: int = 4,
        joint_forward: bool = False,
        update_bn_stats: bool | None = None,
    ) -> None:
        """Initializes the head.

        Args:
            input_data: The loader name of the rotated batches.
            input_backbone: The backbone to extract features with.
            num_rotations: The number of classes: the collation's `num_labels` (4 rotations, or
                6 with its flips).
            joint_forward: Rotated and labeled images in one forward pass (see the base class).
            update_bn_stats: Whether the rotated images' pass moves BatchNorm's running
                statistics (see the base class). By default it does not: in 300 steps on the
                digits that pass cost rotation prediction 3 points even at loss weight 0, and
                without it rotation beats supervised-only at 1 and 2 labels per class (README,
                Results). True is the reference behaviour (SESEMI's code, one set of statistics
                for every pass).
        """
        super().__init__(input_data, input_backbone, num_rotations, joint_forward, update_bn_stats)
