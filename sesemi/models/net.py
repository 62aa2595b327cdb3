"""`ClassifierNet`, the network every part of sesemi shares, and device-side batch preparation."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn


class ClassifierNet(nn.Module):
    """Images `(B, C, H, W)` -> backbone features `(B, D)` -> class logits `(B, num_classes)`.

    The learner trains one, the EMA teacher averages a copy of it, and `predict` / `export` load
    one from a checkpoint (its weights are the learner's `net.*` entries).
    """

    def __init__(self, backbone: nn.Module, num_classes: int) -> None:
        """Puts a linear classifier on the backbone.

        Args:
            backbone: Maps images to pooled features; must have `out_features` (the width D).
            num_classes: The number of classes.
        """
        super().__init__()
        width = getattr(backbone, "out_features", None)
        if not isinstance(width, int) or width < 1:
            raise ValueError(
                f"the backbone {type(backbone).__name__} needs an `out_features` attribute (its "
                "feature width); sesemi.PyTorchImageModels has one"
            )
        if num_classes < 1:
            raise ValueError(f"num_classes must be at least 1, got {num_classes}")
        self.backbone = backbone
        self.supervised_head = nn.Linear(width, num_classes)

    @property
    def num_classes(self) -> int:
        """The number of classes."""
        return self.supervised_head.out_features

    def forward(self, images: Tensor) -> Tensor:
        """Returns class logits `(B, num_classes)`."""
        return self.supervised_head(self.backbone(images))

    def forward_joined(self, chunks: Sequence[Tensor]) -> list[tuple[Tensor, Tensor]]:
        """Runs several image batches as one batch (one set of BatchNorm statistics) and returns
        each chunk's `(features, logits)`."""
        features = self.backbone(torch.cat(list(chunks)) if len(chunks) > 1 else chunks[0])
        logits = self.supervised_head(features)
        sizes = [len(c) for c in chunks]
        return list(zip(features.split(sizes), logits.split(sizes), strict=True))


@contextlib.contextmanager
def frozen_batchnorm_statistics(module: nn.Module) -> Iterator[None]:
    """Inside, `module`'s BatchNorm layers still normalize a training batch by its own statistics
    but leave their running statistics (the ones evaluation uses) as they are: for a pass over
    images unlike those the model is evaluated on, e.g. rotated ones."""
    layers = [
        m
        for m in module.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training and m.track_running_stats
    ]
    saved = [(m, m.momentum, m.num_batches_tracked.clone()) for m in layers]
    for layer in layers:
        layer.momentum = 0.0  # running = (1 - 0) * running + 0 * batch
    try:
        yield
    finally:
        for layer, momentum, count in saved:
            layer.momentum = momentum
            layer.num_batches_tracked.copy_(count)


class BatchPreparation(nn.Module):
    """Prepares image batches on the device: uint8 images are scaled to [0, 1] and normalized,
    and (optionally) made channels-last. Tensors that are not 4-D pass unchanged, so it can be
    mapped over any batch structure (dicts, lists, tuples)."""

    def __init__(
        self, normalization: Mapping[str, Sequence[float]] | None, channels_last: bool = False
    ) -> None:
        """Initializes it.

        Args:
            normalization: `{mean: [...], std: [...]}` for uint8 batches, or None (then a uint8
                batch is an error that says how to set it).
            channels_last: Whether to make 4-D batches channels-last.
        """
        super().__init__()
        self.normalization = dict(normalization) if normalization is not None else None
        self.channels_last = channels_last
        if normalization is not None:
            if set(normalization) != {"mean", "std"}:
                raise ValueError(
                    "learner.hparams.input_normalization needs exactly mean and std, got "
                    f"{dict(normalization)}"
                )
            mean = torch.tensor(list(normalization["mean"]), dtype=torch.float32)
            std = torch.tensor(list(normalization["std"]), dtype=torch.float32)
            self.register_buffer("mean", mean.view(1, -1, 1, 1), persistent=False)
            self.register_buffer("std", std.view(1, -1, 1, 1), persistent=False)

    def images(self, images: Tensor) -> Tensor:
        """Prepares one image batch `(B, C, H, W)`."""
        if images.dtype == torch.uint8:
            if self.normalization is None:
                raise ValueError(
                    "uint8 images reached the learner but learner.hparams.input_normalization "
                    "is not set; set it to {mean: [...], std: [...]} or drop uint8_output"
                )
            images = (images.float() / 255.0 - self.mean) / self.std
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return images

    def forward(self, batch: Any) -> Any:
        """Prepares every 4-D tensor in a (nested) batch."""
        if isinstance(batch, Tensor):
            return self.images(batch) if batch.ndim == 4 else batch
        if isinstance(batch, Mapping):
            return {k: self(v) for k, v in batch.items()}
        if isinstance(batch, (list, tuple)):
            return type(batch)(self(v) for v in batch)
        return batch
