"""Tests for building the scikit-learn digits image folder."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from PIL import Image
from sklearn.datasets import load_digits

import sesemi.datasets.digits as digits_module
from sesemi.datasets.digits import digit_to_image, main, prepare_digits

SPLITS = ("train", "unlabeled", "val")


@pytest.fixture(scope="module")
def digits():
    return load_digits()


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    return prepare_digits(tmp_path_factory.mktemp("built") / "digits")


def _indices(root, split, label=None):
    pattern = f"{label}/*.png" if label is not None else "*/*.png"
    return {int(path.stem) for path in (root / split).glob(pattern)}


def _listing(root):
    return sorted(str(path.relative_to(root)) for path in root.rglob("*") if path.is_file())


def test_counts_and_labels(built, digits):
    per_class = np.bincount(digits.target, minlength=10)
    for label in range(10):
        assert len(_indices(built, "train", label)) == 5
        n_val = len(_indices(built, "val", label))
        assert n_val == round(0.3 * per_class[label])
        assert len(_indices(built, "unlabeled", label)) == per_class[label] - 5 - n_val
        # Every image sits in the folder of its own sklearn label.
        for split in SPLITS:
            assert all(digits.target[i] == label for i in _indices(built, split, label))
    sizes = {split: len(_indices(built, split)) for split in SPLITS}
    assert sum(sizes.values()) == 1797
    assert sizes["train"] == 50
    assert abs(sizes["val"] / 1797 - 0.3) < 0.01
    manifest = json.loads((built / "sesemi_digits.json").read_text())
    assert manifest["counts"] == sizes
    assert manifest["params"]["labels_per_class"] == 5


def test_splits_are_disjoint_and_cover_everything(built):
    train, unlabeled, val = (_indices(built, split) for split in SPLITS)
    assert not train & unlabeled and not train & val and not unlabeled & val
    assert train | unlabeled | val == set(range(1797))


def test_pixels_match_the_sklearn_digit(built, digits):
    references = digits.images * 255.0 / 16.0
    for i in sorted(_indices(built, "train"))[:10]:
        image = Image.open(built / "train" / str(digits.target[i]) / f"{i:04d}.png")
        assert image.mode == "RGB" and image.size == (32, 32)
        pixels = np.asarray(image)
        assert np.array_equal(pixels[..., 0], pixels[..., 1])
        assert np.array_equal(pixels[..., 0], pixels[..., 2])
        assert np.array_equal(pixels, np.asarray(digit_to_image(digits.images[i], 32)))
        small = np.asarray(image.convert("L").resize((8, 8), Image.Resampling.BOX), float)
        candidates = [i] + [j for j in range(0, 1797, 97) if j != i]
        distances = [np.sum((small - references[j]) ** 2) for j in candidates]
        assert candidates[int(np.argmin(distances))] == i


def test_same_arguments_give_identical_trees(tmp_path, built):
    other = prepare_digits(tmp_path / "again")
    files = _listing(built)
    assert files == _listing(other)
    for name in files[::150] + ["sesemi_digits.json"]:
        assert (built / name).read_bytes() == (other / name).read_bytes()
    reseeded = prepare_digits(tmp_path / "reseeded", seed=1)
    assert _indices(reseeded, "train") != _indices(built, "train")


def test_second_call_is_a_no_op(built):
    before = {path: path.stat().st_mtime_ns for path in built.rglob("*") if path.is_file()}
    assert prepare_digits(built) == built
    after = {path: path.stat().st_mtime_ns for path in built.rglob("*") if path.is_file()}
    assert before == after
    assert not list(built.parent.glob("*.tmp-*"))


def test_existing_folder_with_other_parameters_is_refused(built):
    with pytest.raises(FileExistsError, match=re.escape(str(built))):
        prepare_digits(built, labels_per_class=3)
    with pytest.raises(FileExistsError, match=re.escape(str(built))):
        prepare_digits(built, image_size=16)


def test_foreign_folder_is_never_overwritten(tmp_path):
    root = tmp_path / "mine"
    root.mkdir()
    (root / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match=re.escape(str(root))):
        prepare_digits(root)
    assert (root / "notes.txt").read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]


def test_incomplete_build_is_reported(tmp_path):
    root = prepare_digits(tmp_path / "digits", labels_per_class=1, image_size=8)
    next((root / "unlabeled").glob("*/*.png")).unlink()
    with pytest.raises(FileExistsError, match="incomplete"):
        prepare_digits(root, labels_per_class=1, image_size=8)


def test_interrupted_build_leaves_nothing_behind(tmp_path, monkeypatch):
    calls = []

    def failing(pixels, image_size):
        calls.append(1)
        if len(calls) > 100:
            raise KeyboardInterrupt
        return digit_to_image(pixels, image_size)

    monkeypatch.setattr(digits_module, "digit_to_image", failing)
    with pytest.raises(KeyboardInterrupt):
        prepare_digits(tmp_path / "digits", image_size=8)
    assert list(tmp_path.iterdir()) == []


def test_empty_existing_folder_is_filled(tmp_path):
    root = tmp_path / "empty"
    root.mkdir()
    prepare_digits(root, labels_per_class=2, image_size=8)
    assert len(_indices(root, "train")) == 20


@pytest.mark.parametrize(
    "kwargs",
    [
        {"labels_per_class": 0},
        {"labels_per_class": 150},
        {"val_fraction": 0.0},
        {"val_fraction": 1.0},
        {"image_size": 4},
    ],
)
def test_bad_arguments_raise_value_error(tmp_path, kwargs):
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        prepare_digits(tmp_path / "digits", **kwargs)
    assert list(tmp_path.iterdir()) == []


def test_main_prints_summary(tmp_path, capsys):
    root = tmp_path / "cli"
    argv = ["--root", str(root), "--labels-per-class", "3", "--image-size", "8", "--seed", "7"]
    assert main(argv) == 0
    out = capsys.readouterr().out.strip()
    assert out.count("\n") == 0
    assert "30 train" in out and str(root.resolve()) in out
    assert len(_indices(root, "train")) == 30
    assert main(argv + ["--val-fraction", "0.2"]) == 1
    assert str(root) in capsys.readouterr().err
