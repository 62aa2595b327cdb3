"""Reduced-size JPEG decoding (`decode_size`): smaller decodes that keep the short side."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import smooth_image
from PIL import Image

from sesemi.datasets import dataset
from sesemi.datasets.image_folder import ImageReadError, load_image
from sesemi.transforms import train_transforms


@pytest.fixture
def big_jpeg(tmp_path: Path) -> Path:
    path = tmp_path / "big.jpg"
    smooth_image(1200, 900).save(path, quality=90)
    return path


def test_decode_size_reduces_a_large_jpeg_but_keeps_the_short_side(big_jpeg: Path) -> None:
    image = load_image(str(big_jpeg), decode_size=224)
    assert image.mode == "RGB"
    assert image.width < 1200 and image.height < 900
    assert min(image.size) >= 224
    # 900 // 224 = 4: the largest reduction (1/4) that keeps the short side >= 224.
    assert image.size == (300, 225)


def test_decode_size_keeps_the_aspect_ratio_and_content(big_jpeg: Path) -> None:
    full = load_image(str(big_jpeg))
    small = load_image(str(big_jpeg), decode_size=438)
    assert small.size == (600, 450)  # 1/2: 1/4 would give a short side of 225 < 438
    expected = np.asarray(full.resize(small.size, Image.Resampling.BOX), dtype=np.float32)
    assert np.abs(np.asarray(small, dtype=np.float32) - expected).mean() < 3


def test_without_decode_size_a_jpeg_is_decoded_at_full_size(big_jpeg: Path) -> None:
    assert load_image(str(big_jpeg)).size == (1200, 900)


def test_a_jpeg_below_twice_the_decode_size_is_decoded_at_full_size(tmp_path: Path) -> None:
    path = tmp_path / "small.jpg"
    smooth_image(500, 375).save(path, quality=90)
    assert load_image(str(path), decode_size=224).size == (500, 375)


def test_png_is_unaffected_by_decode_size(tmp_path: Path) -> None:
    path = tmp_path / "big.png"
    original = smooth_image(1200, 900)
    original.save(path)
    image = load_image(str(path), decode_size=224)
    assert image.size == (1200, 900)
    assert np.array_equal(np.asarray(image), np.asarray(original))


def test_unreadable_file_still_raises_image_read_error_naming_it(tmp_path: Path) -> None:
    path = tmp_path / "broken.jpg"
    path.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    with pytest.raises(ImageReadError, match="broken.jpg"):
        load_image(str(path), decode_size=224)


def _jpeg_folder(root: Path) -> Path:
    for c, name in enumerate(("cat", "dog")):
        folder = root / "train" / name
        folder.mkdir(parents=True)
        for i in range(2):
            smooth_image(1200, 900, seed=10 * c + i).save(folder / f"{i}.jpg", quality=90)
    (root / "unlabeled").mkdir()
    smooth_image(1000, 1000, seed=99).save(root / "unlabeled" / "0.jpg", quality=90)
    return root


def test_image_folder_threads_decode_size_to_every_image(tmp_path: Path) -> None:
    root = _jpeg_folder(tmp_path / "data")
    full = dataset("image_folder", str(root), subset="train")
    small = dataset("image_folder", str(root), subset="train", decode_size=224)
    assert full[0][0].size == (1200, 900)
    assert small[0][0].size == (300, 225)
    assert [t for _, t in small] == [t for _, t in full] == [0, 0, 1, 1]
    unlabeled = dataset("image_folder", str(root), subset="unlabeled", decode_size=224)
    assert unlabeled[0][0].size == (250, 250)
    assert unlabeled[0][1] == -1


def test_train_transforms_output_shape_is_the_same_with_or_without_decode_size(
    tmp_path: Path,
) -> None:
    root = _jpeg_folder(tmp_path / "data")
    shapes = set()
    for decode_size in (None, 438, 224):
        data = dataset(
            "image_folder",
            str(root),
            subset="train",
            image_transform=train_transforms(),
            decode_size=decode_size,
        )
        for image, _ in data:
            assert image.dtype == torch.float32
            shapes.add(tuple(image.shape))
    assert shapes == {(3, 224, 224)}


@pytest.mark.parametrize("bad", [0, -5, 2.5, "438", True])
def test_invalid_decode_size_is_refused(tmp_path: Path, bad: object) -> None:
    root = _jpeg_folder(tmp_path / "data")
    with pytest.raises(ValueError, match="decode_size"):
        dataset("image_folder", str(root), subset="train", decode_size=bad)
