"""CPU threads per training process: the cores shared among the sesemi runs on the machine."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from conftest import open_sesemi

import sesemi.threads as threads
from sesemi.threads import ThreadShare, live_processes


@pytest.fixture
def sleeper():
    """Another live process (stands for a second training run on the machine)."""
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    yield process.pid
    process.kill()
    process.wait()


@pytest.fixture
def eight_cores(monkeypatch):
    monkeypatch.setattr(threads, "available_cores", lambda: 8)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def _register(folder, pid: int) -> None:
    folder.mkdir(exist_ok=True)
    (folder / str(pid)).touch()


def test_live_processes_counts_running_ones_and_drops_finished_ones(tmp_path, sleeper):
    finished = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], text=True, capture_output=True
    ).stdout.strip()
    _register(tmp_path, sleeper)
    _register(tmp_path, int(finished))
    assert live_processes(str(tmp_path)) == 1
    assert not (tmp_path / finished).exists()
    assert live_processes(str(tmp_path / "absent")) == 0


def test_each_run_takes_its_share_of_the_cores_and_gives_them_back(tmp_path, eight_cores, sleeper):
    torch.set_num_threads(3)
    alone = ThreadShare(folder=str(tmp_path))
    alone.setup(None, None, "fit")
    assert torch.get_num_threads() == 8  # 8 cores, 1 process
    alone.teardown(None, None, "fit")
    assert torch.get_num_threads() == 3 and not list(tmp_path.iterdir())

    _register(tmp_path, sleeper)  # a second run is training on the machine
    shared = ThreadShare(folder=str(tmp_path))
    shared.setup(None, None, "fit")
    assert torch.get_num_threads() == 4
    (tmp_path / str(sleeper)).unlink()  # it finished: the next check takes every core again
    shared._checked = 0.0
    shared.on_train_batch_start(None)
    assert torch.get_num_threads() == 8
    shared.teardown(None, None, "fit")
    assert torch.get_num_threads() == 3


def test_run_threads_and_omp_num_threads_win(tmp_path, eight_cores, sleeper, monkeypatch):
    _register(tmp_path, sleeper)
    fixed = ThreadShare(threads=1, folder=str(tmp_path))
    fixed.setup(None, None, "fit")
    assert torch.get_num_threads() == 1
    fixed.teardown(None, None, "fit")

    torch.set_num_threads(3)
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    respected = ThreadShare(folder=str(tmp_path))
    respected.setup(None, None, "fit")
    assert torch.get_num_threads() == 3 and len(list(tmp_path.iterdir())) == 1
    respected.teardown(None, None, "fit")
    with pytest.raises(ValueError, match="run.threads must be at least 1"):
        ThreadShare(threads=0)


def test_run_threads_below_one_is_one_line_before_training(experiment):
    out = open_sesemi("-cd", "configs", "-cn", "custom", "run.threads=0", cwd=experiment)
    assert out.returncode == 1
    assert "run.threads must be at least 1" in out.stderr and "Traceback" not in out.stderr
