"""The `webdataset` dataset: images in WebDataset tar shards (`open_sesemi shards`), anywhere.

`<root>/index.json` (see `sesemi.shards`) names the classes and, per subset, its shards and their
sample counts, so nothing is scanned. Each sample holds an image file's bytes (under its
extension), its class index (`cls`, -1 when unlabeled) and its id as key: its position in the
subset's `image_folder` order. With several subsets the ids continue, as `image_folder`'s indices
do, so a sample has the same index in shards as in the folder.

A loader reads a `ShardStream` (`ShardedImages.stream`), which splits samples, not shards: each
epoch the shards are put in one order (shuffled by seed and epoch when the loader shuffles) that
every process computes alike; process r of W reads positions [r L, (r + 1) L) of that stream,
L = ceil(N / W), wrapping around to its start as `DistributedSampler` pads, and its DataLoader
workers divide that range in whole batches. So every sample comes once per epoch, each process
draws the same number of batches (as DDP needs) and reads about N / W samples plus the skipped
parts of at most two shards. A shuffle buffer per worker then mixes the samples.
"""

from __future__ import annotations

import bisect
import io
import itertools
import json
import math
import multiprocessing
import os
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from PIL import Image
from torch.utils.data import IterableDataset
from torchvision.datasets.folder import IMG_EXTENSIONS

from sesemi.datasets._registry import register_dataset
from sesemi.datasets.image_folder import ImageReadError, to_rgb

INDEX_NAME = "index.json"
FORMAT = "sesemi-shards/1"
IMAGE_KEYS = frozenset(e.lstrip(".") for e in IMG_EXTENSIONS)  # "png", "jpg", "jpeg", ...


def import_webdataset() -> Any:
    """The `webdataset` package, or an ImportError that says how to install it."""
    try:
        import webdataset
    except ImportError:
        raise ImportError(
            "WebDataset shards need the webdataset package; install it with "
            "pip install 'sesemi[shards]' (or pip install webdataset)"
        ) from None
    return webdataset


def _is_local(url: str) -> bool:
    return url.startswith("file:") or ("://" not in url and not url.startswith("pipe:"))


@dataclass(frozen=True)
class Shard:
    """One tar shard: where it is read from and which samples it holds."""

    url: str
    count: int  # samples in the shard
    offset: int  # the dataset index of its subset's sample 0 (subsets are concatenated)
    subset_size: int  # samples in its subset: ids are below this


class ShardedImages(IterableDataset):
    """The samples of some subsets' shards. Iterating it gives every sample once, in shard order;
    loaders read it through `stream`, which splits, shuffles and sizes it per process."""

    def __init__(
        self,
        shards: Sequence[Shard],
        classes: list[str],
        transform: Callable | None = None,
        shuffle_buffer: int = 1000,
    ) -> None:
        """Initializes the dataset (no shard is opened).

        Args:
            shards: The shards, in index order.
            classes: The class names (empty when every subset is unlabeled).
            transform: The transform applied to each PIL image.
            shuffle_buffer: Samples each worker holds to shuffle from when a stream shuffles.
        """
        self.shards = list(shards)
        self.classes = classes
        self.class_to_idx = {c: i for i, c in enumerate(classes)}
        self.transform = transform
        self.shuffle_buffer = shuffle_buffer
        self.size = sum(s.count for s in self.shards)

    def __len__(self) -> int:
        return self.size

    def __iter__(self) -> Iterator[tuple]:
        return iter(self.stream())

    def stream(
        self,
        batch_size: int = 1,
        processes: int | None = None,
        drop_last: bool = False,
        shuffle: bool = False,
        indexed: bool = False,
        seed: int | None = None,
    ) -> ShardStream:
        """What one process's DataLoader reads (see the module docstring).

        Args:
            batch_size: The DataLoader's batch size: workers split the process's share in whole
                batches, so the DataLoader's length is exact.
            processes: Split over this many processes (each reads its share, by the rank
                WebDataset sees: RANK / WORLD_SIZE, else torch.distributed); None: don't split.
            drop_last: Leave out the last incomplete batch of each process.
            shuffle: Shuffle the shard order every epoch and the samples in a buffer.
            indexed: End each sample with its dataset index: `(image, target, index)`.
            seed: Seeds the shuffling and, with `indexed`, each sample's augmentation by
                (seed, epoch, index), as `sesemi.data.IndexedDataset` does; None: shuffle as
                with seed 0, augmentation unseeded.
        """
        return ShardStream(self, batch_size, processes, drop_last, shuffle, indexed, seed)


def worker_range(
    size: int, processes: int, rank: int, workers: int, worker: int, batch_size: int, drop: bool
) -> tuple[int, int]:
    """The stream positions `[lo, hi)` one DataLoader worker of one process reads.

    Each process gets L = ceil(size / processes) positions (the last wraps past `size`), less its
    last incomplete batch with `drop`; its workers split them in whole batches, the first
    workers one batch more, so each worker's batches are full except the process's last one.
    """
    share = math.ceil(size / processes)
    kept = share - share % batch_size if drop else share
    batches = math.ceil(kept / batch_size)
    each, extra = divmod(batches, workers)
    first = worker * each + min(worker, extra)
    count = each + (worker < extra)
    start = rank * share
    return start + first * batch_size, start + min((first + count) * batch_size, kept)


class ShardStream(IterableDataset):
    """One process's view of a `ShardedImages` for a DataLoader: its share of every epoch, sized
    (`len` is the process's sample count), shuffled and resumable (see `_Pass`)."""

    def __init__(
        self,
        source: ShardedImages,
        batch_size: int,
        processes: int | None,
        drop_last: bool,
        shuffle: bool,
        indexed: bool,
        seed: int | None,
    ) -> None:
        self.source = source
        self.batch_size = batch_size
        self.processes = processes
        self.drop_last = drop_last
        self.shuffle = shuffle
        self.indexed = indexed
        self.seed = seed
        self._epoch = multiprocessing.Value("q", 0, lock=False)  # shared with forked workers
        if indexed and seed is not None:  # imported here, before workers start, not in each
            from sesemi.data import sample_seed, seeded  # (sesemi.data imports this package)

            self._seeding = (seeded, sample_seed)

    def set_epoch(self, epoch: int) -> None:
        """Sets the epoch that orders the shards and seeds the buffer and the augmentation."""
        self._epoch.value = epoch

    def __len__(self) -> int:
        lo, hi = worker_range(
            len(self.source), self.processes or 1, 0, 1, 0, self.batch_size, self.drop_last
        )
        return hi - lo

    def __iter__(self) -> _Pass:
        return _Pass(self)

    def samples(self, epoch: int, skip: int = 0) -> Iterator[tuple]:
        """This worker's samples of `epoch`, after the first `skip` (which are not decoded)."""
        wds = import_webdataset()
        rank, processes, worker, workers = wds.utils.pytorch_worker_info()
        if self.processes is None:
            rank, processes = 0, 1
        elif processes != self.processes:
            raise RuntimeError(
                f"this loader was sized for {self.processes} process(es) but runs in "
                f"{processes} (rank {rank}); build it with the number of processes that read it"
            )
        seed = 0 if self.seed is None else self.seed
        shards = list(self.source.shards)
        if self.shuffle:
            random.Random(f"shards/{seed}/{epoch}").shuffle(shards)
        lo, hi = worker_range(
            len(self.source), processes, rank, workers, worker, self.batch_size, self.drop_last
        )
        raw = _read(wds, shards, lo, hi)
        if self.shuffle and self.source.shuffle_buffer > 1:
            rng = random.Random(f"buffer/{seed}/{epoch}/{rank}/{worker}")
            size = self.source.shuffle_buffer
            raw = wds.shuffle(size, initial=size, rng=rng)(raw)
        for shard, sample in itertools.islice(raw, skip, None):
            yield self._decode(shard, sample, epoch)

    def _decode(self, shard: Shard, sample: dict[str, Any], epoch: int) -> tuple:
        key = sample.get("__key__")
        image_key = next((k for k in sample if k in IMAGE_KEYS), None)
        try:
            id_ = int(key)
            target = int(sample["cls"])
        except (KeyError, TypeError, ValueError):
            id_ = target = -2
        classes = len(self.source.classes)
        if image_key is None or not 0 <= id_ < shard.subset_size or not -1 <= target < classes:
            raise ValueError(
                f"sample '{key}' of shard '{shard.url}' is not one open_sesemi shards wrote "
                "(an image, a cls and a numeric key within index.json's count); rewrite the shards"
            )
        try:
            with Image.open(io.BytesIO(sample[image_key])) as opened:
                image = to_rgb(opened)
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
            raise ImageReadError(
                f"cannot read image '{key}.{image_key}' in shard '{shard.url}' ({e}); replace "
                "the image in the folder and write the shards again"
            ) from None
        index = shard.offset + id_
        transform = self.source.transform
        if transform is not None and self.indexed and self.seed is not None:
            seeded, sample_seed = self._seeding
            with seeded(sample_seed(self.seed, epoch, index)):
                image = transform(image)
        elif transform is not None:
            image = transform(image)
        return (image, target, index) if self.indexed else (image, target)


class _Pass:
    """One pass over a `ShardStream` in one process or worker.

    Resumable for torchdata's `StatefulDataLoader`: `state_dict` holds the epoch and how many
    samples were given; `load_state_dict` on a fresh pass makes it skip as many (read, not
    decoded) in the same order, which the seeds make the same as before.
    """

    def __init__(self, stream: ShardStream) -> None:
        self.stream = stream
        self.epoch: int | None = None
        self.given = 0
        self._samples: Iterator[tuple] | None = None

    def __iter__(self) -> _Pass:
        return self

    def __next__(self) -> tuple:
        if self._samples is None:
            if self.epoch is None:  # read when the pass starts: set_epoch comes before
                self.epoch = self.stream._epoch.value
            self._samples = self.stream.samples(self.epoch, skip=self.given)
        item = next(self._samples)
        self.given += 1
        return item

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "given": self.given}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self._samples is not None:
            raise RuntimeError("a started pass cannot load a state")
        self.epoch, self.given = state["epoch"], int(state["given"])


def _read(wds: Any, shards: list[Shard], lo: int, hi: int) -> Iterator[tuple[Shard, dict]]:
    """`(shard, raw sample)` at stream positions `[lo, hi)`, modulo the total sample count."""
    starts = list(itertools.accumulate((s.count for s in shards), initial=0))
    total = starts[-1]
    position = lo
    while position < hi:
        at = position % total
        i = bisect.bisect_right(starts, at) - 1
        skip = at - starts[i]
        take = min(shards[i].count - skip, hi - position)
        got = 0
        samples = wds.tarfile_samples([{"url": shards[i].url}])
        for sample in itertools.islice(samples, skip, skip + take):
            got += 1
            yield shards[i], sample
        if got < take:
            raise ValueError(
                f"shard '{shards[i].url}' ends after {skip + got} samples but index.json says "
                f"{shards[i].count}; it is truncated or from another write: write the shards again"
            )
        position += take


def read_index(path: str) -> dict[str, Any]:
    """Reads an index.json written by `open_sesemi shards`: a path, or anything WebDataset opens."""
    if _is_local(path):
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"no shard index '{path}'; write the shards with open_sesemi shards <image folder> "
                f"-o <folder> (an interrupted write leaves none: run it again), or set the "
                "dataset's root (or its kwargs.index) to where index.json is"
            )
        with open(path, "rb") as f:
            data = f.read()
    else:
        with import_webdataset().gopen(path, "rb") as f:
            data = f.read()
    try:
        index = json.loads(data)
    except ValueError as e:
        raise ValueError(f"'{path}' is not a shard index ({e}); point to an index.json") from None
    if not isinstance(index, dict) or index.get("format") != FORMAT:
        raise ValueError(f"'{path}' is not an index.json of open_sesemi shards ({FORMAT})")
    return index


def _shard_urls(
    name: str, paths: list[str], urls: str | Sequence[str] | None, base: str | None, single: bool
) -> list[str]:
    """Where the shards of subset `name` are read from (see `webdataset`'s `urls`)."""
    if urls is None:
        if base is None:
            raise ValueError(
                "the shard index is read through a pipe: command, so the shards' place is "
                "unknown; set the dataset's kwargs.urls, e.g. 'pipe:aws s3 cp s3://b/s/{shard} -'"
            )
        if _is_local(base):
            return [os.path.join(base, p) for p in paths]
        return [f"{base}/{p}" for p in paths]
    if isinstance(urls, str) and "{shard}" in urls:
        return [urls.replace("{shard}", p) for p in paths]
    if not single:
        raise ValueError(
            "a list of shard URLs (or a brace pattern) fits one subset only; with several "
            "subsets give urls as a template with {shard}, e.g. 'pipe:cat /data/{shard}'"
        )
    wds = import_webdataset()
    expanded = wds.shardlists.expand_urls(urls) if isinstance(urls, str) else list(urls)
    if len(expanded) != len(paths):
        raise ValueError(
            f"urls give {len(expanded)} shard(s) but index.json lists {len(paths)} for "
            f"'{name}' ({paths[0]}, ...); list them all, in that order"
        )
    return expanded


def _subsets(index: dict[str, Any], subset: str | Sequence[str] | None, where: str) -> list[str]:
    # Like image_folder: one name, a list, or None for all; a name ending in "?" is optional.
    available = list(index["subsets"])
    wanted = available if subset is None else [subset] if isinstance(subset, str) else subset
    names = [n.rstrip("?") for n in wanted if not n.endswith("?") or n[:-1] in available]
    missing = [n for n in names if n not in available]
    if missing or not names:
        raise FileNotFoundError(
            f"subset(s) {', '.join(missing or wanted)} not in the shards of '{where}' "
            f"(subsets: {', '.join(available)}); fix the dataset's subset"
        )
    return names


@register_dataset(name="webdataset")
def webdataset(
    root: str,
    subset: str | Sequence[str] | None = None,
    image_transform: Callable | None = None,
    urls: str | Sequence[str] | None = None,
    index: str | None = None,
    shuffle_buffer: int = 1000,
) -> ShardedImages:
    """Builds a dataset from WebDataset shards written by `open_sesemi shards`.

    Args:
        root: The folder `open_sesemi shards -o` wrote (index.json and, unless `urls` says
            otherwise, the shards).
        subset: A subset of the shards ("train"), a list of them (their indices continue one
            after another; labeled ones share index.json's classes), or None for all. A name
            ending in `?` ("unlabeled?") is read where it exists, else skipped.
        image_transform: The transform applied to each PIL image.
        urls: Where the shards are, if not next to index.json: a template in which `{shard}`
            stands for each shard's path in index.json (`train/train-000000.tar`), e.g.
            `pipe:aws s3 cp s3://bucket/shards/{shard} -` or `https://host/shards/{shard}`; or,
            for one subset, its shards in index.json's order as a list or in WebDataset's brace
            notation (`pipe:aws s3 cp s3://bucket/train-{000000..000009}.tar -`). Anything
            WebDataset opens: paths, http(s)://, gs://, pipe: commands.
        index: The index.json to read, if not `<root>/index.json`: a path, or a URL or pipe:
            command (`pipe:aws s3 cp s3://bucket/shards/index.json -`).
        shuffle_buffer: Samples each DataLoader worker holds to shuffle from, in loaders with
            `shuffle: true` (which also shuffle the shards' order every epoch); 1: none.

    Returns:
        The dataset; loaders read it through `ShardedImages.stream`.
    """
    if type(shuffle_buffer) is not int or shuffle_buffer < 1:
        raise ValueError(f"shuffle_buffer must be a positive integer, got {shuffle_buffer!r}")
    index_path = index or os.path.join(root, INDEX_NAME)
    meta = read_index(index_path)
    names = _subsets(meta, subset, index_path)
    if _is_local(index_path):
        base = os.path.dirname(os.path.abspath(index_path.removeprefix("file://")))
    else:
        base = index_path.rsplit("/", 1)[0] if "://" in index_path else None
    shards, offset = [], 0
    for name in names:
        part = meta["subsets"][name]
        where = _shard_urls(name, part["shards"], urls, base, len(names) == 1)
        for url, count in zip(where, part["shard_counts"], strict=True):
            if _is_local(url) and not os.path.isfile(url.removeprefix("file://")):
                raise FileNotFoundError(
                    f"shard '{url}' (listed in {index_path}) does not exist; copy it there or "
                    "set the dataset's kwargs.urls to where the shards are"
                )
            shards.append(Shard(url, int(count), offset, int(part["count"])))
        offset += int(part["count"])
    labeled = any(meta["subsets"][n].get("labeled") for n in names)
    classes = list(meta["classes"]) if labeled else []
    return ShardedImages(shards, classes, image_transform, shuffle_buffer)
