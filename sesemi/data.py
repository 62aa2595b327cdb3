"""The data module: datasets and loaders built from `data:`, and the per-process epoch length."""

from __future__ import annotations

import collections
import contextlib
import functools
import hashlib
import logging
import math
import multiprocessing
import os
import random
import warnings
import zlib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from hydra.utils import instantiate, to_absolute_path
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader, Dataset, DistributedSampler, IterableDataset

from sesemi.datasets import dataset as build_dataset_by_name
from sesemi.datasets.pseudo_labeled import WithPseudoLabels

log = logging.getLogger(__name__)

# DataLoader arguments passed through as they are when set in a DataLoaderConfig.
LOADER_GROUPS = ("train", "val", "test")  # The `data` keys that hold loaders.
_PLAIN_ARGS = ("shuffle", "num_workers", "pin_memory", "drop_last", "timeout", "persistent_workers")


def resolve_root(root: str | None, data_root: str | None) -> str:
    """Joins a relative dataset root to `data_root`; a relative `data_root` is launch-relative."""
    base = to_absolute_path(data_root) if data_root else os.getcwd()
    if root is None:
        return base
    return root if os.path.isabs(root) else os.path.join(base, root)


def build_dataset(
    node: Mapping[str, Any], data_root: str | None, where: str = "dataset"
) -> Dataset:
    """Builds a dataset from a `DatasetConfig` node (`where` names it in errors)."""
    transform = node.get("image_transform")
    if isinstance(transform, Mapping) and "_target_" not in transform:
        raise ValueError(
            f"{where}.image_transform has no _target_ (it is {dict(transform)}); name a "
            "transform, e.g. ${data.transforms.train} or {_target_: sesemi.transforms."
            "train_transforms, ...}; to change one option of the data's transform, set it in "
            "data.transforms (e.g. +data.transforms.train.uint8_output=true)"
        )
    image_transform = instantiate(transform) if transform is not None else None
    dataset = build_dataset_by_name(
        node["name"],
        root=resolve_root(node.get("root"), data_root),
        subset=node.get("subset"),
        image_transform=image_transform,
        **(node.get("kwargs") or {}),
    )
    pseudo_labels = node.get("pseudo_labels")
    if pseudo_labels is None:
        return dataset
    folder = resolve_root(pseudo_labels, data_root)
    return WithPseudoLabels(dataset, folder, image_transform, f"{where}.pseudo_labels")


def _tally(dataset: Dataset) -> list[int] | None:
    """Images per class index of a dataset whose images all have a class (`targets` >= 0)."""
    targets = getattr(dataset, "targets", None)
    if targets is None or len(targets) != len(dataset) or len(targets) == 0:
        return None
    targets = [int(t) for t in targets]
    if min(targets) < 0:
        return None
    tally = collections.Counter(targets)
    return [tally[c] for c in range(max(targets) + 1)]


def _maybe_call(node: Any, dataset: Dataset) -> Any:
    # A `_partial_: true` sampler node needs the dataset it samples from.
    if node is None:
        return None
    built = instantiate(node)
    return built(dataset) if isinstance(built, functools.partial) else built


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Runs the block with torch's, Python's and NumPy's global generators seeded with `seed`,
    and gives the caller its own generators' states back afterwards."""
    python, numpy = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        # The CPU generator alone: `torch.manual_seed` also queues a seed for every lazy
        # accelerator backend (recording a stack trace each time), ~40x the cost per sample.
        torch.default_generator.manual_seed(seed)
        random.seed(seed)
        np.random.seed(seed % 2**32)
        try:
            yield
        finally:
            random.setstate(python)
            np.random.set_state(numpy)


def sample_seed(seed: int, epoch: int, index: int, draw: int = 0) -> int:
    """One sample's augmentation seed: a fixed function of the run's seed, the epoch, the index
    and `draw`, the pass's token from `PassSampler` (0 for a loader without one)."""
    return (((seed * 1_000_003) ^ epoch ^ draw) * 1_000_000_007 + index) % 2**63


def _own_generator() -> torch.Generator:
    """A generator of its own, seeded from torch's global one (so by the run's seed)."""
    generator = torch.Generator()
    generator.manual_seed(int(torch.empty((), dtype=torch.int64).random_().item()))
    return generator


class PassSampler(DistributedSampler):
    """Shuffles a map-style dataset anew every pass, as `RandomSampler` (or, over several
    processes, `DistributedSampler`) does, and tags each index with its pass: it yields
    `(index, token)`, the token a hash of the generator's state when the pass began, which
    `IndexedDataset` mixes into the sample's augmentation seed.

    Why: Lightning restarts a shorter training loader (the few labeled images) as often as the
    longest one needs within one epoch, and a seed of (seed, epoch, index) alone would give each
    image the same crop on every restart of that epoch (with 40 labeled images beside 1,300
    unlabeled ones in batches of 32, 8 crops per image in 300 steps instead of 150);
    `DistributedSampler`, whose order is a function of the epoch, would also repeat the order.
    The token is a function of the saved generator state, so a resumed run tags its passes as
    the run that never stopped did. The iterator's `state_dict` (the pass's generator state and
    position) is what torchdata's `StatefulDataLoader` saves in checkpoints. `set_epoch`
    (Lightning calls it at every epoch start, also when a run resumes mid-epoch) tells the
    dataset its epoch.

    Over `num_replicas` processes, every process draws the same permutation (give each the same
    `generator` seed), pads it by repeating its start to a multiple of `num_replicas`, and takes
    every `num_replicas`-th index from `rank` on, as `DistributedSampler` does. Being one,
    Lightning keeps it instead of adding its own.

    With `batch_size`, every batch is full: a pass is as many whole batches (on every process)
    as the dataset needs, the last completed from further permutations, each with its own token
    (so an image twice in a pass gets two crops). This is how FixMatch's and USB's code draw
    labeled batches (an endless random stream, e.g. 40 labeled images in batches of 64); a
    dataset smaller than a batch fills it with repeats.

    With `classes` (each index's class), a pass draws every class equally often, instead of a
    permutation: `ceil(len / number of classes)` draws per class, its images in shuffled rounds
    (a class of 1 image beside one of 10 gives that image 10 times a pass, each with a token of
    its own, so a new crop), then all draws shuffled together: class-aware sampling (Shen et
    al., ECCV 2016), the balanced sampling of Kang et al. (arXiv:1910.09217).
    """

    def __init__(
        self,
        data_source: Dataset,
        generator: torch.Generator | None = None,
        num_replicas: int = 1,
        rank: int = 0,
        batch_size: int | None = None,
        classes: Sequence[int] | None = None,
    ) -> None:
        super().__init__(data_source, num_replicas=num_replicas, rank=rank, shuffle=True)
        self.data_source = data_source
        self.groups: list[list[int]] | None = None
        self.unit = len(data_source)  # indices a permutation (or balanced draw) gives
        if classes is not None:
            members: dict[int, list[int]] = {}
            for index, label in enumerate(classes):
                members.setdefault(int(label), []).append(index)
            self.groups = [members[label] for label in sorted(members)]
            self.unit = self.balanced_length(len(data_source), len(self.groups))
            self.per_class = self.unit // max(len(self.groups), 1)
        self.refill = batch_size is not None
        per_process = -(-self.unit // num_replicas)
        if self.refill:  # whole batches on every process
            per_process = -(-per_process // batch_size) * batch_size
        self.num_samples = per_process
        self.total_size = self.num_samples * num_replicas
        # As RandomSampler's: by default seeded from torch's global generator.
        self.generator = generator if generator is not None else _own_generator()

    def set_epoch(self, epoch: int) -> None:
        """Tells the dataset (an `IndexedDataset`) the epoch."""
        super().set_epoch(epoch)
        set_epoch = getattr(self.data_source, "set_epoch", None)
        if callable(set_epoch):
            set_epoch(epoch)

    def __iter__(self) -> _PassIterator:
        return _PassIterator(self)

    @staticmethod
    def balanced_length(size: int, classes: int) -> int:
        """A class-balanced pass's length: `classes` times `ceil(size / classes)` draws."""
        return -(-size // max(classes, 1)) * classes

    def draw(self, generator: torch.Generator) -> list[int]:
        """One permutation of the indices or, with `classes`, one class-balanced draw."""
        if self.groups is None:
            return torch.randperm(len(self.data_source), generator=generator).tolist()
        drawn: list[int] = []
        for members in self.groups:
            picks: list[int] = []
            while len(picks) < self.per_class:  # shuffled rounds over the class's images
                shuffled = torch.randperm(len(members), generator=generator).tolist()
                picks += [members[i] for i in shuffled]
            drawn += picks[: self.per_class]
        return [drawn[i] for i in torch.randperm(len(drawn), generator=generator).tolist()]


class _PassIterator:
    """One pass of a `PassSampler`: a permutation and its token; saves and restores its state."""

    def __init__(self, sampler: PassSampler) -> None:
        self.sampler = sampler
        self._begin(sampler.generator.get_state())

    def _begin(self, state: torch.Tensor) -> None:
        self.state = state
        sampler = self.sampler
        generator = sampler.generator
        generator.set_state(state)
        order: list[tuple[int, int]] = []
        while not order or (sampler.refill and len(order) < sampler.total_size):
            digest = hashlib.blake2b(generator.get_state().numpy().tobytes(), digest_size=8)
            token = int.from_bytes(digest.digest(), "little") % 2**62 + 1
            drawn = sampler.draw(generator)
            if sampler.groups is None:  # a permutation: no index twice
                order += [(index, token) for index in drawn]
                continue
            repeats: dict[int, int] = {}  # an index drawn again gets the next token
            for index in drawn:
                repeats[index] = repeats.get(index, -1) + 1
                order.append((index, token + repeats[index]))
        while len(order) < sampler.total_size:  # this process's share of a padded permutation
            order += order[: sampler.total_size - len(order)]
        self.order = order[sampler.rank : sampler.total_size : sampler.num_replicas]
        self.position = 0

    def __iter__(self) -> _PassIterator:
        return self

    def __next__(self) -> tuple[int, int]:
        if self.position >= len(self.order):
            raise StopIteration
        self.position += 1
        return self.order[self.position - 1]

    def state_dict(self) -> dict[str, Any]:
        """The generator's state when the pass began and how many indices it gave."""
        return {"generator": self.state, "position": self.position}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continues the saved pass: same permutation, same token, from the saved position."""
        self._begin(state["generator"])
        self.position = int(state["position"])


class IndexedDataset(Dataset):
    """Adds each sample's dataset index as its last element: `(image, target)` becomes
    `(image, target, index)`, so training batches carry `indices (B,)` that heads can read (e.g.
    FlexMatch's per-image learning status). Under DDP the indices are those of the whole dataset.

    With a `seed`, each sample's random augmentation is drawn from generators seeded by
    `sample_seed(seed, epoch, index, pass token)` (`set_epoch` tells it the epoch, also in
    DataLoader worker processes; a `PassSampler` gives the token with each index), so it depends
    on nothing else: not on the worker, nor on how many batches were fetched before. A run resumed
    from any checkpoint then augments every sample as the run that never stopped did.
    """

    def __init__(self, dataset: Dataset, seed: int | None = None) -> None:
        self.dataset = dataset
        self.seed = seed
        self._epoch = multiprocessing.Value("q", 0, lock=False)  # shared with forked workers

    def set_epoch(self, epoch: int) -> None:
        """Sets the epoch the per-sample seeds are drawn for."""
        self._epoch.value = epoch

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple:
        # An index, or `(index, pass token)` from a `PassSampler`.
        index, draw = key if isinstance(key, tuple) else (key, 0)
        if self.seed is None:
            sample = self.dataset[index]
        else:
            with seeded(sample_seed(self.seed, self._epoch.value, index, draw)):
                sample = self.dataset[index]
        return (*sample, index) if isinstance(sample, tuple) else (sample, index)

    def __getattr__(self, name: str) -> Any:  # classes, targets, skipped, ... of the dataset
        if name in ("dataset", "seed", "_epoch"):
            raise AttributeError(name)
        return getattr(self.dataset, name)


class LoaderSpec:
    """One configured loader: its dataset and the keyword arguments of its DataLoader."""

    def __init__(
        self,
        where: str,
        node: Mapping[str, Any],
        data_root: str | None,
        default_bs: int | None,
        auto: Mapping[str, Any] | None = None,
    ):
        self.where = where
        self.auto = dict(auto or {})  # values for DataLoader arguments the node leaves null
        self.dataset = build_dataset(node["dataset"], data_root, f"{where}.dataset")
        self.indexed: IndexedDataset | None = None  # what the latest indexed loader reads
        own = node.get("batch_size")
        self.batch_size = default_bs if own is None else own
        if self.batch_size is None:
            raise ValueError(f"{where}: set its batch_size or run.batch_size_per_gpu")
        if self.batch_size < 1:
            key = f"{where}.batch_size" if own is not None else "run.batch_size_per_gpu"
            raise ValueError(f"{key} must be at least 1, got {self.batch_size}")
        self.node = node

    def loader(
        self,
        resumable: bool = False,
        indexed: bool = False,
        world_size: int | None = None,
        seed: int | None = None,
        processes: int | None = None,
    ) -> DataLoader:
        """Builds the DataLoader (Lightning adds a DistributedSampler under DDP, except to an
        IterableDataset, which splits itself: see `_stream`).

        Args:
            indexed: Give each sample its dataset index as last element (`IndexedDataset`).
            world_size: For training loaders: the number of processes, to drop a last batch of
                one image (see `drops_last`); None leaves `drop_last` as configured.
            seed: With `indexed`, seed each sample's augmentation (see `IndexedDataset`).
            resumable: Build torchdata's `StatefulDataLoader`, whose position and shuffling
                state Lightning saves in checkpoints, so a run resumed from a checkpoint taken
                mid-epoch continues with the batches the uninterrupted run would have drawn.
            processes: For an IterableDataset: the processes it is split over (default
                `world_size`); None: each process reads all of it.
        """
        node = self.node
        kwargs = {k: node[k] for k in _PLAIN_ARGS if node.get(k) is not None}
        for key, value in self.auto.items():
            if node.get(key) is None:
                kwargs[key] = value
        if world_size is not None and self.drops_last(world_size) and not node.get("drop_last"):
            log.info("%s: its last batch would hold one image; dropping it each epoch", self.where)
            kwargs["drop_last"] = True
        if not kwargs.get("num_workers"):
            kwargs.pop("persistent_workers", None)
        elif node.get("prefetch_factor") is not None:
            kwargs["prefetch_factor"] = node["prefetch_factor"]
        full = self.fills_batches  # checked by SESEMIDataModule when it was built
        if isinstance(self.dataset, IterableDataset):
            dataset = self._stream(kwargs, indexed, processes or world_size, seed)
        else:
            dataset = self._sampled(kwargs, indexed, seed)
            balanced = node.get("class_balanced")
            if indexed and (seed is not None or full or balanced) and kwargs.get("shuffle"):
                # Each pass its own order and augmentations (see PassSampler); every process
                # the same generator, seeded by the run's seed and the loader's name.
                kwargs.pop("shuffle")
                if seed is None:
                    generator = _own_generator()
                else:
                    generator = torch.Generator()
                    generator.manual_seed(sample_seed(seed, 0, zlib.crc32(self.where.encode())))
                replicas, rank = world_size or 1, 0
                if replicas > 1 and torch.distributed.is_initialized():
                    rank = torch.distributed.get_rank()
                kwargs["sampler"] = PassSampler(
                    dataset,
                    generator,
                    replicas,
                    rank,
                    self.batch_size if full else None,
                    self.dataset.targets if balanced else None,
                )
        if node.get("collate_fn") is not None:
            kwargs["collate_fn"] = instantiate(node["collate_fn"])
        if node.get("worker_init_fn") is not None:
            kwargs["worker_init_fn"] = instantiate(node["worker_init_fn"])
        self.indexed = dataset if indexed else None
        if resumable:
            # Each new iterator draws its workers' base seed from the loader's generator, by
            # default torch's global one: a shorter loader restarted within an epoch would then
            # shift the dropout masks of a run resumed from a checkpoint taken before that
            # restart (its RNG states are restored after the batch is fetched).
            kwargs["generator"] = _own_generator()
            from torchdata.stateful_dataloader import StatefulDataLoader

            return StatefulDataLoader(dataset, **kwargs)
        return DataLoader(dataset, **kwargs)

    def _sampled(self, kwargs: dict[str, Any], indexed: bool, seed: int | None) -> Dataset:
        """A map-style dataset's sampler arguments (into `kwargs`) and the dataset to load."""
        node = self.node
        batch_sampler = _maybe_call(node.get("batch_sampler"), self.dataset)
        if batch_sampler is not None:
            kwargs.pop("shuffle", None)
            kwargs.pop("drop_last", None)
            kwargs["batch_sampler"] = batch_sampler
        else:
            kwargs["batch_size"] = self.batch_size
            kwargs["sampler"] = _maybe_call(node.get("sampler"), self.dataset)
            if kwargs["sampler"] is not None:
                kwargs.pop("shuffle", None)
        return IndexedDataset(self.dataset, seed) if indexed else self.dataset

    def _stream(
        self, kwargs: dict[str, Any], indexed: bool, processes: int | None, seed: int | None
    ) -> IterableDataset:
        """An IterableDataset's view for this loader (e.g. `ShardedImages.stream`): it takes no
        sampler nor the DataLoader's `shuffle` (the node's `shuffle` is passed to it), splits
        itself over processes and workers, gives each sample its index, and its length is this
        process's sample count, so the DataLoader's length is exact."""
        for key in ("sampler", "batch_sampler"):
            if self.node.get(key) is not None:
                raise ValueError(
                    f"{self.where}.{key}: a {type(self.dataset).__name__} dataset orders itself; "
                    f"remove the {key}"
                )
        if not callable(getattr(self.dataset, "stream", None)):
            raise TypeError(
                f"{self.where}.dataset is an IterableDataset without a stream(batch_size, "
                "processes, drop_last, shuffle, indexed, seed) method, which sesemi's loaders "
                "read (see sesemi.datasets.wds_shards.ShardedImages.stream)"
            )
        # The stream splits itself per worker, so its length is exact (Lightning doubts it).
        warnings.filterwarnings("ignore", message=r".*`IterableDataset` has `__len__` defined.*")
        kwargs["batch_size"] = self.batch_size
        return self.dataset.stream(
            batch_size=self.batch_size,
            processes=processes,
            drop_last=bool(kwargs.get("drop_last")),
            shuffle=bool(kwargs.pop("shuffle", False)),
            indexed=indexed,
            seed=seed,
        )

    def check_sampling(self, training: bool) -> None:
        """`full_batches` and `class_balanced` need a shuffled training loader over a map-style
        dataset; `class_balanced` also needs every image's class (a labeled folder)."""
        stream = isinstance(self.dataset, IterableDataset)
        if self.node.get("full_batches") and training and stream:
            # FixMatch's method files ask for full labeled batches; a stream cannot repeat
            # images, so its last batch of an epoch may stay short (large sets: one batch).
            log.warning(
                "%s: full_batches has no effect on a stream (%s); the last batch of each epoch "
                "may be short",
                self.where,
                type(self.dataset).__name__,
            )
        for key in ("full_batches", "class_balanced"):
            if not self.node.get(key) or (key == "full_batches" and training and stream):
                continue
            if not (training and self.node.get("shuffle") and not stream):
                raise ValueError(
                    f"{self.where}: {key} needs a shuffled training loader over an image "
                    f"folder (shuffle: true; not val or test); drop {key}"
                )
        if self.node.get("class_balanced"):
            targets = list(getattr(self.dataset, "targets", None) or [])
            if len(targets) != len(self.dataset) or any(t < 0 for t in targets):
                raise ValueError(
                    f"{self.where}: class_balanced needs a labeled dataset (every image in a "
                    "class folder); drop class_balanced for unlabeled images"
                )
            for key in ("sampler", "batch_sampler"):
                if self.node.get(key) is not None:
                    raise ValueError(
                        f"{self.where}: class_balanced draws the loader's samples itself; drop "
                        f"class_balanced or the {key}"
                    )

    @property
    def fills_batches(self) -> bool:
        """Whether `full_batches` applies: asked for, over a map-style dataset (not a stream)."""
        return bool(self.node.get("full_batches")) and not isinstance(self.dataset, IterableDataset)

    def pass_length(self) -> int:
        """Samples in one pass over the dataset: its length or, with `class_balanced`, the
        number of classes times `ceil(length / number of classes)` (see `PassSampler`)."""
        if not self.node.get("class_balanced"):
            return len(self.dataset)
        return PassSampler.balanced_length(len(self.dataset), len(set(self.dataset.targets)))

    def drops_last(self, world_size: int, training: bool = True) -> bool:
        """Whether the last incomplete batch is dropped: when the node says so, and, in
        training, when it would hold one image (BatchNorm cannot normalize a batch of one).
        A training loader with `full_batches` has no incomplete batch to drop."""
        if training and self.fills_batches:
            return False
        if self.node.get("drop_last"):
            return True
        per_process = math.ceil(self.pass_length() / world_size)
        return (
            training
            and self.node.get("batch_sampler") is None
            and (per_process % self.batch_size == 1 and per_process > 1)
        )

    def batches_per_epoch(self, world_size: int) -> int:
        """Batches each of `world_size` processes draws per epoch (DistributedSampler pads)."""
        per_process = math.ceil(self.pass_length() / world_size)
        if self.drops_last(world_size):
            return per_process // self.batch_size
        return math.ceil(per_process / self.batch_size)


class SESEMIDataModule(pl.LightningDataModule):
    """Builds every configured dataset up front, so bad paths fail before training starts.

    `train_dataloader` returns a dict of loaders; Lightning combines them so that each batch is a
    dict with the same names, the longest loader sets the epoch and shorter ones restart.
    """

    def __init__(
        self,
        data: DictConfig | Mapping[str, Any],
        data_root: str | None,
        batch_size_per_gpu: int | None = None,
        stages: tuple[str, ...] = ("train", "val", "test"),
        loader_defaults: Mapping[str, Any] | None = None,
        world_size: int = 1,
        seed: int | None = None,
    ) -> None:
        """Initializes the data module.

        Args:
            data: A `DataConfig`-shaped mapping.
            data_root: The parent of relative dataset roots.
            batch_size_per_gpu: The default batch size of loaders without one.
            stages: Which of train, val and test to build.
            loader_defaults: DataLoader arguments (num_workers, pin_memory, persistent_workers)
                for loaders that leave them null (see `DevicePlan.loader_defaults`).
            world_size: The number of training processes (for the per-process batch count).
            seed: Seed each training sample's augmentation by (seed, epoch, index, pass), so
                any checkpoint resumes to the same batches (see `IndexedDataset`); None: don't.
        """
        super().__init__()
        if isinstance(data, DictConfig):  # only the loaders: the data's facts may not resolve yet
            nodes = {k: data.get(k) for k in LOADER_GROUPS}
            data = {
                k: OmegaConf.to_container(v, resolve=True) if OmegaConf.is_config(v) else v
                for k, v in nodes.items()
            }
        bs = batch_size_per_gpu
        self.loader_defaults = dict(loader_defaults or {})
        auto = self.loader_defaults
        train = data.get("train") or {} if "train" in stages else {}
        self.train = {
            k: LoaderSpec(f"data.train.{k}", v, data_root, bs, auto)
            for k, v in train.items()
            if v is not None  # a null entry switches an inherited loader off
        }
        self.val = self._spec("val", data, data_root, bs, stages, auto)
        self.test = self._spec("test", data, data_root, bs, stages, auto)
        for spec in self.specs():  # before training starts
            spec.check_sampling(training=spec.where.startswith("data.train."))
        self.data_root = data_root
        self.world_size = world_size
        self.seed = seed

    @staticmethod
    def _spec(stage, data, data_root, bs, stages, auto) -> LoaderSpec | None:
        if stage not in stages or not data.get(stage):
            return None
        return LoaderSpec(f"data.{stage}", data[stage], data_root, bs, auto)

    def specs(self) -> list[LoaderSpec]:
        """Every configured loader: train loaders by name, then val and test."""
        return [*self.train.values(), *(s for s in (self.val, self.test) if s is not None)]

    def dataset_sizes(self) -> dict[str, int]:
        """The length of each training loader's dataset, by loader name."""
        return {name: len(spec.dataset) for name, spec in self.train.items()}

    def class_counts(self) -> dict[str, list[int]]:
        """The images of each class (by target index) in each training loader's dataset, by
        loader name, for the loaders whose images all have a class (`targets` >= 0)."""
        counts = {}
        for name, spec in self.train.items():
            tally = _tally(spec.dataset)
            if tally is not None:
                counts[name] = tally
        return counts

    def hand_labeled_counts(self) -> list[int] | None:
        """The images of each class in the supervised loader's dataset, without the images a
        `pseudo_labels` folder added (CReST's rates are those of the hand-labeled set)."""
        spec = self.train.get("supervised")
        if spec is None:
            return None
        dataset = spec.dataset
        return _tally(dataset.labeled if isinstance(dataset, WithPseudoLabels) else dataset)

    def knn_bank_loader(self) -> DataLoader:
        """The labeled training images with the val transform, in order: the kNN memory bank.

        Every process reads all of them (no DistributedSampler), so each holds the whole bank.
        """
        supervised, val = self.train.get("supervised"), self.val
        if supervised is None or val is None:
            raise ValueError("kNN evaluation needs data.train.supervised and data.val loaders")
        dataset = {**supervised.node["dataset"]}
        dataset["image_transform"] = val.node["dataset"].get("image_transform")
        node = {
            "dataset": dataset,
            "batch_size": val.batch_size,
            "num_workers": val.node.get("num_workers"),
            "pin_memory": val.node.get("pin_memory"),
        }
        where = "kNN bank (data.train.supervised)"
        return LoaderSpec(where, node, self.data_root, None, self.loader_defaults).loader()

    def iterations_per_epoch(self, world_size: int = 1, accumulate_grad_batches: int = 1) -> int:
        """Optimizer steps per epoch on each process: the longest train loader's batch count."""
        if not self.train:
            raise ValueError("no data.train loaders are configured")
        batches = max(spec.batches_per_epoch(world_size) for spec in self.train.values())
        return math.ceil(batches / accumulate_grad_batches)

    def set_epoch(self, epoch: int) -> None:
        """Tells the training datasets the epoch their samples' seeds are drawn for."""
        for spec in self.train.values():
            if spec.indexed is not None:
                spec.indexed.set_epoch(epoch)

    def train_dataloader(self) -> dict[str, DataLoader]:
        """Returns the named training loaders; their batches end with the samples' indices."""
        return {
            name: spec.loader(True, True, self.world_size, self.seed)
            for name, spec in self.train.items()
        }

    def val_dataloader(self) -> DataLoader:
        """Returns the validation loader."""
        return self.val.loader(processes=self.world_size) if self.val else []

    def test_dataloader(self) -> DataLoader:
        """Returns the test loader."""
        return self.test.loader(processes=self.world_size) if self.test else []
