"""Processes started by an outside launcher (`torchrun`, SLURM's `srun`): which one this is, and
the one run folder they all write to.

Each process of such a launch runs `open_sesemi` on its own and composes its own config, so
without help every process would claim a run folder of its own (`<run.dir>/<run.id>/<time>`,
the time differing between nodes by a second or two). Instead:

- under `torchrun`, rank 0 claims the folder as a single run does and posts its path in the
  launcher's key-value store (the agent store at `MASTER_ADDR:MASTER_PORT` that `torchrun` runs
  for its workers); the other ranks read it from there;
- under `srun` (several tasks), every task uses `<run.dir>/<run.id>/slurm-<job id>.<step id>`.

Processes other than rank 0 write no `.hydra/` folder and log to `cli_rank<R>.log`; checkpoints,
metrics and reports are written by rank 0 only (Lightning's rank-zero rule).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta

STORE_TIMEOUT = timedelta(minutes=10)  # how long other ranks wait for rank 0's folder


@dataclass(frozen=True)
class LaunchPeer:
    """This process's place in a launch of several processes by an outside launcher."""

    rank: int
    world_size: int
    launcher: str  # "torchrun" or "srun"


def external_launch(environ: os._Environ | dict | None = None) -> LaunchPeer | None:
    """The process's rank when an outside launcher started it as one of several, else None.

    `torchrun` is recognized by `TORCHELASTIC_RUN_ID` with `RANK` and `WORLD_SIZE` > 1; `srun`
    by `SLURM_PROCID` in a step (`SLURM_STEP_ID`) of more than one task (`SLURM_NTASKS`).
    Lightning's own worker processes (`trainer.devices` > 1 on one machine) are neither.
    """
    env = os.environ if environ is None else environ
    if "TORCHELASTIC_RUN_ID" in env and "RANK" in env:
        world_size = int(env.get("WORLD_SIZE", "1"))
        return LaunchPeer(int(env["RANK"]), world_size, "torchrun") if world_size > 1 else None
    if "SLURM_PROCID" in env and "SLURM_STEP_ID" in env and "SLURM_JOB_ID" in env:
        world_size = int(env.get("SLURM_NTASKS", "1"))
        return LaunchPeer(int(env["SLURM_PROCID"]), world_size, "srun") if world_size > 1 else None
    return None


def peer_overrides(peer: LaunchPeer | None) -> list[str]:
    """Hydra overrides for a process other than rank 0: no `.hydra/` folder of its own (rank 0
    writes it) and a log file of its own in the shared run folder."""
    if peer is None or peer.rank == 0:
        return []
    return ["hydra.output_subdir=null", f"hydra.job.name=cli_rank{peer.rank}"]


def shared_run_dir(path: str, claim: Callable[[str], str]) -> str | None:
    """The run folder every process of an outside launch uses, or None when this process was
    not started by one (it then claims its own folder).

    Args:
        path: The folder a single run would claim (`<run.dir>/<run.id>/<time>`).
        claim: Claims a new folder for `path` (exclusive creation), returning the folder.
    """
    peer = external_launch()
    if peer is None:
        return None
    env = os.environ
    if peer.launcher == "srun":
        step = f"slurm-{env['SLURM_JOB_ID']}.{env['SLURM_STEP_ID']}"
        folder = os.path.join(os.path.dirname(path), step)
        os.makedirs(folder, exist_ok=True)
        return folder
    if env.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() != "true":
        return None  # no store to share the path through: each process claims its own
    from torch.distributed import TCPStore

    store = TCPStore(
        env["MASTER_ADDR"], int(env["MASTER_PORT"]), is_master=False, timeout=STORE_TIMEOUT
    )
    key = f"sesemi/run_dir/{env.get('TORCHELASTIC_RESTART_COUNT', '0')}"
    if peer.rank == 0:
        folder = claim(path)
        store.set(key, folder)
        return folder
    return store.get(key).decode()
