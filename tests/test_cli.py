"""The open_sesemi CLI end to end, in a subprocess, as a user runs it."""

from __future__ import annotations

import csv
import glob
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import open_sesemi, single_process_top1

import sesemi
from sesemi.commands import SUBCOMMANDS
from sesemi.errors import USER_ERRORS, one_line

pytestmark = pytest.mark.cli


def _custom(experiment: Path, *overrides: str) -> subprocess.CompletedProcess:
    return open_sesemi("-cd", "configs", "-cn", "custom", *overrides, cwd=experiment)


def test_help_prints_groups_and_default_config(tmp_path):
    out = open_sesemi("-h", cwd=tmp_path)
    assert out.returncode == 0
    assert "learner: classifier" in out.stdout
    groups = out.stdout[
        out.stdout.index("== Configuration groups ==") : out.stdout.index("== Config ==")
    ]
    assert (
        "method: " in groups
        and "fixmatch" in groups
        and "data: digits, folder, imagewoof" in groups
    )
    for line in ("num_classes: ???", "backbone: ???", "batch_size_per_gpu: null", "trainer: null"):
        assert line in out.stdout
    assert "_target_: sesemi.Classifier" in out.stdout
    usage = out.stdout[: out.stdout.index("== Configuration groups ==")]
    for command in SUBCOMMANDS:  # every subcommand is named in the help a new user reads first
        assert f"open_sesemi {command} " in usage, command


@pytest.mark.parametrize(
    ("word", "expected"),
    [
        ("predcit", "unknown command 'predcit'; did you mean 'open_sesemi predict'?"),
        ("demo", "to train with the built-in config 'demo': open_sesemi -cn demo"),
        ("train", "unknown command 'train'; commands: predict, export"),
    ],
)
def test_a_bare_word_that_is_no_command_is_one_line_naming_the_commands(tmp_path, word, expected):
    # Hydra alone reads the word as an override: "missing EQUAL at '<EOF>'".
    out = open_sesemi(word, "x.png", cwd=tmp_path)
    assert out.returncode == 1
    assert out.stderr.startswith("open_sesemi: error: ") and expected in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1 and "EQUAL" not in out.stderr


def test_one_line_warnings_name_their_place_except_inside_hydra():
    from sesemi.cli import one_line_warning

    mine = one_line_warning("slow", UserWarning, "/x/sesemi/data.py", 12, "code")
    assert mine == "UserWarning: slow (data.py:12)\n"
    hydras = os.path.join("/x", "hydra", "_internal", "instantiate.py")
    assert one_line_warning("short", UserWarning, hydras, 3) == "UserWarning: short\n"


def test_version_names_sesemi_and_the_libraries_it_runs_on(tmp_path):
    out = open_sesemi("--version", cwd=tmp_path)
    assert out.returncode == 0
    assert out.stdout.startswith(f"open_sesemi (sesemi) {sesemi.__version__}, PyTorch ")
    assert "Lightning " in out.stdout and "Hydra 1.3" in out.stdout and "timm 1." in out.stdout


def test_bf16_runs_without_the_model_summarys_size_warning(experiment):
    # Lightning's summary cannot size a bf16 model and says so on every run: noise to a user.
    out = _custom(experiment, "+trainer.precision=bf16-mixed")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "Total params" in out.stdout + out.stderr  # the summary itself is still printed
    assert "not supported by the model summary" not in out.stdout + out.stderr


def test_a_warning_is_one_line_without_the_code_that_raised_it(experiment):
    # PolynomialLR, built by Hydra, warns of a warm-up longer than the run: the user reads the
    # message, not a line of Hydra's code ("result = super().__call__") nor its place there.
    out = _custom(
        experiment,
        "run.num_iterations=2",
        "run.num_epochs=null",
        "+learner.hparams.lr_scheduler.scheduler.warmup_iters=5",
        "learner.hparams.lr_scheduler.scheduler.warmup_epochs=null",
    )
    assert out.returncode == 0, out.stderr[-3000:]
    (line,) = [x for x in out.stderr.splitlines() if "PolynomialLR: warm-up" in x]
    assert line.startswith("UserWarning: PolynomialLR: warm-up (5 iterations) is longer than")
    assert line.endswith("shortened to the whole run")  # no place in Hydra's code either
    assert "super().__call__" not in out.stderr
    assert "Tip:" not in out.stdout + out.stderr  # nor Lightning's adverts for its cloud


def test_info_shows_the_custom_config(experiment):
    out = _custom(experiment, "--info", "config")
    assert out.returncode == 0, out.stderr
    assert "name: test_resnet" in out.stdout and "id: tiny" in out.stdout


def test_fit_then_validate_test_and_resume(experiment):
    fit = _custom(experiment, "run.num_iterations=6", "run.num_epochs=null")
    assert fit.returncode == 0, fit.stderr[-3000:]
    assert "sesemi FIT finished" in fit.stdout and "val/top1" in fit.stdout
    (run_dir,) = glob.glob(str(experiment / "runs" / "tiny" / "*"))
    run_dir = Path(run_dir)
    assert (run_dir / ".hydra" / "config.yaml").is_file()
    assert (run_dir / "metrics.csv").is_file() and glob.glob(str(run_dir / "events.out.tfevents*"))
    last = run_dir / "checkpoints" / "last.ckpt"
    checkpoint = torch.load(last, map_location="cpu", weights_only=False)
    assert checkpoint["global_step"] == 6
    header = (run_dir / "metrics.csv").read_text().splitlines()[0]
    for column in (
        "train/loss",
        "train/rotation_prediction_loss",
        "lr",
        "val/top1",
        "val/top1_best",
    ):
        assert column in header

    validate = _custom(experiment, "run.mode=VALIDATE", f"run.pretrained_checkpoint_path={last}")
    assert validate.returncode == 0, validate.stderr[-3000:]
    assert "sesemi VALIDATE finished" in validate.stdout and "val/top1" in validate.stdout

    test = _custom(experiment, "run.mode=TEST", f"run.pretrained_checkpoint_path={last}")
    assert test.returncode == 0, test.stderr[-3000:]
    assert "test/top1" in test.stdout

    # Resume the killed-or-finished run to a longer budget: it continues from step 6.
    resume = _custom(
        experiment,
        "run.num_iterations=10",
        "run.num_epochs=null",
        "run.resume_from_checkpoint=last",
    )
    assert resume.returncode == 0, resume.stderr[-3000:]
    newest = max(
        glob.glob(str(experiment / "runs/tiny/*/checkpoints/last.ckpt")), key=os.path.getmtime
    )
    resumed = torch.load(newest, map_location="cpu", weights_only=False)
    assert resumed["global_step"] == 10
    # The LR scheduler continued (10 steps taken in all), it did not restart.
    assert resumed["lr_schedulers"][0]["last_epoch"] == 10


def test_validate_and_test_read_a_flexmatch_runs_weights_as_the_summary_says(experiment):
    # FlexMatch keeps a state per unlabeled image, sized from the training data, which VALIDATE
    # and TEST do not build: the summary's "next:" command failed on every FlexMatch run (the
    # demo's) with "FlexMatch needs the number of images of data.train.unlabeled".
    flexmatch = ("method=flexmatch", "data.train.unlabeled.batch_size=8")
    fit = _custom(experiment, *flexmatch, "run.num_iterations=2", "run.num_epochs=null")
    assert fit.returncode == 0, fit.stderr[-3000:]
    (last,) = glob.glob(str(experiment / "runs/tiny/*/checkpoints/last.ckpt"))
    hint = next(line for line in fit.stdout.splitlines() if line.strip().startswith("next:"))
    next_command = shlex.split(hint.split("next:", 1)[1])
    assert next_command[:1] == ["open_sesemi"] and "run.mode=VALIDATE" in next_command
    validate = open_sesemi(*next_command[1:], cwd=experiment)
    assert validate.returncode == 0, validate.stderr[-3000:]
    assert "sesemi VALIDATE finished" in validate.stdout
    assert "unexpected" not in validate.stderr  # the head's state is left out quietly
    # The same weights, so the same score, through resume_from_checkpoint=last too.
    test = _custom(experiment, *flexmatch, "run.mode=TEST", "run.resume_from_checkpoint=last")
    assert test.returncode == 0, test.stderr[-3000:]
    assert "test/top1" in test.stdout
    # Weights of another model are refused in one line rather than evaluated half untrained.
    other = _custom(
        experiment,
        "run.mode=VALIDATE",
        f"run.pretrained_checkpoint_path={last}",
        "learner.hparams.model.backbone.name=resnet18",
    )
    assert other.returncode == 1
    assert "does not fit the model this config builds" in other.stderr
    assert "Traceback" not in other.stderr


def test_a_method_comparison_multirun_ends_with_one_table(experiment):
    # The spec's experiment layout, with the method chosen on the command line.
    out = _custom(
        experiment,
        "-m",
        "method=supervised,rotation",
        "run.seed=0,1",
        "run.num_iterations=2",
        "run.num_epochs=null",
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.count("sesemi FIT finished") == 4
    table = out.stdout[out.stdout.index("sesemi multirun: val/top1 by configuration") :]
    rows = {line.split()[0]: line.split() for line in table.splitlines()[2:] if "=" in line}
    assert set(rows) == {"method=supervised", "method=rotation"}
    (sweep,) = glob.glob(str(experiment / "runs/tiny/multirun_*"))
    assert (Path(sweep) / "comparison.png").stat().st_size > 0
    with open(Path(sweep) / "comparison.csv") as f:
        saved = {row["configuration"]: row for row in csv.DictReader(f)}
    for job in glob.glob(f"{sweep}/[0-9]*"):
        overrides = (Path(job) / ".hydra/overrides.yaml").read_text()
        method = "supervised" if "method=supervised" in overrides else "rotation"
        value = json.loads((Path(job) / "summary.json").read_text())["metrics"]["val/top1"]
        assert f"{value:.6f}" in saved[f"method={method}"]["per_seed"].split()
    for method, row in saved.items():
        assert row["seeds"] == "2" and rows[method][1] == "2"


def test_experiment_src_code_is_instantiable(experiment):
    src = experiment / "src"
    src.mkdir()
    (src / "__init__.py").write_text("")
    (src / "losses.py").write_text(
        "import torch\n\nclass SmoothCE(torch.nn.CrossEntropyLoss):\n"
        "    def __init__(self, reduction='mean'):\n"
        "        super().__init__(reduction=reduction, label_smoothing=0.1)\n"
    )
    # The installed console script, as the spec's users run it: it must import from the
    # launch folder like `python -m sesemi` does.
    out = open_sesemi(
        *("-cd", "configs", "-cn", "custom", "run.num_iterations=2", "run.num_epochs=null"),
        "learner.hparams.model.supervised_loss.callable._target_=src.losses.SmoothCE",
        cwd=experiment,
        console_script=True,
    )
    assert out.returncode == 0, out.stderr[-3000:]


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["run.data_root=/does/not/exist"], "/does/not/exist"),
        (["run.num_iterations=3"], "not both"),
        (["run.num_epochs=null"], "num_epochs or run.num_iterations"),
        (["learner.hparams.model.backbone.name=resnet5O"], "resnet50"),
        (["data.train.supervised.dataset.name=nope"], "image_folder"),
        (["run.pretrained_checkpoint_path=/missing.ckpt"], "/missing.ckpt"),
        (["learner.hparams.num_classes=3"], "set learner.hparams.num_classes=2"),
        (["data.train.supervised.batch_size=64"], "0 iterations per epoch"),
        (["data.val.dataset.subset=nope"], "nope"),
        (["data.train.rotation_prediction=null"], "reads data.train.rotation_prediction"),
        (
            ["~learner.hparams.model.regularization_loss_heads.rotation_prediction.head._target_"],
            "rotation_prediction.head names no class; give it a _target_",
        ),
        (["learner.hparams.model.ema={decay:2}"], "ema.decay must be in [0, 1)"),
        (["learner.hparams.optimizer=???"], "learner.hparams.optimizer"),
        (["run.resume_from_checkpoint=configs/custom.yaml"], "is not a PyTorch checkpoint"),
        (["method=noisy_student"], "data.train.pseudo.dataset.root"),
        (["learner.hparams.model.ema={decay:0.9,warmup:1}"], "unknown key(s) ['warmup']"),
        (["run.num_nodes=0"], "run.num_nodes must be at least 1"),
        (["run.batch_size_per_gpu=0"], "run.batch_size_per_gpu must be at least 1, got 0"),
        (["data.train.supervised.batch_size=0"], "supervised.batch_size must be at least 1, got 0"),
        (["learner.hparams.lr_scheduler.scheduler.max_iters=0"], "max_iters must be at least 1"),
        (["run.gpus=5"], "run.gpus=5 asks for GPUs but this machine has none"),
        # An empty shell variable: not "no checkpoint" (a fresh run, or an untrained model scored)
        (["run.pretrained_checkpoint_path=''"], "run.pretrained_checkpoint_path is empty"),
        (["run.resume_from_checkpoint=' '"], "run.resume_from_checkpoint is empty"),
    ],
)
def test_bad_input_is_one_clear_line_before_training(experiment, monkeypatch, overrides, expected):
    # In process, through the API: the CLI prints the same error as one line (tested below).
    monkeypatch.chdir(experiment)
    cfg = sesemi.compose("custom", overrides, config_dir=experiment / "configs")
    with pytest.raises(USER_ERRORS) as error:
        sesemi.fit(cfg)
    assert expected in one_line(error.value)
    assert "\n" not in one_line(error.value)
    assert not glob.glob(str(experiment / "runs/tiny/*/checkpoints"))


def test_channels_last_is_chosen_from_the_runs_precision_and_compile(experiment, monkeypatch):
    import sesemi.runner

    seen = []

    class Chosen(Exception):
        pass

    def spy(channels_last, plan, precision, compile_options):
        seen.append((channels_last, plan.accelerator, precision, compile_options))
        raise Chosen  # before the model is built

    monkeypatch.setattr(sesemi.runner, "choose_channels_last", spy)
    monkeypatch.chdir(experiment)
    overrides = ["+trainer.precision=bf16-mixed", "learner.hparams.compile=true"]
    with pytest.raises(Chosen):
        sesemi.fit(sesemi.compose("custom", overrides, config_dir=experiment / "configs"))
    assert seen == [(None, "cpu", "bf16-mixed", True)]


def test_evaluating_without_a_checkpoint_warns(experiment, caplog):
    from sesemi.runner import check_run_config

    for mode, warned in (("VALIDATE", True), ("TEST", True), ("FIT", False)):
        caplog.clear()
        cfg = sesemi.compose("custom", [f"run.mode={mode}"], config_dir=experiment / "configs")
        check_run_config(cfg.run)
        said = [r.getMessage() for r in caplog.records if r.name == "sesemi.runner"]
        assert any("with no checkpoint" in m for m in said) is warned, (mode, said)
    caplog.clear()
    ckpt = ["run.mode=VALIDATE", "run.pretrained_checkpoint_path=w.ckpt"]
    check_run_config(sesemi.compose("custom", ckpt, config_dir=experiment / "configs").run)
    assert not [r for r in caplog.records if "with no checkpoint" in r.getMessage()]


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["run.num_epoch=3"], "num_epoch"),  # Hydra's own check, while composing
        (["run.num_epochs=abc"], "num_epochs"),
        (["method=nope"], "method"),
        (["data.image_size=big"], "image_size"),
        (["learner.hparams.num_classes=3"], "set learner.hparams.num_classes=2"),  # at run time
    ],
)
def test_bad_input_on_the_command_line_is_one_line_and_exit_1(experiment, overrides, expected):
    out = _custom(experiment, *overrides)
    assert out.returncode == 1
    assert expected in out.stderr
    assert "Traceback" not in out.stderr
    assert not glob.glob(str(experiment / "runs/tiny/*/checkpoints"))


def test_ddp_two_processes_on_cpu(experiment):
    # 16 labeled and 16 rotation images (train/; there is no unlabeled/) over 2 processes at
    # batch 4 (drop_last): ceil(16 / 2) // 4 = 2 steps per epoch on each process.
    out = _custom(
        experiment,
        "run.accelerator=ddp",
        "+trainer.devices=2",
        "run.num_epochs=2",
        "+trainer.enable_progress_bar=false",
    )
    assert out.returncode == 0, out.stderr[-3000:]
    (last,) = glob.glob(str(experiment / "runs/tiny/*/checkpoints/last.ckpt"))
    checkpoint = torch.load(last, map_location="cpu", weights_only=False)
    assert checkpoint["global_step"] == 2 * 2
    scheduler = checkpoint["lr_schedulers"][0]
    assert scheduler["last_epoch"] == 4 and scheduler["max_iters"] == 4


def test_corrupt_image_stops_naming_the_file_or_is_skipped_and_counted(experiment):
    broken = experiment / "data" / "train" / "cat" / "000.png"
    broken.write_bytes(broken.read_bytes()[:60])  # a truncated PNG
    budget = (
        "run.num_iterations=4",
        "run.num_epochs=null",
        "data.train.rotation_prediction=null",
        "learner.hparams.model.regularization_loss_heads.rotation_prediction=null",
    )
    out = _custom(experiment, *budget)
    assert out.returncode != 0
    assert "cannot read image" in out.stderr and str(broken) in out.stderr
    assert "Traceback" not in out.stderr

    skip = "+data.train.supervised.dataset.kwargs.skip_unreadable=true"
    out = _custom(experiment, *budget, skip, "data.train.supervised.shuffle=false")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "skipped" in out.stdout and "unreadable image(s)" in out.stdout


def test_non_image_files_are_ignored(experiment):
    for name in ("notes.txt", ".DS_Store"):
        (experiment / "data" / "train" / "cat" / name).write_text("not an image")
    out = _custom(experiment, "run.num_iterations=2", "run.num_epochs=null")
    assert out.returncode == 0, out.stderr[-3000:]


def test_same_seed_gives_identical_metrics(experiment):
    runs = []
    for _ in range(2):
        out = _custom(experiment)  # one epoch, validated at its end
        assert out.returncode == 0, out.stderr[-3000:]
        # The end-of-run summary's metric lines (not the progress bar's, whose padding follows
        # the elapsed time's width).
        summary = re.compile(r"  val/\S+ +\S+$")
        runs.append([line for line in out.stdout.splitlines() if summary.match(line)])
    assert len(runs[0]) >= 2 and runs[0] == runs[1]


def test_sigkilled_run_resumes_to_the_same_final_step_and_weights(experiment):
    import signal
    import time

    args = [sys.executable, "-m", "sesemi", "-cd", "configs", "-cn", "custom", "run.num_epochs=8"]
    # One thread, as open_sesemi() runs the others: thread counts change float sums.
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        args, cwd=experiment, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    pattern = str(experiment / "runs/tiny/*/checkpoints/last.ckpt")
    deadline = time.time() + 240
    while not glob.glob(pattern) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    (killed,) = glob.glob(pattern)
    step_at_kill = torch.load(killed, map_location="cpu", weights_only=False)["global_step"]
    assert 0 < step_at_kill < 8 * 4  # 16 images // batch 4 = 4 steps per epoch

    out = _custom(experiment, "run.num_epochs=8", "run.resume_from_checkpoint=last")
    assert out.returncode == 0, out.stderr[-3000:]
    newest = max(glob.glob(pattern), key=os.path.getmtime)
    assert newest != killed  # the resumed run writes its own run directory
    resumed = torch.load(newest, map_location="cpu", weights_only=True)
    assert resumed["global_step"] == 8 * 4
    assert not glob.glob(str(experiment / "runs/tiny/*/checkpoints/*.tmp"))

    # The same run never stopped: with the RNG states restored from the epoch-end checkpoint,
    # the resumed run drew the same batches, augmentations and dropout, so it ends identical.
    straight = _custom(experiment, "run.num_epochs=8", "run.id=straight")
    assert straight.returncode == 0, straight.stderr[-3000:]
    (path,) = glob.glob(str(experiment / "runs/straight/*/checkpoints/last.ckpt"))
    reference = torch.load(path, map_location="cpu", weights_only=True)
    assert resumed["state_dict"].keys() == reference["state_dict"].keys()
    for key, value in reference["state_dict"].items():
        assert torch.equal(resumed["state_dict"][key], value), key
    assert _summary_value(out.stdout, "val/top1") == _summary_value(straight.stdout, "val/top1")


PAUSE = """
import pathlib
import time

import pytorch_lightning as pl


class PauseAfter(pl.Callback):
    \"\"\"Waits (to be killed) when step `step + 1` starts, its checkpoint written.\"\"\"

    def __init__(self, step, flag):
        self.step, self.flag = step, pathlib.Path(flag)

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if trainer.global_step == self.step:
            self.flag.write_text("paused")
            time.sleep(600)
"""


def test_a_run_killed_after_a_mid_epoch_checkpoint_resumes_to_the_same_weights(experiment):
    # Random crops and flips, dropout 0.5: each sample's augmentation is seeded by (run seed,
    # epoch, index, the loader's pass), so the resumed run augments the batches it has left
    # exactly as the run that never stopped, although the killed run had already fetched the
    # next batch. The labeled loader (3 batches of 5 images) restarts within each epoch of 4
    # steps, and the kill comes in the second epoch, in the middle of its pass.
    (experiment / "src").mkdir()
    (experiment / "src" / "__init__.py").write_text("")
    (experiment / "src" / "pause.py").write_text(PAUSE)
    flag = experiment / "paused"
    setup = ["run.num_epochs=3", "+trainer.val_check_interval=2"]  # epochs of 4 steps
    setup.append("data.train.supervised.batch_size=5")
    pause = f"+trainer.callbacks=[{{_target_:src.pause.PauseAfter,step:6,flag:'{flag}'}}]"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    args = [sys.executable, "-m", "sesemi", "-cd", "configs", "-cn", "custom", *setup]
    proc = subprocess.Popen(
        [*args, "run.id=resumed", pause],
        cwd=experiment,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 240
    while not flag.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    (killed,) = glob.glob(str(experiment / "runs/resumed/*/checkpoints/last.ckpt"))
    assert torch.load(killed, map_location="cpu", weights_only=True)["global_step"] == 6
    resumed = _custom(experiment, *setup, "run.id=resumed", "run.resume_from_checkpoint=last")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    straight = _custom(experiment, *setup, "run.id=straight")
    assert straight.returncode == 0, straight.stderr[-3000:]
    paths = {
        name: max(glob.glob(str(experiment / f"runs/{name}/*/checkpoints/last.ckpt")))
        for name in ("resumed", "straight")
    }
    ends = {k: torch.load(p, map_location="cpu", weights_only=True) for k, p in paths.items()}
    assert ends["resumed"]["global_step"] == ends["straight"]["global_step"] == 12
    for key, value in ends["straight"]["state_dict"].items():
        assert torch.equal(ends["resumed"]["state_dict"][key], value), key
    assert _summary_value(resumed.stdout, "val/top1") == _summary_value(straight.stdout, "val/top1")


def _summary_value(stdout: str, key: str) -> float:
    return float(next(line for line in stdout.splitlines() if line.split()[:1] == [key]).split()[1])


DDP_PROBE = '''
import json
import torch
import pytorch_lightning as pl


class Probe(pl.Callback):
    """Records, per rank, a fingerprint of each epoch's first batch and the final weights."""

    def __init__(self, out):
        self.out, self.first = out, []

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if batch_idx == 0:
            self.first.append(float(batch["supervised"][0].double().sum()))

    def on_train_end(self, trainer, module):
        weights = [float(p.double().sum()) for p in module.parameters()]
        with open(f"{self.out}/probe_rank{trainer.global_rank}.json", "w") as f:
            json.dump({"first": self.first, "weights": weights}, f)
'''


def test_ddp_ranks_agree_reshuffle_and_reduce_metrics(experiment):
    import json

    (experiment / "src").mkdir()
    (experiment / "src" / "__init__.py").write_text("")
    (experiment / "src" / "probe.py").write_text(DDP_PROBE)
    (experiment / "configs" / "ddp.yaml").write_text(
        "defaults:\n  - custom\n  - _self_\n"
        "trainer:\n  devices: 2\n  enable_progress_bar: false\n  callbacks:\n"
        "    - _target_: pytorch_lightning.callbacks.ModelCheckpoint\n"
        f"    - _target_: src.probe.Probe\n      out: {experiment}\n"
    )
    out = open_sesemi(
        "-cd", "configs", "-cn", "ddp", "run.accelerator=ddp", "run.num_epochs=3", cwd=experiment
    )
    assert out.returncode == 0, out.stderr[-3000:]
    ranks = [json.loads((experiment / f"probe_rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["weights"] == ranks[1]["weights"]  # DDP kept the replicas identical
    first0, first1 = ranks[0]["first"], ranks[1]["first"]
    assert len(first0) == 3 and all(a != b for a, b in zip(first0, first1, strict=True))
    assert len(set(first0)) == 3  # each epoch reshuffles

    # val/top1 is reduced over both processes: it equals one process evaluating every image.
    (run_dir,) = glob.glob(str(experiment / "runs/tiny/*"))
    rows = (Path(run_dir) / "metrics.csv").read_text().splitlines()
    header = rows[0].split(",")
    logged = [r.split(",")[header.index("val/top1")] for r in rows[1:]]
    final_top1 = float([v for v in logged if v][-1])
    assert final_top1 == pytest.approx(single_process_top1(run_dir, experiment / "data"))


def test_unknown_config_name_gets_one_line(experiment):
    out = open_sesemi("-cn", "demo_fixmach", cwd=experiment)  # the old per-method config names
    assert out.returncode == 1
    assert out.stderr.count("\n") == 1 and "-cn demo method=fixmatch" in out.stderr
    out = open_sesemi("-cn", "dmeo", cwd=experiment)
    assert out.returncode == 1 and "did you mean demo" in out.stderr
    out = _custom(experiment, "-cn", "costum")
    assert out.returncode == 1 and "configs/costum.yaml" in out.stderr


def test_uint8_loaders_with_device_normalization_train_and_record_it(experiment):
    # The data's transforms, which every loader names (supervised, rotation, val).
    uint8 = [f"+data.transforms.{role}.uint8_output=true" for role in ("train", "eval")]
    fit = _custom(
        experiment,
        *uint8,
        "learner.hparams.input_normalization={mean:[0.5,0.5,0.5],std:[0.25,0.25,0.25]}",
        "learner.hparams.channels_last=true",
    )
    assert fit.returncode == 0, fit.stderr[-3000:]
    (last,) = glob.glob(str(experiment / "runs" / "tiny" / "*" / "checkpoints" / "last.ckpt"))
    meta = torch.load(last, map_location="cpu", weights_only=True)["sesemi"]
    assert meta["preprocessing"]["norm_mean"] == [0.5, 0.5, 0.5]
    assert meta["preprocessing"]["norm_std"] == [0.25, 0.25, 0.25]
    # Without the learner's normalization the uint8 batches are refused with one line.
    bad = _custom(experiment, *uint8, "run.id=bad")
    assert bad.returncode == 1 and "input_normalization" in bad.stderr
    # A loader's transform without a _target_ is named, not a "not callable" crash.
    odd = _custom(experiment, "+data.train.supervised.dataset.image_transform.uint8_output=true")
    assert odd.returncode == 1 and "data.train.supervised.dataset.image_transform" in odd.stderr


def test_a_checkpoint_with_code_in_it_is_refused_in_one_line_and_the_code_never_runs(
    experiment, monkeypatch
):
    # Resuming reads checkpoints as data even when the environment asks torch not to.
    import pathlib

    marker = experiment / "payload_ran"

    class Payload:
        def __reduce__(self):
            return (pathlib.Path.touch, (pathlib.Path(marker),))

    path = experiment / "hostile.ckpt"
    torch.save({"state_dict": {}, "extra": Payload()}, path)
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    monkeypatch.chdir(experiment)
    for key in ("resume_from_checkpoint", "pretrained_checkpoint_path"):
        cfg = sesemi.compose("custom", [f"run.{key}={path}"], config_dir=experiment / "configs")
        with pytest.raises(USER_ERRORS) as error:
            sesemi.fit(cfg)
        assert "hostile.ckpt" in one_line(error.value) and "never code" in one_line(error.value)
        assert not marker.exists()
    out = _custom(experiment, f"run.resume_from_checkpoint={path}")
    assert out.returncode == 1 and out.stderr.count("\n") == 1 and not marker.exists()


def test_two_runs_started_together_get_a_folder_each(experiment):
    # Both ask for the same run folder (as two runs started in the same second do); the folder
    # is claimed atomically, so the second run gets `<folder>_1` and nothing is shared.
    wanted = experiment / "runs" / "tiny" / "same-second"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "sesemi", "-cd", "configs", "-cn", "custom", f"run.seed={seed}",
             "run.num_iterations=2", "run.num_epochs=null",
             f"hydra.run.dir=${{sesemi.new_dir:{wanted}}}"],
            cwd=experiment, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )
        for seed in (1, 2)
    ]  # fmt: skip
    for proc in procs:
        assert proc.wait(timeout=300) == 0, proc.stderr.read()[-3000:]
    folders = sorted(p.name for p in wanted.parent.iterdir())
    assert folders == ["same-second", "same-second_1"]
    seeds = set()
    for name in folders:
        run = wanted.parent / name
        seeds.add(yaml.safe_load((run / ".hydra" / "config.yaml").read_text())["run"]["seed"])
        assert (run / "checkpoints" / "last.ckpt").is_file()
        rows = (run / "metrics.csv").read_text().splitlines()
        assert rows.count(rows[0]) == 1  # one run's log: one header
        assert json.loads((run / "summary.json").read_text())["run_dir"] == str(run)
    assert seeds == {1, 2}


def test_a_yaml_syntax_error_or_an_unusable_run_dir_is_one_line(experiment, tmp_path, monkeypatch):
    monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    bad = experiment / "configs" / "tabs.yaml"
    bad.write_text("defaults:\n  - custom\n\trun:\n  seed: 1\n")
    out = open_sesemi("-cd", "configs", "-cn", "tabs", cwd=experiment)
    assert out.returncode == 1 and out.stderr.count("\n") == 1
    assert "tabs.yaml, line 3, column 1" in out.stderr and "Traceback" not in out.stderr
    bad.unlink()
    (experiment / "a_file").write_text("not a folder")
    out = _custom(experiment, "run.dir=a_file")
    assert out.returncode == 1 and out.stderr.count("\n") == 1
    assert (
        "cannot create the run folder 'a_file/tiny/" in out.stderr and "set run.dir" in out.stderr
    )
    assert (experiment / "a_file").read_text() == "not a folder"
    assert not list((tmp_path / "tmp").glob("sesemi-*"))  # the stand-in folder is not left behind


def test_printing_the_resolved_config_shows_run_time_values_as_placeholders(tmp_path):
    out = open_sesemi("-cn", "demo", "--cfg", "job", "--resolve", cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "max_iters: '<max_iterations: known when the run is built>'" in out.stdout
    assert not (tmp_path / "runs").exists()  # printing a config starts no run
