"""`open_sesemi predict | export | pseudo-label | suggest`: put a trained checkpoint to work; and
`open_sesemi shards`: write an image folder as WebDataset shards.

These subcommands take plain options (argparse), not Hydra overrides: the checkpoint commands
read everything they need (weights, class names, preprocessing) from the checkpoint.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import os
import sys
import time
from collections.abc import Iterator, Mapping, Sequence

from sesemi.errors import reporting_user_errors

SUBCOMMANDS = ("predict", "export", "pseudo-label", "shards", "suggest")
UNKNOWN = "unknown"  # predict --unknown-threshold's class for images unlike the known ones


@contextlib.contextmanager
def _atomic_output(path: str) -> Iterator[str]:
    """Yields a temporary name to write `path` under; it becomes `path` only when the block ends
    without an error, and is removed when it fails, so no half-written output is left."""
    tmp = path + ".partial"
    try:
        yield tmp
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise
    os.replace(tmp, path)


def _refuse_overwrite(path: str, overwrite: bool) -> None:
    if os.path.exists(path) and not overwrite:
        raise FileExistsError(f"'{path}' already exists; choose another output or add --overwrite")


def _add_model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="a checkpoint written by open_sesemi (best or last)")
    parser.add_argument(
        "--ema", action="store_true", help="use the EMA teacher's weights (runs with model.ema)"
    )


def _add_input_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("inputs", nargs="*", help="image files and folders (searched recursively)")
    parser.add_argument("--file-list", help="a text file with one image path per line")
    parser.add_argument("--batch-size", type=int, default=64, help="images per batch (64)")
    parser.add_argument("--workers", type=int, default=0, help="decoding processes (0)")
    parser.add_argument("--device", default="auto", help="auto (GPU if any), cpu, cuda, cuda:1")
    parser.add_argument(
        "--tta",
        default="none",
        help="test-time augmentation, probabilities averaged: none, flip, crops (center + 4 "
        "corners), or flip,crops",
    )


def build_parser() -> argparse.ArgumentParser:
    """The parser of the checkpoint subcommands."""
    parser = argparse.ArgumentParser(
        prog="open_sesemi",
        description="Use a trained checkpoint, or write data shards. (Training: open_sesemi "
        "[-cn CONFIG] [overrides]; see open_sesemi -h.)",
    )
    commands = parser.add_subparsers(dest="command", required=True)

    predict = commands.add_parser(
        "predict", help="write top-k class predictions for images to a CSV file"
    )
    _add_model_options(predict)
    _add_input_options(predict)
    predict.add_argument("-o", "--output", default="predictions.csv", help="CSV file to write")
    predict.add_argument("-k", "--top-k", type=int, default=5, help="classes per image (5)")
    predict.add_argument("--overwrite", action="store_true", help="replace an existing output")
    predict.add_argument(
        "--unknown-score",
        default="auto",
        help="the 'unknown' column: msp (1 - max probability), entropy (normalized), ova "
        "(1 - the predicted class's one-vs-all inlier probability, method=openmatch models), "
        "propagation (the share of the unlabeled training images better connected to the "
        "labeled ones through the features' neighbour graph: flags images unlike the training "
        "images and images of unlabeled-folder clusters nobody labeled, which the model may "
        "have pseudo-labeled into known classes; needs the training images); auto "
        "(default): ova where the model has one-vs-all heads, else msp",
    )
    predict.add_argument(
        "--labeled",
        help="--unknown-score propagation: folder of the labeled training images (default: the "
        "checkpoint's, from its run's .hydra/config.yaml)",
    )
    predict.add_argument(
        "--unlabeled",
        help="--unknown-score propagation: folder of the unlabeled training images (default: "
        "the checkpoint's, from its run's .hydra/config.yaml)",
    )
    predict.add_argument(
        "--unknown-threshold",
        type=float,
        help="write 'unknown' in the 'prediction' column where the unknown score exceeds it",
    )

    export = commands.add_parser(
        "export", help="export backbone + classifier to ONNX (dynamic batch size)"
    )
    _add_model_options(export)
    export.add_argument("-o", "--output", default="model.onnx", help="ONNX file to write")
    export.add_argument("--opset", type=int, default=18, help="ONNX opset version (18)")
    export.add_argument("--overwrite", action="store_true", help="replace an existing output")

    label = commands.add_parser(
        "pseudo-label",
        help="label unlabeled images with a trained model, as a dataset a next run can train on",
    )
    _add_model_options(label)
    _add_input_options(label)
    label.add_argument(
        "-o", "--output", required=True, help="folder to write pseudo_labels.csv / .json into"
    )
    label.add_argument(
        "--threshold",
        type=float,
        default=0.0,
        help="keep images whose top class probability is at least this (0: keep all)",
    )
    label.add_argument(
        "--labels",
        choices=("hard", "soft"),
        default="hard",
        help="train the next model on the top class (hard) or the probabilities (soft)",
    )
    label.add_argument(
        "--balance",
        choices=BALANCE,
        default="none",
        help="class balancing. Noisy Student's: drop keeps each class's most confident images, "
        "duplicate also repeats those of smaller classes, to --per-class images each. CReST's: "
        "crest keeps the most confident share (N_rev / N_max)^alpha of each class's images, "
        "rarer classes (by the run's labeled images) more; train again with them added to the "
        "labeled set: data.train.supervised.dataset.pseudo_labels=<this -o folder>",
    )
    label.add_argument(
        "--crest-alpha",
        type=float,
        default=1 / 3,
        help="--balance crest: the exponent alpha of CReST's rates (1/3, USB's default; 0 keeps "
        "every image)",
    )
    label.add_argument(
        "--per-class",
        type=int,
        default=None,
        help="images per class after balancing (default: the smallest class's count for drop, "
        "the largest's for duplicate)",
    )
    label.add_argument("--overwrite", action="store_true", help="replace existing pseudo-labels")
    _add_shards_parser(commands)
    _add_suggest_parser(commands)
    return parser


def _add_shards_parser(commands: argparse._SubParsersAction) -> None:
    shards = commands.add_parser(
        "shards",
        help="write an image folder as WebDataset tar shards (dataset name: webdataset)",
        description="Writes each subset of an image folder (train, unlabeled, val, test: those "
        "that exist) as WebDataset tar shards, OUTPUT/<subset>/<subset>-000000.tar, ..., and "
        "OUTPUT/index.json (classes, sample counts, shards). The images' bytes are stored as "
        "they are, in a shuffled order, with their class index (cls, -1 for loose images) and "
        "their position in the subset's sorted file list as key. Resumable: a write that was "
        "interrupted (no index.json yet) continues with the shard it stopped at when run again "
        "with the same options on unchanged images, and starts over otherwise.",
    )
    shards.add_argument("folder", help="the image folder: <subset>/<class>/*.png|jpg|...")
    shards.add_argument("-o", "--output", required=True, help="folder to write the shards into")
    shards.add_argument(
        "--max-size", default="1GB", help="bytes per shard, e.g. 1GB (default), 500MB, 2GiB"
    )
    shards.add_argument("--max-count", type=int, default=100_000, help="images per shard (100000)")
    shards.add_argument(
        "--subsets", help="comma-separated subsets (default: train,unlabeled,val,test that exist)"
    )
    shards.add_argument("--seed", type=int, default=0, help="seeds the order images are written in")
    shards.add_argument("--overwrite", action="store_true", help="replace finished shards")


# `open_sesemi suggest --strategy` (sesemi.suggest.STRATEGIES) and what each one's score is.
SUGGEST_STRATEGIES = {
    "random": "a seeded uniform draw in [0, 1), lowest first (the baseline)",
    "entropy": "predictive entropy in nats, highest first",
    "margin": "top-1 minus top-2 probability, smallest (the closest call) first",
    "kcenter": "greedy k-center over the backbone's unit-length features, starting from the "
    "labeled images: the distance from the pick to its nearest labeled or earlier pick, largest "
    "first (inf: the first pick when there are no labeled images, the smallest-margin image)",
    "margin-kcenter": "kcenter's, among the --pool-factor x n smallest-margin images",
    "typiclust": "TypiClust: k-means of the labeled and unlabeled features into (labeled + n, "
    "at most 500) clusters, one pick per least-labeled cluster (largest first), its most "
    "typical image; the score is that image's typicality, 1 / mean distance to its 20 nearest "
    "neighbours in the cluster (the pick for the first rounds, when uncertain images are the "
    "odd ones)",
}


def _add_suggest_parser(commands: argparse._SubParsersAction) -> None:
    scores = "; ".join(f"{name}: {text}" for name, text in SUGGEST_STRATEGIES.items())
    suggest = commands.add_parser(
        "suggest",
        help="suggest which unlabeled images to label next (active learning)",
        description="Ranks unlabeled images by what labeling them would teach the model and "
        "writes the first n to a CSV: rank, file, score, guess (the model's top class, a "
        f"pre-label) and probability (its probability). The score, by strategy: {scores}. "
        "Images already in the labeled folder are left out; unreadable ones are skipped.",
    )
    _add_model_options(suggest)
    _add_input_options(suggest)
    suggest.add_argument("-n", type=int, default=50, help="images to suggest (50)")
    suggest.add_argument(
        "--strategy",
        choices=tuple(SUGGEST_STRATEGIES),
        default="typiclust",
        help="how to rank (typiclust); each one's score is described above",
    )
    suggest.add_argument(
        "-o", "--output", default="to_label.csv", help="CSV file to write (to_label.csv)"
    )
    suggest.add_argument(
        "--copy-to", help="also copy (never move) the images here, flat, named <rank>_<name>"
    )
    suggest.add_argument(
        "--labeled",
        help="folder of the labeled images (k-center starts from them, typiclust counts them; "
        "they are left out of the inputs); default: the checkpoint's training folder, from its "
        "run's .hydra/config.yaml",
    )
    suggest.add_argument(
        "--seed", type=int, default=0, help="seeds --strategy random and typiclust's k-means (0)"
    )
    suggest.add_argument(
        "--pool-factor",
        type=int,
        default=10,
        help="margin-kcenter: k-center among the pool-factor x n smallest-margin images (10)",
    )
    suggest.add_argument("--overwrite", action="store_true", help="replace the CSV and copies")


def _load(args: argparse.Namespace):
    from sesemi.inference import load_trained_model

    return load_trained_model(args.checkpoint, ema=args.ema)


def _predictions(args: argparse.Namespace, model, features: bool = False):
    from sesemi.inference import list_images, parse_tta, predict, resolve_device

    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, got {args.batch_size}")
    tta = parse_tta(args.tta)
    files = list_images(args.inputs, args.file_list)
    device = resolve_device(args.device)
    progress = sys.stderr.isatty()
    return files, predict(
        model, files, args.batch_size, args.workers, device, tta, progress, features
    )


def _propagation_scorer(args: argparse.Namespace, model):
    """Fits `--unknown-score propagation` on the model's features of its training images."""
    from sesemi.inference import parse_tta, resolve_device
    from sesemi.propagation import fit_scorer, training_images

    labeled = training_images(args.checkpoint, "labeled", args.labeled)
    unlabeled = training_images(args.checkpoint, "unlabeled", args.unlabeled)
    tta, device = parse_tta(args.tta), resolve_device(args.device)
    progress = sys.stderr.isatty()
    scorer = fit_scorer(
        model, labeled, unlabeled, args.batch_size, args.workers, device, tta, progress
    )
    print(
        f"open_sesemi predict: propagation score over {scorer.labeled} labeled and "
        f"{len(scorer.reference)} unlabeled training images",
        file=sys.stderr,
    )
    return scorer


def run_predict(args: argparse.Namespace) -> str:
    """Writes `file, class_1, score_1, ..., class_k, score_k, error` rows; returns a summary."""
    from sesemi.inference import UNKNOWN_SCORES, unknown_score

    if args.top_k < 1:
        raise ValueError(f"--top-k must be at least 1, got {args.top_k}")
    if args.unknown_score not in ("auto", *UNKNOWN_SCORES):
        raise ValueError(
            f"--unknown-score must be one of auto, {', '.join(UNKNOWN_SCORES)}, got "
            f"'{args.unknown_score}'"
        )
    threshold = args.unknown_threshold
    if threshold is not None and not 0.0 <= threshold <= 1.0:
        raise ValueError(f"--unknown-threshold must be in [0, 1], got {threshold}")
    _refuse_overwrite(args.output, args.overwrite)
    model = _load(args)
    if threshold is not None and UNKNOWN in model.class_names:
        raise ValueError(
            f"--unknown-threshold writes '{UNKNOWN}', but the model has a class of that name; "
            "read the 'unknown' score column instead"
        )
    kind = args.unknown_score
    if kind == "auto":
        kind = "ova" if model.ova is not None else "msp"
    if kind == "ova" and model.ova is None:
        raise ValueError(
            f"--unknown-score ova: '{args.checkpoint}' has no one-vs-all heads (train with "
            "method=openmatch); use msp or entropy"
        )
    if kind != "propagation" and (args.labeled or args.unlabeled):
        raise ValueError("--labeled and --unlabeled are for --unknown-score propagation")
    scorer = _propagation_scorer(args, model) if kind == "propagation" else None
    k = min(args.top_k, len(model.class_names))
    files, predictions = _predictions(args, model, features=scorer is not None)
    failed = unknown = 0
    decide = [] if threshold is None else ["prediction"]
    with _atomic_output(args.output) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        header = ["file"]
        for i in range(1, k + 1):
            header += [f"class_{i}", f"score_{i}"]
        writer.writerow([*header, "unknown", *decide, "error"])
        for p in predictions:
            if p.probabilities is None:
                failed += 1
                print(f"open_sesemi predict: skipped: {p.error}", file=sys.stderr)
                writer.writerow([p.file, *[""] * (2 * k + 1 + len(decide)), p.error])
                continue
            scores, indices = p.probabilities.topk(k)
            row = [p.file]
            for s, i in zip(scores.tolist(), indices.tolist(), strict=True):
                row += [model.class_names[i], f"{s:.6f}"]
            score = float(unknown_score(p.probabilities, kind, p.inliers, p.features, scorer))
            row.append(f"{score:.6f}")
            if threshold is not None:
                unknown += score > threshold
                row.append(UNKNOWN if score > threshold else row[1])
            writer.writerow([*row, ""])
    summary = f"predicted {len(files) - failed} image(s) into {args.output}"
    if threshold is not None:
        summary += f" ({unknown} unknown: {kind} score above {threshold})"
    return summary + (f"; {failed} unreadable file(s) reported there" if failed else "")


def run_export(args: argparse.Namespace) -> str:
    """Exports to ONNX with the class names and preprocessing as metadata; returns a summary."""
    from sesemi.export import export_onnx

    _refuse_overwrite(args.output, args.overwrite)
    model = _load(args)
    export_onnx(model, args.output, opset=args.opset)
    pre = model.preprocessing
    return (
        f"exported {args.output}: input 'images' (N, 3, {pre['input_h']}, {pre['input_w']}) "
        f"float32 normalized with mean {pre['norm_mean']} std {pre['norm_std']}; outputs "
        f"'logits' and 'probabilities' over {len(model.class_names)} classes (names in the "
        "model's metadata_props)"
    )


BALANCE = ("none", "drop", "duplicate", "crest")


def crest_rates(counts: Sequence[int], alpha: float) -> list[float]:
    """CReST's share of each class's pseudo-labeled images to keep (Wei et al., arXiv:2102.09559).

    With the classes ranked by their labeled images, `N_1 >= ... >= N_L` (ties in class order),
    the class of rank l keeps `(N_{L+1-l} / N_1) ** alpha`: the rarest class all of its images,
    the most frequent the share `(N_L / N_1) ** alpha`. Returned in class order.
    """
    if alpha < 0:
        raise ValueError(f"--crest-alpha must be at least 0, got {alpha}")
    if not counts or max(counts) <= 0 or min(counts) < 0:
        raise ValueError(f"CReST needs a labeled image count per class, got {list(counts)}")
    order = sorted(range(len(counts)), key=lambda c: -counts[c])
    ranked = [counts[c] for c in order]
    rates = [0.0] * len(counts)
    for rank, c in enumerate(order):
        rates[c] = (ranked[len(counts) - 1 - rank] / ranked[0]) ** alpha
    return rates


def balance_rows(
    rows: list[list],
    mode: str,
    per_class: int | None = None,
    rates: Mapping[str, float] | None = None,
) -> list[list]:
    """Balances pseudo-labeled rows `[file, label, confidence, ...]` over their labels.

    Noisy Student's class balancing (Xie et al., arXiv:1911.04252): "drop" keeps each class's
    `per_class` most confident images (default: the smallest class's count); "duplicate" also
    repeats the images of smaller classes, most confident first, until each class has
    `per_class` (default: the largest class's count). CReST's: "crest" keeps each label's
    `int(rates[label] * its images)` most confident images (`crest_rates`). "none" returns the
    rows as they are. Rows come back grouped by label, each class most confident first.
    """
    if mode not in BALANCE:
        raise ValueError(f"--balance must be one of {', '.join(BALANCE)}, got '{mode}'")
    if mode == "none" or not rows:
        return rows
    if mode == "crest" and rates is None:
        raise ValueError("--balance crest needs a rate per class")
    by_label: dict[str, list[list]] = {}
    for row in rows:
        by_label.setdefault(row[1], []).append(row)
    counts = [len(group) for group in by_label.values()]
    target = per_class or (min(counts) if mode == "drop" else max(counts))
    balanced = []
    for label in sorted(by_label):
        group = sorted(by_label[label], key=lambda r: -float(r[2]))
        if mode == "crest":
            balanced += group[: int(rates[label] * len(group))]
            continue
        group = group[:target]
        if mode == "duplicate":
            group = [group[i % len(group)] for i in range(target)]
        balanced += group
    return balanced


def _crest_rates(model, rows: list[list], alpha: float) -> list[float]:
    """`crest_rates` by the checkpoint's labeled images per class; a checkpoint that records
    none (written by an older sesemi) is rated by its pseudo-labels' classes, with a note."""
    counts = model.labeled_class_counts
    if counts is None and not rows:
        return [1.0] * len(model.class_names)  # nothing to keep a share of
    if counts is None:
        print(
            "open_sesemi pseudo-label: the checkpoint records no labeled images per class; "
            "--balance crest rates the classes by the pseudo-labels' counts",
            file=sys.stderr,
        )
        labels = [row[1] for row in rows]
        counts = [labels.count(name) for name in model.class_names]
    return crest_rates(counts, alpha)


def run_pseudo_label(args: argparse.Namespace) -> str:
    """Writes `pseudo_labels.csv` and `pseudo_labels.json` into the output folder."""
    from sesemi.datasets.pseudo_labeled import CSV_NAME, META_NAME

    if not 0.0 <= args.threshold <= 1.0:
        raise ValueError(f"--threshold must be in [0, 1], got {args.threshold}")
    if args.per_class is not None and args.per_class < 1:
        raise ValueError(f"--per-class must be at least 1, got {args.per_class}")
    if args.crest_alpha < 0:
        raise ValueError(f"--crest-alpha must be at least 0, got {args.crest_alpha}")
    csv_path = os.path.join(args.output, CSV_NAME)
    _refuse_overwrite(csv_path, args.overwrite)
    model = _load(args)
    files, predictions = _predictions(args, model)
    os.makedirs(args.output, exist_ok=True)
    rows, failed = [], 0
    for p in predictions:
        if p.probabilities is None:
            failed += 1
            print(f"open_sesemi pseudo-label: skipped: {p.error}", file=sys.stderr)
            continue
        confidence, index = p.probabilities.max(dim=0)
        if float(confidence) < args.threshold:
            continue
        rel = os.path.relpath(os.path.abspath(p.file), os.path.abspath(args.output))
        probs = [f"{v:.6f}" for v in p.probabilities.tolist()]
        rows.append([rel, model.class_names[int(index)], f"{float(confidence):.6f}", *probs])
    kept = len(rows)
    rates = None
    if args.balance == "crest":
        rates = _crest_rates(model, rows, args.crest_alpha)
        rates = dict(zip(model.class_names, rates, strict=True))
    rows = balance_rows(rows, args.balance, args.per_class, rates)
    with _atomic_output(csv_path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["file", "label", "confidence", *[f"p:{c}" for c in model.class_names]])
        writer.writerows(rows)
    meta = {
        "class_names": model.class_names,
        "labels": args.labels,
        "threshold": args.threshold,
        "balance": args.balance,
        "per_class": args.per_class,
        **({"crest_alpha": args.crest_alpha, "crest_rates": rates} if rates else {}),
        "tta": args.tta,
        "checkpoint": os.path.abspath(args.checkpoint),
        "ema": args.ema,
        "images": len(files),
        "kept": kept,
        "rows": len(rows),
        "unreadable": failed,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    with open(os.path.join(args.output, META_NAME), "w") as f:
        json.dump(meta, f, indent=2)
    share = kept / max(len(files) - failed, 1)
    balanced = f", {len(rows)} rows after --balance {args.balance}" * (args.balance != "none")
    root = os.path.abspath(args.output)
    use = f"train on them with dataset name: pseudo_labeled, root: {root}"
    if args.balance == "crest":  # CReST's next generation: the same run, more labeled images
        use = f"train the next generation with data.train.supervised.dataset.pseudo_labels={root}"
    return (
        f"pseudo-labeled {kept} of {len(files) - failed} image(s) ({share:.0%} at confidence >= "
        f"{args.threshold}){balanced} into {csv_path}; {use}"
        + (f"; {failed} unreadable file(s) skipped" if failed else "")
    )


def run_shards(args: argparse.Namespace) -> str:
    """Writes the shards and index.json; returns a summary."""
    _refuse_overwrite(os.path.join(args.output, "index.json"), args.overwrite)  # before imports
    from sesemi.shards import parse_size, write_shards

    subsets = [s.strip() for s in args.subsets.split(",") if s.strip()] if args.subsets else None
    index = write_shards(
        args.folder,
        args.output,
        max_size=parse_size(args.max_size),
        max_count=args.max_count,
        subsets=subsets,
        seed=args.seed,
        overwrite=args.overwrite,
        report=lambda line: print(f"open_sesemi shards: {line}", file=sys.stderr),
    )
    parts = index["subsets"]
    counts = ", ".join(f"{p['count']} {name}" for name, p in parts.items())
    shards = sum(len(p["shards"]) for p in parts.values())
    index_path = os.path.join(args.output, "index.json")
    return (
        f"wrote {counts} images in {shards} shard(s) and {index_path}; "
        f"train on them with dataset name: webdataset, root: {os.path.abspath(args.output)}"
    )


def run_suggest(args: argparse.Namespace) -> str:
    """Writes the images to label next, in order, to a CSV; returns a summary."""
    from sesemi.suggest import run

    return run(args)


RUNNERS = {
    "predict": run_predict,
    "export": run_export,
    "pseudo-label": run_pseudo_label,
    "shards": run_shards,
    "suggest": run_suggest,
}


def main(argv: Sequence[str]) -> None:
    """Runs one subcommand; user errors print one line and exit with status 1."""
    args = build_parser().parse_args(list(argv))
    summary = reporting_user_errors(
        f"open_sesemi {args.command}", lambda: RUNNERS[args.command](args)
    )
    print(summary)
