"""The method-comparison table of a multirun, built from its jobs' files on disk."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from sesemi.compare import collect, compare, format_table


def _job(sweep: Path, number: int, overrides: list[str], top1: float, seconds: float) -> None:
    job = sweep / str(number)
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    summary = {"metrics": {"val/top1": top1, "val/loss": 1.0}, "seconds": seconds}
    (job / "summary.json").write_text(json.dumps(summary))


@pytest.fixture
def sweep(tmp_path: Path) -> Path:
    # Two methods x three seeds, numbered as Hydra numbers jobs (10 sorts after 9).
    values = {"supervised": [0.70, 0.74, 0.72], "fixmatch": [0.90, 0.96, 0.93]}
    number = 0
    for seed in range(3):
        for method, tops in values.items():
            _job(tmp_path, number, [f"method={method}", f"run.seed={seed}"], tops[seed], 10 + seed)
            number += 1
    (tmp_path / "multirun.yaml").write_text("not a job")
    (tmp_path / "99").mkdir()  # a job that left no summary (failed): not counted
    return tmp_path


def test_seeds_pool_into_one_row_per_configuration_with_mean_and_std(sweep):
    rows = collect(str(sweep))
    assert [r.configuration for r in rows] == ["method=supervised", "method=fixmatch"]
    supervised, fixmatch = rows
    assert supervised.seeds == ["0", "1", "2"] and supervised.values == [0.70, 0.74, 0.72]
    assert supervised.mean == pytest.approx(0.72)
    assert fixmatch.std == pytest.approx(0.03)  # sample std of 0.90, 0.96, 0.93
    assert supervised.seconds == [10, 11, 12]


def test_the_table_csv_and_chart_are_written_into_the_multirun_folder(sweep):
    table, written = compare(str(sweep))
    assert "method=fixmatch" in table and "0.9300 ± 0.0300" in table
    assert "0.7200 ± 0.0200" in table
    assert sorted(Path(p).name for p in written) == ["comparison.csv", "comparison.png"]
    with open(sweep / "comparison.csv") as f:
        rows = list(csv.DictReader(f))
    assert rows[1]["configuration"] == "method=fixmatch"
    assert float(rows[1]["val/top1_mean"]) == pytest.approx(0.93)
    assert rows[0]["per_seed"].split() == ["0.700000", "0.740000", "0.720000"]
    assert rows[0]["seconds_per_run"] == "11.0"
    assert (sweep / "comparison.png").read_bytes()[:4] == b"\x89PNG"


def test_one_seed_has_zero_spread_and_no_jobs_give_no_table(tmp_path):
    _job(tmp_path, 0, ["method=rotation"], 0.5, 1.0)
    (row,) = collect(str(tmp_path))
    assert row.std == 0.0 and "0.5000 ± 0.0000" in format_table([row])
    assert compare(str(tmp_path / "0" / ".hydra")) is None
