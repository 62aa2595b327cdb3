"""Semi-supervised benchmark on scikit-learn's digits: supervised-only vs. sesemi's methods.

For every (labels per class, seed) the digits are written as an image folder with
`sesemi.datasets.digits.prepare_digits` (train = the labeled images, unlabeled = the rest of the
training pool, val = a stratified 30% held out). Every method in `METHODS` trains the demo's
ResNet-18 (`sesemi/conf/demo.yaml`) for the same number of steps on that split, and
scikit-learn's `LabelSpreading` (kNN graph on the raw 8x8 pixels, transductive on
train + unlabeled) gives a classical reference. The val split is the test set here: each run is
validated once, at the end of training, and that final accuracy is reported (no selection on it).

Usage (from the repository root, in the project's virtual environment):

    python benchmarks/ssl_digits.py --labels 2 5 10 --seeds 0 1 2 --steps 500 \
        --out benchmarks/results/ssl_digits.md

A new method is one more entry in `METHODS`: the Hydra overrides that turn the demo config into
that method (the demo itself is supervised + rotation prediction).
"""

from __future__ import annotations

import argparse
import datetime
import logging
import os
import pathlib
import platform
import shlex
import shutil
import sys
import tempfile
import time
import warnings

# With the default (active) OpenMP wait policy, torch's 2 threads spin while another process
# holds a core, and a training step on a busy 2-core machine becomes several times slower than
# on 1 thread; passive waiting avoids that. It must be set before torch is imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.semi_supervised import LabelSpreading

# Method name -> Hydra overrides applied to the `demo` config. The demo trains the supervised
# loss on `train` plus rotation prediction on `[train, unlabeled]`.
METHODS: dict[str, list[str]] = {
    "supervised": [
        "~data.train.rotation_prediction",
        "learner.hparams.model.regularization_loss_heads=null",
    ],
    "rotation": [],
    "entropy_minimization": [],
    "pi_model": [],
    "mean_teacher": [],
    "fixmatch": [],
    "flexmatch": [],
    "jigsaw": [],
    "rotation_entropy": [],
}
# The built-in config each method starts from (default: `demo`); `demo_<method>` derive from it.
CONFIGS = {name: f"demo_{name}" for name in METHODS if name not in ("supervised", "rotation")}

LABEL_SPREADING = "LabelSpreading (kNN, sklearn)"
METHOD_LABELS = {
    "supervised": "supervised only (ResNet-18)",
    "rotation": "rotation prediction (SESEMI, ResNet-18)",
    "entropy_minimization": "entropy minimization",
    "pi_model": "Pi model",
    "mean_teacher": "Mean Teacher",
    "fixmatch": "FixMatch",
    "flexmatch": "FlexMatch",
    "jigsaw": "jigsaw prediction",
    "rotation_entropy": "rotation + entropy minimization",
}


def split_indices(root: pathlib.Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Indices into `load_digits()` and class labels of one split, from `<class>/<index>.png`."""
    paths = sorted((root / split).glob("*/*.png"))
    indices = np.array([int(p.stem) for p in paths], dtype=np.int64)
    labels = np.array([int(p.parent.name) for p in paths], dtype=np.int64)
    return indices, labels


def run_label_spreading(root: pathlib.Path) -> tuple[float, float]:
    """LabelSpreading on the raw 64-dim pixels of this split; returns (val accuracy, seconds)."""
    start = time.time()
    digits = load_digits()
    train, _ = split_indices(root, "train")
    unlabeled, _ = split_indices(root, "unlabeled")
    val, _ = split_indices(root, "val")
    pool = np.concatenate([train, unlabeled])
    targets = np.concatenate([digits.target[train], np.full(len(unlabeled), -1)])
    model = LabelSpreading(kernel="knn", n_neighbors=7)
    model.fit(digits.data[pool], targets)
    with np.errstate(invalid="ignore"):
        # A val image whose 7 neighbours all got no label mass (rare, at 2 labels per class)
        # has all-NaN class probabilities; it is predicted as class 0 and so counts as an error
        # unless it is a 0. That is how scikit-learn's LabelSpreading behaves; it is kept.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            predicted = model.predict(digits.data[val])
    accuracy = float((predicted == digits.target[val]).mean())
    return accuracy, time.time() - start


def run_method(
    name: str,
    data_root: pathlib.Path,
    workdir: pathlib.Path,
    seed: int,
    steps: int,
    extra: list[str],
    rotation_weight: float | None,
) -> tuple[float, float]:
    """Trains one method on one split; returns (final val top-1, seconds)."""
    from hydra import compose, initialize_config_module
    from omegaconf import open_dict

    import sesemi.config  # noqa: F401  (registers the schema and the ${sesemi:...} resolver)
    from sesemi.runner import run

    run_dir = workdir / "runs" / f"{name}_{data_root.name}"
    overrides = [
        *METHODS[name],
        f"run.data_root={data_root}",
        f"run.dir={workdir / 'runs'}",
        f"run.seed={seed}",
        f"run.num_iterations={steps}",
        f"run.id={name}_{data_root.name}",
        # Validate once, at the end: the val split is the test set of this benchmark.
        f"trainer.val_check_interval={steps}",
        "+trainer.num_sanity_val_steps=0",
        "+trainer.enable_progress_bar=false",
        "+trainer.enable_model_summary=false",
        "+trainer.logger=false",
        *extra,
    ]
    with initialize_config_module(config_module="sesemi.conf", version_base=None):
        cfg = compose(config_name=CONFIGS.get(name, "demo"), overrides=overrides)
    heads = cfg.learner.hparams.model.regularization_loss_heads
    if rotation_weight is not None and heads and "rotation_prediction" in heads:
        with open_dict(cfg):
            heads.rotation_prediction.scale_factor = rotation_weight
    result = run(cfg, str(run_dir))
    if "val/top1" not in result.metrics:
        raise RuntimeError(f"{name} on {data_root.name}: no val/top1 in {result.metrics}")
    shutil.rmtree(run_dir, ignore_errors=True)  # checkpoints are large and not needed here
    return result.metrics["val/top1"], result.seconds


def cell(values: list[float]) -> str:
    """`mean ± std` in percent (population std over seeds; 0 for one seed)."""
    if not values:
        return "—"
    a = 100.0 * np.asarray(values)
    return f"{a.mean():.1f} ± {a.std():.1f}"


def format_table(
    results: dict[str, dict[int, list[float]]],
    seconds: dict[str, list[float]],
    labels: list[int],
    methods: list[str],
) -> str:
    """The markdown table: rows are methods, columns labels per class, plus seconds per run."""
    head = ["method", *[f"{n} labels/class" for n in labels], "s/run"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" + "---:|" * (len(head) - 1)]
    for key in [LABEL_SPREADING, *methods]:
        row = [METHOD_LABELS.get(key, key)]
        row += [cell(results[key][n]) for n in labels]
        row.append(f"{np.mean(seconds[key]):.1f}" if seconds[key] else "—")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def environment(argv: list[str], steps: int, wall: float, args: argparse.Namespace) -> str:
    """The footer: command, date, machine, threads and versions."""
    command = shlex.join([os.path.relpath(sys.argv[0]) if sys.argv else "ssl_digits.py", *argv])
    lines = [
        f"- command: `python {command}`",
        f"- date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}",
        f"- machine: {platform.processor() or '?'} / {platform.machine()}, "
        f"{os.cpu_count()} CPUs, torch.set_num_threads({torch.get_num_threads()}), "
        f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}",
        f"- torch {torch.__version__}, Python {platform.python_version()}",
        f"- budget: {steps} steps per run for every method (demo config otherwise: ResNet-18, "
        "32 px, batch 32, SGD lr 0.05, polynomial decay)",
        "- metric: top-1 accuracy (%) on the 30% stratified val split, after the last step "
        "(mean ± std over seeds " + ", ".join(map(str, args.seeds)) + ")",
        f"- total wall time: {wall / 60:.1f} min",
    ]
    if args.rotation_weight is not None:
        lines.append(f"- rotation loss weight (scale_factor): {args.rotation_weight}")
    if args.set:
        lines.append(f"- extra overrides for every method: {' '.join(args.set)}")
    return "\n".join(lines)


def parse_args(argv: list[str]) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--labels", type=int, nargs="+", default=[2, 5, 10])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=500, help="training steps for every method")
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS))
    parser.add_argument("--workdir", default=None, help="data and runs (default: a temp dir)")
    parser.add_argument("--out", default=None, help="also write the markdown report here")
    parser.add_argument(
        "--rotation-weight",
        type=float,
        default=None,
        help="scale_factor of the rotation loss for methods that have it (default: the config's)",
    )
    parser.add_argument(
        "--set",
        nargs="*",
        default=[],
        metavar="OVERRIDE",
        help="extra Hydra overrides applied to every method, e.g. learner.hparams.optimizer.lr=0.1",
    )
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Runs the grid and prints (and optionally writes) the markdown report."""
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message=r".*treespec, LeafSpec.*")
    warnings.filterwarnings("ignore", message=r".*pin_memory.*no accelerator.*")
    warnings.filterwarnings("ignore", message=r".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=r".*GPU available but not used.*")
    import pytorch_lightning  # noqa: F401  (sets its logger to INFO on import; quiet it after)

    for name in ("pytorch_lightning", "lightning", "lightning.pytorch", "lightning_fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)

    temp = None
    if args.workdir is None:
        temp = tempfile.TemporaryDirectory(prefix="ssl_digits_")
        workdir = pathlib.Path(temp.name)
    else:
        workdir = pathlib.Path(args.workdir).resolve()
        workdir.mkdir(parents=True, exist_ok=True)

    from sesemi.datasets.digits import prepare_digits

    keys = [LABEL_SPREADING, *args.methods]
    results = {k: {n: [] for n in args.labels} for k in keys}
    seconds: dict[str, list[float]] = {k: [] for k in keys}
    start = time.time()
    try:
        for n in args.labels:
            for seed in args.seeds:
                root = prepare_digits(
                    workdir / f"digits_l{n}_s{seed}", labels_per_class=n, seed=seed
                )
                acc, secs = run_label_spreading(root)
                results[LABEL_SPREADING][n].append(acc)
                seconds[LABEL_SPREADING].append(secs)
                print(f"[{n} labels, seed {seed}] {LABEL_SPREADING}: {100 * acc:.1f}%", flush=True)
                for name in args.methods:
                    acc, secs = run_method(
                        name, root, workdir, seed, args.steps, args.set, args.rotation_weight
                    )
                    results[name][n].append(acc)
                    seconds[name].append(secs)
                    print(
                        f"[{n} labels, seed {seed}] {name}: {100 * acc:.1f}% in {secs:.0f}s "
                        f"(elapsed {(time.time() - start) / 60:.1f} min)",
                        flush=True,
                    )
    finally:
        if temp is not None:
            temp.cleanup()
    wall = time.time() - start
    report = (
        "## Test accuracy (%) on digits, by labeled images per class\n\n"
        + format_table(results, seconds, args.labels, args.methods)
        + "\n\n"
        + environment(argv, args.steps, wall, args)
        + "\n"
    )
    print("\n" + report)
    if args.out:
        out = pathlib.Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
