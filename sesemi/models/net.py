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

    With a `reference_image`, evaluation (`eval()` mode: val, test, `predict`, `export`)
    subtracts the logits of that featureless image (one value per channel, as the network sees
    it, i.e. normalized) from every image's logits: what the classifier predicts for an image
    with no content is its bias towards the classes it saw most (CDMAD, Lee & Kim, CVPR 2024,
    arXiv:2403.10391). The reference image rides in the same batch, so one pass serves both; in
    eval mode each image's output is its own. In training the logits stay as they are (the
    losses read them unchanged).

    With a `balanced_head` (ABC, Lee et al., NeurIPS 2021, arXiv:2110.10368; `method=abc`), a
    second linear classifier on the same features, trained by `sesemi.models.heads.abc` to be
    class-balanced, gives the logits in evaluation; training reads `supervised_head`'s.
    """

    def __init__(
        self,
        backbone: nn.Module,
        num_classes: int,
        reference_image: Sequence[float] | None = None,
        balanced_head: bool = False,
    ) -> None:
        """Puts a linear classifier on the backbone.

        Args:
            backbone: Maps images to pooled features; must have `out_features` (the width D).
            num_classes: The number of classes.
            reference_image: The featureless image's value per channel, normalized (e.g. black
                under mean 0.5 and std 0.5: `[-1, -1, -1]`); None: no debiasing.
            balanced_head: Add a second classifier, `balanced_head`, that evaluation predicts
                with (ABC).
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
        self.reference_image = tuple(map(float, reference_image)) if reference_image else None
        self.balanced_head = nn.Linear(width, num_classes) if balanced_head else None

    @property
    def num_classes(self) -> int:
        """The number of classes."""
        return self.supervised_head.out_features

    def forward(self, images: Tensor) -> Tensor:
        """Returns class logits `(B, num_classes)` (debiased in eval mode, see the class)."""
        return self.features_and_logits(images)[1]

    def features_and_logits(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """Returns the backbone features `(B, D)` and class logits `(B, num_classes)`; in eval
        mode, the `balanced_head`'s logits if there is one, minus the reference image's if
        there is one."""
        if self.training:
            features = self.backbone(images)
            return features, self.supervised_head(features)
        head = self.balanced_head if self.balanced_head is not None else self.supervised_head
        if self.reference_image is None:
            features = self.backbone(images)
            return features, head(features)
        features = self.backbone(with_reference_image(images, self.reference_image))
        return features[:-1], debiased(head(features))

    def forward_joined(self, chunks: Sequence[Tensor]) -> list[tuple[Tensor, Tensor]]:
        """Runs several image batches as one batch (one set of BatchNorm statistics) and returns
        each chunk's `(features, logits)`."""
        features = self.backbone(torch.cat(list(chunks)) if len(chunks) > 1 else chunks[0])
        logits = self.supervised_head(features)
        sizes = [len(c) for c in chunks]
        return list(zip(features.split(sizes), logits.split(sizes), strict=True))


def with_reference_image(images: Tensor, values: Sequence[float]) -> Tensor:
    """`images (B, C, ...)` with the reference image appended: `(B + 1, C, ...)`, the last one
    `values[c]` at every pixel of channel c, in the batch's dtype, device and memory format."""
    if len(values) != images.shape[1]:
        raise ValueError(
            f"the reference image has {len(values)} channel value(s) but the images have "
            f"{images.shape[1]} channels; give debias_logits a mean and std per channel"
        )
    reference = torch.empty_like(images[:1])
    for channel, value in enumerate(values):  # scalar fills: no host-to-device copy per step
        reference[:, channel].fill_(value)
    return torch.cat([images, reference])


def debiased(logits: Tensor) -> Tensor:
    """The logits of a `with_reference_image` batch `(B + 1, K)` -> the first B rows minus the
    last (the reference image's), `(B, K)`."""
    return logits[:-1] - logits[-1:]


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
