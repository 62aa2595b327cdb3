"""Hostile and careless input: each case fails in one line naming the problem (or is handled),
before training where it can, and leaves the user's files alone."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_image_folder, write_images
from PIL import Image

from sesemi.checkpoints import find_checkpoint
from sesemi.datasets import dataset
from sesemi.datasets.image_folder import SkipUnreadable
from sesemi.devices import plan_devices
from sesemi.schedulers.lr import PolynomialLR


@pytest.mark.parametrize("max_iters", [0, -3])
def test_a_schedule_of_no_steps_is_refused(max_iters):
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    with pytest.raises(ValueError, match="max_iters must be at least 1"):
        PolynomialLR(optimizer, max_iters=max_iters, warmup_iters=2)


def test_a_hidden_folder_inside_a_class_folder_is_not_read(image_root):
    hidden = image_root / "train" / "cat" / ".ipynb_checkpoints"
    write_images(hidden, 3, seed=9)
    ds = dataset("image_folder", str(image_root), "train")
    assert len(ds) == 16 and not any(".ipynb" in path for path, _ in ds.samples)


def test_a_symlink_loop_adds_nothing_and_two_loops_do_not_hang(image_root):
    cat = image_root / "train" / "cat"
    os.symlink(cat, cat / "again")  # a loop
    os.symlink(image_root / "train", cat / "up")  # a second one, through the parent
    ds = dataset("image_folder", str(image_root), "train")
    assert len(ds) == 16  # each real folder read once
    paths = [os.path.realpath(p) for p, _ in ds.samples]
    assert len(set(paths)) == len(paths) == 16


def test_unreadable_images_are_counted_once_however_many_epochs(image_root):
    broken = image_root / "train" / "cat" / "003.png"
    broken.write_bytes(b"not a png")
    ds = SkipUnreadable(dataset("image_folder", str(image_root), "train"))
    for _ in range(3):  # three epochs
        for i in range(len(ds)):
            ds[i]
    assert ds.skipped == 1


def test_a_last_training_batch_of_one_image_is_dropped_and_counted_out(tmp_path):
    from sesemi.data import LoaderSpec

    root = make_image_folder(tmp_path / "data", {"train": 5}, classes=("a", "b"))  # 10 images
    node = {"dataset": {"name": "image_folder", "subset": "train"}, "shuffle": True}
    spec = LoaderSpec("data.train.supervised", node, str(root), 3)
    assert spec.drops_last(world_size=1) and spec.batches_per_epoch(1) == 3  # 3+3+3, not +1
    assert spec.loader(world_size=1).drop_last and not spec.loader().drop_last
    assert not spec.drops_last(world_size=1, training=False)  # evaluation keeps every image
    assert not LoaderSpec("x", node, str(root), 4).drops_last(1)  # 4+4+2: fine
    # Under DDP each of 3 processes gets ceil(10 / 3) = 4 images: 3 + 1 drops, 2 + 2 does not.
    assert spec.drops_last(world_size=3) and spec.batches_per_epoch(3) == 1
    assert not LoaderSpec("x", node, str(root), 2).drops_last(world_size=3)


def test_a_run_id_with_glob_characters_is_matched_literally(tmp_path):
    last = tmp_path / "runs" / "exp[1]" / "2026-01-01_00-00-00" / "checkpoints" / "last.ckpt"
    last.parent.mkdir(parents=True)
    torch.save({"state_dict": {}}, last)
    found = find_checkpoint("last", "resume_from_checkpoint", str(tmp_path / "runs"), "exp[1]")
    assert Path(found) == last


def test_asking_for_gpus_on_a_machine_without_any_is_an_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    with pytest.raises(ValueError, match="run.gpus=5 asks for GPUs but this machine has none"):
        plan_devices(5)
    with pytest.raises(ValueError, match="run.gpus=0"):
        plan_devices("0,1")
    assert plan_devices(-1).accelerator == "cpu"  # "every GPU there is": the CPU, with a warning


def test_export_without_onnx_names_the_extra_to_install(monkeypatch, tmp_path, capsys):
    from sesemi import commands

    monkeypatch.setitem(sys.modules, "onnx", None)  # as if it were not installed
    monkeypatch.setattr(commands, "_load", lambda args: object())
    with pytest.raises(SystemExit) as stop:
        commands.main(["export", "x.ckpt", "-o", str(tmp_path / "m.onnx")])
    err = capsys.readouterr().err
    assert stop.value.code == 1 and err.count("\n") == 1 and "sesemi[export]" in err
    assert not (tmp_path / "m.onnx").exists()


def test_sixteen_bit_and_float_images_keep_their_range(tmp_path):
    from sesemi.datasets.image_folder import load_image

    ramp = np.tile(np.linspace(0, 65535, 64).astype(np.uint16), (8, 1))
    Image.fromarray(ramp).save(tmp_path / "deep.png")
    pixels = np.asarray(load_image(str(tmp_path / "deep.png")))[..., 0]
    assert (pixels == 255).mean() < 0.05 and pixels.min() == 0 and pixels.max() == 255
    assert abs(int(pixels[0, 32]) - round(ramp[0, 32] / 257)) <= 1  # scaled, not clipped
    unit = np.tile(np.linspace(0.0, 1.0, 64, dtype=np.float32), (8, 1))
    Image.fromarray(unit).save(tmp_path / "float.tiff")
    pixels = np.asarray(load_image(str(tmp_path / "float.tiff")))[..., 0]
    assert pixels.min() == 0 and pixels.max() == 255 and 100 < pixels.mean() < 155


def test_an_image_over_pillows_pixel_limit_is_an_unreadable_image_like_any_other(
    image_root, monkeypatch
):
    from sesemi.datasets.image_folder import ImageReadError, load_image

    big = image_root / "train" / "cat" / "000.png"
    Image.new("RGB", (200, 200)).save(big)  # 40,000 px; the others have 1,920
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10_000)  # over twice the limit: an error
    with pytest.raises(ImageReadError, match="000.png.*MAX_IMAGE_PIXELS"):
        load_image(str(big))
    ds = SkipUnreadable(dataset("image_folder", str(image_root), "train"))
    assert ds[0][1] == 0 and ds.skipped == 1  # skipped and counted; the next image served


def test_an_unreadable_class_folder_is_named_as_unreadable(image_root, monkeypatch):
    locked = str(image_root / "train" / "dog")
    scandir = os.scandir

    def refusing(path="."):
        if os.fspath(path) == locked:
            raise PermissionError(13, "Permission denied", locked)
        return scandir(path)

    monkeypatch.setattr(os, "scandir", refusing)
    with pytest.raises(PermissionError, match="cannot read the folder .*dog.*Permission denied"):
        dataset("image_folder", str(image_root), "train")


def test_class_lists_that_differ_are_named_before_any_class_count(tmp_path, monkeypatch):
    import sesemi
    from sesemi.errors import one_line

    root = make_image_folder(tmp_path / "data", {"train": 4}, classes=("cat", "dog"))
    make_image_folder(root, {"val": 2}, classes=("cat", "dog", "fox"))
    monkeypatch.chdir(tmp_path)
    for num_classes in ("${sesemi:num_classes}", "3", "2"):  # whatever the count says
        cfg = sesemi.compose(
            "base",
            [f"run.data_root={root}", f"run.dir={tmp_path}/runs", "run.gpus=0",
             "run.batch_size_per_gpu=2",
             "data.image_size=32", f"data.num_classes={num_classes}",
             "learner.hparams.model.backbone.name=test_resnet"],
        )  # fmt: skip
        with pytest.raises(ValueError) as error:
            sesemi.fit(cfg)
        message = one_line(error.value)
        assert "different class folders" in message and "only in data.val: fox" in message


def test_resuming_from_a_truncated_or_foreign_checkpoint_is_one_line(experiment, monkeypatch):
    import sesemi
    from sesemi.errors import USER_ERRORS, one_line

    monkeypatch.chdir(experiment)
    configs = experiment / "configs"
    first = sesemi.fit(sesemi.compose("custom", ["run.num_epochs=1"], config_dir=configs))
    truncated = experiment / "truncated.ckpt"
    truncated.write_bytes(Path(first.last_checkpoint).read_bytes()[:5000])
    for n, (path, expected) in enumerate(
        [
            (truncated, "is not a PyTorch checkpoint"),
            (first.last_checkpoint, "written by another model than this config builds"),
        ]
    ):
        other = ["learner.hparams.model.backbone.name=test_efficientnet"]  # another model
        # A run.id of its own: within the first run's second, its timestamped folder is taken.
        other.append(f"run.id=resume{n}")
        cfg = sesemi.compose("custom", [f"run.resume_from_checkpoint={path}", *other], configs)
        with pytest.raises(USER_ERRORS) as error:
            sesemi.fit(cfg)
        assert expected in one_line(error.value) and os.path.basename(str(path)) in one_line(
            error.value
        )


def test_the_summary_lists_only_checkpoints_that_still_exist(tmp_path):
    from sesemi.config.structs import RunMode
    from sesemi.runner import RunResult, _existing, format_summary

    kept = tmp_path / "last.ckpt"
    kept.write_bytes(b"x")
    assert _existing(str(kept)) == str(kept) and _existing(str(tmp_path / "gone.ckpt")) is None
    summary = format_summary(RunResult(RunMode.FIT, str(tmp_path), {"val/top1": 0.5}))
    assert "ckpt" not in summary and "predict:" not in summary
