"""Active learning on the digits: which images to label next, by `open_sesemi suggest` strategy.

For every seed:

1. `sesemi.datasets.digits.prepare_digits(<workdir>/s<seed>/digits, labels_per_class=1,
   seed=<seed>)`: one labeled image per class in train/, the rest of the pool in unlabeled/
   (still in class folders, so each image's true label is known) and a 30 % val split;
2. round 0: `python -m sesemi -cn demo method=flexmatch` (the demo's budget: ResNet-18, 300 steps)
   on that split, validated once, after the last step;
3. for each strategy, `open_sesemi suggest <round 0's last.ckpt> <split>/unlabeled -n 10
   --strategy S --seed <seed>` (the labeled images are round 0's training folder); a copy of the
   split gets the suggested images' true labels: each file moves from unlabeled/<class>/ to
   train/<class>/;
4. round 1: the same training, from scratch, on each copy; its final val top-1 is reported.

Random is also run with more labels (`--random-n`, default 20 and 30), to say how many random
labels the best strategy is worth. The val split is the test set here (as in
ssl_digits.py): the final weights are scored, nothing is selected on it. Each row also says how
many of the 10 classes the picks cover and how many of round 0's pre-labels (the CSV's `guess`)
were right.

Usage (from the repository root, in the project's virtual environment), the full run (27
trainings; each FlexMatch training of 300 steps takes about 13 minutes alone on a 2-core CPU,
about 6 hours in all there; about 2 minutes on one core of the GPU machine):

    python benchmarks/active_digits.py --seeds 0 1 2 --steps 300 --workdir /tmp/active \
        --out benchmarks/results/active_digits.md

A training that already finished in `--workdir` (its run folder has a summary.json) is reused,
as are the suggestion CSVs and labeled copies, so the grid can run as shards side by side and
then be tabled by the same command: first each seed's round 0 alone (`--seeds S --strategies
--random-n`), then one process per seed and strategy (`--seeds S --strategies margin
--random-n`, `--seeds S --strategies random --random-n 20`, ...), all with the same
`--workdir`, and last the full command, which trains nothing new. Several one-thread processes
use 2 CPU cores better than one two-thread process.

A smoke run of the whole pipeline (a minute or two; the numbers mean nothing):

    python benchmarks/active_digits.py --seeds 0 --steps 2 --set \
        learner.hparams.model.backbone.name=test_resnet run.batch_size_per_gpu=4
"""

from __future__ import annotations

import argparse
import csv
import glob
import json
import os
import pathlib
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

from _report import closing, emit, provenance  # benchmarks/_report.py (the script's own folder)

from sesemi.datasets.digits import prepare_digits
from sesemi.suggest import STRATEGIES

TAIL_LINES = 30  # of a failed command's output


def quoted(path: pathlib.Path) -> str:
    """`path` as a single-quoted Hydra value (quotes and backslashes escaped)."""
    return "'" + str(path).replace("\\", "\\\\").replace("'", "\\'") + "'"


def sesemi(arguments: list[str], threads: int, log: pathlib.Path) -> None:
    """Runs `python -m sesemi ARGUMENTS`, its output appended to `log`; raises if it fails."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "OMP_WAIT_POLICY": "PASSIVE"}
    command = [sys.executable, "-m", "sesemi", *arguments]
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    with open(log, "a") as f:
        f.write(f"$ {shlex.join(command)}\n{result.stdout}{result.stderr}\n")
    if result.returncode != 0:
        tail = "".join((result.stdout + result.stderr).splitlines(keepends=True)[-TAIL_LINES:])
        raise RuntimeError(f"`{shlex.join(command)}` failed:\n{tail}")


def train(data: pathlib.Path, run_id: str, seed: int, args, workdir: pathlib.Path) -> dict:
    """Trains FlexMatch on the demo's budget from scratch on `data`; returns its summary.json.
    A run of that id that already finished in `workdir` (it has a summary.json) is reused."""
    found = finished(workdir, run_id)
    if found is not None:
        return found
    sesemi(
        [
            *("-cn", "demo", f"method={args.method}", "data.prepare=null"),
            f"run.data_root={quoted(data)}",
            f"run.seed={seed}",
            f"run.num_iterations={args.steps}",
            f"trainer.val_check_interval={args.steps}",  # validate once, at the end
            f"run.dir={quoted(workdir / 'runs')}",
            f"run.id={run_id}",
            "++trainer.num_sanity_val_steps=0",
            "++trainer.enable_progress_bar=false",
            "++trainer.enable_model_summary=false",
            *args.set,
        ],
        args.threads,
        workdir / "log.txt",
    )
    found = finished(workdir, run_id)
    if found is None:
        raise RuntimeError(f"run {run_id} in {workdir} exited 0 but wrote no summary.json")
    return found


def finished(workdir: pathlib.Path, run_id: str) -> dict | None:
    """The summary.json of run `run_id` in `workdir` (the newest one), None if none finished."""
    found = sorted(glob.glob(str(workdir / "runs" / glob.escape(run_id) / "*" / "summary.json")))
    return json.loads(pathlib.Path(found[-1]).read_text()) if found else None


def suggest(checkpoint: str, split: pathlib.Path, strategy: str, n: int, seed: int, args, workdir):
    """Runs `open_sesemi suggest`; returns its CSV rows."""
    out = workdir / f"suggest_{strategy}_{n}.csv"
    sesemi(
        [
            *("suggest", checkpoint, str(split / "unlabeled"), "-n", str(n)),
            *("--strategy", strategy, "--seed", str(seed), "-o", str(out), "--overwrite"),
            *("--device", "cpu"),
        ],
        args.threads,
        workdir / "log.txt",
    )
    with open(out, newline="") as f:
        return list(csv.DictReader(f))


def label(split: pathlib.Path, rows: list[dict], target: pathlib.Path) -> dict:
    """Copies the split to `target` and gives the suggested images their true labels there: each
    moves from unlabeled/<class>/ to train/<class>/. Returns what the picks were like. A target
    made by an earlier run is kept (it is made under another name and renamed when complete)."""
    classes, right, moves = set(), 0, []
    for row in rows:
        rel = pathlib.Path(os.path.relpath(row["file"], split))
        subset, true_class, name = rel.parts
        if subset != "unlabeled":
            raise RuntimeError(f"suggest picked {row['file']}, which is not an unlabeled image")
        moves.append(pathlib.Path(true_class, name))
        classes.add(true_class)
        right += row["guess"] == true_class
    if not target.exists():
        partial = target.with_name(target.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        shutil.copytree(split, partial)
        for move in moves:
            (partial / "unlabeled" / move).rename(partial / "train" / move)
        partial.rename(target)
    return {"classes": len(classes), "right": right, "count": len(rows)}


def run_seed(seed: int, args, root: pathlib.Path, results: dict) -> None:
    """Round 0, then every strategy's round 1, for one seed; appends to `results`."""
    workdir = root / f"s{seed}"
    workdir.mkdir(parents=True, exist_ok=True)
    split = prepare_digits(workdir / "digits", labels_per_class=1, seed=seed)
    start = time.time()
    first = train(split, "round0", seed, args, workdir)
    results[("none", 0)].append((first["metrics"]["val/top1"], None))
    print(f"[seed {seed}] round 0: {100 * first['metrics']['val/top1']:.1f} %", flush=True)
    jobs = [(s, args.extra) for s in args.strategies]
    jobs += [("random", n) for n in args.random_n if n != args.extra]
    for strategy, n in jobs:
        rows = suggest(first["last_checkpoint"], split, strategy, n, seed, args, workdir)
        picks = label(split, rows, workdir / f"digits_{strategy}_{n}")
        summary = train(workdir / f"digits_{strategy}_{n}", f"{strategy}_{n}", seed, args, workdir)
        shutil.rmtree(pathlib.Path(summary["run_dir"]) / "checkpoints", ignore_errors=True)
        top1 = summary["metrics"]["val/top1"]
        results[(strategy, n)].append((top1, picks))
        print(
            f"[seed {seed}] {strategy} +{n}: {100 * top1:.1f} % ({picks['classes']} classes, "
            f"{picks['right']}/{n} pre-labels right; {(time.time() - start) / 60:.1f} min)",
            flush=True,
        )


def cell(values: list[float]) -> str:
    """`mean ± std` in percent; std is the sample std over seeds (0 for one seed)."""
    a = [100.0 * v for v in values]
    return f"{statistics.fmean(a):.1f} ± {statistics.stdev(a) if len(a) > 1 else 0.0:.1f}"


def table(results: dict, extra: int) -> str:
    """The markdown table (one row per strategy and label count) and the random-labels line."""
    lines = [
        "| labels added | strategy | val top-1 (%) | per seed | classes in picks | "
        "pre-labels right |",
        "|---:|---|---:|---|---:|---:|",
    ]
    for (strategy, n), found in results.items():
        if not found:
            continue
        top1 = [t for t, _ in found]
        picks = [p for _, p in found if p is not None]
        seeds = ", ".join(f"{100 * t:.1f}" for t in top1)
        classes = f"{statistics.fmean(p['classes'] for p in picks):.1f}" if picks else ""
        right = sum(p["right"] for p in picks) / max(sum(p["count"] for p in picks), 1)
        right = f"{100 * right:.0f} %" if picks else ""
        name = strategy if n else "none (round 0: 1 label/class)"
        lines.append(f"| {n} | {name} | {cell(top1)} | {seeds} | {classes} | {right} |")
    mean = {k: statistics.fmean(t for t, _ in v) for k, v in results.items() if v}
    chosen = {k: v for k, v in mean.items() if k[1] == extra and k[0] != "random"}
    if chosen:
        best = max(chosen, key=chosen.get)
        enough = sorted(n for (s, n), v in mean.items() if s == "random" and v >= mean[best])
        needed = f"random needs {enough[0]}" if enough else "no random budget tried reaches it"
        lines.append(
            f"\nBest strategy with {extra} labels: {best[0]} ({100 * mean[best]:.1f} %); "
            f"to match its mean, {needed} (tried: "
            f"{', '.join(str(n) for s, n in mean if s == 'random')})."
        )
    return "\n".join(lines)


def footer(argv: list[str], args: argparse.Namespace, wall: float) -> str:
    """Command, date, machine, versions, budget, statistics and wall time."""
    lines = [
        *provenance(argv, args.threads),
        f"- every training: `python -m sesemi -cn demo method={args.method}`, {args.steps} steps, "
        "from scratch; round 0 has 1 label per class",
        "- metric: top-1 (%) on the 30 % val split after the last step; mean ± sample std "
        f"over seeds {', '.join(map(str, args.seeds))} (each seed has its own split)",
        *closing(wall, args.set, "training"),
    ]
    return "\n".join(lines)


def parse_args(argv: list[str]) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=300, help="training steps (the demo's 300)")
    parser.add_argument("--method", default="flexmatch", help="the method config (flexmatch)")
    parser.add_argument("--strategies", nargs="*", choices=STRATEGIES, default=list(STRATEGIES))
    parser.add_argument("--extra", type=int, default=10, help="labels each strategy adds (10)")
    parser.add_argument(
        "--random-n",
        type=int,
        nargs="*",
        default=[20, 30],
        help="random is also run with these many labels (20 30)",
    )
    parser.add_argument("--workdir", default=None, help="data, runs, logs (default: a temp dir)")
    parser.add_argument("--out", default=None, help="also write the markdown report here")
    parser.add_argument("--threads", type=int, default=2, help="OMP_NUM_THREADS of each run")
    parser.add_argument("--set", nargs="*", default=[], metavar="OVERRIDE", help="Hydra overrides")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Runs every seed and prints (and optionally writes) the markdown report."""
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    temp = tempfile.TemporaryDirectory(prefix="active_digits_") if args.workdir is None else None
    root = pathlib.Path(temp.name if temp else args.workdir).resolve()
    results: dict[tuple[str, int], list] = {("none", 0): []}
    for strategy in args.strategies:
        results[(strategy, args.extra)] = []
    for n in args.random_n:
        results[("random", n)] = []
    start = time.time()
    try:
        for seed in args.seeds:
            run_seed(seed, args, root, results)
    except RuntimeError as error:
        print(f"active_digits: {error}", file=sys.stderr)
        return 1
    finally:
        if temp is not None:
            temp.cleanup()
    report = (
        f"## Val top-1 (%) on digits after labeling {args.extra} images chosen by each strategy\n\n"
        + table(results, args.extra)
        + "\n\n"
        + footer(argv, args, time.time() - start)
        + "\n"
    )
    emit(report, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
