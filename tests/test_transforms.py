"""Image-transform recipes: shapes, normalization, determinism and argument checks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import InterpolationMode

from sesemi.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    center_crop_transforms,
    interpolation_mode,
    train_transforms,
)

H, W = 40, 48  # the fixture images' size


@pytest.fixture
def image() -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (H, W, 3), dtype=np.uint8))


def normalized(pil: Image.Image, mean: float, std: float) -> torch.Tensor:
    """The (C, H, W) tensor of a PIL image scaled to [0, 1] and standardized, by hand."""
    array = np.asarray(pil, dtype=np.float32) / 255.0
    return torch.from_numpy((array - mean) / std).permute(2, 0, 1)


@pytest.mark.parametrize("make", [train_transforms, center_crop_transforms])
def test_output_shape_and_dtype(make, image: Image.Image) -> None:
    out = make(input_h=32, input_w=24)(image)
    assert isinstance(out, torch.Tensor)
    assert out.shape == (3, 32, 24)
    assert out.dtype == torch.float32


@pytest.mark.parametrize("make", [train_transforms, center_crop_transforms])
def test_constant_gray_normalization(make) -> None:
    gray = Image.new("RGB", (W, H), (51, 51, 51))  # 51 / 255 == 0.2
    out = make(input_h=16, input_w=16, norm_mean=(0.5,) * 3, norm_std=(0.5,) * 3)(gray)
    assert torch.allclose(out, torch.full((3, 16, 16), -0.6), atol=1e-6)


def test_default_normalization_is_imagenet_per_channel() -> None:
    gray = Image.new("RGB", (W, H), (51, 51, 51))
    out = center_crop_transforms(input_h=8, input_w=8)(gray)
    expected = [(0.2 - m) / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD, strict=True)]
    assert out[:, 0, 0].tolist() == pytest.approx(expected, abs=1e-5)


def test_center_crop_is_deterministic(image: Image.Image) -> None:
    transform = center_crop_transforms(input_h=32, input_w=24)
    torch.manual_seed(0)
    first = transform(image)
    torch.manual_seed(1)
    assert torch.equal(first, transform(image))


def test_center_crop_takes_the_center() -> None:
    # crop_pct=1 at the image's own short side: no resize, so the crop is the central window.
    rng = np.random.default_rng(1)
    pixels = rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
    out = center_crop_transforms(
        input_h=20, input_w=H, crop_pct=1.0, norm_mean=(0.0,) * 3, norm_std=(1.0,) * 3
    )(Image.fromarray(pixels))
    top, left = (H - 20) // 2, (W - H) // 2
    expected = torch.from_numpy(pixels[top : top + 20, left : left + H] / 255.0).permute(2, 0, 1)
    assert torch.allclose(out, expected.float(), atol=1e-6)


def test_train_is_random(image: Image.Image) -> None:
    transform = train_transforms(input_h=32, input_w=24)
    torch.manual_seed(0)
    outputs = [transform(image) for _ in range(4)]
    assert any(not torch.equal(outputs[0], other) for other in outputs[1:])


def test_train_full_crop_with_flip_is_mirror_image(image: Image.Image) -> None:
    # scale 1 and the image's own aspect ratio make the crop the whole image at its own size,
    # so the only change left is the (certain) horizontal flip.
    kwargs = {"input_h": H, "input_w": W, "scale": (1.0, 1.0), "ratio": (W / H, W / H)}
    flipped = train_transforms(p_hflip=1.0, norm_mean=(0.5,) * 3, norm_std=(0.5,) * 3, **kwargs)
    plain = train_transforms(p_hflip=0.0, norm_mean=(0.5,) * 3, norm_std=(0.5,) * 3, **kwargs)
    expected = normalized(image, 0.5, 0.5)
    assert torch.allclose(plain(image), expected, atol=1e-6)
    assert torch.allclose(flipped(image), torch.flip(expected, dims=(2,)), atol=1e-6)
    assert not torch.allclose(flipped(image), expected)


def test_interpolation_by_name() -> None:
    assert interpolation_mode("bicubic") is InterpolationMode.BICUBIC
    assert interpolation_mode("NEAREST") is InterpolationMode.NEAREST
    assert center_crop_transforms(interpolation="nearest").transforms[0].interpolation == (
        InterpolationMode.NEAREST
    )
    assert train_transforms(interpolation="bicubic").transforms[0].interpolation == (
        InterpolationMode.BICUBIC
    )


@pytest.mark.parametrize(
    "build",
    [
        lambda: interpolation_mode("cubic-ish"),
        lambda: train_transforms(interpolation="cubic-ish"),
        lambda: center_crop_transforms(interpolation="cubic-ish"),
    ],
)
def test_unknown_interpolation_lists_choices(build) -> None:
    with pytest.raises(ValueError, match="cubic-ish") as error:
        build()
    assert "bilinear" in str(error.value) and "bicubic" in str(error.value)


@pytest.mark.parametrize("crop_pct", [0.0, -0.5, 1.01, 2.0])
def test_crop_pct_out_of_range(crop_pct: float) -> None:
    with pytest.raises(ValueError, match="crop_pct"):
        center_crop_transforms(crop_pct=crop_pct)


def test_crop_pct_one_allowed(image: Image.Image) -> None:
    assert center_crop_transforms(input_h=16, input_w=16, crop_pct=1.0)(image).shape == (3, 16, 16)


def test_multiview_returns_each_view_of_the_same_image():
    from sesemi.transforms import MultiView, center_crop_transforms, strong_transforms

    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 48, 3), dtype=np.uint8))
    exact = center_crop_transforms(32, 32)
    views = MultiView([exact, strong_transforms(32, 32), exact])(image)
    assert len(views) == 3 and all(v.shape == (3, 32, 32) for v in views)
    assert torch.equal(views[0], views[2])  # deterministic view twice: identical
    assert not torch.equal(views[0], views[1])  # the strong view differs


def test_strong_transforms_cutout_erases_a_rectangle():
    from sesemi.transforms import strong_transforms

    image = Image.new("RGB", (48, 40), (200, 200, 200))
    t = strong_transforms(
        32, 32, recipe="timm", rand_augment="rand-m5-n1", cutout_p=1.0, cutout_scale=(0.1, 0.1)
    )
    out = t(image)
    erased = (out == 0).all(dim=0)  # cutout fills 0 after normalization, gray stays positive
    assert 0.05 * 32 * 32 <= erased.sum() <= 0.15 * 32 * 32


def test_strong_transforms_refuse_magnitude_zero():
    from sesemi.transforms import strong_transforms

    with pytest.raises(ValueError, match="magnitude"):
        strong_transforms(32, 32, recipe="timm", rand_augment="rand-m0-n1")


@pytest.mark.parametrize("make", [train_transforms, center_crop_transforms])
def test_uint8_output_is_the_float_output_before_normalization(make, image: Image.Image) -> None:
    torch.manual_seed(0)
    pixels = make(input_h=24, input_w=24, uint8_output=True)(image)
    torch.manual_seed(0)
    normalized = make(input_h=24, input_w=24, norm_mean=(0.5,) * 3, norm_std=(0.5,) * 3)(image)
    assert pixels.dtype == torch.uint8 and pixels.shape == (3, 24, 24)
    torch.testing.assert_close((pixels.float() / 255 - 0.5) / 0.5, normalized)


# FixMatch's RandAugment + cutout (sesemi.randaugment), the default strong recipe


def test_fixmatch_rand_augment_draws_from_the_papers_fourteen_operations():
    from sesemi.randaugment import OPS, FixMatchRandAugment

    assert set(OPS) == {
        "AutoContrast",
        "Brightness",
        "Color",
        "Contrast",
        "Equalize",
        "Identity",
        "Posterize",
        "Rotate",
        "Sharpness",
        "ShearX",
        "ShearY",
        "Solarize",
        "TranslateX",
        "TranslateY",
    }  # Identity in; timm's Invert and SolarizeAdd out
    assert FixMatchRandAugment().ops == list(OPS)
    assert (OPS["Rotate"][1:], OPS["Brightness"][1:], OPS["TranslateX"][1:]) == (
        (-30.0, 30.0),
        (0.05, 0.95),
        (-0.3, 0.3),
    )


def test_every_drawn_operation_is_applied_with_a_uniform_magnitude_in_its_range(monkeypatch):
    from sesemi import randaugment

    calls: list[tuple[str, float]] = []

    def recorder(name):
        return lambda image, v, fill: calls.append((name, v)) or image

    fake = {name: (recorder(name), low, high) for name, (_, low, high) in randaugment.OPS.items()}
    monkeypatch.setattr(randaugment, "OPS", fake)
    augment = randaugment.FixMatchRandAugment(num_ops=2)
    image = Image.new("RGB", (8, 8))
    torch.manual_seed(0)
    for _ in range(1000):
        augment(image)
    assert len(calls) == 2000  # always num_ops operations: none skipped with a probability
    rotations = [v for name, v in calls if name == "Rotate"]
    assert len(rotations) > 80 and min(rotations) >= -30 and max(rotations) <= 30
    assert min(rotations) < -25 and max(rotations) > 25  # spread over the whole range
    assert abs(sum(rotations) / len(rotations)) < 5  # uniform: centred on 0
    names = {name for name, _ in calls}
    assert names == set(fake)  # every operation gets drawn


def test_square_cutout_is_a_square_of_at_most_half_the_width():
    from sesemi.randaugment import SquareCutout

    cutout = SquareCutout(0.5, value=-1.0)
    torch.manual_seed(0)
    sides = []
    for _ in range(300):
        out = cutout(torch.zeros(3, 40, 40))
        mask = (out == -1.0).all(dim=0)
        rows, cols = mask.any(dim=1).sum().item(), mask.any(dim=0).sum().item()
        assert mask.sum() == rows * cols  # one axis-aligned rectangle
        if (
            0 < rows < 20
            and 0 < cols < 20
            and 0 < mask.nonzero().min()
            and mask.nonzero().max() < 39
        ):
            assert abs(rows - cols) <= 1  # away from the border, a square
        sides.append(max(rows, cols))
    assert max(sides) <= 20 and max(sides) >= 18  # up to half of 40 px


def test_strong_transforms_default_to_the_fixmatch_recipe():
    from sesemi.randaugment import FixMatchRandAugment, SquareCutout
    from sesemi.transforms import strong_transforms

    steps = strong_transforms(32, 32).transforms
    assert any(isinstance(t, FixMatchRandAugment) for t in steps)
    assert isinstance(steps[-1], SquareCutout) and steps[-1].max_size == 0.5
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 48, 3), dtype=np.uint8))
    assert strong_transforms(32, 32)(image).shape == (3, 32, 32)
    with pytest.raises(ValueError, match="recipe"):
        strong_transforms(32, 32, recipe="autoaugment")
