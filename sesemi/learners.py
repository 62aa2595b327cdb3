"""The `Classifier` LightningModule: run the supervised loss and loss heads, weight, sum, log."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn
from torchmetrics import MaxMetric, MeanMetric
from torchmetrics.classification import MulticlassAccuracy, MulticlassConfusionMatrix

from sesemi.config.structs import EMAConfig, KNNConfig
from sesemi.models.ema import EMATeacher
from sesemi.models.heads.base import HeadInputs, LossHead

log = logging.getLogger(__name__)

SUPERVISED = "supervised"  # The data.train loader the supervised loss reads.
METADATA_KEY = "sesemi"  # The checkpoint entry holding class names and preprocessing.


def _build_loss(node: Any) -> Callable[[Tensor, Tensor], Tensor]:
    # Per-sample losses let the learner own reduction and weighting for every term alike.
    try:
        return instantiate(node, reduction="none")
    except TypeError:
        return instantiate(node)


def _reduce(losses: Tensor, reduction: str) -> Tensor:
    if losses.ndim == 0:
        return losses
    if reduction == "mean":
        return losses.mean()
    if reduction == "sum":
        return losses.sum()
    raise ValueError(f"unknown loss reduction '{reduction}'; use 'mean' or 'sum'")


class WeightedTerm:
    """A loss term's reduction and weight: `scale_factor * scheduler(step)` (scheduler optional)."""

    def __init__(self, reduction: str, scale_factor: float, scheduler: Callable | None) -> None:
        self.reduction = reduction
        self.scale_factor = scale_factor
        self.scheduler = scheduler

    def weight(self, step: int) -> float:
        """Returns the term's weight at the global step."""
        factor = self.scheduler(step) if self.scheduler is not None else 1.0
        return self.scale_factor * factor

    def reduce(self, losses: Tensor) -> Tensor:
        """Reduces per-sample losses to a scalar."""
        return _reduce(losses, self.reduction)


def _term(node: Mapping[str, Any]) -> WeightedTerm:
    scheduler = instantiate(node["scheduler"]) if node.get("scheduler") is not None else None
    return WeightedTerm(
        node.get("reduction", "mean"), float(node.get("scale_factor", 1.0)), scheduler
    )


class Classifier(pl.LightningModule):
    """An image classifier trained with a supervised loss plus weighted regularization heads.

    Each training batch is a dict with one entry per `data.train` loader; the "supervised" entry
    holds `(images (B, C, H, W), targets (B,))` and each head reads its own entry. The loss is
    `sum_t w_t(step) * reduce_t(per-sample losses of term t)` over the supervised term and the
    heads. `forward` returns class probabilities `(B, num_classes)`.
    """

    def __init__(self, hparams: Mapping[str, Any]) -> None:
        """Builds the backbone, classifier, losses and heads from the hyperparameters.

        Args:
            hparams: A `ClassifierHParams`-shaped mapping (num_classes, model, optimizer,
                lr_scheduler), with interpolations already resolved.
        """
        super().__init__()
        if isinstance(hparams, DictConfig):
            hparams = OmegaConf.to_container(hparams, resolve=True)
        self.save_hyperparameters({"hparams": dict(hparams)})
        hp = self.hparams["hparams"]
        model = hp["model"]
        self.num_classes = int(hp["num_classes"])
        self.backbone: nn.Module = instantiate(model["backbone"])
        self.supervised_head = nn.Linear(self.backbone.out_features, self.num_classes)
        ema = model.get("ema")
        self.ema = None
        if ema:
            unknown = set(ema) - {"decay"}
            if unknown:
                raise ValueError(f"learner.hparams.model.ema has unknown key(s) {sorted(unknown)}")
            decay = float(ema.get("decay", EMAConfig.decay))
            self.ema = EMATeacher(self.backbone, self.supervised_head, decay)
        self.supervised_loss = _build_loss(model["supervised_loss"]["callable"])
        self.supervised_term = _term(model["supervised_loss"])
        heads = model.get("regularization_loss_heads") or {}
        self.regularization_heads = nn.ModuleDict()
        self.regularization_terms: dict[str, WeightedTerm] = {}
        for name, node in heads.items():
            if node is None:  # switched off, e.g. regularization_loss_heads.rotation=null
                continue
            head = instantiate(node["head"])
            if not isinstance(head, LossHead):
                raise TypeError(
                    f"regularization_loss_heads.{name}.head must build a "
                    f"sesemi.models.heads.LossHead, got {type(head).__name__}"
                )
            head.build(self.backbones, self.heads)
            self.regularization_heads[name] = head
            self.regularization_terms[name] = _term(node)
        self.train_top1 = MulticlassAccuracy(self.num_classes, average="micro")
        self.val_top1 = MulticlassAccuracy(self.num_classes, average="micro")
        self.test_top1 = MulticlassAccuracy(self.num_classes, average="micro")
        self.val_loss, self.test_loss = MeanMetric(), MeanMetric()
        self.val_top1_best = MaxMetric()
        if self.ema is not None:
            self.val_ema_top1 = MulticlassAccuracy(self.num_classes, average="micro")
        self.channels_last = bool(hp.get("channels_last", False))
        self.compile_options = hp.get("compile") or False
        self._set_input_normalization(hp.get("input_normalization"))
        if self.channels_last:
            self.to(memory_format=torch.channels_last)
        self.knn = self._knn_config(hp.get("knn"))
        self.knn_bank_loader: Any = None  # set by the runner when knn is configured
        self._knn_bank: tuple[Tensor, Tensor] | None = None
        if self.knn is not None:
            self.val_knn_top1 = MulticlassAccuracy(self.num_classes, average="micro")
        self.confusion = nn.ModuleDict(
            {s: MulticlassConfusionMatrix(self.num_classes) for s in ("val", "test")}
        )
        # The last val / test epoch's confusion matrix (rows: true class, columns: predicted).
        self.confusion_matrices: dict[str, Tensor] = {}
        # What a user of the checkpoint needs besides weights (see `set_metadata`).
        self.class_names: list[str] | None = None
        self.preprocessing: dict[str, Any] | None = None

    def set_metadata(
        self, class_names: list[str] | None, preprocessing: Mapping[str, Any] | None
    ) -> None:
        """Records the class names and eval preprocessing that checkpoints carry.

        Args:
            class_names: The class names, in target order (from the labeled image folders).
            preprocessing: `sesemi.transforms.center_crop_transforms` arguments (input size,
                crop_pct, interpolation, normalization) that prepare an image for the model.
        """
        if class_names is not None and len(class_names) != self.num_classes:
            raise ValueError(
                f"{len(class_names)} class names for a {self.num_classes}-class classifier"
            )
        self.class_names = list(class_names) if class_names is not None else None
        self.preprocessing = dict(preprocessing) if preprocessing is not None else None

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Stores the class names and preprocessing beside the weights."""
        checkpoint[METADATA_KEY] = {
            "class_names": self.class_names,
            "preprocessing": self.preprocessing,
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Restores the class names and preprocessing (a resumed run keeps them)."""
        meta = checkpoint.get(METADATA_KEY) or {}
        if self.class_names is None:
            self.class_names = meta.get("class_names")
        if self.preprocessing is None:
            self.preprocessing = meta.get("preprocessing")

    def _set_input_normalization(self, node: Mapping[str, Any] | None) -> None:
        self.input_normalization = node
        if node is None:
            return
        if set(node) != {"mean", "std"}:
            raise ValueError(
                f"learner.hparams.input_normalization needs exactly mean and std, got {dict(node)}"
            )
        mean = torch.tensor(node["mean"], dtype=torch.float32).view(1, -1, 1, 1)
        std = torch.tensor(node["std"], dtype=torch.float32).view(1, -1, 1, 1)
        self.register_buffer("_input_mean", mean, persistent=False)
        self.register_buffer("_input_std", std, persistent=False)

    def prepare_images(self, images: Tensor) -> Tensor:
        """Scales and normalizes a uint8 image batch `(B, C, H, W)` on its device; float
        batches pass unchanged. With `channels_last`, the batch is made channels-last."""
        if images.dtype == torch.uint8:
            if self.input_normalization is None:
                raise ValueError(
                    "uint8 images reached the learner but learner.hparams.input_normalization "
                    "is not set; set it to {mean: [...], std: [...]} or drop uint8_output"
                )
            images = (images.float() / 255.0 - self._input_mean) / self._input_std
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return images

    def _prepare_batch(self, batch: Any) -> Any:
        if isinstance(batch, Tensor):
            return self.prepare_images(batch) if batch.ndim == 4 else batch
        if isinstance(batch, Mapping):
            return {k: self._prepare_batch(v) for k, v in batch.items()}
        if isinstance(batch, (list, tuple)):
            return type(batch)(self._prepare_batch(v) for v in batch)
        return batch

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Normalizes uint8 image batches on the device (and makes them channels-last)."""
        return self._prepare_batch(batch)

    def configure_model(self) -> None:
        """Compiles the backbone with `torch.compile` when `hparams.compile` asks for it."""
        if self.compile_options and not getattr(self, "_compiled", False):
            options = self.compile_options if isinstance(self.compile_options, Mapping) else {}
            self.backbone.compile(**options)  # in place: state_dict keys stay the same
            self._compiled = True

    @staticmethod
    def _knn_config(node: Mapping[str, Any] | None) -> KNNConfig | None:
        if node is None:
            return None
        unknown = set(node) - {"k", "temperature"}
        if unknown:
            raise ValueError(f"learner.hparams.knn has unknown key(s) {sorted(unknown)}")
        knn = KNNConfig(**node)
        if knn.k < 1 or knn.temperature <= 0:
            raise ValueError(
                f"learner.hparams.knn needs k >= 1 and temperature > 0, got {dict(node)}"
            )
        return knn

    @property
    def backbones(self) -> dict[str, nn.Module]:
        """The feature extractors heads may name (see `HeadInputs.backbones`)."""
        if self.ema is None:
            return {"backbone": self.backbone}
        return {"backbone": self.backbone, "teacher_backbone": self.ema.backbone}

    @property
    def heads(self) -> dict[str, nn.Module]:
        """The prediction heads heads may name (see `HeadInputs.heads`)."""
        if self.ema is None:
            return {"supervised_head": self.supervised_head}
        return {
            "supervised_head": self.supervised_head,
            "teacher_supervised_head": self.ema.supervised_head,
        }

    def forward(self, images: Tensor) -> Tensor:
        """Returns class probabilities `(B, num_classes)` for images `(B, C, H, W)`."""
        return torch.softmax(self.supervised_head(self.backbone(images)), dim=-1)

    @staticmethod
    def _check_finite(total: Tensor, terms: dict[str, Tensor], step: int) -> None:
        # One host sync per step (on the total); the terms are looked at only when it fails.
        if torch.isfinite(total):
            return
        name, loss = next(
            ((n, v) for n, v in terms.items() if not torch.isfinite(v)), ("total", total)
        )
        raise FloatingPointError(
            f"loss term '{name}' is {loss.item()} at step {step}; lower the "
            "learning rate or check the data and the term's weight"
        )

    def compute_losses(self, batch: Mapping[str, Any], step: int) -> tuple[Tensor, dict[str, Any]]:
        """The weighted total loss of one multi-loader batch, and the values to log.

        Args:
            batch: One entry per `data.train` loader; "supervised" is `(images, targets)`.
            step: The global step the weight schedules are evaluated at.

        Returns:
            `sum_t w_t(step) * reduce_t(losses_t)` and a dict of each term's loss and weight.
        """
        images, targets = batch[SUPERVISED]
        features = self.backbone(images)
        logits = self.supervised_head(features)
        loss = self.supervised_term.reduce(self.supervised_loss(logits, targets))
        terms = {SUPERVISED: loss}
        weight = self.supervised_term.weight(step)
        total = weight * loss
        logs: dict[str, Any] = {"supervised_loss": loss, "supervised_weight": weight}
        inputs = HeadInputs(
            data=batch,
            backbones=self.backbones,
            heads=self.heads,
            features={"supervised_backbone": features, "supervised_logits": logits},
            step=step,
        )
        for name, head in self.regularization_heads.items():
            term = self.regularization_terms[name]
            head_loss = term.reduce(head(inputs))
            terms[name] = head_loss
            weight = term.weight(step)
            total = total + weight * head_loss
            logs[f"{name}_loss"], logs[f"{name}_weight"] = head_loss, weight
            logs.update({f"{name}/{k}": v for k, v in head.log_values.items()})
        self._check_finite(total, terms, step)
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

    @staticmethod
    def _unit(features: Tensor) -> Tensor:
        # kNN compares L2-normalized float32 features (cosine similarity).
        return torch.nn.functional.normalize(features.float(), dim=1)

    @torch.no_grad()
    def _build_knn_bank(self) -> tuple[Tensor, Tensor]:
        features, labels = [], []
        for images, targets in self.knn_bank_loader:
            features.append(self._unit(self.backbone(images.to(self.device))))
            labels.append(targets.to(self.device))
        return torch.cat(features), torch.cat(labels)

    def knn_scores(self, features: Tensor) -> Tensor:
        """Class votes `(B, num_classes)` of L2-normalized features by the kNN bank."""
        bank, labels = self._knn_bank
        similarity = features @ bank.T
        top, index = similarity.topk(min(self.knn.k, len(labels)), dim=1)
        votes = torch.zeros(len(features), self.num_classes, device=features.device)
        return votes.scatter_add_(1, labels[index], (top / self.knn.temperature).exp())

    def on_validation_epoch_start(self) -> None:
        """Computes the kNN bank's features with the current backbone."""
        if self.knn is not None and self.knn_bank_loader is not None:
            self._knn_bank = self._build_knn_bank()

    def _evaluate(self, batch: Any, stage: str) -> None:
        images, targets = batch
        features = self.backbone(images)
        logits = self.supervised_head(features)
        if stage == "val" and self._knn_bank is not None:
            self.val_knn_top1(self.knn_scores(self._unit(features)), targets)
            self.log("val/knn/top1", self.val_knn_top1, batch_size=len(targets))
        loss_metric, top1 = (
            (self.val_loss, self.val_top1) if stage == "val" else (self.test_loss, self.test_top1)
        )
        loss_metric(torch.nn.functional.cross_entropy(logits, targets), len(targets))
        top1(logits, targets)
        self.confusion[stage].update(logits, targets)
        self.log(f"{stage}/loss", loss_metric, batch_size=len(targets))
        self.log(f"{stage}/top1", top1, prog_bar=True, batch_size=len(targets))
        if stage == "val" and self.ema is not None:
            self.val_ema_top1(self.ema(images), targets)
            self.log("val/ema/top1", self.val_ema_top1, batch_size=len(targets))

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        """Moves the EMA teacher after each optimizer step."""
        if self.ema is not None:
            self.ema.update(self.backbone, self.supervised_head)

    def on_train_start(self) -> None:
        """Forgets the best val top-1 seen in the sanity check."""
        self.val_top1_best.reset()

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        """Accumulates val loss and top-1 on one `(images, targets)` batch."""
        self._evaluate(batch, "val")

    def _keep_confusion(self, stage: str) -> None:
        # compute() reduces over processes; the matrix is kept on the CPU for the run's report.
        self.confusion_matrices[stage] = self.confusion[stage].compute().cpu()
        self.confusion[stage].reset()

    def on_test_epoch_end(self) -> None:
        """Keeps the test confusion matrix."""
        self._keep_confusion("test")

    def on_validation_epoch_end(self) -> None:
        """Keeps the val confusion matrix and logs the best val top-1 so far."""
        self._keep_confusion("val")
        self.val_top1_best(self.val_top1.compute())
        # val_top1.compute() is already reduced over processes, so every rank logs the same value.
        self.log("val/top1_best", self.val_top1_best.compute(), prog_bar=True, sync_dist=True)

    def test_step(self, batch: Any, batch_idx: int) -> None:
        """Accumulates test loss and top-1 on one `(images, targets)` batch."""
        self._evaluate(batch, "test")

    def configure_optimizers(self) -> Any:
        """Builds the optimizer over trainable parameters and the per-step LR scheduler."""
        hp = self.hparams["hparams"]
        params = [p for p in self.parameters() if p.requires_grad]
        optimizer = instantiate(hp["optimizer"], params=params)
        sched = hp.get("lr_scheduler")
        if not sched:
            return optimizer
        scheduler = instantiate(sched["scheduler"], optimizer=optimizer)
        config = {"scheduler": scheduler, "interval": sched.get("interval", "step")}
        config["frequency"] = sched.get("frequency", 1)
        if sched.get("monitor"):
            config["monitor"] = sched["monitor"]
        return {"optimizer": optimizer, "lr_scheduler": config}
