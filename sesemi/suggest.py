"""Active learning: which unlabeled images to label next (uncertainty, diversity, or both),
and `open_sesemi suggest`, which writes that order as a CSV and copies the images out.

The strategies are small functions of a model's outputs on the unlabeled pool: class
probabilities `(N, C)` and backbone features `(N, D)`. Each returns a `Ranking`: the pool indices
to label, first first, and each pick's score:

- random: a seeded uniform draw in [0, 1), lowest first (the baseline).
- entropy: predictive entropy in nats, highest (the flattest prediction) first.
- margin: top-1 minus top-2 probability, smallest (the closest call) first.
- kcenter: greedy k-center (core-set, Sener & Savarese, arXiv:1708.00489) over unit-length
  backbone features, starting from the labeled images' features; the score is the pick's
  distance to its nearest labeled or earlier-picked image, largest first. With no labeled
  images the first pick is the smallest-margin image (score inf).
- margin-kcenter: kcenter within the `pool_factor * n` smallest-margin images (uncertain, and
  not near-duplicates of each other or of labeled images); the score is kcenter's.
- typiclust: TypiClust (Hacohen, Dekel & Weinshall, arXiv:2202.02794), for the few-label start
  where uncertain picks are the atypical images: k-means on the unit-length features of the
  labeled and pool images into (labeled + n) clusters, at most 500; each pick comes from the
  cluster with the fewest labeled or picked images (the largest on ties) and is its most
  typical pool image, the one with the highest typicality = 1 / mean distance to its 20
  nearest neighbours in the cluster. The score is that typicality.
"""

from __future__ import annotations

import argparse
import csv
import os
import shutil
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
from torch import Tensor

if TYPE_CHECKING:
    from sesemi.inference import TrainedModel

# The strategies, as `open_sesemi suggest --strategy` names them (its help says what each score is).
STRATEGIES = ("random", "entropy", "margin", "kcenter", "margin-kcenter", "typiclust")
# The strategies that need the backbone's features of the pool and of the labeled images.
FEATURE_STRATEGIES = ("kcenter", "margin-kcenter", "typiclust")
CSV_COLUMNS = ("rank", "file", "score", "guess", "probability")
# Pairwise distances computed at once (float64): ~256 MB, whatever the pool's size.
DISTANCES_AT_ONCE = 2**25


class Ranking(NamedTuple):
    """Images in the order to label them.

    Attributes:
        order: `(n,)` indices into the pool, the first to label first.
        scores: `(n,)` each pick's score (its meaning is the strategy's, see `STRATEGIES`).
    """

    order: Tensor
    scores: Tensor


def margins(probs: Tensor) -> Tensor:
    """Top-1 minus top-2 class probability of each row of `probs` `(N, C)`: `(N,)`."""
    top = probs.topk(min(2, probs.shape[1]), dim=1).values
    return top[:, 0] - top[:, 1] if top.shape[1] > 1 else top[:, 0]


def entropies(probs: Tensor) -> Tensor:
    """Predictive entropy (nats) of each row of `probs` `(N, C)`: `(N,)`; 0 log 0 is 0."""
    return torch.special.entr(probs.double()).sum(dim=1)


def rank_margin(probs: Tensor) -> Ranking:
    """Smallest margin (the closest call between the two likeliest classes) first."""
    scores = margins(probs)
    order = torch.argsort(scores, stable=True)
    return Ranking(order, scores[order])


def rank_entropy(probs: Tensor) -> Ranking:
    """Highest entropy (the flattest prediction over all classes) first."""
    scores = entropies(probs)
    order = torch.argsort(scores, descending=True, stable=True)
    return Ranking(order, scores[order])


def rank_random(count: int, seed: int) -> Ranking:
    """A seeded random permutation of `count` images: ordered by a uniform draw per image."""
    keys = torch.rand(count, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    order = torch.argsort(keys, stable=True)
    return Ranking(order, keys[order])


def nearest_distances(features: Tensor, reference: Tensor) -> Tensor:
    """Each row's Euclidean distance to its nearest row of `reference`: `(N,)`, inf if none.

    `reference` `(M, D)` is taken in chunks so that no more than ~32M distances are held at once.
    """
    features, reference = features.double(), reference.double()
    nearest = torch.full((len(features),), float("inf"), dtype=torch.float64)
    squared = (features**2).sum(dim=1, keepdim=True)  # (N, 1)
    chunk = max(1, DISTANCES_AT_ONCE // max(len(features), 1))
    for start in range(0, len(reference), chunk):
        part = reference[start : start + chunk]  # (m, D)
        d2 = squared + (part**2).sum(dim=1) - 2 * features @ part.T  # (N, m)
        nearest = torch.minimum(nearest, d2.clamp_min(0).min(dim=1).values.sqrt())
    return nearest


def k_center(features: Tensor, labeled_features: Tensor, n: int, first: int = 0) -> Ranking:
    """Greedy k-center (the core-set selection of Sener & Savarese, arXiv:1708.00489).

    Each pick is the image farthest from its nearest labeled or already picked image, so the
    picks cover the pool: far from what is labeled and from each other.

    Args:
        features: `(N, D)` the pool's features (Euclidean distances between rows are used).
        labeled_features: `(M, D)` the labeled images' features; `M` may be 0.
        n: How many to pick (at most N).
        first: The first pick when there are no labeled images (every distance is inf).

    Returns:
        The picks; each score is the pick's distance to its nearest labeled or earlier pick.
    """
    n = min(n, len(features))
    nearest = nearest_distances(features, labeled_features)
    taken = torch.zeros(len(features), dtype=torch.bool)
    order, scores = [], []
    for _ in range(n):
        if len(labeled_features) == 0 and not order:
            pick = first
        else:
            pick = int(torch.where(taken, -1.0, nearest).argmax())
        order.append(pick)
        scores.append(float(nearest[pick]))
        taken[pick] = True
        nearest = torch.minimum(nearest, nearest_distances(features, features[pick : pick + 1]))
    return Ranking(torch.tensor(order, dtype=torch.long), torch.tensor(scores, dtype=torch.float64))


def margin_k_center(
    probs: Tensor, features: Tensor, labeled_features: Tensor, n: int, pool_factor: int = 10
) -> Ranking:
    """Uncertainty, then diversity: k-center among the `pool_factor * n` smallest margins.

    The uncertain pool alone would hold near-duplicates (the same confusing look many times);
    k-center inside it keeps one of each. With no labeled images the smallest margin is first.
    """
    pool = rank_margin(probs).order[: pool_factor * n]
    within = k_center(features[pool], labeled_features, n, first=0)
    return Ranking(pool[within.order], within.scores)


def typicality(features: Tensor, neighbours: int = 20) -> Tensor:
    """Each row's typicality among `features` `(N, D)`: 1 / the mean Euclidean distance to its
    `neighbours` nearest other rows (fewer when N is smaller), `(N,)`; 0 for a lone row.

    Rows are taken in chunks so that no more than ~32M distances are held at once.
    """
    k = min(neighbours, len(features) - 1)
    if k < 1:
        return torch.zeros(len(features), dtype=torch.float64)
    features = features.double()
    mean = torch.empty(len(features), dtype=torch.float64)
    chunk = max(1, DISTANCES_AT_ONCE // len(features))
    for start in range(0, len(features), chunk):
        distances = torch.cdist(features[start : start + chunk], features)
        nearest = distances.topk(k + 1, dim=1, largest=False).values[:, 1:]  # without itself
        mean[start : start + chunk] = nearest.mean(dim=1)
    return 1.0 / mean.clamp_min(1e-12)


def typiclust(
    features: Tensor,
    labeled_features: Tensor,
    n: int,
    seed: int = 0,
    neighbours: int = 20,
    min_cluster: int = 5,
    max_clusters: int = 500,
) -> Ranking:
    """TypiClust (Hacohen, Dekel & Weinshall, arXiv:2202.02794): typical images of uncovered
    clusters, the low-budget counterpart of uncertainty sampling.

    The labeled and pool images are clustered together by k-means into `M + n` clusters (M
    labeled; at most `max_clusters`, which bounds k-means' time when many images are labeled:
    a cluster may then get several picks). Each pick comes from the cluster holding the fewest
    labeled or already picked images, the largest such cluster on ties, skipping clusters
    smaller than `min_cluster` while bigger ones have pool images left (a guard against
    clusters of outliers); within it, the pool image of highest `typicality` (density among
    the cluster's images) is taken.

    Args:
        features: `(N, D)` the pool's features.
        labeled_features: `(M, D)` the labeled images' features; `M` may be 0.
        n: How many to pick (at most N).
        seed: Seeds k-means.
        neighbours: Nearest neighbours that typicality averages over (the paper's 20).
        min_cluster: Clusters with fewer images are used only when no bigger one has images left.
        max_clusters: The most clusters k-means makes.

    Returns:
        The picks; each score is the pick's typicality within its cluster.
    """
    from sklearn.cluster import KMeans

    n = min(n, len(features))
    everything = torch.cat([features, labeled_features]).double()
    clusters = min(len(labeled_features) + n, len(everything), max_clusters)
    kmeans = KMeans(n_clusters=clusters, n_init=3, random_state=seed).fit(everything.numpy())
    assignment = torch.as_tensor(kmeans.labels_, dtype=torch.long)
    in_pool = torch.arange(len(everything)) < len(features)
    typical = torch.zeros(len(everything), dtype=torch.float64)
    queues = []  # each cluster's pool images, most typical first
    for c in range(clusters):
        members = (assignment == c).nonzero().squeeze(1)
        typical[members] = typicality(everything[members], neighbours)
        members = members[in_pool[members]]
        queues.append(members[typical[members].argsort(descending=True, stable=True)])
    sizes = torch.bincount(assignment, minlength=clusters)
    covered = torch.bincount(assignment[~in_pool], minlength=clusters)
    left = torch.tensor([len(q) for q in queues])
    big = sizes >= min_cluster
    # Fewest covered first, then the largest: a key that orders both at once.
    tie_break = len(everything) + 1
    order, scores = [], []
    for _ in range(n):
        usable = left > 0
        if (usable & big).any():
            usable &= big
        key = covered.double() * tie_break - sizes.double()
        chosen = int(torch.where(usable, key, torch.inf).argmin())
        pick = int(queues[chosen][len(queues[chosen]) - left[chosen]])
        order.append(pick)
        scores.append(float(typical[pick]))
        left[chosen] -= 1
        covered[chosen] += 1
    return Ranking(torch.tensor(order, dtype=torch.long), torch.tensor(scores, dtype=torch.float64))


def rank(
    strategy: str,
    probs: Tensor,
    features: Tensor | None,
    labeled_features: Tensor | None,
    n: int,
    seed: int = 0,
    pool_factor: int = 10,
) -> Ranking:
    """The first `n` images of the pool to label by `strategy` (one of `STRATEGIES`).

    Args:
        strategy: The strategy's name.
        probs: `(N, C)` the pool's class probabilities.
        features: `(N, D)` the pool's features (`FEATURE_STRATEGIES` only; made unit length here).
        labeled_features: `(M, D)` the labeled images' features (`FEATURE_STRATEGIES` only).
        n: How many images (at most N).
        seed: Seeds `random` and typiclust's k-means.
        pool_factor: `margin-kcenter`'s uncertain pool, in multiples of n.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy '{strategy}'; use one of {', '.join(STRATEGIES)}")
    if strategy == "random":
        ranking = rank_random(len(probs), seed)
    elif strategy == "entropy":
        ranking = rank_entropy(probs)
    elif strategy == "margin":
        ranking = rank_margin(probs)
    else:
        if features is None:
            raise ValueError(f"--strategy {strategy} needs the images' features")
        unit = torch.nn.functional.normalize(features.float(), dim=1)
        labeled = labeled_features if labeled_features is not None else unit[:0]
        labeled = torch.nn.functional.normalize(labeled.float(), dim=1)
        if strategy == "kcenter":
            first = int(rank_margin(probs).order[0])
            return k_center(unit, labeled, n, first)
        if strategy == "typiclust":
            return typiclust(unit, labeled, n, seed)
        return margin_k_center(probs, unit, labeled, n, pool_factor)
    return Ranking(ranking.order[:n], ranking.scores[:n])


def training_folders(checkpoint: str, which: str = "labeled") -> list[str] | None:
    """The image folders a checkpoint's run trained on, from the run's saved config
    (`<run>/.hydra/config.yaml` beside `<run>/checkpoints/`): the labeled ones (the `supervised`
    loader's) or the unlabeled ones (every other training loader's, e.g. the demo's `train` and
    `unlabeled` subsets), or None when they cannot be told: no saved config, no `image_folder`
    dataset there, or folders that are gone."""
    from omegaconf import OmegaConf

    if which not in ("labeled", "unlabeled"):
        raise ValueError(f"which must be 'labeled' or 'unlabeled', got '{which}'")
    run_dir = os.path.dirname(os.path.dirname(os.path.abspath(checkpoint)))
    try:
        cfg = OmegaConf.load(os.path.join(run_dir, ".hydra", "config.yaml"))
        loaders = list(cfg.data.train)
    except Exception:  # noqa: BLE001 - no config, or an unreadable one: the folder is unknown
        return None

    def value(key: str) -> Any:  # interpolations resolved (`${data.unlabeled_subset}`)
        try:
            found = OmegaConf.select(cfg, key, default=None)
            return (
                OmegaConf.to_container(found, resolve=True) if OmegaConf.is_config(found) else found
            )
        except Exception:  # noqa: BLE001 - unresolvable here: the folder is unknown, skipped
            return "${unresolved}"

    data_root = value("run.data_root")
    names = [n for n in loaders if (n == "supervised") == (which == "labeled")]
    try:  # a relative data_root is relative to the folder the run was launched from
        hydra = OmegaConf.load(os.path.join(run_dir, ".hydra", "hydra.yaml"))
        launched = str(OmegaConf.select(hydra, "hydra.runtime.cwd", default=None) or os.getcwd())
    except Exception:  # noqa: BLE001 - runs saved by sesemi.fit have no hydra.yaml
        launched = os.getcwd()
    folders: list[str] = []
    for name in names:
        node = f"data.train.{name}.dataset"
        root, subset = value(f"{node}.root"), value(f"{node}.subset")
        subsets = [subset] if isinstance(subset, str) or subset is None else subset
        values = [data_root, root, *subsets]
        if value(f"{node}.name") != "image_folder" or any("${" in str(v) for v in values):
            continue
        base = os.path.join(launched, str(data_root)) if data_root else launched
        base = os.path.join(base, str(root)) if root else base
        for s in subsets:
            folder = os.path.normpath(os.path.join(base, str(s).rstrip("?") if s else ""))
            if os.path.isdir(folder) and folder not in folders:
                folders.append(folder)
    return folders or None


def _report(line: str) -> None:
    print(f"open_sesemi suggest: {line}", file=sys.stderr)


def _outputs(
    model: TrainedModel, files: list[str], args: argparse.Namespace, features: bool, what: str
) -> tuple[Tensor, Tensor | None, list[str]]:
    """Class probabilities `(N, C)`, features `(N, D)` or None, and the files that were read."""
    from sesemi.inference import parse_tta, predict, resolve_device

    tta, device = parse_tta(args.tta), resolve_device(args.device)
    progress = sys.stderr.isatty()
    probs, feats, read = [], [], []
    run = predict(model, files, args.batch_size, args.workers, device, tta, progress, features)
    for p in run:
        if p.probabilities is None:
            _report(f"skipped{what}: {p.error}")
            continue
        read.append(p.file)
        probs.append(p.probabilities)
        feats.append(p.features)
    if not read:
        return torch.zeros(0, len(model.class_names)), None, read
    return torch.stack(probs), torch.stack(feats) if features else None, read


def _labeled_files(args: argparse.Namespace) -> list[str]:
    """The labeled images: --labeled, else the checkpoint's training folders (possibly none)."""
    from sesemi.inference import list_images
    from sesemi.propagation import training_images

    if args.labeled is not None:
        return training_images(args.checkpoint, "labeled", args.labeled)
    folders = training_folders(args.checkpoint)
    if folders is None:
        return []
    try:
        return list_images(folders)
    except FileNotFoundError:  # the folders hold no images
        return []


def _check_options(args: argparse.Namespace) -> None:
    """Refuses bad numbers and existing outputs early, before the model is loaded."""
    from sesemi.commands import _refuse_overwrite

    for name, value in (("-n", args.n), ("--pool-factor", args.pool_factor)):
        if value < 1:
            raise ValueError(f"{name} must be at least 1, got {value}")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, got {args.batch_size}")
    _refuse_overwrite(args.output, args.overwrite)
    folder = args.copy_to
    if folder and not args.overwrite:
        if os.path.isfile(folder) or (os.path.isdir(folder) and os.listdir(folder)):
            raise FileExistsError(
                f"--copy-to '{folder}' is not an empty folder; choose another one or add "
                "--overwrite"
            )


def copy_out(files: Sequence[str], folder: str) -> list[str]:
    """Copies (never moves) `files`, in rank order, into `folder` as `<rank>_<name>`: one flat
    folder whose sorted names keep the order (`0001_x.png`, `0002_y.png`, ...); a file of the
    same name there is replaced."""
    os.makedirs(folder, exist_ok=True)
    width = max(4, len(str(len(files))))
    targets = []
    for position, source in enumerate(files, start=1):
        target = os.path.join(folder, f"{position:0{width}d}_{os.path.basename(source)}")
        shutil.copy2(source, target)
        targets.append(target)
    return targets


def _write_csv(path: str, pool: list[str], probs: Tensor, ranking: Ranking, names: list[str]):
    from sesemi.commands import _atomic_output

    with _atomic_output(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(CSV_COLUMNS)
        picks = zip(ranking.order.tolist(), ranking.scores.tolist(), strict=True)
        for position, (i, score) in enumerate(picks, start=1):
            probability, guess = probs[i].max(dim=0)
            row = [position, pool[i], f"{score:.6f}", names[int(guess)]]
            writer.writerow([*row, f"{float(probability):.6f}"])


def run(args: argparse.Namespace) -> str:
    """`open_sesemi suggest`: writes the CSV (and the copies); returns a summary line."""
    from sesemi.inference import list_images, load_trained_model

    _check_options(args)
    model = load_trained_model(args.checkpoint, ema=args.ema)
    files = list_images(args.inputs, args.file_list)
    labeled = _labeled_files(args)
    known = {os.path.realpath(f) for f in labeled}
    pool = [f for f in files if os.path.realpath(f) not in known]
    if len(pool) < len(files):
        _report(f"left out {len(files) - len(pool)} input image(s) that are labeled already")
    if not pool:
        raise ValueError("every input image is labeled already; give unlabeled images")
    diverse = args.strategy in FEATURE_STRATEGIES
    readable = len(pool)
    probs, feats, pool = _outputs(model, pool, args, diverse, "")
    unreadable = readable - len(pool)
    if not pool:
        raise ValueError("none of the input images could be read")
    labeled_feats = None
    if diverse and labeled:
        _, labeled_feats, _ = _outputs(model, labeled, args, True, " labeled image")
    if diverse and labeled_feats is None:
        _report(
            "no labeled images (the checkpoint's run names no image_folder training folder that "
            "is still there; give one with --labeled DIR): k-center starts from the "
            "smallest-margin image, typiclust counts every cluster as unlabeled"
        )
    n = args.n
    if n > len(pool):
        _report(f"-n {n} is more than the {len(pool)} readable image(s); suggesting them all")
        n = len(pool)
    ranking = rank(args.strategy, probs, feats, labeled_feats, n, args.seed, args.pool_factor)
    summary = f"suggested {n} of {len(pool)} image(s) by {args.strategy} into {args.output}"
    if args.copy_to:
        before = set(os.listdir(args.copy_to)) if os.path.isdir(args.copy_to) else set()
        copied = copy_out([pool[i] for i in ranking.order.tolist()], args.copy_to)
        others = len(before - {os.path.basename(c) for c in copied})
        summary += f"; copied them to {args.copy_to}"
        summary += f" ({others} older file(s) left there)" if others else ""
    _write_csv(args.output, pool, probs, ranking, model.class_names)
    return summary + (f"; {unreadable} unreadable file(s) skipped" if unreadable else "")
