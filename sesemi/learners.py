"""The `Classifier` LightningModule: run the supervised loss and loss heads, weight, sum, log."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.optim import Optimizer
from torchmetrics import MaxMetric, MeanMetric
from torchmetrics.classification import MulticlassAccuracy

from sesemi.models.ema import EMATeacher
from sesemi.models.heads.base import SUPERVISED, HeadContext, HeadInputs, LossHead, link_blenders
from sesemi.models.net import BatchPreparation, ClassifierNet
from sesemi.schedulers.weight import WeightedTerm

log = logging.getLogger(__name__)
UNTRAINED_BALANCED_HEAD = (
    "learner.hparams.model.balanced_head is set but no loss head trains it, so evaluation would "
    "predict with an untrained classifier; add method=abc (e.g. 'method=[fixmatch_da,abc]') or "
    "drop balanced_head"
)


def per_sample_cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
    """Cross-entropy of each sample `(B,)`; targets are class indices or probabilities."""
    return F.cross_entropy(logits, targets, reduction="none")


@dataclass
class LRSchedulerSpec:
    """A learning-rate scheduler to build over the optimizer, and how Lightning steps it."""

    factory: Callable[[Optimizer], Any]
    interval: str = "step"
    frequency: int = 1
    monitor: str | None = None


class Classifier(pl.LightningModule):
    """An image classifier trained with a supervised loss plus weighted regularization heads.

    Each training batch is a dict with one entry per `data.train` loader; the "supervised" entry
    holds `(images (B, C, H, W), targets (B,))` and each head reads its own entry. The loss is
    `sum_t w_t(step) * reduce_t(per-sample losses of term t)` over the supervised term and the
    heads. `forward` returns class probabilities `(B, num_classes)`. Every part is built
    elsewhere (by `sesemi.build` from a config, or by you) and handed in.
    """

    def __init__(
        self,
        backbone: nn.Module,
        num_classes: int,
        optimizer: Callable[[Iterable[nn.Parameter]], Optimizer],
        supervised_loss: Callable[[Tensor, Tensor], Tensor] | None = None,
        heads: Mapping[str, LossHead] | None = None,
        weights: Mapping[str, WeightedTerm] | None = None,
        lr_scheduler: LRSchedulerSpec | None = None,
        ema_decay: float | None = None,
        reference_image: Sequence[float] | None = None,
        balanced_head: bool = False,
        input_normalization: Mapping[str, Any] | None = None,
        channels_last: bool = False,
        compile: bool | Mapping[str, Any] = False,
        dataset_sizes: Mapping[str, int] | None = None,
        class_counts: Mapping[str, Sequence[int]] | None = None,
        config: Mapping[str, Any] | None = None,
    ) -> None:
        """Assembles the learner.

        Args:
            backbone: Maps images to features `(B, out_features)`.
            num_classes: The number of classes.
            optimizer: Builds the optimizer from the trainable parameters.
            supervised_loss: Per-sample loss of `(logits, targets)`; default cross-entropy.
            heads: Regularization loss heads by name; each is built here (`LossHead.build`).
            weights: Each term's `WeightedTerm` by name ("supervised" or a head's); default 1.
            lr_scheduler: An optional LR scheduler.
            ema_decay: Keep an EMA teacher of the network with this decay (None: no teacher).
            reference_image: CDMAD: a featureless image's normalized value per channel, whose
                logits are subtracted from the pseudo-labelling heads' weak-view logits and
                from every prediction in evaluation (`sesemi.models.net.ClassifierNet`); None:
                no debiasing.
            balanced_head: ABC: add a second, class-balanced classifier that evaluation
                predicts with (`ClassifierNet`); a head must train it (`method=abc`).
            input_normalization: `{mean, std}` for uint8 image batches, applied on the device.
            channels_last: Keep the model and image batches channels-last.
            compile: `torch.compile` the backbone: True, or `torch.compile` arguments.
            dataset_sizes: `data.train` loader name -> dataset length, for heads that need it.
            class_counts: `data.train` loader name -> images per class, for the loaders whose
                images all have a class (for heads that need it).
            config: The plain (resolved) hyperparameters that built it, saved in checkpoints as
                `hyper_parameters["hparams"]` for the record (never executed when loading).
        """
        super().__init__()
        if config is not None:
            self.save_hyperparameters({"hparams": dict(config)})
        self.net = ClassifierNet(backbone, num_classes, reference_image, balanced_head)
        self.num_classes = num_classes
        self.ema = EMATeacher(self.net, ema_decay) if ema_decay is not None else None
        self.supervised_loss = supervised_loss or per_sample_cross_entropy
        self.heads = nn.ModuleDict(dict(heads or {}))
        self.weights = {SUPERVISED: WeightedTerm(), **dict(weights or {})}
        unknown = set(self.weights) - set(self.heads) - {SUPERVISED}
        if unknown:
            raise ValueError(f"weights for unknown term(s) {sorted(unknown)}")
        for name, head in self.heads.items():
            if not isinstance(head, LossHead):
                raise TypeError(
                    f"regularization_loss_heads.{name}.head must build a "
                    f"sesemi.models.heads.LossHead, got {type(head).__name__}"
                )
            head.build(
                HeadContext(
                    self.backbones,
                    self.classifiers,
                    num_classes,
                    dict(dataset_sizes or {}),
                    name,
                    self.net.reference_image,
                    {k: tuple(v) for k, v in (class_counts or {}).items()},
                )
            )
        link_blenders(self.heads)
        # Evaluation runs build no heads (and load the trained balanced head).
        if (
            balanced_head
            and self.heads
            and not any(h.trains_balanced_head for h in self.heads.values())
        ):
            raise ValueError(UNTRAINED_BALANCED_HEAD)
        if reference_image is not None and not any(
            h.uses_reference_image for h in self.heads.values()
        ):
            log.warning(
                "debias_logits (method=cdmad) debiases evaluation only: no head pseudo-labels "
                "with it; add a FixMatch-family method, e.g. 'method=[fixmatch,cdmad]'"
            )
        self.optimizer_factory = optimizer
        self.lr_scheduler = lr_scheduler
        self.prepare_batch = BatchPreparation(input_normalization, channels_last)
        self.compile_options = compile
        self.train_top1 = MulticlassAccuracy(num_classes, average="micro")
        self.val_top1 = MulticlassAccuracy(num_classes, average="micro")
        self.test_top1 = MulticlassAccuracy(num_classes, average="micro")
        self.val_loss, self.test_loss = MeanMetric(), MeanMetric()
        self.val_top1_best = MaxMetric()
        if self.ema is not None:
            self.val_ema_top1 = MulticlassAccuracy(num_classes, average="micro")
        self._ema_step = -1
        if channels_last:
            self.to(memory_format=torch.channels_last)

    @property
    def backbone(self) -> nn.Module:
        """The student's backbone."""
        return self.net.backbone

    @property
    def supervised_head(self) -> nn.Module:
        """The student's linear classifier."""
        return self.net.supervised_head

    @property
    def backbones(self) -> dict[str, nn.Module]:
        """The feature extractors heads may name (see `HeadInputs.backbones`)."""
        found = {"backbone": self.net.backbone}
        if self.ema is not None:
            found["teacher_backbone"] = self.ema.net.backbone
        return found

    @property
    def classifiers(self) -> dict[str, nn.Module]:
        """The classifiers heads may name (see `HeadInputs.heads`)."""
        found = {"supervised_head": self.net.supervised_head}
        if self.net.balanced_head is not None:
            found["balanced_head"] = self.net.balanced_head
        if self.ema is not None:
            found["teacher_supervised_head"] = self.ema.net.supervised_head
        return found

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Normalizes uint8 image batches on the device (and makes them channels-last)."""
        return self.prepare_batch(batch)

    def configure_model(self) -> None:
        """Compiles the backbone with `torch.compile` when asked to."""
        if self.compile_options and not getattr(self, "_compiled", False):
            options = self.compile_options if isinstance(self.compile_options, Mapping) else {}
            self.net.backbone.compile(**options)  # in place: state_dict keys stay the same
            self._compiled = True

    def forward(self, images: Tensor) -> Tensor:
        """Returns class probabilities `(B, num_classes)` for images `(B, C, H, W)`."""
        return torch.softmax(self.net(images), dim=-1)

    def compute_losses(self, batch: Mapping[str, Any], step: int) -> tuple[Tensor, dict[str, Any]]:
        """The weighted total loss of one multi-loader batch, and the values to log.

        Args:
            batch: One entry per `data.train` loader; "supervised" is `(images, targets[, ...])`.
            step: The global step the weight schedules are evaluated at.

        Returns:
            `sum_t w_t(step) * reduce_t(losses_t)` and a dict of each term's loss and weight.
        """
        images, targets = batch[SUPERVISED][:2]
        joined = {name: head.joined_views(batch) for name, head in self.heads.items()}
        outputs = self.net.forward_joined(
            [images, *(v for views in joined.values() for v in views)]
        )
        features, logits = outputs.pop(0)
        cache: dict[str, Any] = {"supervised_backbone": features, "supervised_logits": logits}
        for name, views in joined.items():  # each head's joined views' outputs, in order
            cache[f"joined/{name}"] = [outputs.pop(0) for _ in views]
        inputs = HeadInputs(batch, self.backbones, self.classifiers, cache, step)
        losses = {SUPERVISED: self.supervised_loss(logits, targets)}
        losses.update({name: head(inputs) for name, head in self.heads.items()})
        total, logs = logits.new_zeros(()), {}
        for name, per_sample in losses.items():
            term = self.weights.get(name) or WeightedTerm()
            loss, weight = term.reduce(per_sample), term.weight(step)
            total = total + weight * loss
            logs[f"{name}_loss"], logs[f"{name}_weight"] = loss, weight
            if name != SUPERVISED:
                logs.update({f"{name}/{k}": v for k, v in self.heads[name].log_values.items()})
        # One host sync per step (on the total); the terms are looked at only when it fails.
        if not torch.isfinite(total):
            bad = next((n for n in losses if not torch.isfinite(logs[f"{n}_loss"])), "total")
            value = logs[f"{bad}_loss"].item() if bad != "total" else total.item()
            raise FloatingPointError(
                f"loss term '{bad}' is {value} at step {step}; lower the learning rate or check "
                "the data and the term's weight"
            )
        return total, {"logits": logits.detach(), "targets": targets, **logs}

    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> Tensor:
        """Computes, logs and returns the weighted loss of one multi-loader batch."""
        total, logs = self.compute_losses(batch, self.global_step)
        logits, targets = logs.pop("logits"), logs.pop("targets")
        # Soft targets (class probabilities, e.g. pseudo-labels) count as their argmax class.
        self.train_top1(logits, targets.argmax(dim=1) if targets.ndim == 2 else targets)
        logs = {f"train/{k}": v for k, v in logs.items()}
        logs["lr"] = self.trainer.optimizers[0].param_groups[0]["lr"]
        self.log_dict(logs, on_step=True, on_epoch=False, batch_size=len(targets))
        self.log("train/loss", total, prog_bar=True, batch_size=len(targets))
        self.log("train/top1", self.train_top1, on_step=True, on_epoch=False, prog_bar=True)
        return total

    def on_train_start(self) -> None:
        """Forgets the best val top-1 of the sanity check; the EMA counts steps from here."""
        self.val_top1_best.reset()
        self._ema_step = self.global_step

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        """Moves the EMA teacher once per optimizer step (not per batch under accumulation)."""
        if self.ema is not None and self.global_step != self._ema_step:
            self._ema_step = self.global_step
            self.ema.update(self.net)

    def _evaluate(self, batch: Any, stage: str) -> dict[str, Tensor]:
        images, targets = batch[:2]
        features, logits = self.net.features_and_logits(images)
        loss, top1 = getattr(self, f"{stage}_loss"), getattr(self, f"{stage}_top1")
        loss(F.cross_entropy(logits, targets), len(targets))
        top1(logits, targets)
        self.log(f"{stage}/loss", loss, batch_size=len(targets))
        self.log(f"{stage}/top1", top1, prog_bar=True, batch_size=len(targets))
        if stage == "val" and self.ema is not None:
            self.val_ema_top1(self.ema(images), targets)
            self.log("val/ema/top1", self.val_ema_top1, batch_size=len(targets))
        # For callbacks (kNN evaluation, confusion matrices): they read the step's outputs.
        return {"features": features, "logits": logits, "targets": targets}

    def validation_step(self, batch: Any, batch_idx: int) -> dict[str, Tensor]:
        """Accumulates val loss and top-1 on one `(images, targets)` batch."""
        return self._evaluate(batch, "val")

    def test_step(self, batch: Any, batch_idx: int) -> dict[str, Tensor]:
        """Accumulates test loss and top-1 on one `(images, targets)` batch."""
        return self._evaluate(batch, "test")

    def on_validation_epoch_end(self) -> None:
        """Logs the best val top-1 so far."""
        self.val_top1_best(self.val_top1.compute())
        # val_top1.compute() is already reduced over processes, so every rank logs the same value.
        self.log("val/top1_best", self.val_top1_best.compute(), prog_bar=True, sync_dist=True)

    def configure_optimizers(self) -> Any:
        """Builds the optimizer over trainable parameters and the LR scheduler."""
        params = [p for p in self.parameters() if p.requires_grad]
        optimizer = self.optimizer_factory(params)
        spec = self.lr_scheduler
        if spec is None:
            return optimizer
        config = {"scheduler": spec.factory(optimizer), "interval": spec.interval}
        config["frequency"] = spec.frequency
        if spec.monitor:
            config["monitor"] = spec.monitor
        return {"optimizer": optimizer, "lr_scheduler": config}
