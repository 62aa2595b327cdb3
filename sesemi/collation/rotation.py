"""The rotation collation: every quarter turn of every image, labeled by the number of turns."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from sesemi.collation._samples import stack_images


class RotationTransformer:
    """Collates images into every rotation by a multiple of 90 degrees, labeled by that multiple.

    Each image of shape `(C, H, W)` appears once per rotation; the output is image-major, so
    rows `4 * i + k` hold image `i` rotated counter-clockwise by `k * 90` degrees
    (`torch.rot90(image, k, dims=(1, 2))`). Images must be square for the batch to stack.

    Reference: Gidaris et al., "Unsupervised Representation Learning by Predicting Image
    Rotations", arXiv:1803.07728.
    """

    def __init__(self, num_rotations: int = 4) -> None:
        """Initializes the collation.

        Args:
            num_rotations: How many of the rotations by 0, 90, 180 and 270 degrees to use.
        """
        if not 1 <= num_rotations <= 4:
            raise ValueError(f"num_rotations must be between 1 and 4, got {num_rotations}")
        self.num_rotations = num_rotations

    def __call__(self, batch: Sequence[Any]) -> tuple[Tensor, Tensor]:
        """Rotates and stacks a batch.

        Args:
            batch: A list of `(image, label[, index])` samples or bare images `(C, H, W)`.

        Returns:
            Rotated images `(B * R, C, H, W)` and rotation labels `(B * R,)`, R = num_rotations.
        """
        images = stack_images(batch)  # (B, C, H, W)
        rotated = torch.stack(
            [torch.rot90(images, k, dims=(2, 3)) for k in range(self.num_rotations)], dim=1
        )  # (B, R, C, H, W)
        labels = torch.arange(self.num_rotations).repeat(images.shape[0])
        return rotated.flatten(0, 1), labels
