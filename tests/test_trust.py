"""Hostile and careless input: each case fails in one line naming the problem (or is handled),
before training where it can, and leaves the user's files alone."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch
from conftest import make_image_folder, write_images

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
