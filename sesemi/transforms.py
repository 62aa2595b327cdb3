"""Named image-transform recipes that configs point at (`train_transforms`, ...)."""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torchvision.transforms import InterpolationMode, v2

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def interpolation_mode(name: str) -> InterpolationMode:
    """Looks up a torchvision interpolation mode by name ("bilinear", "bicubic", ...)."""
    try:
        return InterpolationMode[name.upper()]
    except KeyError:
        known = ", ".join(m.value for m in InterpolationMode)
        raise ValueError(f"unknown interpolation '{name}'; choose one of: {known}") from None


def to_normalized_tensor(mean: Sequence[float], std: Sequence[float]) -> list[v2.Transform]:
    """PIL image -> `(C, H, W)` float32 in [0, 1] -> standardized per channel."""
    return [
        v2.PILToTensor(),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(mean=list(mean), std=list(std)),
    ]


def _output(mean: Sequence[float], std: Sequence[float], uint8: bool) -> list[v2.Transform]:
    return [v2.PILToTensor()] if uint8 else to_normalized_tensor(mean, std)


def _crop_and_flip(
    input_h: int,
    input_w: int,
    scale: Sequence[float],
    ratio: Sequence[float],
    interpolation: str,
    p_hflip: float,
) -> list[v2.Transform]:
    # The geometric part every training recipe shares: random resized crop, horizontal flip.
    crop = v2.RandomResizedCrop(
        (input_h, input_w),
        scale=tuple(scale),
        ratio=tuple(ratio),
        interpolation=interpolation_mode(interpolation),
        antialias=True,
    )
    return [crop, v2.RandomHorizontalFlip(p_hflip)]


def train_transforms(
    input_h: int = 224,
    input_w: int = 224,
    scale: Sequence[float] = (0.35, 1.0),
    ratio: Sequence[float] = (3 / 4, 4 / 3),
    interpolation: str = "bilinear",
    p_hflip: float = 0.5,
    norm_mean: Sequence[float] = IMAGENET_MEAN,
    norm_std: Sequence[float] = IMAGENET_STD,
    uint8_output: bool = False,
) -> v2.Compose:
    """Random-resized-crop training augmentation.

    Args:
        input_h: Output height in pixels.
        input_w: Output width in pixels.
        scale: Range of the crop's area as a fraction of the image's.
        ratio: Range of the crop's aspect ratio.
        interpolation: Resampling by name ("nearest", "bilinear", "bicubic", ...).
        p_hflip: Probability of a horizontal flip.
        norm_mean: Per-channel mean subtracted after scaling to [0, 1].
        norm_std: Per-channel standard deviation divided by.
        uint8_output: Return the uint8 pixels, unscaled and unnormalized (a quarter of the
            bytes to collate and copy); the learner then normalizes them on the device with
            `learner.hparams.input_normalization` and the norm arguments here are not used.

    Returns:
        A transform from a PIL image to a normalized `(3, input_h, input_w)` float tensor.
    """
    crop_flip = _crop_and_flip(input_h, input_w, scale, ratio, interpolation, p_hflip)
    return v2.Compose([*crop_flip, *_output(norm_mean, norm_std, uint8_output)])


def center_crop_transforms(
    input_h: int = 224,
    input_w: int = 224,
    crop_pct: float = 0.875,
    interpolation: str = "bilinear",
    norm_mean: Sequence[float] = IMAGENET_MEAN,
    norm_std: Sequence[float] = IMAGENET_STD,
    uint8_output: bool = False,
) -> v2.Compose:
    """Deterministic evaluation preprocessing: resize the short side, then center crop.

    Args:
        input_h: Output height in pixels.
        input_w: Output width in pixels.
        crop_pct: The crop's share of the resized image (0.875 resizes 224 crops to 256).
        interpolation: Resampling by name.
        norm_mean: Per-channel mean subtracted after scaling to [0, 1].
        norm_std: Per-channel standard deviation divided by.
        uint8_output: Return uint8 pixels, to be normalized on the device (see
            `train_transforms`).

    Returns:
        A transform from a PIL image to a normalized `(3, input_h, input_w)` float tensor.
    """
    if not 0.0 < crop_pct <= 1.0:
        raise ValueError(f"crop_pct must be in (0, 1], got {crop_pct}")
    resize = round(max(input_h, input_w) / crop_pct)
    return v2.Compose(
        [
            v2.Resize(resize, interpolation=interpolation_mode(interpolation), antialias=True),
            v2.CenterCrop((input_h, input_w)),
            *_output(norm_mean, norm_std, uint8_output),
        ]
    )


STRONG_RECIPES = ("fixmatch", "timm")


def strong_transforms(
    input_h: int = 224,
    input_w: int = 224,
    scale: Sequence[float] = (0.35, 1.0),
    ratio: Sequence[float] = (3 / 4, 4 / 3),
    interpolation: str = "bilinear",
    p_hflip: float = 0.5,
    recipe: str = "fixmatch",
    num_ops: int = 2,
    cutout: float = 0.5,
    rand_augment: str = "rand-m10-n2-mstd0.5",
    cutout_p: float = 1.0,
    cutout_scale: Sequence[float] = (0.02, 0.25),
    norm_mean: Sequence[float] = IMAGENET_MEAN,
    norm_std: Sequence[float] = IMAGENET_STD,
) -> v2.Compose:
    """The strong augmentation of FixMatch-style methods: crop, flip, RandAugment, cutout.

    Two recipes:

    * "fixmatch" (the default; FixMatch's paper, arXiv:2001.07685, Table 12, and USB): `num_ops`
      operations from FixMatch's list of 14 (Identity included), each always applied with a
      magnitude drawn uniformly from its range, then a square cutout of side up to `cutout` of
      the width (`sesemi.randaugment`).
    * "timm": timm's RandAugment config string `rand_augment` (each op applied with probability
      0.5, a fixed magnitude with noise, timm's op list) and torchvision's `RandomErasing` of a
      rectangle (`cutout_p`, area `cutout_scale`, aspect 0.3-3.3); sesemi's earlier recipe.

    Args:
        input_h: Output height in pixels.
        input_w: Output width in pixels.
        scale: Range of the crop's area as a fraction of the image's.
        ratio: Range of the crop's aspect ratio.
        interpolation: Resampling by name.
        p_hflip: Probability of a horizontal flip.
        recipe: "fixmatch" or "timm".
        num_ops: ("fixmatch") Operations per image (the paper: 2; USB: 3).
        cutout: ("fixmatch") The cutout square's largest side as a fraction of the width.
        rand_augment: ("timm") timm's RandAugment config string (`rand-m{magnitude}-n{ops}-...`).
        cutout_p: ("timm") Probability of erasing one rectangle (filled with 0 after
            normalization).
        cutout_scale: ("timm") Range of the erased area as a fraction of the image's.
        norm_mean: Per-channel mean (also the colour uncovered pixels and the cutout get).
        norm_std: Per-channel standard deviation.

    Returns:
        A transform from a PIL image to a normalized `(3, input_h, input_w)` float tensor.
    """
    if recipe not in STRONG_RECIPES:
        raise ValueError(
            f"unknown strong recipe '{recipe}'; use one of: {', '.join(STRONG_RECIPES)}"
        )
    fill = tuple(round(255 * m) for m in norm_mean)
    crop_flip = _crop_and_flip(input_h, input_w, scale, ratio, interpolation, p_hflip)
    if recipe == "fixmatch":
        from sesemi.randaugment import FixMatchRandAugment, SquareCutout

        augment = [FixMatchRandAugment(num_ops, fill=fill)]
        erase = SquareCutout(cutout, value=0.0)
    else:
        from timm.data.auto_augment import rand_augment_transform

        magnitude = re.search(r"-m(\d+(\.\d+)?)", rand_augment)
        if magnitude and float(magnitude.group(1)) < 1:
            # timm maps magnitude 0 to a 0-bit posterize, which Pillow refuses mid-training.
            raise ValueError(f"rand_augment '{rand_augment}': use a magnitude m >= 1")
        hparams = {"translate_const": int(0.45 * min(input_h, input_w)), "img_mean": fill}
        augment = [rand_augment_transform(rand_augment, hparams)]
        erase = v2.RandomErasing(p=cutout_p, scale=tuple(cutout_scale), value=0)
    return v2.Compose([*crop_flip, *augment, *to_normalized_tensor(norm_mean, norm_std), erase])


class MultiView:
    """Applies several transforms to one image and returns every view, e.g. (weak, strong).

    A dataset with this transform yields `((view_1, ..., view_k), target)`; the default
    collation then gives `([batch_1, ..., batch_k], targets)`, each batch `(B, C, H, W)`.
    """

    def __init__(self, views: Sequence[Callable]) -> None:
        """Initializes the transform.

        Args:
            views: One transform per view (Hydra nodes are built by `instantiate`).
        """
        if len(views) < 1:
            raise ValueError("MultiView needs at least one view transform")
        self.views = list(views)

    def __call__(self, image: Any) -> tuple:
        return tuple(view(image) for view in self.views)
