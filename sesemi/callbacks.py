"""Lightning callbacks of ours: an always-current, atomically written `last.ckpt`."""

from __future__ import annotations

import os

import pytorch_lightning as pl
from pytorch_lightning.callbacks import Callback


class LastCheckpoint(Callback):
    """Writes `dirpath/last.ckpt` after every validation and epoch of training.

    Lightning 2's `ModelCheckpoint(save_last=True)` refreshes `last.ckpt` only when it also saves
    a top-k checkpoint, so after an epoch that did not improve the monitored metric the file is
    stale; resuming needs the newest state. The file is written to a temporary name and renamed,
    so a kill during the save leaves the previous `last.ckpt` intact.
    """

    FILENAME = "last.ckpt"

    def __init__(self, dirpath: str, every_n_steps: int | None = None) -> None:
        """Initializes the callback.

        Args:
            dirpath: The checkpoint folder.
            every_n_steps: Also save every this many optimizer steps (None: only at
                validation and epoch ends).
        """
        self.dirpath = dirpath
        self.every_n_steps = every_n_steps
        self._saved_step = -1

    @property
    def path(self) -> str:
        """The path of `last.ckpt`."""
        return os.path.join(self.dirpath, self.FILENAME)

    def save(self, trainer: pl.Trainer) -> None:
        """Saves the full trainer state (every rank calls this; rank zero writes)."""
        if trainer.global_step == self._saved_step:
            return
        self._saved_step = trainer.global_step
        tmp = self.path + ".tmp"
        trainer.save_checkpoint(tmp)
        if trainer.is_global_zero:
            os.replace(tmp, self.path)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking and trainer.state.fn == "fit":
            self.save(trainer)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.save(trainer)

    def on_train_batch_end(self, trainer: pl.Trainer, *args: object) -> None:
        if self.every_n_steps and trainer.global_step % self.every_n_steps == 0:
            self.save(trainer)
