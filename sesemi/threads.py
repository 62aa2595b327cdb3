"""CPU threads per training process: the machine's cores shared among the sesemi runs on it.

Two training processes that each take every core (torch's default) run far slower together
than one alone: their threads preempt each other at every parallel region. Parallel multirun
jobs, two runs side by side and CPU DDP ranks all meet this. Each training process registers
itself in a per-user folder of the machine's temp dir while it trains; `ThreadShare` sets its
intra-op threads to `cores / live registered processes` and checks again every few seconds,
so the share follows runs as they start and finish.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback

from sesemi.devices import available_cores

log = logging.getLogger(__name__)

CHECK_SECONDS = 10.0  # how often a process recounts the runs that share the machine


def registry_dir() -> str:
    """The folder where this user's training processes on this machine register."""
    uid = os.getuid() if hasattr(os, "getuid") else "user"
    return os.path.join(tempfile.gettempdir(), f"sesemi-{uid}-training")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def live_processes(folder: str) -> int:
    """The registered processes still running (entries of finished ones are removed)."""
    count = 0
    for name in os.listdir(folder) if os.path.isdir(folder) else []:
        if not name.isdigit():
            continue
        if _alive(int(name)):
            count += 1
        else:
            try:
                os.remove(os.path.join(folder, name))
            except OSError:
                pass
    return count


def shared_threads(cores: int, processes: int) -> int:
    """Threads for one of `processes` processes sharing `cores` cores (at least 1)."""
    return max(1, cores // max(processes, 1))


class ThreadShare(Callback):
    """Sets this process's intra-op threads while it trains, and restores them afterwards.

    `threads` (run.threads) fixes the count. With None, the count is the cores this process
    may use (its affinity mask) divided by the live sesemi training processes on the machine,
    rechecked every `CHECK_SECONDS`; an OMP_NUM_THREADS set in the environment is respected
    instead (Lightning sets it for CPU DDP ranks, as cores / ranks).
    """

    def __init__(self, threads: int | None = None, folder: str | None = None) -> None:
        """Initializes the callback.

        Args:
            threads: A fixed thread count (at least 1), or None for the shared count.
            folder: The registry folder (default: `registry_dir()`).

        Raises:
            ValueError: If `threads` is below 1.
        """
        if threads is not None and int(threads) < 1:
            raise ValueError(f"run.threads must be at least 1 (or null for auto), got {threads}")
        self.threads = None if threads is None else int(threads)
        self.folder = folder or registry_dir()
        self._entry: str | None = None
        self._before: int | None = None
        self._checked = 0.0
        self._current: int | None = None

    def _set(self, threads: int, why: str) -> None:
        if threads != self._current:
            torch.set_num_threads(threads)
            log.info("CPU threads: %d (%s; set run.threads to fix it)", threads, why)
            self._current = threads

    def _share(self) -> None:
        self._checked = time.monotonic()
        cores, processes = available_cores(), live_processes(self.folder)
        threads = shared_threads(cores, processes)
        self._set(threads, f"{cores} cores / {processes} sesemi training process(es)")

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit" or self._before is not None:
            return
        self._before = torch.get_num_threads()
        if self.threads is not None:
            self._set(self.threads, "run.threads")
            return
        if "OMP_NUM_THREADS" in os.environ:
            return
        os.makedirs(self.folder, exist_ok=True)
        self._entry = os.path.join(self.folder, str(os.getpid()))
        with open(self._entry, "w"):
            pass
        self._share()

    def on_train_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        if self._entry is not None and time.monotonic() - self._checked > CHECK_SECONDS:
            self._share()

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit" or self._before is None:
            return
        if self._entry is not None:
            try:
                os.remove(self._entry)
            except OSError:
                pass
            self._entry = None
        torch.set_num_threads(self._before)
        self._before, self._current = None, None
