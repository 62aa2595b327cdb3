"""Few labels in the real world, on scikit-learn's digits: long-tailed classes, and foreign
images (of classes nobody labeled) in the unlabeled folder.

Scenario `imbalance`: from each seed's digits split (`sesemi.datasets.digits.prepare_digits`,
10 labels per class), class c keeps the share `10^(-c/9)` of the largest class in the labeled
and in the unlabeled set (imbalance ratio 10: labeled 10, 8, 6, 5, 4, 3, 2, 2, 1, 1 images;
unlabeled about 115 down to 12), the val split stays balanced. Reported per method: balanced
accuracy (the mean per-class recall on val) and the worst class's recall.

Scenario `foreign`: classes 0-5 are known (labeled: `--foreign-labels` per class; val: their
val images); the unlabeled folder holds `--known-unlabeled` images of the known classes plus,
for a foreign share r, `known * r / (1 - r)` images of classes 6-9 (r = 0.75 needs 3 x as many
foreign as known images: 160 known, 480 foreign of the 504 there are), as loose files. The
number of known unlabeled images is the same at every r, so only the foreign images change.
Reported: val accuracy on the 6 classes, and at every r the AUROC of `open_sesemi predict`'s
default unknown score (OpenMatch's one-vs-all score, else 1 - max probability) separating
held-out images of the 4 foreign classes (their val split, never trained on) from the known
classes' val images.

Every job is one `python -m sesemi -cn demo` run (ResNet-18, 32 px, batch 32, `--steps` steps,
validated once at the end), the method by name; its folder's `val_per_class_accuracy.csv` gives
the recalls. Usage (from the repository root, in the project's virtual environment):

    python benchmarks/realworld_digits.py imbalance --methods fixmatch flexmatch freematch \
        softmatch fixmatch_da debiaspl fixmatch_balanced --seeds 0 1 2 --steps 300 \
        --out benchmarks/results/imbalance_digits.md
    python benchmarks/realworld_digits.py imbalance --seeds 0 --methods \
        flexmatch:supervised_loss=logit_adjusted   # a method with overrides of its own
    python benchmarks/realworld_digits.py foreign --methods fixmatch flexmatch \
        --ratios 0 0.25 0.5 0.75 --seeds 0 1 2 --steps 300 \
        --out benchmarks/results/foreign_digits.md
"""

from __future__ import annotations

import argparse
import collections
import csv
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

import numpy as np
import torch
from _report import closing, emit, provenance  # benchmarks/_report.py (the script's own folder)
from sklearn.metrics import roc_auc_score

from sesemi.datasets.digits import prepare_digits

NUM_CLASSES = 10
KNOWN = [str(c) for c in range(6)]  # the foreign scenario's labeled classes
FOREIGN = [str(c) for c in range(6, 10)]
# 6 classes; the unlabeled loader keeps its last partial batch: at r = 0 the unlabeled set (the
# labeled images + 160 known ones) is smaller than one batch of 7 x 32.
FOREIGN_OVERRIDES = ["data.num_classes=6", "data.train.unlabeled.drop_last=false"]
TAIL_LINES = 30


def long_tail_counts(largest: int, ratio: float = 10.0, classes: int = NUM_CLASSES) -> list[int]:
    """Images kept per class: `round(largest * ratio^(-c / (classes - 1)))`, at least 1."""
    return [max(1, round(largest * ratio ** (-c / (classes - 1)))) for c in range(classes)]


def _images(folder: pathlib.Path) -> list[pathlib.Path]:
    return sorted(folder.glob("*.png"))


def _copy(files: list[pathlib.Path], folder: pathlib.Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for f in files:
        shutil.copyfile(f, folder / f.name)


def build_imbalanced(
    base: pathlib.Path, root: pathlib.Path, seed: int, ratio: float = 10.0
) -> dict[str, list[int]]:
    """Writes the long-tailed split of `base` (imbalance ratio `ratio`) to `root`; returns the
    labeled/unlabeled counts."""
    rng = np.random.default_rng(seed)
    labeled_counts = long_tail_counts(len(_images(base / "train" / "0")), ratio)
    largest_unlabeled = min(len(_images(base / "unlabeled" / c)) for c in "0123")
    unlabeled_counts = long_tail_counts(largest_unlabeled, ratio)
    for c in range(NUM_CLASSES):
        for split, counts in (("train", labeled_counts), ("unlabeled", unlabeled_counts)):
            files = _images(base / split / str(c))
            keep = sorted(rng.choice(len(files), counts[c], replace=False))
            _copy([files[i] for i in keep], root / split / str(c))
        _copy(_images(base / "val" / str(c)), root / "val" / str(c))
    return {"labeled": labeled_counts, "unlabeled": unlabeled_counts}


def build_foreign(
    base: pathlib.Path, root: pathlib.Path, seed: int, ratio: float, labels: int, known: int
) -> list[pathlib.Path]:
    """Writes the foreign-images split of `base` to `root`; returns the held-out foreign files
    (the foreign classes' val images) for the unknown-score AUROC."""
    rng = np.random.default_rng(seed)
    for c in KNOWN:
        _copy(_images(base / "train" / c)[:labels], root / "train" / c)
        _copy(_images(base / "val" / c), root / "val" / c)
    pool = [f for c in KNOWN for f in _images(base / "unlabeled" / c)]
    pool += [f for c in KNOWN for f in _images(base / "train" / c)[labels:]]
    strangers = [f for c in FOREIGN for s in ("train", "unlabeled") for f in _images(base / s / c)]
    n_foreign = round(known * ratio / (1.0 - ratio))
    if known > len(pool) or n_foreign > len(strangers):
        raise RuntimeError(
            f"foreign share {ratio} needs {known} known and {n_foreign} foreign unlabeled images; "
            f"the digits have {len(pool)} and {len(strangers)}: lower --known-unlabeled"
        )
    picked = [pool[i] for i in rng.choice(len(pool), known, replace=False)]
    picked += [strangers[i] for i in rng.choice(len(strangers), n_foreign, replace=False)]
    _copy(picked, root / "unlabeled")  # loose files: unlabeled, no class folders
    return [f for c in FOREIGN for f in _images(base / "val" / c)]


def slug(method: str) -> str:
    """A `--methods` entry as a folder name (`flexmatch:a.b=c` -> `flexmatch+a.b-c`)."""
    return re.sub(r"[^\w.+-]", "-", method.replace(":", "+"))


def run_job(
    method: str, seed: int, data_root: pathlib.Path, run_dir: pathlib.Path, args, extra: list[str]
) -> pathlib.Path:
    """Trains one method (a `--methods` entry) on one prepared folder; returns the run's
    folder."""
    name, *overrides = method.split(":")
    command = [
        sys.executable,
        *("-m", "sesemi", "-cn", "demo"),
        f"method={name}",
        *overrides,
        f"run.seed={seed}",
        f"run.data_root={data_root}",
        "data.prepare=null",
        f"run.num_iterations={args.steps}",
        f"trainer.val_check_interval={args.steps}",
        f"run.dir={run_dir}",
        "run.id=job",
        "++trainer.num_sanity_val_steps=0",
        "++trainer.enable_progress_bar=false",
        "++trainer.enable_model_summary=false",
        *extra,
        *args.set,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "OMP_WAIT_POLICY": "PASSIVE"}
    # Beside the run folder, named after all of it: a share such as "r0.5" is no suffix.
    log = run_dir.parent / f"{run_dir.name}.log"
    header = "$ " + shlex.join(command) + "\n"
    finished = sorted((run_dir / "job").glob("*/checkpoints/last.ckpt"))
    if log.exists() and len(finished) == 1 and log.read_text().startswith(header):
        print(f"[reused] {run_dir} (the same command finished there)", flush=True)
        return finished[0].parent.parent
    shutil.rmtree(run_dir, ignore_errors=True)  # this script's own folder, from an earlier try
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as out:
        out.write(header)
        out.flush()
        code = subprocess.call(command, env=env, stdout=out, stderr=subprocess.STDOUT)
    folders = sorted((run_dir / "job").glob("*/summary.json"))
    if code != 0 or len(folders) != 1:
        tail = "".join(log.read_text().splitlines(keepends=True)[-TAIL_LINES:])
        raise RuntimeError(f"{method} failed (exit status {code}); end of {log}:\n{tail}")
    return folders[0].parent


def recalls(run: pathlib.Path) -> dict[str, float]:
    """Per-class val recall from the run's `val_per_class_accuracy.csv`."""
    with open(run / "val_per_class_accuracy.csv", newline="") as f:
        return {row["class"]: float(row["accuracy"]) for row in csv.DictReader(f)}


def unknown_aurocs(
    run: pathlib.Path, known: list[pathlib.Path], foreign: list[pathlib.Path]
) -> dict[str, float]:
    """AUROC of each unknown score `predict` offers this model (msp, entropy, propagation over
    the run's training images, and ova for models with one-vs-all detectors) for foreign
    (positive) vs known images."""
    from sesemi.inference import UNKNOWN_SCORES, load_trained_model, predict, unknown_score
    from sesemi.propagation import fit_scorer, training_images

    checkpoint = str(run / "checkpoints" / "last.ckpt")
    model = load_trained_model(checkpoint)
    kinds = [k for k in UNKNOWN_SCORES if k != "ova" or model.ova is not None]
    files = [str(f) for f in [*known, *foreign]]
    predictions = list(predict(model, files, 256, features=True))
    labeled = training_images(checkpoint, "labeled")
    scorer = fit_scorer(model, labeled, training_images(checkpoint, "unlabeled"), 256)
    truth = [0] * len(known) + [1] * len(foreign)
    found = {}
    for kind in kinds:
        scores = [
            float(unknown_score(p.probabilities, kind, p.inliers, p.features, scorer))
            for p in predictions
        ]
        found[kind] = float(roc_auc_score(truth, scores))
    return found


def cell(values: list[float], scale: float = 100.0, digits: int = 1) -> str:
    """`mean ± sample std` (0 for one value)."""
    a = [scale * v for v in values]
    std = statistics.stdev(a) if len(a) > 1 else 0.0
    return f"{statistics.fmean(a):.{digits}f} ± {std:.{digits}f}"


def crest_labels(
    run: pathlib.Path, root: pathlib.Path, dest: pathlib.Path, args
) -> tuple[pathlib.Path, str]:
    """CReST's next labeled images: `open_sesemi pseudo-label --balance crest` with the run's
    last checkpoint over the split's unlabeled images into `dest`; returns `dest` and a note on
    what was added (per class, and how many are right: the images sit in class folders)."""
    command = [
        sys.executable,
        *("-m", "sesemi", "pseudo-label", str(run / "checkpoints" / "last.ckpt")),
        *(str(root / "unlabeled"), "-o", str(dest), "--overwrite", "--balance", "crest"),
        *("--crest-alpha", str(args.crest_alpha)),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"pseudo-label failed: {done.stderr.strip()[-2000:]}")
    with open(dest / "pseudo_labels.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    added = collections.Counter(r["label"] for r in rows)
    right = collections.Counter(
        r["label"] for r in rows if pathlib.Path(r["file"]).parent.name == r["label"]
    )
    per_class = ", ".join(f"{c}: {right[c]}/{added[c]}" for c in sorted(added, key=int))
    return dest, f"added (right/added) {per_class}"


def crest_name(method: str, generation: int) -> str:
    """A method's row name for a CReST generation (generation 0: the method itself)."""
    return f"{method} (CReST generation {generation})" if generation else method


def run_imbalance(args, workdir: pathlib.Path) -> tuple[str, str]:
    """Trains every method on every seed's long-tailed split (and, with --crest-generations,
    again on CReST's expanded labeled sets); returns the table and notes."""
    generations = range(args.crest_generations + 1)
    names = [crest_name(m, g) for m in args.methods for g in generations]
    balanced = {m: [] for m in names}
    worst = {m: [] for m in names}
    added_notes = []
    for seed in args.seeds:
        root = workdir / f"imbalance_s{seed}"
        if root.exists():
            shutil.rmtree(root)
        counts = build_imbalanced(base_split(workdir, seed), root, seed)
        for method in args.methods:
            extra, previous = [], None
            for g in generations:
                name = crest_name(method, g)
                started = time.time()
                suffix = f"_crest{g}" if g else ""
                run_dir = workdir / "runs" / f"imbalance_{slug(method)}{suffix}_s{seed}"
                if g:
                    dest = workdir / "crest" / f"{slug(method)}_g{g}_s{seed}"
                    dest, note = crest_labels(previous, root, dest, args)
                    extra = [f"data.train.supervised.dataset.pseudo_labels={dest}"]
                    added_notes.append(f"- seed {seed}, {name}: {note}")
                    print(f"[imbalance s{seed}] {name}: {note}", flush=True)
                    if not args.keep_checkpoints:
                        shutil.rmtree(previous / "checkpoints", ignore_errors=True)
                run = run_job(method, seed, root, run_dir, args, extra)
                per_class = recalls(run)
                if not args.keep_checkpoints and g == args.crest_generations:
                    shutil.rmtree(run / "checkpoints", ignore_errors=True)
                previous = run
                balanced[name].append(statistics.fmean(per_class.values()))
                worst[name].append(min(per_class.values()))
                print(
                    f"[imbalance s{seed}] {name}: balanced {100 * balanced[name][-1]:.1f} %, "
                    f"worst class {100 * worst[name][-1]:.1f} % "
                    f"({min(per_class, key=per_class.get)}; {time.time() - started:.0f} s)",
                    flush=True,
                )
    lines = [
        "| method | balanced accuracy (%) | worst class recall (%) |",
        "|---|---:|---:|",
        *(f"| {m} | {cell(balanced[m])} | {cell(worst[m])} |" for m in names),
    ]
    notes = (
        f"- imbalance ratio 10; per class (0..9) labeled {counts['labeled']}, unlabeled "
        f"{counts['unlabeled']} (of seed {args.seeds[-1]}); val balanced (the 30 % split)"
    )
    if added_notes:
        notes += (
            "\n- CReST (`pseudo-label --balance crest --crest-alpha "
            f"{args.crest_alpha:g}`), pseudo-labeled images added to the labeled set, by "
            "predicted class:\n" + "\n".join(added_notes)
        )
    return "\n".join(lines), notes


def known_accuracy(run: pathlib.Path, base: pathlib.Path) -> float:
    """Val accuracy on the known classes, from the run's per-class recalls."""
    per_class = recalls(run)
    counts = {c: len(_images(base / "val" / c)) for c in KNOWN}
    return sum(per_class[c] * counts[c] for c in KNOWN) / sum(counts.values())


def record(tables, key: tuple[str, float], seed: int, run: pathlib.Path, held_out, started) -> None:
    """Appends a run's known-class accuracy, default-score AUROC and every score's AUROC to
    `tables` under `key` (row, foreign share), and prints them."""
    accuracy, auroc, every = tables
    base, known_val, foreign_val = held_out
    accuracy[key].append(known_accuracy(run, base))
    scores = unknown_aurocs(run, known_val, foreign_val)
    # predict's default score: ova where the model has detectors, else msp
    auroc[key].append(scores["ova" if "ova" in scores else "msp"])
    every[key].append(scores)
    print(
        f"[foreign {key[1]:g} s{seed}] {key[0]}: accuracy {100 * accuracy[key][-1]:.1f} %, "
        "unknown-score AUROC "
        + ", ".join(f"{k} {v:.3f}" for k, v in scores.items())
        + f" ({time.time() - started:.0f} s)",
        flush=True,
    )


def filter_unlabeled(
    run: pathlib.Path,
    root: pathlib.Path,
    dest: pathlib.Path,
    threshold: float,
    base: pathlib.Path,
    outliers: bool = False,
) -> str:
    """Writes `root` to `dest` without the unlabeled images whose propagation score (`predict
    --unknown-score propagation` with the run's checkpoint) exceeds `threshold`, as a user
    cleaning the folder would (with `outliers`, the dropped images go to `dest/outliers`, for
    `method=outlier_exposure`); returns how many known and foreign images it dropped."""
    from sesemi.inference import load_trained_model
    from sesemi.propagation import fit_scorer, training_images

    checkpoint = str(run / "checkpoints" / "last.ckpt")
    model = load_trained_model(checkpoint)
    pool = _images(root / "unlabeled")
    scorer = fit_scorer(model, training_images(checkpoint, "labeled"), [str(f) for f in pool])
    # The scorer's bank holds the pool's features, in order, after the labeled images' (every
    # pool image is readable and none is labeled): no second pass over the pool.
    assert len(scorer.bank) - scorer.labeled == len(pool)
    dropped = scorer.score(scorer.bank[scorer.labeled :]) > threshold
    if dest.exists():
        shutil.rmtree(dest)
    for split in ("train", "val"):
        shutil.copytree(root / split, dest / split)
    drops = dropped.tolist()
    _copy([f for f, d in zip(pool, drops, strict=True) if not d], dest / "unlabeled")
    if outliers:
        _copy([f for f, d in zip(pool, drops, strict=True) if d], dest / "outliers")
    truth = {f.name: f.parent.name in FOREIGN for f in base.glob("*/*/*.png")}
    foreign = torch.tensor([truth[f.name] for f in pool])
    return (
        f"dropped {int((dropped & foreign).sum())} of {int(foreign.sum())} foreign and "
        f"{int((dropped & ~foreign).sum())} of {int((~foreign).sum())} known unlabeled images"
    )


def with_outliers(method: str) -> str:
    """A `--methods` entry plus the outlier_exposure add-on (`m:o` -> `[m,outlier_exposure]:o`)."""
    name, *overrides = method.split(":")
    return ":".join([f"[{name},outlier_exposure]", *overrides])


def run_foreign(args, workdir: pathlib.Path) -> tuple[str, str]:
    """Trains every method at every foreign share and seed (and with --filter-threshold each
    again on the filtered folder); returns the table and notes."""
    tables = accuracy, auroc, every = [collections.defaultdict(list) for _ in range(3)]
    rows_of = [*args.methods]
    if args.filter_threshold is not None:
        filtered = f" + propagation filter {args.filter_threshold:g}"
        if args.outlier_exposure:
            filtered += " + outlier exposure"
        rows_of += [m + filtered for m in args.methods]
        again_row = filtered + ", cleaned again by that run, trained again"
        if args.clean_again:
            rows_of += [m + again_row for m in args.methods]
    filter_notes = []
    for seed in args.seeds:
        base = base_split(workdir, seed)
        known_val = [f for c in KNOWN for f in _images(base / "val" / c)]
        for ratio in args.ratios:
            root = workdir / f"foreign_r{ratio:g}_s{seed}"
            if root.exists():
                shutil.rmtree(root)
            foreign_val = build_foreign(
                base, root, seed, ratio, args.foreign_labels, args.known_unlabeled
            )

            held_out = (base, known_val, foreign_val)
            for method in args.methods:
                started = time.time()
                name = f"foreign_{slug(method)}_r{ratio:g}_s{seed}"
                run = run_job(method, seed, root, workdir / "runs" / name, args, FOREIGN_OVERRIDES)
                record(tables, (method, ratio), seed, run, held_out, started)
                if args.filter_threshold is not None:
                    started = time.time()
                    clean = workdir / f"{root.name}_{slug(method)}_filtered"
                    what = filter_unlabeled(
                        run, root, clean, args.filter_threshold, base, args.outlier_exposure
                    )
                    filter_notes.append(f"{method}, {100 * ratio:g} %, seed {seed}: {what}")
                    print(f"[foreign {ratio:g} s{seed}] {method}: filter {what}", flush=True)
                    again = workdir / "runs" / f"{name}_filtered"
                    second = run_job(
                        with_outliers(method) if args.outlier_exposure else method,
                        seed, clean, again, args, FOREIGN_OVERRIDES,
                    )  # fmt: skip
                    record(tables, (method + filtered, ratio), seed, second, held_out, started)
                    if args.clean_again:
                        started = time.time()
                        clean2 = workdir / f"{root.name}_{slug(method)}_filtered_again"
                        what = filter_unlabeled(second, root, clean2, args.filter_threshold, base)
                        filter_notes.append(
                            f"{method}, {100 * ratio:g} %, seed {seed}, again: {what}"
                        )
                        print(f"[foreign {ratio:g} s{seed}] {method}: again {what}", flush=True)
                        third = run_job(
                            method, seed, clean2, workdir / "runs" / f"{name}_filtered_again",
                            args, FOREIGN_OVERRIDES,
                        )  # fmt: skip
                        record(tables, (method + again_row, ratio), seed, third, held_out, started)
                        if not args.keep_checkpoints:
                            shutil.rmtree(third / "checkpoints", ignore_errors=True)
                    if not args.keep_checkpoints:
                        shutil.rmtree(second / "checkpoints", ignore_errors=True)
                if not args.keep_checkpoints:
                    shutil.rmtree(run / "checkpoints", ignore_errors=True)
    head = ["method", *[f"{100 * r:g} % foreign" for r in args.ratios]]
    rows = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * len(args.ratios)]
    for m in rows_of:
        rows.append("| " + " | ".join([m, *(cell(accuracy[m, r]) for r in args.ratios)]) + " |")
    rows += ["", "Unknown-score AUROC (foreign vs known held-out images):", ""]
    rows += ["| " + " | ".join(head) + " |", "|---|" + "---:|" * len(args.ratios)]
    for m in rows_of:
        cells = (cell(auroc[m, r], 1.0, 3) for r in args.ratios)
        rows.append("| " + " | ".join([m, *cells]) + " |")
    rows += ["", "The AUROC of each unknown score `predict` offers:", ""]
    rows += ["| " + " | ".join(["method: score", *head[1:]]) + " |"]
    rows += ["|---|" + "---:|" * len(args.ratios)]
    for m in rows_of:
        for kind in every[m, args.ratios[0]][0]:
            cells = (cell([s[kind] for s in every[m, r]], 1.0, 3) for r in args.ratios)
            rows.append("| " + " | ".join([f"{m}: {kind}", *cells]) + " |")
    filter_how = (
        f"the run's checkpoint scores its unlabeled folder, images above "
        f"{args.filter_threshold or 0:g} are left out, the method trains again from scratch on "
        "the rest"
    )  # (used only with --filter-threshold)
    if args.outlier_exposure:
        filter_how += "; the dropped images are its outliers/ folder, `method=[M,outlier_exposure]`"
    notes = (
        f"- known classes {', '.join(KNOWN)} ({args.foreign_labels} labels each), foreign "
        f"{', '.join(FOREIGN)}; unlabeled: {args.known_unlabeled} known images + "
        "known x r / (1 - r) foreign ones, loose files, with the labeled images (the demo's "
        "unlabeled_subset), in each method's unlabeled batches, the last partial batch kept; "
        "val: the known classes' 30 % split; unknown score: `open_sesemi predict`'s default "
        "(ova for openmatch, 1 - max probability otherwise); every score's table: propagation "
        "over the run's own labeled and unlabeled training folders"
        + "".join(f"\n- propagation filter ({filter_how}): {line}" for line in filter_notes)
    )
    return "\n".join(rows), notes


def base_split(workdir: pathlib.Path, seed: int) -> pathlib.Path:
    """Each seed's full digits split (10 labels per class), prepared once."""
    return prepare_digits(workdir / f"digits_s{seed}", labels_per_class=10, seed=seed)


def footer(argv: list[str], args, wall: float) -> str:
    """Command, date, machine, versions, budget, statistics and wall time."""
    lines = [
        *provenance(argv, args.threads),
        f"- budget: {args.steps} steps per run (demo config otherwise: ResNet-18, 32 px, batch 32, "
        "SGD lr 0.05, polynomial decay); validated once, after the last step; mean ± sample std "
        f"over seeds {', '.join(map(str, args.seeds))}",
        *closing(wall, args.set, "job"),
    ]
    return "\n".join(lines)


def parse_args(argv: list[str]) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("scenario", choices=["imbalance", "foreign"])
    parser.add_argument(
        "--methods",
        nargs="+",
        default=["fixmatch", "flexmatch"],
        help="method names, each optionally with overrides of its own after colons, e.g. "
        "flexmatch:supervised_loss=logit_adjusted",
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=300, help="training steps of every run")
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.0, 0.25, 0.5, 0.75])
    parser.add_argument("--foreign-labels", type=int, default=2, help="labels per known class")
    parser.add_argument("--known-unlabeled", type=int, default=160)
    parser.add_argument("--workdir", default=None, help="data, runs, logs (default: a temp dir)")
    parser.add_argument("--out", default=None, help="also write the markdown report here")
    parser.add_argument("--threads", type=int, default=2, help="OMP_NUM_THREADS of the jobs")
    parser.add_argument("--set", nargs="*", default=[], metavar="OVERRIDE")
    parser.add_argument(
        "--filter-threshold",
        type=float,
        default=None,
        help="foreign: also clean each run's unlabeled folder with `predict --unknown-score "
        "propagation` (drop the images scoring above this) and train the method again on it",
    )
    parser.add_argument(
        "--outlier-exposure",
        action="store_true",
        help="foreign, with --filter-threshold: the dropped images become the second run's "
        "outliers/ folder and it trains `method=[M,outlier_exposure]`",
    )
    parser.add_argument(
        "--clean-again",
        action="store_true",
        help="foreign, with --outlier-exposure: the outlier-exposure run scores the original "
        "unlabeled folder again, the images above --filter-threshold are dropped (no "
        "outliers/), and the method trains a third time on the rest",
    )
    parser.add_argument(
        "--crest-generations",
        type=int,
        default=0,
        help="imbalance: after each method's run, CReST generations (Wei et al., "
        "arXiv:2102.09559): pseudo-label the unlabeled images with the last run "
        "(--balance crest) and train the method again from scratch with them added to the "
        "labeled images",
    )
    parser.add_argument("--crest-alpha", type=float, default=1 / 3, help="CReST's alpha")
    parser.add_argument(
        "--keep-checkpoints",
        action="store_true",
        help="keep each run's checkpoints; a later call with the same --workdir then reuses "
        "the runs whose command is unchanged (scores them again, no training)",
    )
    args = parser.parse_args(argv)
    if args.filter_threshold is not None and not 0.0 <= args.filter_threshold <= 1.0:
        parser.error("--filter-threshold must be in [0, 1]")
    if args.outlier_exposure and args.filter_threshold is None:
        parser.error("--outlier-exposure needs --filter-threshold (it picks the outliers)")
    if args.clean_again and not args.outlier_exposure:
        parser.error("--clean-again needs --outlier-exposure (its run scores the folder again)")
    if any(not 0.0 <= r < 1.0 for r in args.ratios):
        parser.error("--ratios must be in [0, 1)")
    return args


def main(argv: list[str] | None = None) -> int:
    """Runs one scenario's grid and prints (and optionally writes) the markdown report."""
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    temp = tempfile.TemporaryDirectory(prefix="realworld_") if args.workdir is None else None
    workdir = pathlib.Path(temp.name if temp else args.workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    start = time.time()
    try:
        run = run_imbalance if args.scenario == "imbalance" else run_foreign
        table, notes = run(args, workdir)
    except RuntimeError as error:
        print(f"realworld_digits: {error}", file=sys.stderr)
        return 1
    finally:
        if temp is not None:
            temp.cleanup()
    title = {
        "imbalance": "## Long-tailed digits (imbalance ratio 10): balanced val accuracy",
        "foreign": "## Foreign images among the unlabeled: val accuracy (%) on the 6 known classes",
    }[args.scenario]
    report = f"{title}\n\n{table}\n\n{notes}\n{footer(argv, args, time.time() - start)}\n"
    emit(report, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
