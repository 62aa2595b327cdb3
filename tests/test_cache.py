"""The pre-resized image cache (`cache_dir` of `image_folder`): pixels, reuse, rebuilds, errors."""

from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_image_folder, smooth_image
from PIL import Image
from torch.utils.data import DataLoader

from sesemi.datasets import dataset
from sesemi.datasets import image_folder as image_folder_module
from sesemi.datasets.cache import capped_size
from sesemi.datasets.image_folder import ImageReadError, load_image
from sesemi.transforms import center_crop_transforms, train_transforms


@pytest.fixture
def decodes(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The paths the cache builder decodes, in the order it asks for them."""
    calls: list[str] = []
    real = image_folder_module.load_image

    def counting(path: str, decode_size: int | None = None) -> Image.Image:
        calls.append(os.path.basename(path))
        return real(path, decode_size)

    monkeypatch.setattr(image_folder_module, "load_image", counting)
    return calls


def _cached(root: Path, cache: Path, **kwargs):
    kwargs.setdefault("subset", "train")
    return dataset("image_folder", str(root), cache_dir=str(cache), **kwargs)


def _pixels(image: Image.Image | torch.Tensor) -> np.ndarray:
    if isinstance(image, torch.Tensor):
        return image.permute(1, 2, 0).numpy()
    return np.asarray(image)


@pytest.mark.parametrize(
    "size, cap, expected",
    [
        ((1200, 900), 256, (341, 256)),  # landscape: the height is the short side
        ((900, 1200), 256, (256, 341)),  # portrait
        ((300, 256), 256, (300, 256)),  # already at the cap
        ((48, 40), 256, (48, 40)),  # smaller: never enlarged
    ],
)
def test_capped_size_caps_the_short_side_and_keeps_the_aspect(size, cap, expected) -> None:
    assert capped_size(*size, cap) == expected


def test_cached_pixels_are_the_resized_decode_of_the_original(tmp_path: Path) -> None:
    folder = tmp_path / "data" / "train" / "cat"
    folder.mkdir(parents=True)
    smooth_image(120, 90).save(folder / "wide.png")
    smooth_image(60, 100, seed=1).save(folder / "tall.png")
    data = _cached(tmp_path / "data", tmp_path / "cache", cache_size=48)
    for (image, _), name, size in zip(data, ("tall", "wide"), ((48, 80), (64, 48)), strict=True):
        assert image.size == size
        original = load_image(str(folder / f"{name}.png"))
        expected = original.resize(size, Image.Resampling.BICUBIC)
        assert np.array_equal(np.asarray(image), np.asarray(expected))


def test_large_jpeg_is_draft_decoded_but_matches_a_full_decode(tmp_path: Path) -> None:
    folder = tmp_path / "data" / "train" / "cat"
    folder.mkdir(parents=True)
    smooth_image(1200, 900).save(folder / "big.jpg", quality=90)
    image, _ = _cached(tmp_path / "data", tmp_path / "cache", cache_size=100)[0]
    assert image.size == (133, 100)
    full = load_image(str(folder / "big.jpg")).resize(image.size, Image.Resampling.BICUBIC)
    difference = np.abs(np.asarray(image, np.float32) - np.asarray(full, np.float32))
    assert difference.mean() < 1.5


def test_small_images_are_stored_unchanged(image_root: Path, tmp_path: Path) -> None:
    plain = dataset("image_folder", str(image_root), subset="train")
    cached = _cached(image_root, tmp_path / "cache", cache_size=256)
    for (a, _), (b, _) in zip(plain, cached, strict=True):
        assert b.size == a.size == (48, 40)
        assert np.array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("subset", ["train", ["train", "val"], None])
def test_targets_and_classes_equal_the_uncached_dataset(image_root, tmp_path, subset) -> None:
    plain = dataset("image_folder", str(image_root), subset=subset)
    cached = _cached(image_root, tmp_path / "cache", subset=subset)
    assert cached.classes == plain.classes == ["cat", "dog"]
    assert cached.targets == plain.targets
    assert [t for _, t in cached] == [t for _, t in plain]
    assert np.array_equal(np.asarray(cached[len(cached) - 1][0]), np.asarray(plain[-1][0]))


def test_unlabeled_folder_is_cached_with_target_minus_one(tmp_path: Path) -> None:
    make_image_folder(tmp_path / "data", {"train": 2})
    (tmp_path / "data" / "unlabeled").mkdir()
    smooth_image(30, 20).save(tmp_path / "data" / "unlabeled" / "a.png")
    data = _cached(tmp_path / "data", tmp_path / "cache", subset=["train", "unlabeled"])
    assert data.targets == [0, 0, 1, 1, -1]
    assert data[4][0].size == (30, 20)


def test_a_second_build_reuses_the_cache_without_decoding(image_root, tmp_path, decodes) -> None:
    first = _cached(image_root, tmp_path / "cache")
    assert len(decodes) == len(first) == 16
    second = _cached(image_root, tmp_path / "cache")
    assert len(decodes) == 16  # nothing decoded again
    assert np.array_equal(np.asarray(first[5][0]), np.asarray(second[5][0]))


def test_a_changed_folder_rebuilds_decoding_only_new_and_modified_files(
    image_root: Path, tmp_path: Path, decodes: list[str]
) -> None:
    _cached(image_root, tmp_path / "cache")
    decodes.clear()
    modified = image_root / "train" / "cat" / "003.png"
    Image.new("RGB", (48, 40), (1, 2, 3)).save(modified)
    os.utime(modified, ns=(1, 1))  # a different mtime even on coarse-mtime filesystems
    Image.new("RGB", (30, 30), (9, 9, 9)).save(image_root / "train" / "dog" / "new.png")
    data = _cached(image_root, tmp_path / "cache")
    assert sorted(decodes) == ["003.png", "new.png"]
    assert len(data) == 17
    assert np.asarray(data[3][0]).reshape(-1, 3).tolist()[0] == [1, 2, 3]
    assert data[16][0].size == (30, 30) and data.targets[16] == 1
    assert len(list((tmp_path / "cache").glob("*.pixels"))) == 1  # the old pixel file is gone


def test_a_removed_file_rebuilds_without_decoding(image_root, tmp_path, decodes) -> None:
    plain_before = dataset("image_folder", str(image_root), subset="train")
    _cached(image_root, tmp_path / "cache")
    decodes.clear()
    (image_root / "train" / "cat" / "000.png").unlink()
    data = _cached(image_root, tmp_path / "cache")
    assert decodes == []
    assert len(data) == 15
    assert np.array_equal(np.asarray(data[0][0]), np.asarray(plain_before[1][0]))


def test_an_interrupted_build_leaves_no_valid_looking_cache(
    image_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = image_folder_module.load_image
    calls = []

    def interrupted(path: str, decode_size: int | None = None) -> Image.Image:
        calls.append(path)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return real(path, decode_size)

    monkeypatch.setattr(image_folder_module, "load_image", interrupted)
    with pytest.raises(KeyboardInterrupt):
        _cached(image_root, tmp_path / "cache")
    assert [p.suffix for p in (tmp_path / "cache").iterdir()] == [".lock"]  # nothing else
    monkeypatch.setattr(image_folder_module, "load_image", real)
    assert len(_cached(image_root, tmp_path / "cache")) == 16


_KILLED_BUILD = """
import sys, time
from sesemi.datasets import dataset, image_folder

real = image_folder.load_image
image_folder.load_image = lambda path, size=None: time.sleep(0.3) or real(path, size)
dataset("image_folder", sys.argv[1], subset="train", cache_dir=sys.argv[2])
"""


def test_a_build_killed_by_sigkill_leaves_no_manifest_and_its_leftovers_are_removed(
    image_root: Path, tmp_path: Path, decodes: list[str]
) -> None:
    cache = tmp_path / "cache"
    args = [sys.executable, "-c", _KILLED_BUILD, str(image_root), str(cache)]
    process = subprocess.Popen(args, cwd=Path(__file__).parents[1])
    deadline = time.monotonic() + 300  # generous: a loaded machine imports torch slowly
    while not list(cache.glob("*.pixels.tmp")) and time.monotonic() < deadline:
        assert process.poll() is None, "the build ended before it could be killed"
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert list(cache.glob("*.pixels.tmp")) and not list(cache.glob("*.json"))
    data = _cached(image_root, cache)
    assert len(decodes) == len(data) == 16
    assert not list(cache.glob("*.tmp")) and len(list(cache.glob("*.pixels"))) == 1


def test_a_truncated_pixel_file_is_rebuilt(image_root, tmp_path, decodes) -> None:
    _cached(image_root, tmp_path / "cache")
    (pixels,) = (tmp_path / "cache").glob("*.pixels")
    with open(pixels, "r+b") as f:
        f.truncate(100)
    decodes.clear()
    data = _cached(image_root, tmp_path / "cache")
    assert len(decodes) == 16
    assert data[15][0].size == (48, 40)


def test_a_dataloader_with_two_workers_reads_the_cache(image_root: Path, tmp_path: Path) -> None:
    transform = center_crop_transforms(input_h=32, input_w=32, crop_pct=1.0)
    data = _cached(image_root, tmp_path / "cache", image_transform=transform)
    expected = torch.stack([image for image, _ in data])
    loader = DataLoader(data, batch_size=4, num_workers=2)
    images, targets = zip(*loader, strict=True)
    assert torch.equal(torch.cat(images), expected)
    assert torch.cat(targets).tolist() == data.targets


def test_pickling_drops_the_memory_map_and_a_copy_reopens_it(image_root, tmp_path) -> None:
    data = _cached(image_root, tmp_path / "cache")
    state = pickle.dumps(data)
    assert len(state) < 20_000  # file names and offsets, not 16 images of pixels
    copy = pickle.loads(state)
    assert copy.cache._buffer is None
    assert np.array_equal(np.asarray(copy[7][0]), np.asarray(data[7][0]))


def test_tensor_output_feeds_the_v2_transforms(image_root: Path, tmp_path: Path) -> None:
    pil = _cached(image_root, tmp_path / "cache")
    tensors = _cached(image_root, tmp_path / "cache", cache_output="tensor")
    image, _ = tensors[2]
    assert image.dtype == torch.uint8 and image.shape == (3, 40, 48)
    assert np.array_equal(_pixels(image), np.asarray(pil[2][0]))
    image.zero_()  # a transform writing into its input leaves the cache untouched
    assert np.array_equal(_pixels(tensors[2][0]), np.asarray(pil[2][0]))
    trained = _cached(
        image_root,
        tmp_path / "cache",
        cache_output="tensor",
        image_transform=train_transforms(32, 32),
    )
    assert trained[0][0].shape == (3, 32, 32) and trained[0][0].dtype == torch.float32


def _corrupt(root: Path) -> Path:
    broken = root / "train" / "cat" / "002.png"
    broken.write_bytes(b"not a png")
    return broken


def test_an_unreadable_file_stops_the_build_naming_it(image_root: Path, tmp_path: Path) -> None:
    _corrupt(image_root)
    with pytest.raises(ImageReadError, match="002.png.*skip_unreadable"):
        _cached(image_root, tmp_path / "cache")


def test_with_skip_unreadable_it_is_left_out_and_counted(image_root, tmp_path, decodes) -> None:
    _corrupt(image_root)
    with pytest.raises(ImageReadError):
        _cached(image_root, tmp_path / "cache")
    decodes.clear()
    data = _cached(image_root, tmp_path / "cache", skip_unreadable=True)
    assert decodes == []  # the failed build was kept, unreadable file included
    assert len(data) == 15 and data.skipped == 1
    plain = dataset("image_folder", str(image_root), subset="train")
    assert data.targets == plain.targets[:2] + plain.targets[3:]
    both = _cached(image_root, tmp_path / "cache", subset=["train", "val"], skip_unreadable=True)
    assert len(both) == 23 and both.skipped == 1


def test_a_hidden_cache_dir_inside_the_dataset_root_is_not_taken_for_a_subset(image_root) -> None:
    dataset("image_folder", str(image_root), cache_dir=str(image_root / ".cache"))
    again = dataset("image_folder", str(image_root), cache_dir=str(image_root / ".cache"))
    assert len(again) == 24  # train and val; the cache folder is no subset


def test_a_relative_cache_dir_is_next_to_the_dataset_root(image_root: Path, monkeypatch) -> None:
    monkeypatch.chdir(image_root / "train")  # not the cwd
    dataset("image_folder", str(image_root), subset=["train", "val"], cache_dir="img_cache")
    manifests = sorted(p.name for p in (image_root.parent / "img_cache").glob("*.json"))
    assert [m.split("-")[0] for m in manifests] == ["train", "val"]  # one cache per folder


@pytest.mark.parametrize(
    "kwargs, key",
    [
        ({"cache_dir": True}, "cache_dir"),
        ({"cache_dir": ""}, "cache_dir"),
        ({"cache_dir": 5}, "cache_dir"),
        ({"cache_dir": "c", "cache_size": 0}, "cache_size"),
        ({"cache_dir": "c", "cache_size": 2.5}, "cache_size"),
        ({"cache_dir": "c", "cache_size": "256"}, "cache_size"),
        ({"cache_dir": "c", "cache_size": True}, "cache_size"),
        ({"cache_dir": "c", "cache_output": "numpy"}, "cache_output"),
        ({"cache_size": 256}, "cache_size is set but cache_dir"),
        ({"cache_output": "tensor"}, "cache_output is set but cache_dir"),
        ({"cache_dir": "c", "decode_size": 438}, "decode_size"),
        ({"cache_dir": "data/cache"}, "inside the dataset folder"),
    ],
)
def test_bad_cache_kwargs_name_the_key(image_root: Path, kwargs: dict, key: str) -> None:
    with pytest.raises(ValueError, match=key):
        dataset("image_folder", str(image_root), subset="train", **kwargs)
    assert not (image_root.parent / "c").exists()  # refused before anything was built
