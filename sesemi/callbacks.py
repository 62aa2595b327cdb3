"""Lightning callbacks of ours: an atomic `last.ckpt`, kNN evaluation, confusion-matrix reports."""

from __future__ import annotations

import os
import random
import time
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.callbacks import Callback, ProgressBar, RichProgressBar, TQDMProgressBar
from torch import Tensor
from torchmetrics.classification import MulticlassConfusionMatrix

from sesemi.checkpoints import METADATA_KEY
from sesemi.evaluation import write_confusion_report


class LastCheckpoint(Callback):
    """Writes `dirpath/last.ckpt` after every validation, at the end of training and, at most
    every `min_seconds`, at epoch ends.

    Lightning 2's `ModelCheckpoint(save_last=True)` refreshes `last.ckpt` only when it also saves
    a top-k checkpoint, so after an epoch that did not improve the monitored metric the file is
    stale; resuming needs the newest state. The file is written to a temporary name and renamed,
    so a kill during the save leaves the previous `last.ckpt` intact.

    Epoch ends are rate-limited because short epochs (a few labeled images make one-step
    epochs) would otherwise write the whole model every step; a run killed between saves resumes
    from the newest one, exactly (see `_restore_rng`), repeating at most `min_seconds` of work.

    Every checkpoint also carries the random number generators' states (Python, NumPy, torch on
    the CPU and GPUs); a resumed run restores them when its first epoch starts (from an
    epoch-end checkpoint) or just before the step it stopped at (mid-epoch), so it draws the
    same data order, augmentations and dropout masks as the run that was never stopped.
    """

    FILENAME = "last.ckpt"

    def __init__(
        self, dirpath: str, every_n_steps: int | None = None, min_seconds: float = 60.0
    ) -> None:
        """Initializes the callback.

        Args:
            dirpath: The checkpoint folder.
            every_n_steps: Also save every this many optimizer steps (None: only at
                validation, epoch ends and the end).
            min_seconds: The least time between two saves at epoch ends (0: every epoch).
        """
        self.dirpath = dirpath
        self.every_n_steps = every_n_steps
        self.min_seconds = min_seconds
        self._saved_step = -1
        self._saved_at = time.monotonic()

    @property
    def path(self) -> str:
        """The path of `last.ckpt`."""
        return os.path.join(self.dirpath, self.FILENAME)

    def save(self, trainer: pl.Trainer, mid_epoch: bool = False) -> None:
        """Saves the full trainer state (every rank calls this; rank zero writes).

        Args:
            trainer: The trainer.
            mid_epoch: Whether the epoch goes on after this checkpoint (a validation inside it).
        """
        if trainer.global_step == self._saved_step:
            return
        self._saved_step = trainer.global_step
        self._saved_at = time.monotonic()
        self._mid_epoch = mid_epoch
        tmp = self.path + ".tmp"
        trainer.save_checkpoint(tmp, weights_only=False)
        if trainer.is_global_zero:
            os.replace(tmp, self.path)

    def state_dict(self) -> dict[str, Any]:
        """The RNG states at save time (plain tensors and tuples, loadable weights-only)."""
        version, keys, gauss = random.getstate()
        name, mt, pos, has_gauss, cached = np.random.get_state()
        state = {
            "python": (version, tuple(keys), gauss),
            "numpy": (name, torch.from_numpy(mt.astype(np.int64)), pos, has_gauss, cached),
            "torch": torch.get_rng_state(),
        }
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return {"rng": state, "mid_epoch": getattr(self, "_mid_epoch", False)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Keeps the saved RNG states until training goes on (see `_restore_rng`)."""
        self._pending_rng = state_dict.get("rng")
        self._pending_mid_epoch = bool(state_dict.get("mid_epoch", False))

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # From an epoch-end checkpoint: after restoring, model building and the sanity check
        # (which Lightning isolates), just before the epoch's data iterators draw their seeds.
        if not getattr(self, "_pending_mid_epoch", False):
            self._restore_rng()

    def on_train_batch_start(self, trainer: pl.Trainer, *args: object) -> None:
        # From a mid-epoch checkpoint: after the resumed loaders have restored their position
        # (which may draw from the generators), just before the step the run stopped before.
        self._restore_rng()

    def _restore_rng(self) -> None:
        state = getattr(self, "_pending_rng", None)
        if state is None:
            return
        self._pending_rng = None
        version, keys, gauss = state["python"]
        random.setstate((version, tuple(keys), gauss))
        name, mt, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((name, mt.numpy().astype(np.uint32), pos, has_gauss, cached))
        torch.set_rng_state(state["torch"])
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking and trainer.state.fn == "fit":
            last = trainer.fit_loop.epoch_loop.batch_progress.is_last_batch
            self.save(trainer, mid_epoch=not last and not trainer.should_stop)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if time.monotonic() - self._saved_at >= self.min_seconds:
            self.save(trainer)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.save(trainer)

    def on_train_batch_end(self, trainer: pl.Trainer, *args: object) -> None:
        if self.every_n_steps and trainer.global_step % self.every_n_steps == 0:
            self.save(trainer)


class KNNEvaluation(Callback):
    """Classifies every val image by its k most similar labeled training images' classes.

    At each validation start the backbone encodes the labeled images (the `bank_loader`, read
    with the val transform); each val image's L2-normalized features then take the k most
    cosine-similar bank images, each voting `exp(similarity / temperature)` for its class
    (Wu et al., arXiv:1805.01978). Logs `val/knn/top1`. Every process holds the whole bank.
    """

    def __init__(self, bank_loader: Iterable, k: int = 20, temperature: float = 0.07) -> None:
        """Initializes the callback.

        Args:
            bank_loader: The labeled images with the val transform: `(images, targets)` batches.
            k: The number of neighbours.
            temperature: The softness of the vote weights.
        """
        if k < 1 or temperature <= 0:
            raise ValueError(
                f"learner.hparams.knn needs k >= 1 and temperature > 0, got k={k}, "
                f"temperature={temperature}"
            )
        self.bank_loader = bank_loader
        self.k = k
        self.temperature = temperature
        self._bank: tuple[Tensor, Tensor] | None = None
        self._counts: Tensor | None = None

    @staticmethod
    def _unit(features: Tensor) -> Tensor:
        return F.normalize(features.float(), dim=1)

    @torch.no_grad()
    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        features, labels = [], []
        for batch in self.bank_loader:
            images, targets = pl_module.prepare_batch(batch[0].to(pl_module.device)), batch[1]
            features.append(self._unit(pl_module.net.backbone(images)))
            labels.append(targets.to(pl_module.device))
        self._bank = torch.cat(features), torch.cat(labels)
        self._counts = torch.zeros(2, device=pl_module.device)  # correct, total

    def scores(self, features: Tensor, num_classes: int) -> Tensor:
        """Class votes `(B, num_classes)` for L2-normalized features `(B, D)`."""
        bank, labels = self._bank
        top, index = (features @ bank.T).topk(min(self.k, len(labels)), dim=1)
        votes = torch.zeros(len(features), num_classes, device=features.device)
        return votes.scatter_add_(1, labels[index], (top / self.temperature).exp())

    def on_validation_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, *args: Any
    ) -> None:
        if self._bank is None or not isinstance(outputs, Mapping):
            return
        votes = self.scores(self._unit(outputs["features"]), pl_module.num_classes)
        correct = (votes.argmax(dim=1) == outputs["targets"]).sum()
        self._counts += torch.stack([correct, correct.new_tensor(len(votes))]).float()

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._counts is None:
            return
        counts = trainer.strategy.reduce(self._counts, reduce_op="sum")
        pl_module.log("val/knn/top1", counts[0] / counts[1].clamp(min=1), sync_dist=False)
        self._bank = self._counts = None


class ConfusionReport(Callback):
    """Writes the confusion matrix and per-class accuracy of the last validation or test.

    FIT runs report their last validation (the final weights), VALIDATE and TEST runs their
    one evaluation: `<stage>_confusion_matrix.csv`, `<stage>_confusion_matrix.png` and
    `<stage>_per_class_accuracy.csv` in `out_dir` (see `sesemi.evaluation`).
    """

    def __init__(self, out_dir: str, class_names: list[str] | None, num_classes: int) -> None:
        """Initializes the callback.

        Args:
            out_dir: The folder to write to (the run directory).
            class_names: The class names in target order (None: the class indices).
            num_classes: The number of classes.
        """
        self.out_dir = out_dir
        self.class_names = class_names or [str(i) for i in range(num_classes)]
        self.matrix = MulticlassConfusionMatrix(num_classes)
        self.last: tuple[str, Tensor] | None = None
        self.reports: list[str] = []

    def _update(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any) -> None:
        if trainer.sanity_checking or not isinstance(outputs, Mapping):
            return
        self.matrix = self.matrix.to(pl_module.device)
        self.matrix.update(outputs["logits"].detach(), outputs["targets"])

    def _keep(self, trainer: pl.Trainer, stage: str) -> None:
        if trainer.sanity_checking:
            return
        # compute() reduces over processes; the matrix is kept on the CPU for the report.
        self.last = stage, self.matrix.compute().cpu()
        self.matrix.reset()

    def on_validation_batch_end(self, trainer, pl_module, outputs, *args: Any) -> None:
        self._update(trainer, pl_module, outputs)

    def on_test_batch_end(self, trainer, pl_module, outputs, *args: Any) -> None:
        self._update(trainer, pl_module, outputs)

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._keep(trainer, "val")

    def on_test_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._keep(trainer, "test")

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self.last is not None and trainer.is_global_zero:
            stage_name, matrix = self.last
            self.reports = write_confusion_report(
                matrix, self.class_names, self.out_dir, stage_name
            )


class ValidateLastStep(Callback):
    """Validates the final weights of a run whose length is a step count (`run.num_iterations`).

    Lightning validates at epoch ends and every `val_check_interval` steps, so a run whose last
    step falls elsewhere (fewer steps than an epoch, say) would end without validating its
    final weights; asking the trainer to stop at that step makes it validate there, which the
    best and last checkpoints then see.
    """

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        if trainer.max_steps > 0 and trainer.global_step >= trainer.max_steps:
            trainer.should_stop = True


class CheckpointMetadata(Callback):
    """Writes what a user of a checkpoint needs besides the weights into every checkpoint.

    `checkpoint["sesemi"]` holds the class names (in target order), the eval preprocessing
    (`center_crop_transforms` arguments) and a plain description of the network (its class
    count and, for `sesemi.PyTorchImageModels`, the timm name and arguments), so `predict`,
    `export` and `load_classifier` rebuild it from data alone; the hand-labeled training images
    of each class (`pseudo-label --balance crest` rates the classes by them); and the number of
    training processes, which a resumed run must match.
    """

    def __init__(
        self,
        class_names: list[str] | None,
        preprocessing: Mapping | None,
        labeled_class_counts: list[int] | None = None,
    ) -> None:
        """Initializes the callback.

        Args:
            class_names: The class names in target order (from the labeled image folders).
            preprocessing: `center_crop_transforms` arguments that prepare an image.
            labeled_class_counts: The hand-labeled training images of each class, for
                `pseudo-label --balance crest`; None when unknown.
        """
        self.class_names = list(class_names) if class_names is not None else None
        self.preprocessing = dict(preprocessing) if preprocessing is not None else None
        counts = [int(n) for n in labeled_class_counts or []]
        # Classes past the last labeled one have no images (the tally stops at the last).
        counts += [0] * (len(self.class_names or []) - len(counts))
        self.labeled_class_counts = counts if labeled_class_counts is not None else None

    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        net = getattr(pl_module, "net", None)
        backbone = getattr(net, "backbone", None)
        spec = getattr(backbone, "spec", None)
        checkpoint[METADATA_KEY] = {
            "class_names": self.class_names,
            "preprocessing": self.preprocessing,
            "model": {
                "num_classes": getattr(net, "num_classes", None),
                "backbone": spec() if callable(spec) else None,
                "reference_image": list(getattr(net, "reference_image", None) or []) or None,
            },
            "labeled_class_counts": self.labeled_class_counts,
            "world_size": trainer.world_size,  # training processes (resume needs as many)
        }


class DataEpoch(Callback):
    """Tells the data module each training epoch as it starts (`set_epoch`), for the per-sample
    augmentation seeds of `sesemi.data.IndexedDataset`."""

    def __init__(self, data: Any) -> None:
        """Initializes the callback.

        Args:
            data: An object with `set_epoch(epoch)` (the `SESEMIDataModule`).
        """
        self.data = data

    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        # A run resumed mid-epoch continues that epoch without on_train_epoch_start, and its
        # loaders' workers may start fetching before on_train_start.
        self.data.set_epoch(int(checkpoint.get("epoch", 0)))

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.data.set_epoch(trainer.current_epoch)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.data.set_epoch(trainer.current_epoch)


def run_description(trainer: pl.Trainer) -> str | None:
    """`Epoch E · step S/N` for a run measured in steps (`max_epochs=-1`, `max_steps=N`), whose
    epochs say nothing of how far the run is (a few labeled images make one-step epochs); None
    for a run measured in epochs."""
    if trainer.max_epochs is None or trainer.max_epochs >= 0 or trainer.max_steps < 0:
        return None
    return f"Epoch {trainer.current_epoch} · step {trainer.global_step}/{trainer.max_steps}"


class StepsRichProgressBar(RichProgressBar):
    """Lightning's rich progress bar, labelled with the run's step count in runs measured in
    steps (Lightning's own label reads `Epoch 3/-2` there: `max_epochs - 1` of an endless run)."""

    def _get_train_description(self, current_epoch: int) -> str:
        text = run_description(self.trainer)
        if text is None:
            return super()._get_train_description(current_epoch)
        return f"{text:{len(self.validation_description)}}"  # padded as Lightning pads its own

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if run_description(trainer) and self.progress is not None:
            if self.train_progress_bar_id is not None:
                description = self._get_train_description(trainer.current_epoch)
                self.progress.update(self.train_progress_bar_id, description=description)


class StepsTQDMProgressBar(TQDMProgressBar):
    """Lightning's tqdm progress bar (used where `rich` is not installed), labelled with the
    run's step count in runs measured in steps, as `StepsRichProgressBar`."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        text = run_description(trainer)
        if text is not None:
            self.train_progress_bar.set_description(text, refresh=False)
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)


def progress_bar() -> ProgressBar:
    """The progress bar Lightning would pick (rich where installed, else tqdm), with run steps."""
    from pytorch_lightning.callbacks.progress.rich_progress import _RICH_AVAILABLE

    return StepsRichProgressBar() if _RICH_AVAILABLE else StepsTQDMProgressBar()
