"""Two "nodes" on one machine: `torchrun` starts one process per node (gloo, rendezvous on
127.0.0.1) exactly as a user starts one per machine; and resuming on another number of
processes is refused."""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import free_port, open_sesemi, single_process_top1
from PIL import Image

from sesemi.schedulers.lr import polynomial_lr

PROBE = '''
import json
import pytorch_lightning as pl


class Probe(pl.Callback):
    """Records, per process, each step's sample indices and LR, and the loaders' lengths."""

    def __init__(self, out):
        self.out, self.steps = out, []

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        _, _, indices = batch["supervised"]
        self.steps.append({
            "epoch": trainer.current_epoch,
            "indices": indices.tolist(),
            "lr": trainer.optimizers[0].param_groups[0]["lr"],
        })

    def on_train_end(self, trainer, module):
        with open(f"{self.out}/probe_rank{trainer.global_rank}.json", "w") as f:
            json.dump({
                "world_size": trainer.world_size,
                "batches_per_epoch": trainer.num_training_batches,
                "max_iters": trainer.lr_scheduler_configs[0].scheduler.max_iters,
                "steps": self.steps,
            }, f)
'''

# 16 labeled images (2 classes x 8), batch 4 per process, 2 processes: each process gets a
# disjoint half (8 images) = 2 steps per epoch; 2 epochs = 4 steps; warm-up 1 epoch = 2 steps.
BATCH, EPOCHS, LABELED = 4, 2, 16


@pytest.fixture
def multinode(experiment: Path) -> Path:
    # Two more val cats, one with the dog cue (the bright left half): each process's half of
    # the 10 val images then scores differently (4/5 and 5/5 when the cue is learned), so
    # only a val/top1 reduced over both processes equals one process evaluating all 10.
    cat = experiment / "data" / "val" / "cat"
    for name, cue in (("004.png", True), ("005.png", False)):
        pixels = np.random.default_rng(7).integers(0, 200, (40, 48, 3), dtype=np.uint8)
        pixels[:, :24] = 255 if cue else pixels[:, :24]
        Image.fromarray(pixels).save(cat / name)
    (experiment / "src").mkdir()
    (experiment / "src" / "__init__.py").write_text("")
    (experiment / "src" / "probe.py").write_text(PROBE)
    (experiment / "configs" / "multinode.yaml").write_text(
        "defaults:\n  - custom\n  - _self_\n"
        f"run:\n  num_epochs: {EPOCHS}\n"
        "learner:\n  hparams:\n    lr_scheduler:\n      scheduler:\n        warmup_epochs: 1\n"
        "trainer:\n  enable_progress_bar: false\n  callbacks:\n"
        "    - _target_: pytorch_lightning.callbacks.ModelCheckpoint\n"
        "      dirpath: ${hydra:runtime.output_dir}/checkpoints\n      save_last: true\n"
        f"    - _target_: src.probe.Probe\n      out: {experiment}\n"
    )
    return experiment


def _torchrun_nodes(experiment: Path, *overrides: str) -> list[subprocess.CompletedProcess]:
    """Starts the command of the README on 2 "nodes" (one process each) and waits for both."""
    port = free_port()
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    env.pop("HYDRA_FULL_ERROR", None)
    nodes = [
        subprocess.Popen(
            [
                *(sys.executable, "-m", "torch.distributed.run"),
                *("--nnodes", "2", "--nproc-per-node", "1", "--node-rank", str(rank)),
                *("--master-addr", "127.0.0.1", "--master-port", str(port)),
                *("-m", "sesemi", "-cd", "configs", "-cn", "multinode"),
                *("run.num_nodes=2", "run.accelerator=ddp", *overrides),
            ],
            cwd=experiment,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in (0, 1)
    ]
    results = []
    for node in nodes:
        stdout, stderr = node.communicate(timeout=400)
        results.append(subprocess.CompletedProcess(node.args, node.returncode, stdout, stderr))
    return results


def test_two_nodes_by_torchrun_share_data_schedule_outputs_and_metrics(multinode):
    nodes = _torchrun_nodes(multinode)
    for node in nodes:
        assert node.returncode == 0, node.stderr[-3000:]
    ranks = [json.loads((multinode / f"probe_rank{r}.json").read_text()) for r in (0, 1)]
    per_process = LABELED // 2 // BATCH
    for probe in ranks:
        assert probe["world_size"] == 2
        # ${sesemi:iterations_per_epoch} counts the steps of one process.
        assert probe["batches_per_epoch"] == per_process
        assert probe["max_iters"] == per_process * EPOCHS
        assert len(probe["steps"]) == per_process * EPOCHS
    # Every process sees a disjoint shard of each epoch; together, every labeled image once.
    for epoch in range(EPOCHS):
        seen = [
            [i for s in probe["steps"] if s["epoch"] == epoch for i in s["indices"]]
            for probe in ranks
        ]
        assert not set(seen[0]) & set(seen[1])
        assert sorted(seen[0] + seen[1]) == list(range(LABELED))
    # The global batch is batch_size_per_gpu x world size.
    for step0, step1 in zip(ranks[0]["steps"], ranks[1]["steps"], strict=True):
        assert len(step0["indices"]) + len(step1["indices"]) == BATCH * 2
    # The LR follows the schedule of the per-process step count (warm-up = 1 epoch = 2 steps).
    for step, record in enumerate(ranks[0]["steps"]):
        expected = polynomial_lr(step, 0.1, per_process, 0.001, 0.5, per_process * EPOCHS)
        assert record["lr"] == pytest.approx(expected), step
        assert ranks[1]["steps"][step]["lr"] == record["lr"]

    # One run folder, written by one process: one .hydra/, one set of checkpoints and reports.
    (run_dir,) = (Path(p) for p in glob.glob(str(multinode / "runs/tiny/*")))
    assert (run_dir / ".hydra" / "config.yaml").is_file()
    assert sorted(p.name for p in run_dir.glob("*.log")) == ["cli.log", "cli_rank1.log"]
    assert len(list(run_dir.glob("metrics.csv"))) == 1
    assert json.loads((run_dir / "summary.json").read_text())["mode"] == "FIT"
    assert "sesemi FIT finished" in nodes[0].stdout and "sesemi FIT" not in nodes[1].stdout
    checkpoint = torch.load(run_dir / "checkpoints/last.ckpt", map_location="cpu")
    assert checkpoint["global_step"] == per_process * EPOCHS
    assert checkpoint["sesemi"]["world_size"] == 2

    # val/top1 is reduced over both processes: one process evaluating every val image agrees.
    rows = (run_dir / "metrics.csv").read_text().splitlines()
    column = rows[0].split(",").index("val/top1")
    logged = [r.split(",")[column] for r in rows[1:]]
    final_top1 = float([v for v in logged if v][-1])
    assert final_top1 == pytest.approx(single_process_top1(run_dir, multinode / "data"))

    # Resuming the 2-process run on 1 process is refused before training, in one line.
    last = run_dir / "checkpoints" / "last.ckpt"
    before = last.read_bytes()
    out = open_sesemi(
        "-cd", "configs", "-cn", "multinode", f"run.resume_from_checkpoint={last}", cwd=multinode
    )
    assert out.returncode == 1
    assert "written by a run on 2 process(es) and this run has 1" in out.stderr
    assert "Traceback" not in out.stderr
    assert last.read_bytes() == before


def test_a_one_process_checkpoint_is_not_resumed_on_two(experiment):
    first = open_sesemi("-cd", "configs", "-cn", "custom", cwd=experiment)
    assert first.returncode == 0, first.stderr[-3000:]
    (last,) = glob.glob(str(experiment / "runs/tiny/*/checkpoints/last.ckpt"))
    out = open_sesemi(
        *("-cd", "configs", "-cn", "custom", "run.accelerator=ddp", "+trainer.devices=2"),
        f"run.resume_from_checkpoint={last}",
        cwd=experiment,
    )
    assert out.returncode == 1
    assert "written by a run on 1 process(es) and this run has 2" in out.stderr
    assert "Traceback" not in out.stderr
    assert len(glob.glob(str(experiment / "runs/tiny/*/checkpoints/*.ckpt"))) == 2  # no new one


def test_launchers_are_recognized_and_srun_tasks_share_a_folder(tmp_path, monkeypatch):
    from sesemi.launch import LaunchPeer, external_launch, peer_overrides, shared_run_dir

    torchrun = {"TORCHELASTIC_RUN_ID": "none", "RANK": "1", "WORLD_SIZE": "2"}
    srun = {"SLURM_PROCID": "3", "SLURM_NTASKS": "4", "SLURM_JOB_ID": "77", "SLURM_STEP_ID": "0"}
    assert external_launch(torchrun) == LaunchPeer(1, 2, "torchrun")
    assert external_launch(srun) == LaunchPeer(3, 4, "srun")
    assert external_launch({**srun, "SLURM_NTASKS": "1"}) is None  # one task: a plain run
    assert external_launch({k: v for k, v in srun.items() if k != "SLURM_STEP_ID"}) is None
    assert external_launch({"LOCAL_RANK": "1", "WORLD_SIZE": "2"}) is None  # Lightning's own
    assert peer_overrides(LaunchPeer(0, 2, "srun")) == []
    assert "hydra.output_subdir=null" in peer_overrides(LaunchPeer(1, 2, "srun"))

    def claim(path: str) -> str:
        raise AssertionError("srun tasks do not claim a folder each")

    folders = set()
    for rank in ("0", "1"):  # two tasks whose clocks disagree by a second
        monkeypatch.setattr("os.environ", {**srun, "SLURM_PROCID": rank})
        folders.add(shared_run_dir(str(tmp_path / "tiny" / f"2026-01-01_00-00-0{rank}"), claim))
    assert folders == {str(tmp_path / "tiny" / "slurm-77.0")}
