"""Measures training throughput (images/s) on one GPU, run as a user runs sesemi.

Usage:
    python benchmarks/gpu_throughput.py [--out benchmarks/results/gpu_throughput.md]
    python benchmarks/gpu_throughput.py --device cpu --model resnet18 --size 64 --steps 3 \
        --warmup-steps 1 --images-per-class 8 --rows full          # a CPU smoke run

Each row is one `python -m sesemi -cn base ...` run (a subprocess) of the base config's method,
supervised cross-entropy + rotation prediction, with a timm `resnet50` (pretrained false) at
224 px instead of base's ResNet-50-D, `--batch` images per loader (each rotation image appears in
its 4 quarter turns, so a step holds batch + 4 x batch images), `--warmup-steps` steps (the
`torch.compile` included) and then `--steps` timed steps; validation, the sanity check and the
progress bar are off. The data are the pre-resized uint8 image cache (`cache_dir`,
`cache_output: tensor`, `cache_size` 256 at 224 px) read by `uint8_output: true` transforms and
normalized on the device (`learner.hparams.input_normalization`), with sesemi's loader defaults
(on a GPU: the CPU cores minus one, at most 8, persistent workers per training loader, pinned
memory) unless `--workers N` sets them. The rows:

    full        bf16-mixed + torch.compile, cached uint8 data (the recipe of
                README's "Operations > Speed")
    no-compile  bf16-mixed + channels_last, no torch.compile
    bf16-nchw   no-compile with channels_last off: what channels_last adds under bf16
    fp32        no compile, fp32, NCHW (sesemi's GPU defaults), the same cached uint8 data
    constant    full with the training loaders replaced by one constant batch each (a real
                batch of the same loaders, drawn once, pinned, copied to the GPU every step):
                the model-only ceiling of this machine

channels_last is left to sesemi in the compiled rows: off on a GPU (torch.compile chooses the
convolutions' layout; a compiled channels-last model failed its first backward pass in PyTorch
2.11 on an H200), on for the CPU.

The script writes an image folder into `--workdir` (default: a temporary folder, removed at the
end unless `--keep`): `data/train/<class>/*.jpg` and `data/val/<class>/*.jpg`, `--classes` x
`--images-per-class` photo-like JPEGs of about 320x256 px made from random numbers (never
downloaded), builds their image cache once (timed, before any row) and writes a Lightning
callback, `src/timing.py`, that every row loads as `trainer.callbacks=[{_target_:
src.timing.Timing, ...}]` with the run's working directory = `--workdir` (the `src.` layout of
README's "Your own experiment"). The callback synchronizes the GPU at each training batch's start
and end and records, per step, the time from the previous batch's end (or the epoch's start) to
this batch's start (waiting on data: the loader, plus the copy to the device and the
normalization there, plus Lightning's between-step work) and the whole step; epoch-end hooks
(checkpoint saves) are left out and reported apart. After the run it writes a JSON with images/s
(images per step / mean step time), the mean step time, the data-wait share and the peak GPU
memory (`torch.cuda.max_memory_allocated`).

The table: row, images/s per GPU, s/step, data wait %, data wait % without each epoch's first
step (the small synthetic epochs restart the loaders often, which a long real epoch does
rarely), peak GPU memory and the warm-up's seconds (compilation), then the target line: at least
4,000 images/s on one H100 with the data path not the bottleneck (the full row within 5 % of the
constant-batch ceiling).

On a CPU (`--device cpu`, the default where CUDA is missing) the rows skip torch.compile unless
`--cpu-compile`, and the batch is 8; bf16 autocast there is emulated and slow: use it only for a
smoke run with small settings.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

REPO = Path(__file__).resolve().parents[1]
ROWS = ("full", "no-compile", "bf16-nchw", "fp32", "constant")
ROW_LABELS = {
    "full": "(a) full: bf16-mixed + compile, cache uint8",
    "no-compile": "(b) bf16-mixed + channels_last, no compile",
    "bf16-nchw": "(b') bf16-mixed, NCHW (channels_last off), no compile",
    "fp32": "(c) fp32, NCHW, no compile, cache uint8",
    "constant": "(d) full, constant batch (no loader): model-only ceiling",
}
TARGET_IMAGES_PER_S = 4000
CEILING_SHARE = 0.95  # the data path is "not the bottleneck" within 5 % of the ceiling

TIMING_MODULE = '''"""Per-step timing for benchmarks/gpu_throughput.py (which writes this file)."""

from __future__ import annotations

import itertools
import json
import os
import statistics
import time
from typing import Any

import pytorch_lightning as pl
import torch


def _sync(trainer: pl.Trainer) -> None:
    if trainer.strategy.root_device.type == "cuda":
        torch.cuda.synchronize()


def _images(batch: Any) -> int:
    """Images in a batch: the first tensor of each loader's `(images, targets, ...)`."""
    if isinstance(batch, dict):
        return sum(_images(v) for v in batch.values())
    if isinstance(batch, (list, tuple)) and batch and isinstance(batch[0], torch.Tensor):
        return int(batch[0].shape[0])
    return 0


def _pinned(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.pin_memory()
    if isinstance(value, (list, tuple)):
        return type(value)(_pinned(v) for v in value)
    if isinstance(value, dict):
        return {k: _pinned(v) for k, v in value.items()}
    return value


class ConstantBatches:
    """Stands in for a training loader: one batch, handed out `length` times per epoch."""

    def __init__(self, batch: Any, length: int) -> None:
        """Keeps the batch and the epoch length (that of the loader it replaces)."""
        self.batch, self.length = batch, length

    def __len__(self) -> int:
        """The number of batches per epoch."""
        return self.length

    def __iter__(self) -> Any:
        """The same batch, `length` times."""
        return itertools.repeat(self.batch, self.length)


class Timing(pl.Callback):
    """Times every training step and writes a summary of the steps after the warm-up."""

    def __init__(self, out: str, warmup_steps: int = 30, constant_batch: bool = False) -> None:
        """Initializes the callback.

        Args:
            out: The JSON file to write at the end of training.
            warmup_steps: Steps left out of the summary (compilation, allocator, cuDNN search).
            constant_batch: Replace every training loader by one of its batches, repeated.
        """
        self.out, self.warmup_steps, self.constant_batch = out, warmup_steps, constant_batch
        self.waits: list[float] = []
        self.steps: list[float] = []
        self.images: list[int] = []
        self.epoch_first: list[bool] = []
        self.seen = self.epochs = 0
        self.first_of_epoch = False
        self.mark = self.last_end = self.train_start = None
        self.boundary_s = 0.0
        self.warmup_s = None
        self.workers: dict[str, Any] = {}

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """With `constant_batch`, makes the data module hand out constant batches."""
        if not self.constant_batch or stage != "fit":
            return
        data = trainer.datamodule
        build = data.train_dataloader
        pin = trainer.strategy.root_device.type == "cuda"

        def constant() -> dict[str, ConstantBatches]:
            loaders = build()
            out = {}
            for name, loader in loaders.items():
                batch = next(iter(loader))
                out[name] = ConstantBatches(_pinned(batch) if pin else batch, len(loader))
            return out  # the real loaders (and their workers) go away here

        data.train_dataloader = constant

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Notes the loaders' worker counts and the start of training."""
        loaders = trainer.train_dataloader
        if isinstance(loaders, dict):
            self.workers = {n: getattr(dl, "num_workers", None) for n, dl in loaders.items()}
        if trainer.strategy.root_device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        _sync(trainer)
        self.train_start = time.perf_counter()

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Starts the clock of the epoch's first step (the loaders restart after this)."""
        _sync(trainer)
        self.mark = time.perf_counter()
        if self.last_end is not None:
            self.boundary_s += self.mark - self.last_end  # epoch-end hooks: checkpoints
        self.first_of_epoch = True
        self.epochs += 1

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        """The batch is on the device: the wait for it ends here."""
        _sync(trainer)
        self.batch_start = time.perf_counter()
        self.batch_images = _images(batch)

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        """Records the step (after the warm-up)."""
        _sync(trainer)
        now = time.perf_counter()
        self.seen += 1
        if self.seen > self.warmup_steps:
            self.waits.append(self.batch_start - self.mark)
            self.steps.append(now - self.mark)
            self.images.append(self.batch_images)
            self.epoch_first.append(self.first_of_epoch)
        elif self.seen == self.warmup_steps:
            self.warmup_s = now - self.train_start
        self.mark = self.last_end = now
        self.first_of_epoch = False

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Writes the summary JSON."""
        result: dict[str, Any] = {
            "timed_steps": len(self.steps),
            "warmup_steps": self.warmup_steps,
            "warmup_s": self.warmup_s,
            "epochs": self.epochs,
            "epoch_boundaries_s_excluded": self.boundary_s,
            "loader_workers": self.workers,
            "constant_batch": self.constant_batch,
            "device": str(trainer.strategy.root_device),
            "peak_gpu_memory_bytes": None,
        }
        if trainer.strategy.root_device.type == "cuda":
            result["peak_gpu_memory_bytes"] = torch.cuda.max_memory_allocated()
            result["gpu"] = torch.cuda.get_device_name(trainer.strategy.root_device)
        if self.steps:
            mean_step = statistics.fmean(self.steps)
            mean_images = statistics.fmean(self.images)
            later = [i for i, first in enumerate(self.epoch_first) if not first]
            later_steps = sum(self.steps[i] for i in later)
            result.update(
                images_per_step=mean_images,
                s_per_step=mean_step,
                median_s_per_step=statistics.median(self.steps),
                images_per_s=mean_images / mean_step,
                data_wait_share=sum(self.waits) / sum(self.steps),
                epoch_starts_timed=len(self.steps) - len(later),
                data_wait_share_without_epoch_starts=(
                    sum(self.waits[i] for i in later) / later_steps if later else None
                ),
                images_per_s_without_epoch_starts=(
                    sum(self.images[i] for i in later) / later_steps if later else None
                ),
            )
        os.makedirs(os.path.dirname(os.path.abspath(self.out)), exist_ok=True)
        with open(self.out + ".tmp", "w") as f:
            json.dump(result, f, indent=2)
        os.replace(self.out + ".tmp", self.out)
'''


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parses the command line.

    Args:
        argv: The arguments (default: `sys.argv[1:]`).

    Returns:
        The options, with `device`, `batch` and `rows` resolved.
    """
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", choices=("cuda", "cpu"), default=None)
    parser.add_argument("--model", default="resnet50", help="timm model name (resnet50)")
    parser.add_argument("--size", type=int, default=224, help="training crop in px (224)")
    parser.add_argument(
        "--batch", type=int, default=None, help="images per loader and step (64 on a GPU, 8 CPU)"
    )
    parser.add_argument("--steps", type=int, default=300, help="timed steps per row (300)")
    parser.add_argument("--warmup-steps", type=int, default=30, help="untimed steps first (30)")
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--images-per-class", type=int, default=200)
    parser.add_argument(
        "--val-per-class", type=int, default=None, help="val images (images-per-class / 10, >= 2)"
    )
    parser.add_argument(
        "--rows", default=",".join(ROWS), help=f"comma-separated rows out of {','.join(ROWS)}"
    )
    parser.add_argument(
        "--workers", type=int, default=None, help="workers per training loader (sesemi's default)"
    )
    parser.add_argument("--workdir", default=None, help="images, cache, runs (default: temp)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary workdir")
    parser.add_argument("--cpu-compile", action="store_true", help="compile on the CPU too")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an extra Hydra override for every row (repeatable)",
    )
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per row (1800)")
    parser.add_argument("--out", default=None, help="also write the results as markdown here")
    args = parser.parse_args(argv)
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = [r for r in rows if r not in ROWS]
    if unknown or not rows:
        parser.error(f"--rows: unknown row(s) {unknown}; choose from {','.join(ROWS)}")
    args.rows = rows
    if args.steps < 1 or args.warmup_steps < 0:
        parser.error("--steps must be >= 1 and --warmup-steps >= 0")
    import torch

    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
        if args.device == "cpu":
            print("note: no CUDA device found; measuring on the CPU (--device cpu)")
    elif args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device")
    if args.batch is None:
        args.batch = 64 if args.device == "cuda" else 8
    if args.val_per_class is None:
        args.val_per_class = max(2, args.images_per_class // 10)
    return args


def photo(rng: np.random.Generator, tint: np.ndarray, width: int, height: int) -> Image.Image:
    """A photo-like image: smooth colour fields, texture, a few soft shapes, sensor noise.

    Args:
        rng: The random generator.
        tint: The class's mean colour (3 values, 0-255), mixed into the background.
        width: The width in px.
        height: The height in px.

    Returns:
        An RGB image.
    """
    grid = rng.integers(0, 256, (int(rng.integers(2, 6)), int(rng.integers(2, 6)), 3))
    field = Image.fromarray(grid.astype(np.uint8)).resize((width, height), Image.BICUBIC)
    pixels = np.asarray(field, dtype=np.float32) * 0.6 + tint * 0.4
    texture = rng.normal(0, 1, (height // 6 + 1, width // 6 + 1)).astype(np.float32)
    texture = Image.fromarray(np.uint8(np.clip(texture * 40 + 128, 0, 255)))
    texture = np.asarray(texture.resize((width, height), Image.BILINEAR), np.float32) - 128
    pixels += texture[..., None] * rng.uniform(0.2, 0.6)
    image = Image.fromarray(np.uint8(np.clip(pixels, 0, 255)))
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(2, 6))):
        x, y = rng.integers(0, width), rng.integers(0, height)
        w, h = rng.integers(width // 10, width // 2), rng.integers(height // 10, height // 2)
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        box = (int(x - w // 2), int(y - h // 2), int(x + w // 2), int(y + h // 2))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=colour)
    image = image.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.5, 2.0))))
    noisy = np.asarray(image, np.float32) + rng.normal(0, 4, (height, width, 3))
    return Image.fromarray(np.uint8(np.clip(noisy, 0, 255)))


def make_folder(root: Path, classes: int, per_class: dict[str, int], seed: int = 0) -> bool:
    """Writes `root/<subset>/<class>/*.jpg` unless an identical folder is already there.

    Args:
        root: The dataset folder.
        classes: The number of class folders.
        per_class: Images per class for each subset ("train", "val").
        seed: The random seed.

    Returns:
        Whether the images were written (False: reused).
    """
    spec = {"classes": classes, "per_class": per_class, "seed": seed, "version": 1}
    marker = root.parent / "dataset.json"
    if marker.is_file() and json.loads(marker.read_text()) == spec and root.is_dir():
        return False
    shutil.rmtree(root, ignore_errors=True)
    marker.unlink(missing_ok=True)
    rng = np.random.default_rng(seed)
    tints = rng.integers(30, 226, (classes, 3)).astype(np.float32)
    for subset, count in per_class.items():
        for c in range(classes):
            folder = root / subset / f"class_{c:02d}"
            folder.mkdir(parents=True)
            for i in range(count):
                # About 320x256, one in four portrait; a little jitter, as photos vary.
                width, height = 320 + int(rng.integers(-16, 17)), 256 + int(rng.integers(-12, 13))
                if rng.random() < 0.25:
                    width, height = height, width
                image = photo(rng, tints[c], width, height)
                image.save(folder / f"{i:05d}.jpg", quality=90)
    marker.write_text(json.dumps(spec))
    return True


def cache_size_for(size: int) -> int:
    """The cached short side for a crop size: 256 at 224 px (ImageNet's resize), scaled."""
    return max(size, round(size * 256 / 224))


def build_caches(data: Path, cache_dir: Path, cache_size: int) -> float:
    """Builds (or finds) the image caches of train/ and val/ as the runs will; returns seconds.

    Args:
        data: The dataset folder (`run.data_root`).
        cache_dir: The cache folder (absolute).
        cache_size: The cached short side in px.
    """
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    from sesemi.datasets import dataset

    start = time.perf_counter()
    for subset in ("train", "val"):
        dataset(
            "image_folder",
            str(data),
            subset=subset,
            cache_dir=str(cache_dir),
            cache_size=cache_size,
            cache_output="tensor",
        )
    return time.perf_counter() - start


def quoted(text: str) -> str:
    """A Hydra override value, single-quoted (any path is safe in it)."""
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def row_overrides(row: str, args: argparse.Namespace, work: Path) -> tuple[list[str], list[str]]:
    """The `python -m sesemi -cn base` overrides of one row, and what the row skipped.

    Args:
        row: One of ROWS.
        args: The options.
        work: The workdir.

    Returns:
        The overrides, and notes on what was skipped (compile on a CPU).
    """
    cache = [
        f"+{node}.dataset.kwargs.{key}={value}"
        for node in ("data.train.supervised", "data.train.rotation_prediction", "data.val")
        for key, value in (
            ("cache_dir", quoted(str(work / "cache"))),
            ("cache_size", cache_size_for(args.size)),
            ("cache_output", "tensor"),
        )
    ]
    timing = (
        f"trainer.callbacks=[{{_target_:src.timing.Timing,"
        f"out:{quoted(str(work / 'results' / f'{row}.json'))},"
        f"warmup_steps:{args.warmup_steps},constant_batch:{str(row == 'constant').lower()}}}]"
    )
    overrides = [
        f"run.data_root={quoted(str(work / 'data'))}",
        f"run.dir={quoted(str(work / 'runs'))}",
        f"run.id={row}",
        "run.seed=0",
        f"run.gpus={1 if args.device == 'cuda' else 0}",
        "run.num_epochs=null",
        f"run.num_iterations={args.warmup_steps + args.steps}",
        f"run.batch_size_per_gpu={args.batch}",
        f"learner.hparams.model.backbone.name={args.model}",
        "learner.hparams.model.backbone.pretrained=false",
        f"data.image_size={args.size}",
        *cache,
        "+data.transforms.train.uint8_output=true",
        "+data.transforms.eval.uint8_output=true",
        "learner.hparams.input_normalization={mean:${data.norm_mean},std:${data.norm_std}}",
        "+trainer.enable_progress_bar=false",
        "+trainer.enable_model_summary=false",
        "+trainer.num_sanity_val_steps=0",
        "+trainer.check_val_every_n_epoch=1000000",  # validation off (no epoch reaches it)
        timing,
    ]
    if args.workers is not None:
        for loader in ("supervised", "rotation_prediction"):
            overrides.append(f"data.train.{loader}.num_workers={args.workers}")
    skipped = []
    if row != "fp32":
        overrides.append("+trainer.precision=bf16-mixed")
    if row in ("no-compile", "bf16-nchw", "fp32"):
        overrides.append(f"learner.hparams.channels_last={str(row == 'no-compile').lower()}")
    if row in ("full", "constant"):
        if args.device == "cpu" and not args.cpu_compile:
            skipped.append(f"{row}: torch.compile skipped on the CPU (--cpu-compile keeps it)")
        else:
            overrides.append("learner.hparams.compile=true")
    return overrides + list(args.set), skipped


def run_row(row: str, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Runs one row's training as a subprocess and reads its timing JSON.

    Args:
        row: One of ROWS.
        args: The options.
        work: The workdir (the run's working directory).

    Returns:
        The callback's summary, with `command`, `seconds` and `skipped` added, or `error`.
    """
    overrides, skipped = row_overrides(row, args, work)
    result_path = work / "results" / f"{row}.json"
    result_path.unlink(missing_ok=True)
    log_path = work / "logs" / f"{row}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1", HYDRA_FULL_ERROR="1")
    if (REPO / "sesemi" / "__init__.py").is_file():  # this checkout's sesemi, installed or not
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    command = [sys.executable, "-m", "sesemi", "-cn", "base", *overrides]
    print(f"row {row}: running ({args.warmup_steps} + {args.steps} steps; log {log_path})")
    for note in skipped:
        print(f"  note: {note}")
    start = time.perf_counter()
    with open(log_path, "w") as log:
        log.write(shlex.join(command) + "\n\n")
        log.flush()
        try:
            done = subprocess.run(
                command, cwd=work, stdout=log, stderr=subprocess.STDOUT, timeout=args.timeout
            )
            code = done.returncode
        except subprocess.TimeoutExpired:
            code = None
    seconds = time.perf_counter() - start
    base = {"command": command, "seconds": seconds, "skipped": skipped, "log": str(log_path)}
    if code != 0 or not result_path.is_file():
        lines = log_path.read_text(errors="replace").strip().splitlines()
        why = "timed out" if code is None else f"exit code {code}"
        last = lines[-1] if lines else ""
        print(f"  FAILED ({why}): {last}")
        return {**base, "error": f"{why}: {last}"}
    result = json.loads(result_path.read_text())
    print(
        f"  {result.get('images_per_s', float('nan')):.1f} images/s, "
        f"{result.get('s_per_step', float('nan')):.4f} s/step, {seconds:.0f} s in all"
    )
    return {**result, **base}


def percent(value: float | None) -> str:
    """A share as a percentage, or n/a."""
    return "n/a" if value is None else f"{100 * value:.1f}"


def table(rows: dict[str, dict[str, Any]], device: str) -> list[str]:
    """The markdown table of the rows' results.

    Args:
        rows: Each row's result (see `run_row`).
        device: "cuda" or "cpu".
    """
    rate = "images/s per GPU" if device == "cuda" else "images/s (CPU)"
    lines = [
        f"| row | {rate} | s/step | data wait % | data wait % w/o epoch starts "
        "| peak GPU memory (GiB) | warm-up s (compile) |",
        "|---|---|---|---|---|---|---|",
    ]
    for row, r in rows.items():
        if "error" in r:
            lines.append(f"| {ROW_LABELS[row]} | failed: {r['error'][:120]} | | | | | |")
            continue
        peak = r.get("peak_gpu_memory_bytes")
        warm = r.get("warmup_s")
        label = ROW_LABELS[row] + (" [compile skipped]" if r.get("skipped") else "")
        speed = r["images_per_s"]
        rate = f"{speed:,.0f}" if speed >= 100 else f"{speed:.2f}"
        lines.append(
            f"| {label} | {rate} | {r['s_per_step']:.4f} "
            f"| {percent(r['data_wait_share'])} "
            f"| {percent(r.get('data_wait_share_without_epoch_starts'))} "
            f"| {'n/a' if peak is None else f'{peak / 2**30:.1f}'} "
            f"| {'n/a' if warm is None else f'{warm:.1f}'} |"
        )
    return lines


def target_line(rows: dict[str, dict[str, Any]], device: str) -> str:
    """The target and whether this run meets it (judged on an H100 only)."""
    text = (
        f"Target: >= {TARGET_IMAGES_PER_S:,} images/s on one H100 (row full) with the data path "
        f"not the bottleneck (row full >= {CEILING_SHARE:.0%} of row constant's images/s; "
        f"without row constant: data wait <= {1 - CEILING_SHARE:.0%})."
    )
    full, ceiling = rows.get("full"), rows.get("constant")
    if not full or "error" in full:
        return text + " Not judged: row full did not run."
    if "H100" not in device:
        return text + f" Not judged: this ran on {device}."
    fast = full["images_per_s"] >= TARGET_IMAGES_PER_S
    if ceiling and "error" not in ceiling:
        ratio = full["images_per_s"] / ceiling["images_per_s"]
        fed = ratio >= CEILING_SHARE
        detail = f"{full['images_per_s']:,.0f} images/s, {ratio:.0%} of the ceiling"
    else:
        fed = full["data_wait_share"] <= 1 - CEILING_SHARE
        detail = (
            f"{full['images_per_s']:,.0f} images/s, data wait {percent(full['data_wait_share'])} %"
        )
    verdict = "met" if fast and fed else "NOT met"
    return f"{text} {verdict} ({detail})."


def machine(device: str) -> str:
    """The machine and library versions, one line."""
    import hydra
    import pytorch_lightning
    import timm
    import torch
    import torchvision

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return (
        f"{device}; {platform.machine()}, {cores} cores "
        f"({platform.processor() or platform.platform()}); Python {platform.python_version()}, "
        f"torch {torch.__version__} (CUDA {torch.version.cuda}), torchvision "
        f"{torchvision.__version__}, Lightning {pytorch_lightning.__version__}, timm "
        f"{timm.__version__}, Hydra {hydra.__version__}, Pillow {Image.__version__}"
    )


def main(argv: list[str] | None = None) -> None:
    """Builds the data, runs the rows and prints (and with --out writes) the table.

    Args:
        argv: The arguments (default: `sys.argv[1:]`).
    """
    args = parse_args(argv)
    import torch

    device = torch.cuda.get_device_name(0) if args.device == "cuda" else "CPU"
    temporary = args.workdir is None
    work = Path(args.workdir or tempfile.mkdtemp(prefix="sesemi_gpu_throughput_")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    results: dict[str, dict[str, Any]] = {}
    try:
        per_class = {"train": args.images_per_class, "val": args.val_per_class}
        start = time.perf_counter()
        made = make_folder(work / "data", args.classes, per_class)
        print(
            f"images: {'wrote' if made else 'reusing'} {args.classes} classes x {per_class} in "
            f"{work / 'data'} ({time.perf_counter() - start:.1f} s)"
        )
        (work / "src").mkdir(exist_ok=True)
        (work / "src" / "__init__.py").write_text("")
        (work / "src" / "timing.py").write_text(TIMING_MODULE)
        build_s = build_caches(work / "data", work / "cache", cache_size_for(args.size))
        print(f"image cache (train + val, {cache_size_for(args.size)} px): {build_s:.1f} s")
        for row in args.rows:
            results[row] = run_row(row, args, work)
    finally:
        failed = len(results) < len(args.rows) or any("error" in r for r in results.values())
        if temporary and not args.keep and not failed:
            shutil.rmtree(work, ignore_errors=True)
        elif temporary:
            print(f"workdir kept (logs under logs/): {work}")

    steps_per_epoch = args.images_per_class * args.classes // args.batch
    workers = next((r.get("loader_workers") for r in results.values() if "error" not in r), {})
    ok = [r for r in results.values() if "error" not in r]
    model = f"model: timm {args.model} (pretrained false), {args.size} px, batch {args.batch}"
    if ok:
        model += f" labeled + {args.batch} x 4 rotation images = {ok[0]['images_per_step']:.0f}"
    notes = [
        model + " images per step",
        f"steps: {args.warmup_steps} warm-up (untimed, compile included) + {args.steps} timed; "
        f"{steps_per_epoch} steps per epoch ({args.classes} x {args.images_per_class} images), "
        "every epoch's first step waits for the loaders to restart",
        f"data: image cache, {cache_size_for(args.size)} px, cache_output tensor, "
        f"uint8_output, normalized on the device; loader workers {workers or 'n/a'} "
        f"({'--workers' if args.workers is not None else 'sesemi default'}); cache build "
        f"{build_s:.1f} s, before the rows",
        *(note for r in results.values() for note in r.get("skipped", [])),
    ]
    median_epoch_s = [r["epoch_boundaries_s_excluded"] for r in ok]
    if median_epoch_s:
        notes.append(
            "epoch-end hooks (checkpoint saves) left out of the timing: "
            f"{statistics.median(median_epoch_s):.2f} s per run (median)"
        )
    lines = [
        *table(results, args.device),
        "",
        target_line(results, device),
        "",
        *(f"- {n}" for n in notes),
    ]
    command = "python benchmarks/gpu_throughput.py " + shlex.join(
        sys.argv[1:] if argv is None else argv
    )
    print()
    print("\n".join(lines))
    print(f"\n{machine(device)}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    if args.out:
        header = [
            "# GPU training throughput: ResNet-50, supervised + rotation prediction",
            "",
            f"- command: `{command.strip()}`",
            f"- date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
            f"- machine: {machine(device)}",
            "",
        ]
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text("\n".join(header + lines) + "\n")
        print(f"written: {args.out}")
    if any("error" in r for r in results.values()):
        sys.exit(1)


if __name__ == "__main__":
    main()
