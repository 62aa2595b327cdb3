"""Measures the framework overhead: `Classifier` under a Lightning Trainer vs a raw PyTorch loop.

Usage: python benchmarks/step_overhead.py --steps 200 --batch 32 --size 32 --model resnet18
Both fit the same model (timm backbone + linear classifier), loss (cross-entropy), optimizer
(SGD, momentum) and the same pre-built in-memory batches, so only the training loop differs.
Prints a markdown table of seconds per step and the ratio.
"""

from __future__ import annotations

import argparse
import functools
import os
import platform
import tempfile
import time

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from sesemi import PyTorchImageModels
from sesemi.data import SESEMIDataModule  # noqa: F401  (same import cost as a real run)
from sesemi.learners import Classifier


def classifier(model: str, num_classes: int) -> Classifier:
    """A supervised-only Classifier, built from objects."""
    optimizer = functools.partial(torch.optim.SGD, lr=0.01, momentum=0.9)
    return Classifier(PyTorchImageModels(model), num_classes, optimizer)


class Batches(pl.LightningDataModule):
    """The same tensors for both loops, as the learner's dict-of-loaders batches."""

    def __init__(self, images: torch.Tensor, targets: torch.Tensor, batch: int) -> None:
        super().__init__()
        self.loader = DataLoader(TensorDataset(images, targets), batch_size=batch)

    def train_dataloader(self) -> dict[str, DataLoader]:
        return {"supervised": self.loader}


def raw_loop(model: Classifier, loader: DataLoader, steps: int) -> float:
    """Seconds per step of a plain loop over the learner's own modules."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    model.train()
    done, start = 0, time.perf_counter()
    while done < steps:
        for images, targets in loader:
            logits = model.net(images)
            loss = torch.nn.functional.cross_entropy(logits, targets)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            done += 1
            if done == steps:
                break
    return (time.perf_counter() - start) / steps


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
    """Runs both loops (after a warm-up) and prints the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    n = args.batch * 20
    images, targets = torch.randn(n, 3, args.size, args.size), torch.randint(0, 10, (n,))
    data = Batches(images, targets, args.batch)
    raw_loop(classifier(args.model, 10), data.loader, 10)  # warm-up (allocator, kernels)
    raw = raw_loop(classifier(args.model, 10), data.loader, args.steps)
    with tempfile.TemporaryDirectory() as log_dir:
        lit = lightning_loop(classifier(args.model, 10), data, args.steps, log_dir)
    print(f"| loop | s/step ({args.model}, batch {args.batch}, {args.size} px) |")
    print("|---|---|")
    print(f"| raw PyTorch | {raw:.4f} |")
    print(f"| sesemi Classifier + Lightning | {lit:.4f} |")
    print(f"| ratio | {lit / raw:.3f} |")
    print(
        f"\n{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"{time.strftime('%Y-%m-%d')}"
    )


if __name__ == "__main__":
    main()
