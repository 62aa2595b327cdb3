"""FixMatch's strong augmentation: RandAugment with random magnitudes, then a square cutout.

Reference: Sohn et al., "FixMatch: Simplifying Semi-Supervised Learning with Consistency and
Confidence", arXiv:2001.07685, Table 12 (the "RA" variant): for each image, `num_ops` operations
are drawn uniformly (with replacement) from the 14 below and each is applied, always, with a
magnitude drawn uniformly from its range; then a square of side `L * width`, L uniform in
[0, 0.5], centred at a uniform point and clipped to the image, is filled with the mean colour.
The same list, ranges and cutout are in USB's implementation (microsoft/Semi-supervised-learning),
which draws 3 operations where the paper draws 2.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from PIL import Image, ImageEnhance, ImageOps
from torch import Tensor


def _affine(image: Image.Image, matrix: tuple[float, ...], fill: tuple[int, ...]) -> Image.Image:
    return image.transform(image.size, Image.Transform.AFFINE, matrix, fillcolor=fill)


def _translate(image: Image.Image, dx: float, dy: float, fill: tuple[int, ...]) -> Image.Image:
    # dx, dy: fractions of the width and height.
    w, h = image.size
    return _affine(image, (1, 0, dx * w, 0, 1, dy * h), fill)


# name -> (operation(image, magnitude, fill), low, high): FixMatch's Table 12.
OPS: dict[str, tuple[Callable[..., Image.Image], float, float]] = {
    "AutoContrast": (lambda im, v, fill: ImageOps.autocontrast(im), 0.0, 1.0),
    "Brightness": (lambda im, v, fill: ImageEnhance.Brightness(im).enhance(v), 0.05, 0.95),
    "Color": (lambda im, v, fill: ImageEnhance.Color(im).enhance(v), 0.05, 0.95),
    "Contrast": (lambda im, v, fill: ImageEnhance.Contrast(im).enhance(v), 0.05, 0.95),
    "Equalize": (lambda im, v, fill: ImageOps.equalize(im), 0.0, 1.0),
    "Identity": (lambda im, v, fill: im, 0.0, 1.0),
    "Posterize": (lambda im, v, fill: ImageOps.posterize(im, int(v)), 4.0, 8.0),
    "Rotate": (lambda im, v, fill: im.rotate(v, fillcolor=fill), -30.0, 30.0),
    "Sharpness": (lambda im, v, fill: ImageEnhance.Sharpness(im).enhance(v), 0.05, 0.95),
    "ShearX": (lambda im, v, fill: _affine(im, (1, v, 0, 0, 1, 0), fill), -0.3, 0.3),
    "ShearY": (lambda im, v, fill: _affine(im, (1, 0, 0, v, 1, 0), fill), -0.3, 0.3),
    "Solarize": (lambda im, v, fill: ImageOps.solarize(im, int(v)), 0.0, 256.0),
    "TranslateX": (
        lambda im, v, fill: _affine(im, (1, 0, v * im.size[0], 0, 1, 0), fill),
        -0.3,
        0.3,
    ),
    "TranslateY": (
        lambda im, v, fill: _affine(im, (1, 0, 0, 0, 1, v * im.size[1]), fill),
        -0.3,
        0.3,
    ),
}


class FixMatchRandAugment:
    """Applies `num_ops` operations of FixMatch's list, each with a uniformly drawn magnitude.

    Random numbers come from torch's generator (seeded per DataLoader worker by PyTorch).
    """

    def __init__(
        self, num_ops: int = 2, ops: Sequence[str] | None = None, fill: Sequence[int] = (0, 0, 0)
    ) -> None:
        """Initializes the transform.

        Args:
            num_ops: Operations per image (the paper: 2; USB: 3).
            ops: The operation names to draw from (default: all 14 of `OPS`).
            fill: The RGB colour of pixels that geometric operations uncover.
        """
        names = list(ops) if ops is not None else list(OPS)
        unknown = [n for n in names if n not in OPS]
        if unknown or not names:
            raise ValueError(f"unknown RandAugment op(s) {unknown}; choose from {', '.join(OPS)}")
        if num_ops < 0:
            raise ValueError(f"num_ops must be at least 0, got {num_ops}")
        self.num_ops = num_ops
        self.ops = names
        self.fill = tuple(int(c) for c in fill)

    def __call__(self, image: Image.Image) -> Image.Image:
        """Returns the augmented PIL image."""
        picks = torch.randint(len(self.ops), (self.num_ops,)).tolist()
        strengths = torch.rand(self.num_ops).tolist()
        for pick, strength in zip(picks, strengths, strict=True):
            op, low, high = OPS[self.ops[pick]]
            image = op(image, low + (high - low) * strength, self.fill)
        return image


class SquareCutout:
    """Fills a square of side `L * width` (L uniform in [0, max_size]), centred at a uniform
    point of the image and clipped to it, with `value` (0: the mean colour after normalization).
    """

    def __init__(self, max_size: float = 0.5, value: float = 0.0) -> None:
        """Initializes the transform.

        Args:
            max_size: The largest side as a fraction of the image's width (FixMatch: 0.5).
            value: The fill value, in the tensor's (normalized) units.
        """
        if not 0.0 <= max_size <= 1.0:
            raise ValueError(f"cutout max_size must be in [0, 1], got {max_size}")
        self.max_size = max_size
        self.value = value

    def __call__(self, image: Tensor) -> Tensor:
        """Returns a copy of the `(C, H, W)` tensor with the square filled."""
        h, w = image.shape[-2:]
        side = float(torch.rand(())) * self.max_size * w
        cy, cx = float(torch.rand(())) * h, float(torch.rand(())) * w
        top, left = int(max(0.0, cy - side / 2)), int(max(0.0, cx - side / 2))
        bottom, right = int(min(h, top + side)), int(min(w, left + side))
        image = image.clone()
        image[..., top:bottom, left:right] = self.value
        return image
