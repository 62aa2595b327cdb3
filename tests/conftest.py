"""Shared fixtures: tiny synthetic image folders and a small experiment config, all in tmp_path."""

from __future__ import annotations

import glob
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

# The spec's experiment layout (`defaults: [base]`) made tiny: a 2-class folder at 32 px, the test
# model, one epoch of batches of 4 on the CPU.
TINY_CONFIG = """\
defaults:
  - base
  - _self_
run:
  seed: 0
  gpus: 0
  num_epochs: 1
  id: tiny
  data_root: {data_root}
  dir: {runs}
  batch_size_per_gpu: 4
data:
  image_size: 32
  test:
    batch_size: 4
    dataset:
      name: image_folder
      subset: val
      image_transform: ${{data.transforms.eval}}
learner:
  hparams:
    model:
      backbone:
        name: test_resnet
    lr_scheduler:
      scheduler:
        warmup_epochs: 0
"""

# Overrides that make any built-in config (demo, imagewoof, ...) train a few CPU steps quickly.
FAST = [
    "run.num_epochs=null",
    "run.num_iterations=2",
    "run.batch_size_per_gpu=4",
    "learner.hparams.model.backbone.name=test_resnet",
    "++trainer.val_check_interval=2",
    "++trainer.check_val_every_n_epoch=null",
    "++trainer.limit_val_batches=1",
    "++trainer.num_sanity_val_steps=0",
    "++trainer.enable_progress_bar=false",
    "++trainer.enable_model_summary=false",
    "++trainer.log_every_n_steps=1",
]


def free_port() -> int:
    """A free TCP port on localhost, for a test's process group."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class IdentityFeatures(torch.nn.Module):
    """A stub backbone for head tests: the images are their features (x * 1, with a parameter
    for gradients); `out_features` 3."""

    out_features = 3

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.tensor(1.0))

    def forward(self, x):
        return x * self.weight


def smooth_image(width: int, height: int, seed: int = 0) -> Image.Image:
    """Gradients plus mild noise: a photograph-like image that JPEG and resampling treat
    as they treat real photographs."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    pixels = np.stack([x / width * 255, y / height * 255, (x + y) / (width + height) * 255], -1)
    pixels += rng.normal(0, 8, pixels.shape)
    return Image.fromarray(pixels.clip(0, 255).astype(np.uint8))


def write_images(folder: Path, count: int, seed: int, bright_left: bool = False) -> None:
    """Writes `count` random 40x48 RGB PNGs; `bright_left` whitens the left half (a cue)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        pixels = rng.integers(0, 200, (40, 48, 3), dtype=np.uint8)
        if bright_left:
            pixels[:, :24] = 255
        Image.fromarray(pixels).save(folder / f"{i:03d}.png")


def make_image_folder(
    root: Path,
    splits: dict[str, int] | None = None,
    classes: tuple[str, ...] = ("cat", "dog"),
) -> Path:
    """Makes `root/<split>/<class>/NNN.png` with `splits[split]` images per class."""
    splits = splits or {"train": 8, "val": 4}
    for s, (split, count) in enumerate(splits.items()):
        for c, name in enumerate(classes):
            write_images(root / split / name, count, seed=100 * s + c, bright_left=(c == 1))
    return root


def train_tiny_run(root: Path, splits: dict[str, int] | None = None) -> dict[str, Path]:
    """Trains TINY_CONFIG (two classes, `make_image_folder(root / "data", splits)`) from `root`
    with `open_sesemi -cd configs -cn custom`; returns the data folder and the last checkpoint."""
    data = make_image_folder(root / "data", splits)
    (root / "configs").mkdir()
    (root / "configs" / "custom.yaml").write_text(
        TINY_CONFIG.format(data_root=data, runs=root / "runs")
    )
    fit = open_sesemi("-cd", "configs", "-cn", "custom", cwd=root)
    assert fit.returncode == 0, fit.stderr[-3000:]
    (checkpoint,) = glob.glob(str(root / "runs" / "tiny" / "*" / "checkpoints" / "last.ckpt"))
    return {"data": data, "checkpoint": Path(checkpoint)}


def open_sesemi(
    *args: str, cwd: Path, timeout: int = 300, console_script: bool = False
) -> subprocess.CompletedProcess:
    """Runs `python -m sesemi ARGS` (or the installed `open_sesemi ARGS`) in `cwd`."""
    # One thread per process: tiny models gain nothing from more, and CI's 2 cores are shared.
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    env.pop("HYDRA_FULL_ERROR", None)
    command = (
        [str(Path(sys.executable).parent / "open_sesemi")]
        if console_script
        else [
            sys.executable,
            "-m",
            "sesemi",
        ]
    )
    return subprocess.run(
        [*command, *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def single_process_top1(run_dir: Path, data_root: Path) -> float:
    """The top-1 accuracy of `run_dir`'s last checkpoint on every image of `data_root/val`,
    evaluated here in one process (what a DDP run's reduced val/top1 must equal)."""
    import torch

    import sesemi
    from sesemi.datasets import dataset
    from sesemi.transforms import center_crop_transforms

    model = sesemi.load_classifier(Path(run_dir) / "checkpoints/last.ckpt")
    val = dataset("image_folder", data_root, "val", center_crop_transforms(32, 32))
    images = torch.stack([val[i][0] for i in range(len(val))])
    with torch.no_grad():
        predicted = model.net(images).argmax(dim=1)
    return (predicted == torch.tensor(val.targets)).float().mean().item()


@pytest.fixture
def image_root(tmp_path: Path) -> Path:
    """A two-class image folder with train (8 per class) and val (4 per class) subsets."""
    return make_image_folder(tmp_path / "data")


@pytest.fixture
def experiment(tmp_path: Path, image_root: Path) -> Path:
    """The spec's experiment layout: `configs/custom.yaml` (defaults: [base]) tuned to be tiny."""
    configs = tmp_path / "configs"
    configs.mkdir()
    text = TINY_CONFIG.format(data_root=image_root, runs=tmp_path / "runs")
    (configs / "custom.yaml").write_text(text)
    return tmp_path


@pytest.fixture(scope="session")
def digits_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo's digits folder (5 labels per class), written once per test session."""
    from sesemi.datasets.digits import prepare_digits

    return prepare_digits(tmp_path_factory.getbasetemp() / "sesemi_digits", labels_per_class=5)


@pytest.fixture
def one_thread():
    """In-process training on one thread (CI's 2 cores are shared; tiny models gain nothing)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _quiet_env(monkeypatch: pytest.MonkeyPatch) -> None:
    # Tests never touch a GPU or the network.
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # In-process runs keep the test's thread count (sesemi.threads respects OMP_NUM_THREADS).
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    os.environ.setdefault("PYTHONHASHSEED", "0")
