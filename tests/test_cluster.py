"""Hydra's launcher and sweeper plugins on sesemi's configs: the SLURM launcher config (composed,
and its sbatch script written by the real CLI without a cluster), submitit's local launcher (jobs
in subprocesses) and Optuna's FixMatch search."""

from __future__ import annotations

import csv
import glob
import json
import os
from pathlib import Path

import pytest
import yaml
from conftest import FAST, open_sesemi
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf
from omegaconf.errors import InterpolationResolutionError

pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")

FIXMATCH_HEAD = "learner.hparams.model.regularization_loss_heads.fixmatch"
SEARCH_SPACE = {
    f"{FIXMATCH_HEAD}.head.threshold",
    f"{FIXMATCH_HEAD}.scale_factor",
    "learner.hparams.optimizer.lr",
}
# Quiet, quick jobs (FAST minus what the tiny experiment config already sets).
QUICK = [
    "run.num_epochs=null",
    "run.num_iterations=2",
    "++trainer.val_check_interval=2",
    "++trainer.check_val_every_n_epoch=null",
    "++trainer.num_sanity_val_steps=0",
    "++trainer.enable_progress_bar=false",
    "++trainer.enable_model_summary=false",
]


def _hydra_compose(name: str, overrides: list[str]):
    with initialize_config_module(config_module="sesemi.conf", version_base=None):
        return compose(name, overrides=overrides, return_hydra_config=True)


def _jobs(sweep: Path) -> list[Path]:
    return sorted((p for p in sweep.iterdir() if p.name.isdigit()), key=lambda p: int(p.name))


def _summary(job: Path) -> dict:
    return json.loads((job / "summary.json").read_text())


@pytest.mark.parametrize(
    ("overrides", "gpus_per_node", "tasks_per_node", "nodes"),
    [
        (["run.gpus=4", "run.num_nodes=2"], 4, 4, 2),
        (["run.gpus=[0,1]"], 2, 2, 1),
        (["run.gpus='0,1,2'"], 3, 3, 1),
        ([], None, 1, 1),  # the demo trains on the CPU: one task, no GPU request
    ],
)
def test_the_slurm_launcher_is_sized_by_the_run_options(
    overrides, gpus_per_node, tasks_per_node, nodes
):
    cfg = _hydra_compose(
        "demo", ["hydra/launcher=slurm", "hydra.launcher.partition=gpu", *overrides]
    )
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("submitit_launcher.SlurmLauncher")
    assert (launcher.gpus_per_node, launcher.tasks_per_node, launcher.nodes) == (
        gpus_per_node,
        tasks_per_node,
        nodes,
    )
    assert (launcher.partition, launcher.cpus_per_task, launcher.mem_gb) == ("gpu", 8, 64)
    assert (launcher.timeout_min, launcher.name) == (1440, "sesemi_demo")


def test_every_gpu_there_is_cannot_size_a_slurm_job():
    cfg = _hydra_compose("imagewoof", ["hydra/launcher=slurm"])  # run.gpus: -1
    with pytest.raises(InterpolationResolutionError, match=r"run.gpus=-1 .* e.g. run.gpus=4"):
        _ = cfg.hydra.launcher.gpus_per_node


@pytest.mark.cli
def test_a_slurm_multirun_submits_one_job_array_with_the_configured_resources(
    tmp_path, monkeypatch
):
    # No SLURM here: a stand-in `sbatch` keeps the script it is given and refuses it.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 1\n")
    (bin_dir / "sbatch").write_text(
        '#!/bin/sh\ncp "$1" "$SBATCH_COPY"\necho "sbatch: no cluster here" >&2\nexit 1\n'
    )
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    script = tmp_path / "job.sh"
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    monkeypatch.setenv("SBATCH_COPY", str(script))
    out = open_sesemi(
        "-cn", "demo", "-m", "hydra/launcher=slurm", "hydra.launcher.partition=gpu",
        "run.gpus=4", "run.num_nodes=2", f"run.dir={tmp_path / 'runs'}",
        "method=fixmatch,flexmatch", cwd=tmp_path,
    )  # fmt: skip
    assert out.returncode != 0 and "sbatch: no cluster here" in out.stderr
    lines = set(script.read_text().splitlines())
    (sweep,) = glob.glob(str(tmp_path / "runs/demo/multirun_*"))
    assert {
        "#SBATCH --array=0-1%2",  # a job array: one task per job
        "#SBATCH --partition=gpu",
        "#SBATCH --nodes=2",
        "#SBATCH --gpus-per-node=4",
        "#SBATCH --ntasks-per-node=4",  # one training process per GPU
        "#SBATCH --cpus-per-task=8",
        "#SBATCH --mem=64GB",
        "#SBATCH --time=1440",
        "#SBATCH --job-name=sesemi_demo",
        f"#SBATCH --output={sweep}/.submitit/%A_%a/%A_%a_0_log.out",
    } <= lines


@pytest.mark.cli
def test_submitit_local_jobs_write_their_own_folders_and_one_comparison(experiment):
    out = open_sesemi(
        "-cd", "configs", "-cn", "custom", "-m", "hydra/launcher=submitit_local",
        "method=supervised,rotation", *QUICK, cwd=experiment, timeout=600,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    # The jobs ran in submitit's processes (their summaries are in their logs), the table here.
    assert "sesemi FIT finished" not in out.stdout
    assert "sesemi multirun: val/top1 by configuration" in out.stdout
    (sweep,) = (experiment / "runs/tiny").iterdir()  # no other run folder was claimed
    assert sweep.name.startswith("multirun_")
    jobs = _jobs(sweep)
    assert [j.name for j in jobs] == ["0", "1"]
    with open(sweep / "comparison.csv") as f:
        table = {row["configuration"]: row for row in csv.DictReader(f)}
    assert set(table) == {"method=supervised", "method=rotation"}
    for job in jobs:
        summary = _summary(job)
        assert summary["run_dir"] == str(job)
        assert Path(summary["last_checkpoint"]) == job / "checkpoints/last.ckpt"
        assert Path(summary["best_checkpoint"]).parent == job / "checkpoints"
        assert Path(summary["best_checkpoint"]).is_file()
        method = next(o for o in yaml.safe_load((job / ".hydra/overrides.yaml").read_text()))
        assert table[method]["per_seed"] == f"{summary['metrics']['val/top1']:.6f}"
    logs = sorted(glob.glob(f"{sweep}/.submitit/*/*_0_log.out"))
    assert len(logs) == 2
    for log in logs:
        text = Path(log).read_text()
        assert "sesemi FIT finished" in text
        # The suggested next command names the job's config, although the job process was
        # started by submitit, not by open_sesemi.
        assert f"next: open_sesemi -cd={experiment / 'configs'} -cn custom method=" in text


def test_the_fixmatch_search_maximizes_over_keys_fixmatch_has():
    sweeper = _hydra_compose("demo", ["hydra/sweeper=fixmatch_search"]).hydra.sweeper
    assert sweeper._target_.endswith("OptunaSweeper")
    assert (sweeper.direction, sweeper.sampler.seed) == ("maximize", 0)
    params = dict(sweeper.params)
    assert params.pop("method") == "fixmatch"
    assert set(params) == SEARCH_SPACE
    fixmatch = _hydra_compose("demo", ["method=fixmatch"])
    assert all(isinstance(OmegaConf.select(fixmatch, key), float) for key in SEARCH_SPACE)
    # FlexMatch's threshold is a policy: its own `threshold` is the key to search there.
    flexmatch = _hydra_compose("demo", ["method=flexmatch"])
    assert OmegaConf.select(flexmatch, f"{FIXMATCH_HEAD}.head.threshold.threshold") == 0.95


@pytest.mark.cli
def test_an_optuna_search_reports_the_best_trial_of_its_jobs(tmp_path, digits_root):
    # Sampler seed 4 draws learning rates 0.18 and 0.011: trials that end apart after 2 steps.
    out = open_sesemi(
        "-cn", "demo", "-m", "method=fixmatch", "hydra/sweeper=fixmatch_search",
        "hydra.sweeper.n_trials=2", "hydra.sweeper.sampler.seed=4",
        f"run.data_root={digits_root}", f"run.dir={tmp_path / 'runs'}", *FAST,
        "++trainer.limit_val_batches=1.0",  # every val image (one batch holds 2-3 classes only)
        cwd=tmp_path, timeout=600,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    assert "setup plugin" not in out.stdout  # optuna's alembic noise is silenced
    (sweep,) = (tmp_path / "runs/demo").iterdir()
    result = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    trials = {}
    for job in _jobs(sweep):
        overrides = yaml.safe_load((job / ".hydra/overrides.yaml").read_text())
        params = dict(o.split("=", 1) for o in overrides if o.split("=", 1)[0] in SEARCH_SPACE)
        assert set(params) == SEARCH_SPACE and "method=fixmatch" in overrides
        # The trial's values reached the FixMatch head it trained.
        config = OmegaConf.load(job / ".hydra/config.yaml")
        for key, value in params.items():
            assert OmegaConf.select(config, key) == pytest.approx(float(value))
        summary = _summary(job)
        assert "train/fixmatch_loss" in summary["metrics"]
        trials[summary["metrics"]["val/top1_best"]] = {k: float(v) for k, v in params.items()}
    assert len(trials) == 2, "the two trials should reach different val/top1"
    assert result["best_value"] == pytest.approx(max(trials))  # maximized, not minimized
    assert result["best_params"] == pytest.approx(trials[max(trials)])
