"""The rotation collation: every quarter turn of every image, labeled by the number of turns."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from sesemi.collation._samples import stack_images


class RotationTransformer:
    """Collates images into every rotation by a multiple of 90 degrees, labeled by that multiple,
    and optionally their horizontal and vertical flips (SESEMI's 6-way task).

    Each image of shape `(C, H, W)` appears once per transformation; the output is image-major,
    so rows `T * i + k` hold image `i` rotated counter-clockwise by `k * 90` degrees
    (`torch.rot90(image, k, dims=(1, 2))`) for `k < num_rotations`; with `flips`, row
    `T * i + num_rotations` is the image mirrored left-right and the next one mirrored top-down
    (labels `num_rotations` and `num_rotations + 1`). T = `num_labels`. Images must be square
    for the batch to stack.

    References: Gidaris et al., "Unsupervised Representation Learning by Predicting Image
    Rotations", arXiv:1803.07728 (the 4 rotations); SESEMI (Tran, arXiv:1906.10343), whose code
    adds the two flips.
    """

    def __init__(self, num_rotations: int = 4, flips: bool = False) -> None:
        """Initializes the collation.

        Args:
            num_rotations: How many of the rotations by 0, 90, 180 and 270 degrees to use.
            flips: Also show each image mirrored left-right and top-down (2 more labels).
        """
        if not 1 <= num_rotations <= 4:
            raise ValueError(f"num_rotations must be between 1 and 4, got {num_rotations}")
        self.num_rotations = num_rotations
        self.flips = flips

    @property
    def num_labels(self) -> int:
        """The number of transformation classes: rotations, plus 2 with the flips."""
        return self.num_rotations + 2 * self.flips

    def __call__(self, batch: Sequence[Any]) -> tuple[Tensor, Tensor]:
        """Rotates and stacks a batch.

        Args:
            batch: A list of `(image, label[, index])` samples or bare images `(C, H, W)`.

        Returns:
            Transformed images `(B * T, C, H, W)` and their labels `(B * T,)`, T = num_labels.
        """
        images = stack_images(batch)  # (B, C, H, W)
        views = [torch.rot90(images, k, dims=(2, 3)) for k in range(self.num_rotations)]
        if self.flips:
            views += [images.flip(3), images.flip(2)]  # left-right, top-down
        labels = torch.arange(self.num_labels).repeat(images.shape[0])
        return torch.stack(views, dim=1).flatten(0, 1), labels  # (B, T, C, H, W) -> (B * T, ...)
