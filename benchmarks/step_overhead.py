"""Measures the framework overhead: sesemi vs a raw PyTorch loop, short epochs, parallel jobs.

Usage: python benchmarks/step_overhead.py --steps 200 --batch 32 --size 32 --model resnet18 \
    [--rows supervised fixmatch joint layout epochs parallel] [--out FILE]

Rows (each a ratio measured side by side in this one process, same machine, same minute):

- supervised: `Classifier` under a Lightning Trainer vs a raw PyTorch loop; the same model
  (timm backbone + linear classifier), loss, optimizer (SGD, momentum) and the same pre-built
  in-memory batches, so only the training loop differs.
- fixmatch: the same for FixMatch (`FixMatchLossHead`, threshold 0.95, mu = 7, weak view
  without gradient then the strong view, as sesemi's default): labeled, weak and strong batches
  are pre-built tensors (augmentation already applied), so only the loop and the head differ.
- joint: sesemi's FixMatch with its default separate passes (labeled; weak without gradient;
  strong) vs `joint_forward: all` (labeled, weak and strong in one pass: one set of BatchNorm
  statistics, as USB's `use_cat`), same batches.
- layout: sesemi's FixMatch with contiguous (NCHW) vs channels-last model and batches.
- epochs: whole `open_sesemi -cn demo method=supervised` runs on the digits, with 3 labels per
  class (30 images: every epoch is one step) vs 108 (1,080 images: 34 steps per epoch); s/step
  of the training loop, after warm-up steps (a timing callback).
- parallel: the 30-image run alone vs two of them started together on this machine (sesemi's
  default `run.threads` shares the cores between them).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import pathlib
import platform
import subprocess
import sys
import tempfile
import time

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from sesemi import PyTorchImageModels
from sesemi.data import SESEMIDataModule  # noqa: F401  (same import cost as a real run)
from sesemi.learners import Classifier
from sesemi.models.heads.fixmatch import FixMatchLossHead

MU, THRESHOLD, CLASSES = 7, 0.95, 10


def classifier(
    model: str,
    num_classes: int,
    fixmatch: bool = False,
    joint_forward: bool | str = False,
    channels_last: bool = False,
) -> Classifier:
    """A supervised-only (or FixMatch) Classifier, built from objects."""
    optimizer = functools.partial(torch.optim.SGD, lr=0.01, momentum=0.9)
    heads = None
    if fixmatch:
        head = FixMatchLossHead("unlabeled", threshold=THRESHOLD, joint_forward=joint_forward)
        heads = {"fixmatch": head}
    return Classifier(
        PyTorchImageModels(model), num_classes, optimizer, heads=heads, channels_last=channels_last
    )


class Views(torch.utils.data.Dataset):
    """Pre-augmented unlabeled samples as sesemi's loaders give them: `([weak, strong], -1, i)`."""

    def __init__(self, weak: torch.Tensor, strong: torch.Tensor) -> None:
        self.weak, self.strong = weak, strong

    def __len__(self) -> int:
        return len(self.weak)

    def __getitem__(self, i: int) -> tuple:
        return [self.weak[i], self.strong[i]], -1, i


class Batches(pl.LightningDataModule):
    """The same tensors for both loops, as the learner's dict-of-loaders batches."""

    def __init__(
        self,
        images: torch.Tensor,
        targets: torch.Tensor,
        batch: int,
        unlabeled: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> None:
        super().__init__()
        self.loader = DataLoader(TensorDataset(images, targets), batch_size=batch)
        self.unlabeled = None
        if unlabeled is not None:
            self.unlabeled = DataLoader(Views(*unlabeled), batch_size=batch * MU)

    def train_dataloader(self) -> dict[str, DataLoader]:
        loaders = {"supervised": self.loader}
        if self.unlabeled is not None:
            loaders["unlabeled"] = self.unlabeled
        return loaders


def _timed_steps(model: Classifier, batches, loss_of, steps: int) -> float:
    """Seconds per step of a plain SGD loop over `batches()` (re-iterated each pass)."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    model.train()
    done, start = 0, time.perf_counter()
    while done < steps:
        for batch in batches():
            loss = loss_of(batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            done += 1
            if done == steps:
                break
    return (time.perf_counter() - start) / steps


def raw_loop(model: Classifier, loader: DataLoader, steps: int) -> float:
    """Seconds per step of a plain loop over the learner's own modules."""

    def loss_of(batch):
        images, targets = batch
        return F.cross_entropy(model.net(images), targets)

    return _timed_steps(model, lambda: loader, loss_of, steps)


def raw_fixmatch_loop(model: Classifier, data: Batches, steps: int) -> float:
    """Seconds per step of a plain FixMatch loop over the learner's own network."""

    def loss_of(batch):
        (images, targets), ([weak, strong], _, _) = batch
        loss = F.cross_entropy(model.net(images), targets)
        with torch.no_grad():
            confidence, pseudo = F.softmax(model.net(weak), dim=1).max(dim=1)
        mask = (confidence >= THRESHOLD).float()
        losses = F.cross_entropy(model.net(strong), pseudo, reduction="none")
        return loss + (mask * losses).mean()

    return _timed_steps(
        model, lambda: zip(data.loader, data.unlabeled, strict=True), loss_of, steps
    )


TIMING = """
import json, time
import pytorch_lightning as pl


class StepTime(pl.Callback):
    \"\"\"Writes the training loop's seconds per step after `warmup` steps.\"\"\"

    def __init__(self, out, warmup):
        self.out, self.warmup, self.start = out, warmup, None

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if trainer.global_step == self.warmup and self.start is None:
            self.start = time.perf_counter()

    def on_train_end(self, trainer, module):
        steps = trainer.global_step - self.warmup
        with open(self.out, "w") as f:
            json.dump({"s_per_step": (time.perf_counter() - self.start) / steps}, f)
"""


def sesemi_runs(workdir: pathlib.Path, labels: int, steps: int, copies: int, model: str) -> list:
    """Starts `copies` demo runs (supervised, `labels` per class) at once; their s/step."""
    src = workdir / "src"
    src.mkdir(parents=True, exist_ok=True)
    (src / "__init__.py").write_text("")
    (src / "timing.py").write_text(TIMING)
    warmup = max(steps // 10, 5)
    outs = [workdir / f"time_l{labels}_{copies}x{i}.json" for i in range(copies)]
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    processes = [
        subprocess.Popen(
            [
                *(sys.executable, "-m", "sesemi", "-cn", "demo", "method=supervised"),
                f"run.data_root={workdir}/digits_l{labels}",
                f"data.prepare.labels_per_class={labels}",
                f"run.num_iterations={steps + warmup}",
                f"run.dir={workdir}/runs",
                f"learner.hparams.model.backbone.name={model}",
                "trainer.val_check_interval=null",
                "trainer.check_val_every_n_epoch=100000",
                "++trainer.num_sanity_val_steps=0",
                "++trainer.enable_progress_bar=false",
                "++trainer.enable_model_summary=false",
                f"trainer.callbacks=[{{_target_: src.timing.StepTime, out: '{out}', "
                f"warmup: {warmup}}}]",
            ],
            cwd=workdir,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for out in outs
    ]
    for process in processes:
        _, err = process.communicate()
        if process.returncode != 0:
            raise RuntimeError(f"the sesemi run failed:\n{err[-3000:]}")
    return [json.loads(out.read_text())["s_per_step"] for out in outs]


def lightning_loop(model: Classifier, data: Batches, steps: int, log_dir: str) -> float:
    """Seconds per step of `Trainer.fit` with CSV logging on, as a user runs it."""
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=steps,
        logger=pl.loggers.CSVLogger(log_dir, name="bench"),
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=10,
    )
    start = time.perf_counter()
    trainer.fit(model, datamodule=data)
    return (time.perf_counter() - start) / steps


def main() -> None:
    """Runs the chosen rows (each after a warm-up) and prints the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--rows",
        nargs="+",
        default=["supervised", "fixmatch", "joint", "layout", "epochs", "parallel"],
        choices=["supervised", "fixmatch", "joint", "layout", "epochs", "parallel"],
    )
    parser.add_argument("--workdir", default=None, help="digits and runs of the sesemi rows")
    parser.add_argument("--out", default=None, help="also write the table here (markdown)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    n = args.batch * 20
    shape = (3, args.size, args.size)
    images, targets = torch.randn(n, *shape), torch.randint(0, CLASSES, (n,))
    lines = [
        f"| row | s/step ({args.model}, batch {args.batch}, {args.size} px) | ratio |",
        "|---|---:|---:|",
    ]
    if "supervised" in args.rows:
        data = Batches(images, targets, args.batch)
        raw_loop(classifier(args.model, CLASSES), data.loader, 10)  # warm-up
        raw = raw_loop(classifier(args.model, CLASSES), data.loader, args.steps)
        with tempfile.TemporaryDirectory() as log_dir:
            lit = lightning_loop(classifier(args.model, CLASSES), data, args.steps, log_dir)
        lines += [
            f"| supervised: raw PyTorch | {raw:.4f} | |",
            f"| supervised: sesemi Classifier + Lightning | {lit:.4f} | {lit / raw:.3f} |",
        ]
    if "fixmatch" in args.rows:
        weak, strong = torch.randn(n * MU, *shape), torch.randn(n * MU, *shape)
        data = Batches(images, targets, args.batch, (weak, strong))
        raw_fixmatch_loop(classifier(args.model, CLASSES, True), data, 5)  # warm-up
        raw = raw_fixmatch_loop(classifier(args.model, CLASSES, True), data, args.steps)
        with tempfile.TemporaryDirectory() as log_dir:
            lit = lightning_loop(classifier(args.model, CLASSES, True), data, args.steps, log_dir)
        lines += [
            f"| FixMatch (mu {MU}): raw PyTorch | {raw:.4f} | |",
            f"| FixMatch (mu {MU}): sesemi Classifier + Lightning | {lit:.4f} | {lit / raw:.3f} |",
        ]
    for row, option, values in (
        ("joint", "joint_forward", (False, "all")),
        ("layout", "channels_last", (False, True)),
    ):
        if row not in args.rows:
            continue
        weak, strong = torch.randn(n * MU, *shape), torch.randn(n * MU, *shape)
        data = Batches(images, targets, args.batch, (weak, strong))
        seconds = []
        for value in values:
            with tempfile.TemporaryDirectory() as log_dir:
                learner = classifier(args.model, CLASSES, True, **{option: value})
                lightning_loop(learner, data, 3, log_dir)  # warm-up
            with tempfile.TemporaryDirectory() as log_dir:
                learner = classifier(args.model, CLASSES, True, **{option: value})
                seconds.append(lightning_loop(learner, data, args.steps, log_dir))
        lines += [
            f"| FixMatch (mu {MU}), sesemi, {option}={values[0]} | {seconds[0]:.4f} | |",
            f"| FixMatch (mu {MU}), sesemi, {option}={values[1]} | {seconds[1]:.4f} | "
            f"{seconds[1] / seconds[0]:.3f} |",
        ]
    if "epochs" in args.rows or "parallel" in args.rows:
        workdir = pathlib.Path(args.workdir or tempfile.mkdtemp(prefix="step_overhead_"))
        short = sesemi_runs(workdir, 3, args.steps, 1, args.model)[0]
        if "epochs" in args.rows:
            long = sesemi_runs(workdir, 108, args.steps, 1, args.model)[0]
            lines += [
                f"| open_sesemi supervised, 1,080 labeled images (34 steps/epoch) | {long:.4f} | |",
                f"| open_sesemi supervised, 30 labeled images (1 step/epoch) | {short:.4f} | "
                f"{short / long:.3f} |",
            ]
        if "parallel" in args.rows:
            pair = sesemi_runs(workdir, 3, args.steps, 2, args.model)
            lines += [
                f"| one run alone (30 images) | {short:.4f} | |",
                f"| two runs side by side, each | {max(pair):.4f} | speed "
                f"{short / max(pair):.2f}x |",
            ]
    lines.append(
        f"\n{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"{time.strftime('%Y-%m-%d %H:%M')}; `python benchmarks/step_overhead.py "
        f"{' '.join(sys.argv[1:])}`"
    )
    print("\n".join(lines))
    if args.out:
        pathlib.Path(args.out).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
