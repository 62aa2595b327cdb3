"""Semi-supervised benchmark on scikit-learn's digits: sesemi's methods vs. LabelSpreading.

For every count N of labels per class, the grid (methods x seeds) runs as ONE sesemi multirun,

    python -m sesemi -cn demo -m method=<methods> run.seed=<seeds> run.id=l<N> ...

Each job prepares its split with the demo's `data.prepare` (`sesemi.datasets.digits`) into
`<workdir>/digits_l<N>_s<seed>` (train = N labeled images per class, unlabeled = the rest of the
training pool, val = a stratified 30% held out), trains the demo's ResNet-18 for `--steps` steps
and is validated once, at the end: the val split is the test set here, and that final accuracy is
reported (no selection on it). The multirun's `comparison.csv` gives each method's per-seed
val/top1 and seconds per run; checkpoints are deleted as jobs finish. scikit-learn's
`LabelSpreading` (kNN graph on the raw 8x8 pixels, transductive on train + unlabeled) on the same
prepared splits gives a classical reference.

Usage (from the repository root, in the project's virtual environment):

    python benchmarks/ssl_digits.py --labels 2 5 10 --seeds 0 1 2 --steps 500 \
        --out benchmarks/results/ssl_digits.md

On the 2 cores of a CPU machine, two shards side by side (`--threads 1`, each its own
`--workdir`) finish a grid sooner; `--collect` then tabulates them without training:

    python benchmarks/ssl_digits.py --labels 1 --seeds 0 1 2 --steps 300 --threads 1 \
        --methods flexmatch --workdir /tmp/shard_a &
    python benchmarks/ssl_digits.py --labels 1 --seeds 0 1 2 --steps 300 --threads 1 \
        --methods supervised rotation --workdir /tmp/shard_b
    python benchmarks/ssl_digits.py --labels 1 --seeds 0 1 2 --steps 300 --threads 1 \
        --methods supervised rotation flexmatch --collect /tmp/shard_a /tmp/shard_b

Any method of the `method` config group can be named in `--methods`; `--set` adds Hydra overrides
to every job, e.g. a lighter rotation loss (formerly `--rotation-weight 0.5`):

    --set learner.hparams.model.regularization_loss_heads.rotation_prediction.scale_factor=0.5
"""

from __future__ import annotations

import argparse
import csv
import importlib.metadata
import importlib.resources
import os
import pathlib
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings

import numpy as np
from _report import closing, emit, provenance  # benchmarks/_report.py (the script's own folder)
from sklearn.datasets import load_digits
from sklearn.semi_supervised import LabelSpreading

from sesemi.config.resolvers import hydra_quoted

LABEL_SPREADING = "label_spreading"
METHOD_LABELS = {
    LABEL_SPREADING: "LabelSpreading (kNN, sklearn)",
    "supervised": "supervised only (ResNet-18)",
    "rotation": "rotation prediction (SESEMI, ResNet-18)",
    "rotation_flip": "rotation + flips, 6-way (SESEMI's code)",
    "entropy_minimization": "entropy minimization",
    "pi_model": "Pi model",
    "mean_teacher": "Mean Teacher",
    "fixmatch": "FixMatch",
    "flexmatch": "FlexMatch",
    "freematch": "FreeMatch",
    "softmatch": "SoftMatch",
    "jigsaw": "jigsaw prediction",
    "rotation_entropy": "rotation + entropy minimization",
    "noisy_student_teacher": "Noisy Student teacher (noised supervised)",
    "noisy_student": "Noisy Student",
}
# The `method` config group's files, in the order above (a new method's file joins at the end).
_FILES = {
    f.name[: -len(".yaml")]
    for f in (importlib.resources.files("sesemi.conf") / "method").iterdir()
    if f.name.endswith(".yaml")
}
METHODS = [m for m in METHOD_LABELS if m in _FILES] + sorted(_FILES - set(METHOD_LABELS))
# The default grid: every method that needs nothing but the digits (not Noisy Student's stages).
DEFAULT_METHODS = [m for m in METHODS if not m.startswith("noisy_student")]
TAIL_LINES = 40  # of the multirun's log, shown when it fails


def split_indices(root: pathlib.Path, split: str) -> np.ndarray:
    """Indices into `load_digits()` of one prepared split, from its `<class>/<index>.png` names."""
    return np.array(sorted(int(p.stem) for p in (root / split).glob("*/*.png")), dtype=np.int64)


def run_label_spreading(root: pathlib.Path) -> tuple[float, float]:
    """LabelSpreading on the raw 64-dim pixels of this split; returns (val accuracy, seconds)."""
    if not (root / "sesemi_digits.json").is_file():
        raise RuntimeError(f"{root} was not prepared by the multirun")
    start = time.time()
    digits = load_digits()
    train, unlabeled, val = (split_indices(root, s) for s in ("train", "unlabeled", "val"))
    pool = np.concatenate([train, unlabeled])
    targets = np.concatenate([digits.target[train], np.full(len(unlabeled), -1)])
    model = LabelSpreading(kernel="knn", n_neighbors=7)
    model.fit(digits.data[pool], targets)
    # A val image whose 7 neighbours all got no label mass (rare, at 2 labels per class) has
    # all-NaN class probabilities; scikit-learn predicts class 0 for it, which is kept.
    with np.errstate(invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        predicted = model.predict(digits.data[val])
    return float((predicted == digits.target[val]).mean()), time.time() - start


def multirun_command(n: int, args: argparse.Namespace, workdir: pathlib.Path) -> list[str]:
    """The `python -m sesemi -cn demo -m ...` command of the grid for N labels per class."""
    return [
        sys.executable,
        *("-m", "sesemi", "-cn", "demo", "-m"),
        f"method={','.join(args.methods)}",
        f"run.seed={','.join(map(str, args.seeds))}",
        # One split per (N, seed): the path and the split's seed follow each job's run.seed.
        f"run.data_root={hydra_quoted(f'{workdir}/digits_l{n}_s' + '${run.seed}')}",
        f"data.prepare.labels_per_class={n}",
        "+data.prepare.seed=${run.seed}",
        f"run.num_iterations={args.steps}",
        f"trainer.val_check_interval={args.steps}",  # validate once, at the end
        f"run.dir={hydra_quoted(str(workdir / 'runs'))}",
        f"run.id=l{n}",
        "++trainer.num_sanity_val_steps=0",
        "++trainer.enable_progress_bar=false",
        "++trainer.enable_model_summary=false",
        *args.set,
    ]


def run_multirun(command: list[str], runs: pathlib.Path, log: pathlib.Path, threads: int):
    """Runs one multirun, its output to `log`; returns its new `multirun_*` folder under `runs`.

    Job launches are echoed; finished jobs' checkpoints are deleted as the multirun goes on.
    """
    before = set(runs.glob("multirun_*"))
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "OMP_WAIT_POLICY": "PASSIVE"}
    env["PYTHONUNBUFFERED"] = "1"

    def drop_checkpoints() -> list[pathlib.Path]:
        new = sorted(set(runs.glob("multirun_*")) - before)
        for summary in (p for d in new for p in d.glob("*/summary.json")):
            shutil.rmtree(summary.parent / "checkpoints", ignore_errors=True)
        return new

    with open(log, "w") as out:
        out.write("$ " + shlex.join(command) + "\n")
        out.flush()
        process = subprocess.Popen(
            command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        for line in process.stdout:
            out.write(line)
            launch = re.search(r"\[HYDRA\]\s+#(\d+) : (.*)", line)
            if launch:
                drop_checkpoints()
                shown = [o for o in launch[2].split() if o.startswith(("method=", "run.seed="))]
                print(f"  job #{launch[1]}: {' '.join(shown)}", flush=True)
        returncode = process.wait()
    new = drop_checkpoints()
    if returncode != 0 or len(new) != 1 or not (new[0] / "comparison.csv").is_file():
        tail = "".join(log.read_text().splitlines(keepends=True)[-TAIL_LINES:])
        raise RuntimeError(
            f"the multirun failed (exit status {returncode}, new folders {[str(d) for d in new]}); "
            f"last {TAIL_LINES} lines of {log}:\n{tail}"
        )
    return new[0]


def read_comparison(path: pathlib.Path, methods: list[str], seeds: list[int]) -> dict:
    """Each method's ({seed: val/top1}, seconds per run) from `comparison.csv`, for `seeds`."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    found: dict[str, tuple[dict, float]] = {}
    for row in rows:
        named = re.findall(r"(?:^| )method=(\S+)", row["configuration"])
        method = named[0] if named else methods[0] if len(methods) == 1 else None
        if method not in methods or method in found:
            raise RuntimeError(f"{path}: unexpected row {row['configuration']!r} (--set sweeps?)")
        values = [float(v) for v in row["per_seed"].split()]
        if sorted(int(s) for s in row["seed_values"].split()) != sorted(seeds):
            raise RuntimeError(f"{path}: {method} ran seeds {row['seed_values']}, not {seeds}")
        if any(np.isnan(values)):
            raise RuntimeError(f"{path}: a {method} job has no val/top1 ({row['per_seed']})")
        per_seed = dict(zip(map(int, row["seed_values"].split()), values, strict=True))
        found[method] = (per_seed, float(row["seconds_per_run"]))
    if set(found) != set(methods):
        raise RuntimeError(f"{path}: no row for {sorted(set(methods) - set(found))}")
    return found


def logged_option(log: pathlib.Path, name: str) -> str:
    """The value of `name=` in the multirun command on the first line of its log."""
    command = shlex.split(log.read_text().splitlines()[0][2:])
    return next(o for o in command if o.startswith(name + "=")).split("=", 1)[1]


def collect(args: argparse.Namespace, n: int) -> tuple[dict, dict]:
    """`--collect`: each method's results for N labels per class from the `--workdir` folders
    that ran it (each folder's newest `l<N>` multirun; one method's seeds may come from several
    folders, each seed from one), and each seed's split folder (for LabelSpreading)."""
    per_seed: dict[str, dict[int, float]] = {}
    seconds: dict[str, list[float]] = {}
    splits: dict[int, pathlib.Path] = {}
    for folder in map(pathlib.Path, args.collect):
        sweeps = sorted((folder / "runs" / f"l{n}").glob("multirun_*/comparison.csv"))
        if not sweeps:
            continue
        log = folder / f"multirun_l{n}.log"
        steps = int(logged_option(log, "run.num_iterations"))
        if steps != args.steps:
            raise RuntimeError(f"{folder} ran {steps} steps per job, not --steps {args.steps}")
        ran = logged_option(log, "method").split(",")
        seeds = [int(s) for s in logged_option(log, "run.seed").split(",")]
        for seed in seeds:  # the first folder that still holds the seed's split
            split = folder / f"digits_l{n}_s{seed}"
            if (split / "sesemi_digits.json").is_file():
                splits.setdefault(seed, split)
        for method, (values, secs) in read_comparison(sweeps[-1], ran, seeds).items():
            if method not in args.methods:
                continue
            twice = sorted(set(values) & set(per_seed.get(method, {})))
            if twice:
                raise RuntimeError(f"{method} at {n} labels/class, seed(s) {twice}, ran twice")
            per_seed.setdefault(method, {}).update(values)
            seconds.setdefault(method, []).extend([secs] * len(values))
    lost = sorted(set(args.seeds) - set(splits))
    if lost:
        raise RuntimeError(f"no --collect folder holds the split of seed(s) {lost} at {n}/class")
    found = {}
    for method in args.methods:
        missing = sorted(set(args.seeds) - set(per_seed.get(method, {})))
        if missing:
            raise RuntimeError(f"no --collect folder ran {method}, seed(s) {missing}, at {n}/class")
        values = [per_seed[method][seed] for seed in args.seeds]
        found[method] = (values, statistics.fmean(seconds[method]))
    return found, splits


def cell(values: list[float]) -> str:
    """`mean ± std` in percent; std is the sample std over seeds (n-1, as compare.py; 0 for 1)."""
    a = [100.0 * v for v in values]
    return f"{statistics.fmean(a):.1f} ± {statistics.stdev(a) if len(a) > 1 else 0.0:.1f}"


def format_table(results: dict, seconds: dict, labels: list[int]) -> str:
    """The markdown table: rows are methods, columns labels per class, plus seconds per run."""
    head = ["method", *[f"{n} labels/class" for n in labels], "s/run"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" + "---:|" * (len(head) - 1)]
    for key, by_n in results.items():
        row = [METHOD_LABELS.get(key, key), *[cell(by_n[n]) for n in labels]]
        lines.append("| " + " | ".join([*row, f"{statistics.fmean(seconds[key]):.1f}"]) + " |")
    return "\n".join(lines)


def footer(argv: list[str], args: argparse.Namespace, example: list[str], wall: float) -> str:
    """Command, date, machine, versions, budget, statistics and wall time."""
    command, *made = provenance(argv, args.threads)
    if args.collect:  # the multiruns that made the numbers, from their logs
        ran = [
            f"- collected from `{log}`: `{log.read_text().splitlines()[0][2:]}`"
            for folder in map(pathlib.Path, args.collect)
            for log in sorted(folder.glob("multirun_l*.log"))
        ]
    else:
        ran = [
            f"- each N ran as one multirun, e.g. N={args.labels[0]}: "
            f"`{shlex.join(['python', *example[1:]])}`"
        ]
    lines = [
        command,
        *ran,
        *made,
        f"- budget: {args.steps} steps per run for every method (demo config otherwise: "
        "ResNet-18, 32 px, batch 32, SGD lr 0.05, polynomial decay)",
        "- metric: top-1 accuracy (%) on the 30% stratified val split, after the last step; "
        f"mean ± sample std (n-1) over seeds {', '.join(map(str, args.seeds))}",
        # Collected grids: their wall time is in their own reports (and the s/run column).
        *closing(wall, args.set, "job")[1 if args.collect else 0 :],
    ]
    return "\n".join(lines)


def parse_args(argv: list[str]) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--labels", type=int, nargs="+", default=[2, 5, 10])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=500, help="training steps for every method")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=DEFAULT_METHODS)
    parser.add_argument("--workdir", default=None, help="data, runs, logs (default: a temp dir)")
    parser.add_argument("--out", default=None, help="also write the markdown report here")
    parser.add_argument("--threads", type=int, default=2, help="OMP_NUM_THREADS of the jobs")
    parser.add_argument(
        "--collect",
        nargs="+",
        default=None,
        metavar="WORKDIR",
        help="train nothing: tabulate the grids already run into these --workdir folders (e.g. "
        "shards run side by side with --threads 1), each method from the folder that ran it; "
        "--steps and --threads say how they ran",
    )
    parser.add_argument(
        "--set",
        nargs="*",
        default=[],
        metavar="OVERRIDE",
        help="extra Hydra overrides for every job, e.g. learner.hparams.optimizer.lr=0.1",
    )
    args = parser.parse_args(argv)
    args.methods = list(dict.fromkeys(args.methods))
    return args


def main(argv: list[str] | None = None) -> int:
    """Runs the grid and prints (and optionally writes) the markdown report."""
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    temp = None
    if args.collect:
        workdir = pathlib.Path(args.collect[0])
    elif args.workdir is None:
        temp = tempfile.TemporaryDirectory(prefix="ssl_digits_")
        workdir = pathlib.Path(temp.name)
    else:
        workdir = pathlib.Path(args.workdir).resolve()
        workdir.mkdir(parents=True, exist_ok=True)
    keys = [LABEL_SPREADING, *args.methods]
    results = {k: {n: [] for n in args.labels} for k in keys}
    seconds: dict[str, list[float]] = {k: [] for k in keys}
    start = time.time()
    try:
        for n in args.labels:
            if args.collect:
                found, splits = collect(args, n)
            else:
                command = multirun_command(n, args, workdir)
                log = workdir / f"multirun_l{n}.log"
                print(f"[{n} labels/class] multirun (log: {log})", flush=True)
                sweep = run_multirun(command, workdir / "runs" / f"l{n}", log, args.threads)
                found = read_comparison(sweep / "comparison.csv", args.methods, args.seeds)
                found = {m: ([v[s] for s in args.seeds], t) for m, (v, t) in found.items()}
                splits = {seed: workdir / f"digits_l{n}_s{seed}" for seed in args.seeds}
            for method, (values, secs) in found.items():
                results[method][n] = values
                seconds[method].append(secs)
            for seed in args.seeds:
                acc, secs = run_label_spreading(splits[seed])
                results[LABEL_SPREADING][n].append(acc)
                seconds[LABEL_SPREADING].append(secs)
            for key in keys:
                per_seed = ", ".join(f"{100 * v:.1f}" for v in results[key][n])
                print(f"[{n} labels/class] {key}: {per_seed} %", flush=True)
            if not args.collect:
                print(f"  elapsed {(time.time() - start) / 60:.1f} min; results in {sweep}")
    except RuntimeError as error:
        print(f"ssl_digits: {error}", file=sys.stderr)
        return 1
    finally:
        if temp is not None:
            temp.cleanup()
    report = (
        "## Test accuracy (%) on digits, by labeled images per class\n\n"
        + format_table(results, seconds, args.labels)
        + "\n\n"
        + footer(argv, args, multirun_command(args.labels[0], args, workdir), time.time() - start)
        + "\n"
    )
    emit(report, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
