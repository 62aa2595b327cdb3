"""What every benchmark script does with its finished markdown report."""

from __future__ import annotations

import datetime
import importlib.metadata
import os
import pathlib
import platform
import shlex
import sys

# The packages whose versions every sesemi report names.
VERSIONS = ("torch", "pytorch-lightning", "hydra-core", "scikit-learn", "sesemi")


def accelerator() -> str:
    """`; GPU: <name>` where CUDA sees one (the jobs may use it), else nothing."""
    import torch

    return f"; GPU: {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ""


def version(package: str) -> str:
    """The installed version of `package`; for sesemi run from a source tree on PYTHONPATH (not
    installed, as on a lent GPU machine), the tree's own `__version__`."""
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        if package == "sesemi":
            import sesemi

            return f"{sesemi.__version__} (source tree, not installed)"
        return "not installed"


def provenance(argv: list[str], threads: int, packages: tuple[str, ...] = VERSIONS) -> list[str]:
    """The report lines saying how it was made: command, date, machine and versions."""
    versions = ", ".join(f"{p} {version(p)}" for p in packages)
    return [
        f"- command: `{shlex.join(['python', os.path.relpath(sys.argv[0]), *argv])}`",
        f"- date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}",
        f"- machine: {platform.machine()}, {os.cpu_count()} CPUs, OMP_NUM_THREADS={threads}, "
        f"OMP_WAIT_POLICY=PASSIVE{accelerator()}",
        f"- versions: {versions}, Python {platform.python_version()}",
    ]


def emit(report: str, out: str | None) -> None:
    """Prints the report and, with `out`, writes it there (creating its folder)."""
    print("\n" + report)
    if out:
        path = pathlib.Path(out)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(report)


def closing(wall: float, overrides: list[str], what: str = "job") -> list[str]:
    """The report lines after the settings: wall time and the extra overrides, if any."""
    lines = [f"- total wall time: {wall / 60:.1f} min"]
    if overrides:
        lines.append(f"- extra overrides for every {what}: `{shlex.join(overrides)}`")
    return lines
