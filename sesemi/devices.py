"""Maps the spec's `run.gpus` / `run.accelerator` options onto Lightning 2 Trainer arguments."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

import torch

log = logging.getLogger(__name__)

_warned: set[str] = set()


def warn_once(key: str, message: str) -> None:
    """Logs a warning the first time `key` is seen in this process."""
    if key not in _warned:
        _warned.add(key)
        log.warning(message)


@dataclass
class DevicePlan:
    """Trainer arguments for devices and strategy, and how many GPUs they use."""

    accelerator: str
    devices: int | list[int] | str
    strategy: str
    num_gpus: int
    num_nodes: int

    @property
    def world_size(self) -> int:
        """The number of training processes over all nodes."""
        per_node = self.num_gpus if self.accelerator == "gpu" else int(self.devices)
        return max(per_node, 1) * self.num_nodes

    def loader_defaults(self) -> dict[str, Any]:
        """DataLoader settings for loaders that leave them null (auto).

        On GPUs: worker processes (the CPU cores per GPU on this node, at most 8) that persist
        between epochs, and pinned memory. On the CPU: loading in the training process, whose
        threads already use the cores.
        """
        if self.accelerator != "gpu" or self.num_gpus < 1:
            return {"num_workers": 0, "pin_memory": False, "persistent_workers": False}
        workers = max(1, min(8, available_cores() // self.num_gpus - 1))
        return {"num_workers": workers, "pin_memory": True, "persistent_workers": True}

    def trainer_kwargs(self) -> dict[str, Any]:
        """Returns the `pl.Trainer` keyword arguments of this plan."""
        return {
            "accelerator": self.accelerator,
            "devices": self.devices,
            "strategy": self.strategy,
            "num_nodes": self.num_nodes,
        }


def available_cores() -> int:
    """The CPU cores this process may run on (its affinity mask where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def _parse_gpus(gpus: Any) -> int | list[int]:
    if gpus is None:
        return 0
    if isinstance(gpus, str):
        text = gpus.strip()
        if text.lstrip("-").isdigit():
            return int(text)
        try:
            return [int(g) for g in text.split(",") if g.strip()]
        except ValueError:
            raise ValueError(f"run.gpus='{gpus}' is not a GPU count or a list like '0,1'") from None
    if isinstance(gpus, bool):
        raise ValueError("run.gpus must be a number or a list of GPU ids, not a boolean")
    if isinstance(gpus, int):
        return gpus
    return [int(g) for g in gpus]


def _strategy(accelerator: Any, multi_process: bool) -> str:
    if accelerator in (None, "", "auto"):
        return "ddp" if multi_process else "auto"
    if accelerator == "dp":
        warn_once(
            "dp",
            "run.accelerator=dp: DataParallel was removed in Lightning 2; using "
            + ("DistributedDataParallel ('ddp') instead" if multi_process else "a single device"),
        )
        return "ddp" if multi_process else "auto"
    if accelerator == "ddp" and not multi_process:
        return "auto"
    return str(accelerator)


def plan_devices(
    gpus: Any, accelerator: Any = None, num_nodes: int = 1, cpu_devices: Any = None
) -> DevicePlan:
    """Turns the spec's run options into a device plan.

    Args:
        gpus: -1 for every GPU, 0 or None for the CPU, a count, a list of ids, or "0,1".
        accelerator: "ddp", the old "dp" (mapped to ddp with a warning), or a Lightning strategy.
        num_nodes: The number of nodes.
        cpu_devices: Processes per node when training on the CPU (`trainer.devices`), e.g. 2 for
            a two-process DDP run on one machine.

    Returns:
        The plan. Asking for GPUs on a machine without one falls back to the CPU with one
        warning; asking for more GPUs than exist is an error.
    """
    wanted = _parse_gpus(gpus)
    available = torch.cuda.device_count()
    if wanted == -1 and available == 0:  # "every GPU" of a machine that has none: the CPU
        warn_once("no-gpu", f"run.gpus={gpus} but no GPU is available; training on the CPU")
    elif wanted not in (0, [], -1) and available == 0:
        raise ValueError(
            f"run.gpus={gpus} asks for GPUs but this machine has none; use run.gpus=0 (the CPU) "
            "or run.gpus=-1 (every GPU there is, else the CPU)"
        )
    if wanted in (0, []) or available == 0:
        procs = int(cpu_devices) if isinstance(cpu_devices, int) and cpu_devices > 0 else 1
        strategy = _strategy(accelerator, procs * num_nodes > 1)
        return DevicePlan("cpu", procs, strategy, 0, num_nodes)
    if isinstance(wanted, int):
        count = available if wanted == -1 else wanted
        if wanted < -1 or count > available:
            raise ValueError(
                f"run.gpus={gpus} asks for more GPUs than the {available} available; "
                "use run.gpus=-1 for all of them"
            )
        devices: int | list[int] = count
    else:
        missing = [g for g in wanted if not 0 <= g < available]
        if missing:
            raise ValueError(
                f"run.gpus={gpus}: GPU id(s) {missing} do not exist (ids 0..{available - 1})"
            )
        devices, count = wanted, len(wanted)
    multi = count * num_nodes > 1
    return DevicePlan("gpu", devices, _strategy(accelerator, multi), count, num_nodes)


def cpu_has_bf16() -> bool:
    """Whether this CPU has bf16 instructions (AVX-512 BF16 or AMX), from /proc/cpuinfo."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return any(flag in flags.split() for flag in ("avx512_bf16", "amx_bf16"))


def warn_slow_cpu_precision(plan: DevicePlan, precision: Any) -> None:
    """Warns that bf16 / fp16 autocast on a CPU without bf16 instructions is slow."""
    text = str(precision or "")
    if plan.accelerator == "cpu" and text.startswith(("bf16", "16")) and not cpu_has_bf16():
        warn_once(
            "cpu_precision",
            f"trainer.precision={text} on a CPU without bf16 instructions (AVX-512 BF16 or AMX): "
            "Lightning runs bf16 autocast, emulated and usually slower than 32-bit here; "
            "drop the precision option for CPU runs",
        )


def choose_channels_last(
    channels_last: bool | None, plan: DevicePlan, precision: Any, compile_options: Any
) -> bool:
    """Whether the model and image batches go channels-last (`learner.hparams.channels_last`).

    null (auto): on for CPU training (oneDNN's faster layout); on GPUs, on under 16-bit
    precision (tensor cores want channels-last: a ResNet-50 bf16 step at 224 px ran 1.66x faster
    in it on an H200, `benchmarks/results/gpu_throughput_h200.md`) and off in 32-bit (not
    measured there); off on other accelerators. On GPUs it is off whenever the backbone is
    compiled: `torch.compile` lays convolutions out itself, and a channels-last model compiled
    under bf16 failed its first backward pass in PyTorch 2.11 on an H200 (an inductor stride
    assertion in `convolution_backward`). An explicit true is turned off there with a warning.

    Args:
        channels_last: The configured value: True, False or None (auto).
        plan: The devices.
        precision: `trainer.precision` (None: 32-bit).
        compile_options: `learner.hparams.compile` (falsy: not compiled).

    Returns:
        The value the learner is built with.
    """
    gpu = plan.accelerator == "gpu"
    if gpu and compile_options:
        if channels_last:
            warn_once(
                "channels_last_compile",
                "learner.hparams.channels_last=true with learner.hparams.compile on a GPU: "
                "turned off (a compiled channels-last model failed its first backward pass in "
                "PyTorch 2.11's inductor; torch.compile chooses the convolutions' layout itself)",
            )
        return False
    if channels_last is not None:
        return bool(channels_last)
    if gpu:
        return "16" in str(precision or "")
    return plan.accelerator == "cpu"
