"""Lightning callbacks of ours: an always-current, atomically written `last.ckpt`."""

from __future__ import annotations

import os
import random
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback


class LastCheckpoint(Callback):
    """Writes `dirpath/last.ckpt` after every validation and epoch of training.

    Lightning 2's `ModelCheckpoint(save_last=True)` refreshes `last.ckpt` only when it also saves
    a top-k checkpoint, so after an epoch that did not improve the monitored metric the file is
    stale; resuming needs the newest state. The file is written to a temporary name and renamed,
    so a kill during the save leaves the previous `last.ckpt` intact.

    Every checkpoint also carries the random number generators' states (Python, NumPy, torch on
    the CPU and GPUs); a resumed run restores them when its first epoch starts, so, from a
    checkpoint taken at the end of an epoch, it draws the same data order, augmentations and
    dropout masks as the run that was never stopped.
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
        return {"rng": state}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Keeps the saved RNG states until training starts (see `on_train_epoch_start`)."""
        self._pending_rng = state_dict.get("rng")

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # After restoring, model building and the sanity check (which Lightning isolates), just
        # before the epoch's data iterators draw their seeds.
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
            self.save(trainer)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.save(trainer)

    def on_train_batch_end(self, trainer: pl.Trainer, *args: object) -> None:
        if self.every_n_steps and trainer.global_step % self.every_n_steps == 0:
            self.save(trainer)
