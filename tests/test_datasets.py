"""The dataset registry and the built-in `image_folder` dataset."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from conftest import make_image_folder, write_images
from PIL import Image
from torch.utils.data import Dataset

from sesemi.datasets import _registry, dataset, list_datasets, register_dataset
from sesemi.transforms import center_crop_transforms


@contextlib.contextmanager
def restored_registry() -> Iterator[None]:
    """Undoes whatever is registered inside the block."""
    before = dict(_registry._BUILDERS)
    try:
        yield
    finally:
        _registry._BUILDERS.clear()
        _registry._BUILDERS.update(before)


@pytest.fixture
def clean_registry() -> Iterator[None]:
    """Removes whatever a test registers so the registry is the same for every other test."""
    with restored_registry():
        yield


def check_targets(ds) -> None:
    """Each sample's target is the index of the class folder it lies in."""
    for path, target in ds.samples:
        assert ds.classes[target] == Path(path).parent.name


# ---------------------------------------------------------------- subsets


def test_single_subset(image_root: Path) -> None:
    ds = dataset("image_folder", str(image_root), subset="train")
    assert len(ds) == 16
    assert ds.classes == ["cat", "dog"]
    assert ds.targets == [0] * 8 + [1] * 8
    check_targets(ds)
    assert all(Path(p).parent.parent.name == "train" for p, _ in ds.samples)
    image, target = ds[15]
    assert isinstance(image, Image.Image) and image.size == (48, 40) and target == 1


def test_subset_list_concatenates(image_root: Path) -> None:
    transform = center_crop_transforms(input_h=16, input_w=16)
    ds = dataset(
        "image_folder", str(image_root), subset=["train", "val"], image_transform=transform
    )
    assert len(ds) == 24
    assert ds.classes == ["cat", "dog"]
    assert ds.class_to_idx == {"cat": 0, "dog": 1}
    assert ds.targets == [0] * 8 + [1] * 8 + [0] * 4 + [1] * 4
    for d in ds.datasets:
        check_targets(d)
    image, target = ds[20]  # val/dog
    assert target == 1
    assert isinstance(image, torch.Tensor) and image.shape == (3, 16, 16)


def test_subset_none_uses_all_subfolders(image_root: Path) -> None:
    make_image_folder(image_root, {"extra": 2})
    ds = dataset("image_folder", str(image_root))
    assert len(ds) == 16 + 8 + 4  # train, val and extra
    assert ds.classes == ["cat", "dog"]
    assert sorted({Path(p).parent.parent.name for d in ds.datasets for p, _ in d.samples}) == [
        "extra",
        "train",
        "val",
    ]


def test_subset_none_on_class_folder_root(image_root: Path) -> None:
    ds = dataset("image_folder", str(image_root / "val"))
    assert len(ds) == 8
    assert ds.classes == ["cat", "dog"]
    check_targets(ds)


def test_loose_images_are_unlabeled(tmp_path: Path) -> None:
    write_images(tmp_path / "unlabeled", 5, seed=3)
    ds = dataset("image_folder", str(tmp_path / "unlabeled"))
    assert len(ds) == 5
    assert ds.targets == [-1] * 5
    assert ds.classes == []
    transform = center_crop_transforms(input_h=8, input_w=8)
    image, target = dataset("image_folder", str(tmp_path), "unlabeled", transform)[4]
    assert target == -1
    assert image.shape == (3, 8, 8)


def test_labeled_and_unlabeled_subsets_together(image_root: Path) -> None:
    write_images(image_root / "unlabeled", 3, seed=4)
    ds = dataset("image_folder", str(image_root), subset=["train", "unlabeled"])
    assert len(ds) == 19
    assert ds.classes == ["cat", "dog"]
    assert ds.targets == [0] * 8 + [1] * 8 + [-1] * 3
    assert ds[18][1] == -1


def test_an_optional_subset_is_read_where_it_exists_and_skipped_where_not(image_root) -> None:
    without = dataset("image_folder", str(image_root), subset=["train", "unlabeled?"])
    assert len(without) == 16 and without.classes == ["cat", "dog"]
    write_images(image_root / "unlabeled", 3, seed=4)
    with_it = dataset("image_folder", str(image_root), subset=["train", "unlabeled?"])
    assert len(with_it) == 19 and with_it.targets[-3:] == [-1, -1, -1]
    with pytest.raises(FileNotFoundError, match="none of the optional subsets"):
        dataset("image_folder", str(image_root), subset=["extra?"])
    with pytest.raises(FileNotFoundError, match="extra"):  # not optional: an error
        dataset("image_folder", str(image_root), subset=["train", "extra"])


# ---------------------------------------------------------------- errors


def test_missing_root(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match="nowhere"):
        dataset("image_folder", str(missing), subset="train")


def test_missing_subset_lists_subfolders(image_root: Path) -> None:
    with pytest.raises(FileNotFoundError) as error:
        dataset("image_folder", str(image_root), subset=["train", "test"])
    message = str(error.value)
    assert str(image_root / "test") in message
    assert "train, val" in message


def test_empty_class_folder_named(image_root: Path) -> None:
    (image_root / "train" / "bird").mkdir()
    (image_root / "train" / "bird" / "notes.txt").write_text("not an image")
    with pytest.raises(FileNotFoundError, match="bird"):
        dataset("image_folder", str(image_root), subset="train")


def test_subsets_with_different_classes(tmp_path: Path) -> None:
    root = make_image_folder(tmp_path / "d", {"train": 2})
    make_image_folder(root, {"val": 2}, classes=("cat", "bird"))
    with pytest.raises(ValueError) as error:
        dataset("image_folder", str(root), subset=["train", "val"])
    message = str(error.value)
    assert "bird" in message and "dog" in message
    assert "'train'" in message and "'val'" in message


def test_non_image_files_ignored(image_root: Path) -> None:
    for folder in (image_root, image_root / "train", image_root / "train" / "cat"):
        (folder / ".DS_Store").write_bytes(b"\x00\x01")
        (folder / "README.txt").write_text("notes")
    ds = dataset("image_folder", str(image_root), subset="train")
    assert len(ds) == 16
    assert ds.classes == ["cat", "dog"]
    assert all(p.endswith(".png") for p, _ in ds.samples)
    everything = dataset("image_folder", str(image_root))
    assert len(everything) == 24


def test_hidden_entries_ignored(image_root: Path) -> None:
    # A notebook's checkpoint folder is no class; macOS "._x.png" resource forks are no images.
    checkpoints = image_root / "train" / ".ipynb_checkpoints"
    write_images(checkpoints, 1, seed=9)
    (image_root / "train" / "cat" / "._000.png").write_bytes(b"\x00\x05\x16\x07")
    ds = dataset("image_folder", str(image_root), subset="train")
    assert ds.classes == ["cat", "dog"]
    assert len(ds) == 16
    assert not [p for p, _ in ds.samples if Path(p).name.startswith(".")]
    assert not [p for p, _ in ds.samples if ".ipynb_checkpoints" in p]
    ds[0]  # a real image, not the resource fork


def test_unexpected_kwargs_rejected(image_root: Path) -> None:
    with pytest.raises(TypeError, match="bogus"):
        dataset("image_folder", str(image_root), subset="train", bogus=1)


def test_building_opens_no_image(image_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_open(*args, **kwargs):
        raise AssertionError("an image was opened")

    monkeypatch.setattr(Image, "open", no_open)
    ds = dataset("image_folder", str(image_root), subset=["train", "val"])
    assert len(ds) == 24
    with pytest.raises(AssertionError, match="an image was opened"):
        ds[0]


# ---------------------------------------------------------------- registry


def test_unknown_name_lists_registered(image_root: Path) -> None:
    assert "image_folder" in list_datasets()
    with pytest.raises(KeyError, match="image_folder") as error:
        dataset("imagefolder", str(image_root))
    assert "imagefolder" in str(error.value)


class _Recorded(Dataset):
    def __init__(self, **arguments) -> None:
        self.arguments = arguments

    def __len__(self) -> int:
        return 1

    def __getitem__(self, index: int):
        return self.arguments


def test_register_plain_decorator(clean_registry: None) -> None:
    @register_dataset
    def sesemi_test_plain(root, subset=None, image_transform=None, **kwargs):
        return _Recorded(root=root, subset=subset, image_transform=image_transform, **kwargs)

    assert callable(sesemi_test_plain)  # the decorator returns the function itself
    assert "sesemi_test_plain" in list_datasets()
    ds = dataset("sesemi_test_plain", "/some/root", subset="s", image_transform=abs, size=7)
    assert ds.arguments == {
        "root": "/some/root",
        "subset": "s",
        "image_transform": abs,
        "size": 7,
    }


def test_register_with_name(clean_registry: None) -> None:
    @register_dataset(name="sesemi_test_named")
    def builder(root, subset=None, image_transform=None, **kwargs):
        return _Recorded(root=root, **kwargs)

    assert "sesemi_test_named" in list_datasets()
    assert "builder" not in list_datasets()
    assert dataset("sesemi_test_named", "r", flag=True).arguments == {"root": "r", "flag": True}


def test_duplicate_name_names_first_registration(clean_registry: None) -> None:
    @register_dataset(name="sesemi_test_dup")
    def first(root, subset=None, image_transform=None):
        return _Recorded(root=root)

    with pytest.raises(ValueError, match="sesemi_test_dup") as error:

        @register_dataset(name="sesemi_test_dup")
        def second(root, subset=None, image_transform=None):
            return _Recorded(root="second")

    assert __file__ in str(error.value)
    assert dataset("sesemi_test_dup", "r").arguments == {"root": "r"}  # the first one stays

    with pytest.raises(ValueError, match=r"image_folder\.py"):
        register_dataset(name="image_folder")(first)


def test_what_a_test_registers_is_removed_after_it() -> None:
    # Independent of test order: register inside the fixture's context, then look after it.
    before = list_datasets()
    with restored_registry():
        register_dataset(name="sesemi_test_temporary")(lambda root, **kw: _Recorded(root=root))
        assert "sesemi_test_temporary" in list_datasets()
    assert list_datasets() == before and "image_folder" in before
