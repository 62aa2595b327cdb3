"""Method comparison after a multirun: one table of val/top1 per configuration over seeds.

Each job writes `summary.json` (its metrics and wall time) and Hydra writes its
`.hydra/overrides.yaml`; the table is built from those files on disk, so it works with any
launcher (in-process, joblib, submitit on a cluster). Jobs whose overrides differ only in
`run.seed` form one row.
"""

from __future__ import annotations

import csv
import json
import math
import os
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import yaml

SUMMARY_NAME = "summary.json"
SEED_KEYS = ("run.seed",)
TABLE_NAME = "comparison"  # comparison.csv and comparison.png in the multirun folder


@dataclass
class Row:
    """One configuration's runs: its overrides (seed excluded) and each seed's result."""

    configuration: str
    seeds: list[Any] = field(default_factory=list)
    values: list[float] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)

    @property
    def finite(self) -> list[float]:
        """The seeds' values that exist (a run without the metric gives NaN)."""
        return [v for v in self.values if not math.isnan(v)]

    @property
    def mean(self) -> float:
        """The mean metric over seeds (NaN without any)."""
        return statistics.fmean(self.finite) if self.finite else math.nan

    @property
    def std(self) -> float:
        """The sample standard deviation over seeds (0 for one seed)."""
        return statistics.stdev(self.finite) if len(self.finite) > 1 else 0.0


def _job_record(job_dir: str, metric: str) -> tuple[list[str], Any, float, float] | None:
    summary = os.path.join(job_dir, SUMMARY_NAME)
    if not os.path.isfile(summary):
        return None
    with open(summary) as f:
        result = json.load(f)
    overrides_path = os.path.join(job_dir, ".hydra", "overrides.yaml")
    overrides: list[str] = []
    if os.path.isfile(overrides_path):
        with open(overrides_path) as f:
            overrides = [str(o) for o in yaml.safe_load(f) or []]
    seed = None
    kept = []
    for item in overrides:
        key, _, value = item.partition("=")
        if key.lstrip("+~") in SEED_KEYS:
            seed = value
        else:
            kept.append(item)
    value = result.get("metrics", {}).get(metric, math.nan)
    return kept, seed, float(value), float(result.get("seconds", 0.0))


def collect(sweep_dir: str, metric: str = "val/top1") -> list[Row]:
    """Reads every job folder of a multirun into one row per configuration (seeds pooled).

    A configuration is named by the overrides that tell its jobs from the others' (those every
    job shares, such as a shorter run for all, are left out of the name).

    Args:
        sweep_dir: The multirun folder (Hydra's `hydra.sweep.dir`).
        metric: The metric to compare, from each job's `summary.json`.

    Returns:
        The rows in the order their first job ran.
    """
    # Hydra's job folders are numbered 0, 1, ...: in job order, not string order.
    names = sorted(os.listdir(sweep_dir), key=lambda n: (len(n), n) if n.isdigit() else (1e9, n))
    records = []
    for name in names:
        path = os.path.join(sweep_dir, name)
        record = _job_record(path, metric) if os.path.isdir(path) else None
        if record is not None:
            records.append(record)
    shared = set.intersection(*(set(r[0]) for r in records)) if len(records) > 1 else set()
    rows: dict[str, Row] = {}
    for overrides, seed, value, seconds in records:
        configuration = " ".join(o for o in overrides if o not in shared) or "(defaults)"
        row = rows.setdefault(configuration, Row(configuration))
        row.seeds.append(seed)
        row.values.append(value)
        row.seconds.append(seconds)
    return list(rows.values())


def _seconds(seconds: list[float]) -> str:
    if not seconds:
        return ""
    mean = statistics.fmean(seconds)
    return f"{mean:.1f}" if mean < 100 else f"{mean:.0f}"


def format_table(rows: Sequence[Row], metric: str = "val/top1") -> str:
    """The comparison as aligned text: configuration, seeds, mean ± std, per seed, s/run."""
    header = ["configuration", "seeds", f"{metric} mean ± std", "per seed", "s/run"]
    lines = [
        [
            r.configuration,
            str(len(r.values)),
            f"{r.mean:.4f} ± {r.std:.4f}",
            " ".join(f"{v:.4f}" for v in r.values),
            _seconds(r.seconds),
        ]
        for r in rows
    ]
    widths = [max(len(x[i]) for x in [header, *lines]) for i in range(len(header))]
    text = ["  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)).rstrip()]
    for line in lines:
        text.append("  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip())
    return "\n".join(text)


def write_csv(rows: Sequence[Row], path: str, metric: str = "val/top1") -> str:
    """Writes one line per configuration (mean, std, each seed's value, mean seconds)."""
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(
            [
                "configuration",
                "seeds",
                f"{metric}_mean",
                f"{metric}_std",
                "per_seed",
                "seed_values",
                "seconds_per_run",
            ]
        )
        for r in rows:
            writer.writerow(
                [
                    r.configuration,
                    len(r.values),
                    f"{r.mean:.6f}",
                    f"{r.std:.6f}",
                    " ".join(f"{v:.6f}" for v in r.values),
                    " ".join(str(s) for s in r.seeds),
                    f"{statistics.fmean(r.seconds):.1f}" if r.seconds else "",
                ]
            )
    return path


def write_chart(rows: Sequence[Row], path: str, metric: str = "val/top1") -> str:
    """Draws each configuration's mean as a bar with a ± std error bar and every seed as a dot."""
    import matplotlib

    matplotlib.use("Agg")  # files only; never opens a window
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(4.0, 1.2 * len(rows) + 2), 4.5))
    positions = range(len(rows))
    ax.bar(
        positions,
        [r.mean for r in rows],
        yerr=[r.std for r in rows],
        capsize=4,
        color="#9ecae1",
        edgecolor="#3182bd",
    )
    for i, r in enumerate(rows):
        ax.scatter([i] * len(r.values), r.values, color="#08519c", s=14, zorder=3)
    ax.set_xticks(list(positions), [r.configuration for r in rows], rotation=30, ha="right")
    ax.set_ylabel(f"{metric} (mean ± std over seeds)")
    finite = [v for r in rows for v in r.values if not math.isnan(v)]
    if finite:
        low = min(finite)
        ax.set_ylim(max(0.0, low - 0.1 * (1.0 - low + 0.05)), min(1.0, max(finite) + 0.02))
    ax.set_title(f"{metric} by configuration")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def compare(sweep_dir: str, metric: str = "val/top1") -> tuple[str, list[str]] | None:
    """Builds the table of a multirun folder, writes CSV and PNG there; returns the text and
    the paths written, or None when no job left a summary."""
    rows = collect(sweep_dir, metric)
    if not rows:
        return None
    base = os.path.join(sweep_dir, TABLE_NAME)
    written = [write_csv(rows, base + ".csv", metric), write_chart(rows, base + ".png", metric)]
    return format_table(rows, metric), written


class CompareRuns:
    """A Hydra callback: after a multirun, prints and writes the comparison of its jobs."""

    def __init__(self, metric: str = "val/top1") -> None:
        """Initializes the callback.

        Args:
            metric: The metric to compare.
        """
        self.metric = metric

    def on_multirun_end(self, config: Any, **kwargs: Any) -> None:
        """Compares the jobs of the multirun that just ended (Hydra calls this)."""
        sweep_dir = str(config.hydra.sweep.dir)
        if not os.path.isdir(sweep_dir):
            return
        found = compare(sweep_dir, self.metric)
        if found is None:
            return
        table, written = found
        print(f"\nsesemi multirun: {self.metric} by configuration ({sweep_dir})")
        print(table)
        print("written: " + ", ".join(written))

    def __getattr__(self, name: str) -> Any:  # Hydra's other callback hooks do nothing here
        if name.startswith("on_"):
            return lambda *args, **kwargs: None
        raise AttributeError(name)
