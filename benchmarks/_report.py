"""What every benchmark script does with its finished markdown report."""

from __future__ import annotations

import pathlib


def emit(report: str, out: str | None) -> None:
    """Prints the report and, with `out`, writes it there (creating its folder)."""
    print("\n" + report)
    if out:
        path = pathlib.Path(out)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(report)
