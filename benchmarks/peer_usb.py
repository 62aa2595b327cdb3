"""Head to head on the digits: sesemi's FixMatch, FlexMatch, ABC and DASO vs. USB's (`semilearn`).

USB (microsoft/Semi-supervised-learning, PyPI `semilearn`) is the reference implementation of
these methods. For every seed, both libraries train on the SAME prepared split and are scored on
the same val images:

* the split is `sesemi.datasets.digits.prepare_digits(<workdir>/digits_l<L>_s<split seed>,
  labels_per_class=L, seed=<split seed>)`, the split seed being the run's seed (as
  `ssl_digits.py` does; the plain demo keeps seed 0 for every run.seed unless
  `+data.prepare.seed` is given) or `--split-seed`;
* sesemi runs `python -m sesemi -cn demo method=<m> run.seed=<s> data.prepare.labels_per_class=L
  +data.prepare.seed=<split seed> run.num_iterations=<steps> ...`, validates once, after the last
  step, and its `summary.json` gives val/top1 of the final weights;
* USB runs in a virtual environment of its own (`<workdir>/usb_venv`, created on first use with
  `semilearn --no-deps`, torch and the few packages its FixMatch/FlexMatch path imports; never in
  the project's environment). A worker process (this file with `--usb-worker`, run by that
  environment's Python) builds USB's `fixmatch` / `flexmatch` algorithm with `semilearn.get_config`
  and `get_algorithm`, on `BasicDataset`s of the same PNG files, and trains it with the
  algorithm's own `train()` loop on the CPU. Every setting is read from sesemi's composed demo
  config (timm ResNet-18 and its dropout, batch 32 + 7 x 32, SGD, the polynomial LR schedule with
  warm-up, threshold, lambda_u, the weak / strong / eval transforms: sesemi's own transform code,
  which USB's dataset accepts) and mirrored; what cannot be mirrored is listed in the report.

Each run is one process, one at a time; s/step is its whole wall time (Python start, imports,
model build, training, the final validation) divided by the steps, excluding the USB environment's
set-up and the data preparation. USB evaluates its EMA model (`ema_m`, which in USB changes only
evaluation, not training); the table gives both the final weights' and the EMA weights' top-1.

Usage (from the repository root, in the project's virtual environment):

    python benchmarks/peer_usb.py --labels 1 --seeds 0 1 2 --steps 300 \
        --out benchmarks/results/peer_usb.md

Both libraries with every labeled batch full (USB's own sampler, sesemi's `full_batches`):

    python benchmarks/peer_usb.py --set data.train.supervised.full_batches=true

`--set` adds Hydra overrides to sesemi's runs, which the USB runs mirror; the USB runs draw
sesemi's batches unless the labeled loader has `full_batches` (or `--usb-sampler` says otherwise).

Long-tailed data (`--imbalance R`): both libraries read one long-tailed copy of each seed's split,
made by `realworld_digits.py`'s imbalance scenario code (`build_imbalanced`, `long_tail_counts`;
from 10 labels per class by default, class c keeps `R^(-c/9)` of the largest class's labeled and
unlabeled images, val stays balanced); the report gives balanced accuracy, the worst class's recall
and every class's recall. Method `abc` is ABC (Lee, Shin & Kim, NeurIPS 2021, arXiv:2110.10368)
on FixMatch: sesemi's `method=[fixmatch,abc]` (its `balanced_head` predicts), USB's `fixmatch` with
`imb_algorithm='abc'` (its `logits_aux` predicts, as its evaluate does):

    python benchmarks/peer_usb.py --imbalance 10 --methods abc fixmatch --seeds 0 --steps 600 \
        --out benchmarks/results/peer_usb_abc.md

Method `daso` is DASO (Oh, Kim & Kweon, CVPR 2022, arXiv:2106.05682) on FixMatch: sesemi's
`method=[fixmatch,daso]`, USB's `fixmatch` with `imb_algorithm='daso'` (its settings read from
sesemi's DASO head; the linear classifier predicts in both):

    python benchmarks/peer_usb.py --imbalance 10 --methods daso --seeds 0 1 2 --steps 600 \
        --out benchmarks/results/peer_usb_daso.md

A quick check of the whole pipeline (minutes, mostly the USB environment on first use):

    python benchmarks/peer_usb.py --seeds 0 --steps 5
"""

from __future__ import annotations

import argparse
import csv
import datetime
import importlib
import importlib.abc
import importlib.metadata
import importlib.util
import inspect
import json
import math
import os
import pathlib
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import time
import types

from _report import emit  # benchmarks/_report.py (the script's own folder)

REPO = pathlib.Path(__file__).resolve().parents[1]
LIBRARIES = ("sesemi", "usb")
METHODS = ("fixmatch", "flexmatch", "abc", "daso")
METHOD_LABELS = {
    "fixmatch": "FixMatch",
    "flexmatch": "FlexMatch",
    "abc": "FixMatch + ABC",
    "daso": "FixMatch + DASO",
}
# sesemi's `method=` value where it is not the method's name (ABC and DASO are add-ons to
# FixMatch).
SESEMI_METHODS = {"abc": "[fixmatch,abc]", "daso": "[fixmatch,daso]"}
# USB's (algorithm, imb_algorithm) where it is not (the method's name, None).
USB_ALGORITHMS = {"abc": ("fixmatch", "abc"), "daso": ("fixmatch", "daso")}
USB_VERSION = "0.3.2"
# pip takes these two from this machine's disk; the same builds as the project's environment.
USB_TORCH = ("torch==2.14.1", "torchvision==0.29.1")
# What `import semilearn` needs on the FixMatch / FlexMatch path besides torch, torchvision,
# numpy and Pillow (found by importing it): sklearn.metrics (AlgorithmBase), timm (its ViTs),
# torch.utils.tensorboard (its TBLog), ruamel.yaml (its config helpers), progress (its Trainer),
# tqdm (its MedMNIST loader).
USB_PACKAGES = ("scikit-learn", "timm", "tensorboard", "ruamel.yaml", "progress", "tqdm")
# Imported when semilearn is imported, used only by its audio, NLP, W&B, Aim and MedMNIST code:
# replaced by stub modules in the USB worker when they are not installed (they are not).
USB_STUBS = ("torchaudio", "transformers", "wandb", "aim", "skimage")
USB_MARKER = "peer_usb_ready.json"  # in the USB environment once it imports semilearn
SESEMI_VERSIONS = ("sesemi", "torch", "torchvision", "timm", "pytorch-lightning", "hydra-core")
LOG_EVERY = 10  # USB's num_log_iter (sesemi's demo logs every 10 steps too)
TAIL_LINES = 40  # of a failed run's log


# ----------------------------------------------------------------------------------------------
# The USB side: runs in the USB environment's Python (no sesemi installation, no Hydra).
# ----------------------------------------------------------------------------------------------


class _Placeholder:
    """Stands for any name of a stubbed package; using it says which package is missing."""

    _origin = "?"

    def __init__(self, *args: object, **kwargs: object) -> None:
        raise RuntimeError(f"{self._origin} is a stub in peer_usb's USB worker (not installed)")


class _StubModule(types.ModuleType):
    """A module whose every public attribute is a `_Placeholder` subclass named after it."""

    def __getattr__(self, name: str) -> type:
        if name.startswith("__"):
            raise AttributeError(name)
        placeholder = type(name, (_Placeholder,), {"_origin": f"{self.__name__}.{name}"})
        setattr(self, name, placeholder)
        return placeholder


class _StubFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Imports `_StubModule`s for the given top-level packages and all their submodules."""

    def __init__(self, roots: set[str]) -> None:
        self.roots = roots

    def find_spec(self, fullname: str, path: object = None, target: object = None):
        if fullname.partition(".")[0] not in self.roots:
            return None
        return importlib.util.spec_from_loader(fullname, self, is_package=True)

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
        return _StubModule(spec.name)

    def exec_module(self, module: types.ModuleType) -> None:
        """Stub modules have no code to run."""


def install_stubs() -> list[str]:
    """Stubs every package of `USB_STUBS` that is not installed; returns the stubbed names."""
    missing = {name for name in USB_STUBS if importlib.util.find_spec(name) is None}
    if missing:
        sys.meta_path.insert(0, _StubFinder(missing))
    return sorted(missing)


def patch_torch_amp() -> list[str]:
    """Gives `torch.cuda.amp` the `GradScaler` / `autocast` names semilearn imports, where this
    torch no longer has them (they moved to `torch.amp`); returns what was patched."""
    import torch

    patched = []
    amp = torch.cuda.amp
    if not hasattr(amp, "GradScaler"):
        amp.GradScaler = lambda *args, **kwargs: torch.amp.GradScaler("cuda", *args, **kwargs)
        patched.append("torch.cuda.amp.GradScaler")
    if not hasattr(amp, "autocast"):
        amp.autocast = lambda *args, **kwargs: torch.amp.autocast("cuda", *args, **kwargs)
        patched.append("torch.cuda.amp.autocast")
    return patched


def load_sesemi_sources(repo: pathlib.Path) -> types.SimpleNamespace:
    """sesemi's transform and LR-schedule code, read from the repository's source files.

    `sesemi` becomes a namespace package over `repo/sesemi` without running its `__init__`, so
    `sesemi.transforms`, `sesemi.randaugment` and `sesemi.schedulers.lr` (which need only torch,
    torchvision and Pillow) import as they are; nothing of sesemi is installed in this
    environment.
    """
    package = types.ModuleType("sesemi")
    package.__path__ = [str(repo / "sesemi")]
    sys.modules["sesemi"] = package
    return types.SimpleNamespace(
        transforms=importlib.import_module("sesemi.transforms"),
        polynomial_lr=importlib.import_module("sesemi.schedulers.lr").polynomial_lr,
    )


def read_split(root: pathlib.Path, subsets: list[str]) -> tuple:
    """The images `(N, H, W, 3)` uint8 and class indices `(N,)` of `root/<subset>/<class>/*.png`,
    subsets concatenated in order, classes in sorted order, files sorted by name."""
    import numpy as np
    from PIL import Image

    images, targets = [], []
    for subset in subsets:
        classes = sorted(p.name for p in (root / subset).iterdir() if p.is_dir())
        for label, name in enumerate(classes):
            for path in sorted((root / subset / name).glob("*.png")):
                with Image.open(path) as image:
                    images.append(np.asarray(image.convert("RGB"), dtype=np.uint8))
                targets.append(label)
    return np.stack(images), np.array(targets, dtype=np.int64)


def make_classifier(num_classes: int, backbone: dict):
    """sesemi's network in USB's model interface: a timm model without classifier (global
    pooling and dropout `drop_rate` on the pooled features, as `sesemi.PyTorchImageModels`), then a
    linear layer. Returns `{"logits", "feat"}`; `only_feat` / `only_fc` as USB's networks."""
    import timm
    from torch import nn

    class TimmClassifier(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            options = {k: v for k, v in backbone.items() if k != "name"}
            self.backbone = timm.create_model(
                backbone["name"], pretrained=False, num_classes=0, **options
            )
            width = getattr(self.backbone, "head_hidden_size", None) or self.backbone.num_features
            self.num_features = width  # USB's ABCNet reads its backbone's feature width here
            self.classifier = nn.Linear(width, num_classes)

        def forward(self, x, only_fc: bool = False, only_feat: bool = False, **kwargs):
            if only_fc:
                return self.classifier(x)
            feat = self.backbone(x)
            if only_feat:
                return feat
            return {"logits": self.classifier(feat), "feat": feat}

    return TimmClassifier()


class CycledBatches:
    """`steps` batches of a DataLoader, as Lightning's `max_size_cycle` combination of sesemi's
    training loaders draws them: every `epoch_length` steps all loaders restart (reshuffled);
    within an epoch a loader that runs out restarts (reshuffled)."""

    def __init__(self, loader, steps: int, epoch_length: int) -> None:
        self.loader, self.steps, self.epoch_length = loader, steps, epoch_length

    def __len__(self) -> int:
        return self.steps

    def __iter__(self):
        done = 0
        while done < self.steps:
            batches = iter(self.loader)
            for _ in range(min(self.epoch_length, self.steps - done)):
                try:
                    batch = next(batches)
                except StopIteration:
                    batches = iter(self.loader)
                    batch = next(batches)
                yield batch
                done += 1


class EpochSlices:
    """The batches of an iterable, `per_epoch` at a time: each `iter()` (one USB epoch) goes on
    where the previous one stopped, so the data order is the same whatever the epoch count."""

    def __init__(self, batches, per_epoch: int) -> None:
        self.batches, self.per_epoch, self.stream = batches, per_epoch, None

    def __len__(self) -> int:
        return self.per_epoch

    def __iter__(self):
        if self.stream is None:
            self.stream = iter(self.batches)
        for _ in range(self.per_epoch):
            try:
                yield next(self.stream)
            except StopIteration:
                return


def build_transform(node: dict, sources: types.SimpleNamespace):
    """Instantiates a `sesemi.transforms.<recipe>` config node."""
    module, _, name = node["_target_"].rpartition(".")
    if module != "sesemi.transforms":
        raise ValueError(f"peer_usb builds sesemi.transforms recipes only, not {node['_target_']}")
    return getattr(sources.transforms, name)(
        **{k: v for k, v in node.items() if not k.startswith("_")}
    )


def usb_strong_transform(node: dict, sources: types.SimpleNamespace):
    """USB's strong view on sesemi's geometry: the node's crop and flip, then USB's
    `RandAugment(3, 5)` (its CIFAR recipe: 3 ops, PIL cutout in (125, 123, 114)), then to a
    normalized tensor."""
    from semilearn.datasets.augmentation import RandAugment
    from torchvision.transforms import v2

    keys = ("input_h", "input_w", "scale", "ratio", "interpolation", "p_hflip")
    weak = sources.transforms.train_transforms(
        **{k: node[k] for k in (*keys, "norm_mean", "norm_std") if k in node}
    )
    steps = list(weak.transforms)
    steps.insert(2, RandAugment(3, 5))  # after the crop and the flip, before PILToTensor
    return v2.Compose(steps)


def patch_daso_first_period(hook) -> dict:
    """Makes USB's `DASOPseudoLabelingHook` read the pseudo-label counts so far while no
    `num_pl_dist_iter` period has closed yet, as sesemi's DASO head does; returns a record of
    the steps it did so (filled in during training).

    USB's hook starts from all-zero counts, and `get_pl_dist` normalizes them: 0 / 0 is NaN, the
    blended probabilities are NaN and every pseudo-label becomes class 0 (argmax of NaN) from
    `num_pretrain_iter` until the first period closes. USB's defaults (5120 pretraining steps,
    periods of 100) never get there; a run whose pretraining is shorter than a period does.
    Once a period has closed, or where no pseudo-label has been counted yet, the hook is USB's.
    """
    import torch

    record = {"steps": 0}
    original = hook.get_pl_dist

    def get_pl_dist(normalize: bool = True):
        closed = torch.as_tensor(hook.pseudo_label_dist, dtype=torch.float).sum() > 0
        if closed or not hook.pseudo_label_list:
            return original(normalize)
        labels = torch.cat(hook.pseudo_label_list, 0)
        counts = torch.bincount(labels, minlength=hook.num_classes).float()
        record["steps"] += 1
        return counts / counts.sum() if normalize else counts

    hook.get_pl_dist = get_pl_dist
    return record


def patch_daso_current_similarities(algorithm, model) -> None:
    """Makes USB's DASO blend each weak view with its own similarities of this step
    (`--usb-daso-similarities current`).

    USB's `DASO.train_step` computes `probs_sim` (the weak views' similarity softmax) after
    FixMatch's `train_step` has made the pseudo-labels with it, so each blend reads the previous
    step's `probs_sim`, the previous unlabeled batch's images. Here a forward hook on `model`
    keeps the features of its last call, which in FixMatch's `train_step` (use_cat=False) is
    the weak views' pass, and the pseudo-labeling hook sets `probs_sim` from them, with DASO's
    own prototypes, similarity and T_proto, before it blends; DASO's loss then recomputes the
    same `probs_sim`.
    """
    import torch

    captured = {}

    def keep_features(module, inputs, output) -> None:
        if isinstance(output, dict) and "feat" in output:
            captured["feat"] = output["feat"]

    model.register_forward_hook(keep_features)
    hook = algorithm.hooks_dict["PseudoLabelingHook"]
    original = hook.gen_ulb_targets

    def gen_ulb_targets(alg, *args, **kwargs):
        if alg.it >= alg.num_pretrain_iter:
            feats = captured["feat"].detach()
            logits = kwargs.get("logits", args[0] if args else None)
            if logits is not None and len(feats) != len(logits):
                raise RuntimeError("the last forward pass was not the weak views'")
            prototypes = alg.queue.prototypes
            with torch.no_grad():
                sim = alg.similarity_fn(feats.unsqueeze(1), prototypes.unsqueeze(0))
                alg.probs_sim = (sim / alg.T_proto).softmax(dim=1)
        return original(alg, *args, **kwargs)

    hook.gen_ulb_targets = gen_ulb_targets


def usb_worker(spec_path: pathlib.Path) -> int:
    """Trains USB's algorithm as `spec` says and writes its val scores to `spec["result"]`."""
    start = time.time()
    spec = json.loads(spec_path.read_text())
    stubbed = install_stubs()
    import random

    import numpy as np
    import torch

    torch.set_num_threads(spec["threads"])
    patched = patch_torch_amp()
    sources = load_sesemi_sources(pathlib.Path(spec["repo"]))
    from semilearn import BasicDataset, get_algorithm, get_config
    from semilearn.algorithms import name2alg
    from semilearn.core.hooks import Hook
    from semilearn.imb_algorithms import name2imbalg
    from torch.utils.data import DataLoader

    method, seed, steps = spec["method"], spec["seed"], spec["steps"]
    algorithm_name, imb_algorithm = spec["algorithm"], spec["imb_algorithm"]
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)

    root = pathlib.Path(spec["data_root"])
    lb_x, lb_y = read_split(root, spec["labeled_subsets"])
    ulb_x, ulb_y = read_split(root, spec["unlabeled_subsets"])
    val_x, val_y = read_split(root, spec["val_subsets"])
    num_classes = spec["num_classes"]
    loaders = spec["loaders"]
    optimizer_options, schedule = spec["optimizer"], spec["lr_schedule"]

    transforms = spec["transforms"]
    weak_labeled = build_transform(transforms["labeled"], sources)
    weak = build_transform(transforms["weak"], sources)
    if spec["usb_strong"] == "usb":
        strong = usb_strong_transform(transforms["strong"], sources)
    else:
        strong = build_transform(transforms["strong"], sources)
    evaluation = build_transform(transforms["eval"], sources)
    alg = algorithm_name
    lb_set = BasicDataset(alg, lb_x, lb_y, num_classes, weak_labeled, False, None, False)
    ulb_set = BasicDataset(alg, ulb_x, ulb_y, num_classes, weak, True, strong, False)
    val_set = BasicDataset(alg, val_x, val_y, num_classes, evaluation, False, None, False)

    epochs = spec["usb_epochs"]
    config = {
        "algorithm": algorithm_name,
        "net": "peer_usb_timm",  # a name for logs; the network comes from net_builder below
        "use_pretrain": False,
        "num_classes": num_classes,
        "num_labels": len(lb_y),
        "batch_size": loaders["labeled"]["batch_size"],
        "uratio": loaders["uratio"],
        "eval_batch_size": loaders["val"]["batch_size"],
        "epoch": epochs,
        "num_train_iter": steps,
        "num_eval_iter": steps,  # its LoggingHook's long line, once, at the end
        "num_log_iter": LOG_EVERY,
        "num_warmup_iter": schedule["warmup_iters"],  # for the record; the schedule is replaced
        "ema_m": spec["ema_m"],
        "ulb_loss_ratio": spec["lambda_u"],
        "T": spec["temperature"],  # unused with hard labels
        "p_cutoff": spec["threshold"],
        "hard_label": True,
        "use_cat": spec["use_cat"],
        "amp": False,
        "clip_grad": 0.0,
        "optim": "SGD",
        "lr": optimizer_options["lr"],
        "momentum": optimizer_options.get("momentum", 0.0),
        "weight_decay": optimizer_options.get("weight_decay", 0.0),
        "dataset": "peer_usb_digits",  # unknown to USB: no dataset is built from data_dir
        "data_dir": str(root),
        "num_workers": 0,
        "include_lb_to_ulb": True,
        "img_size": spec["image_size"],
        "seed": seed,
        "gpu": None,
        "rank": 0,
        "world_size": 1,
        "distributed": False,
        "multiprocessing_distributed": False,
        "save_dir": spec["save_dir"],
        "save_name": f"{method}_s{seed}",
        "ulb_dest_len": len(ulb_y),  # FlexMatch's per-image learning status
        "lb_dest_len": len(lb_y),
    }
    if algorithm_name == "flexmatch":
        config["thresh_warmup"] = spec["flexmatch_warmup"]
    if imb_algorithm is not None:
        config.update(
            imb_algorithm=imb_algorithm,
            # For the record (ImbAlgorithmBase stores them; ABC and DASO do not read them).
            lb_imb_ratio=spec["imbalance"] or 1,
            ulb_imb_ratio=spec["imbalance"] or 1,
        )
    if imb_algorithm == "abc":
        abc = spec["abc"]
        config.update(abc_p_cutoff=abc["threshold"], abc_loss_ratio=abc["loss_ratio"])
    elif imb_algorithm == "daso":
        daso = spec["daso"]
        config.update(
            daso_queue_len=daso["queue_size"],
            daso_T_proto=daso["proto_temperature"],
            daso_T_dist=daso["dist_temperature"],
            daso_interp_alpha=0.5,  # USB's default; unused with daso_with_dist_aware
            daso_with_dist_aware=True,
            daso_assign_loss_ratio=daso["loss_ratio"],
            daso_num_pl_dist_iter=daso["dist_period"],
            daso_num_pretrain_iter=daso["pretrain_steps"],
        )
    elif imb_algorithm is not None:
        raise ValueError(f"peer_usb runs USB's imb_algorithm abc or daso only, not {imb_algorithm}")
    args = get_config(config)

    def net_builder(num_classes: int, pretrained: bool = False, **kwargs: object):
        if pretrained:
            raise ValueError("peer_usb never loads pretrained weights")
        return make_classifier(num_classes, spec["backbone"])

    if imb_algorithm is None:
        algorithm = get_algorithm(args, net_builder, None, None)
    else:
        # USB's get_imb_algorithm's class (the add-on over its base algorithm), handed the
        # datasets as its get_dataset would: ABC reads the labeled class counts from
        # dataset_dict["train_lb"].targets while it is built. (The loaders USB then builds from
        # them are replaced below.)
        datasets = {"train_lb": lb_set, "train_ulb": ulb_set, "eval": val_set, "test": None}

        class ImbAlgorithm(name2imbalg[imb_algorithm], name2alg[algorithm_name]):
            def set_dataset(self):
                return datasets

        algorithm = ImbAlgorithm(args=args, net_builder=net_builder, tb_log=None, logger=None)
    first_period = None
    if imb_algorithm == "daso":
        first_period = patch_daso_first_period(algorithm.hooks_dict["PseudoLabelingHook"])
        if spec["daso"]["similarities"] == "current":
            if spec["use_cat"]:
                raise ValueError("--usb-daso-similarities current needs separate forward passes")
            patch_daso_current_similarities(algorithm, algorithm.model)

    # USB's send_model_cuda with gpu=None wraps both models in DataParallel (ABC reaches its
    # classifier through model.module); on the CPU DataParallel only calls the module.
    algorithm.model = torch.nn.DataParallel(algorithm.model)
    algorithm.ema_model = torch.nn.DataParallel(algorithm.ema_model)

    # The CPU: batches stay where they are (USB's process_batch moves them with .cuda()).
    wanted = list(inspect.signature(name2alg[algorithm_name].train_step).parameters)

    def process_batch(input_args=None, **kwargs):
        names = input_args if input_args is not None else wanted
        return {k: v for k, v in kwargs.items() if k in names and v is not None}

    algorithm.process_batch = process_batch

    # Hooks that need CUDA (TimerHook's events) or USB's .cuda() evaluation and checkpoints
    # (EvaluationHook, CheckpointHook) go; the val set is scored below. The LR each step used
    # (TimerHook logged the next one) is logged instead.
    class LRLogHook(Hook):
        def before_train_step(self, algorithm):
            self.lr = algorithm.optimizer.param_groups[0]["lr"]

        def after_train_step(self, algorithm):
            algorithm.log_dict["lr"] = self.lr
            algorithm.log_dict["epoch"] = algorithm.epoch  # ABC's keep rate decays with it

    dropped = ("TimerHook", "EvaluationHook", "CheckpointHook")
    algorithm._hooks = [h for h in algorithm._hooks if h.name not in dropped]
    algorithm.register_hook(LRLogHook(), "LRLogHook", "LOW")

    # sesemi's optimizer (weight decay on every parameter; USB's get_optimizer spares biases and
    # BatchNorm) and its LR schedule, stepped after each optimizer step as USB steps its own.
    algorithm.optimizer = torch.optim.SGD(algorithm.model.parameters(), **optimizer_options)
    base_lr = optimizer_options["lr"]

    def lr_factor(step: int) -> float:
        lr = sources.polynomial_lr(
            step,
            base_lr,
            schedule["warmup_iters"],
            schedule["warmup_lr"],
            schedule["lr_pow"],
            schedule["max_iters"],
        )
        return lr / base_lr

    algorithm.scheduler = torch.optim.lr_scheduler.LambdaLR(algorithm.optimizer, lr_factor)

    batch_size = loaders["labeled"]["batch_size"]
    ulb_batch_size = batch_size * loaders["uratio"]
    if spec["sampler"] == "usb":
        from semilearn.core.utils import get_data_loader

        # One stream of `steps` batches, as in a one-epoch run (cut into epochs below).
        options = {"num_workers": 0, "num_iters": steps, "num_epochs": 1}
        train_lb = get_data_loader(args, lb_set, batch_size, **options)
        train_ulb = get_data_loader(args, ulb_set, ulb_batch_size, **options)
    else:
        labeled = DataLoader(
            lb_set,
            batch_size=batch_size,
            shuffle=True,
            drop_last=loaders["labeled"]["drop_last"],
            generator=torch.Generator().manual_seed(seed),
        )
        unlabeled = DataLoader(
            ulb_set,
            batch_size=ulb_batch_size,
            shuffle=True,
            drop_last=loaders["unlabeled"]["drop_last"],
            generator=torch.Generator().manual_seed(seed + 1),
        )
        epoch_length = max(len(labeled), len(unlabeled))
        train_lb = CycledBatches(labeled, steps, epoch_length)
        train_ulb = CycledBatches(unlabeled, steps, epoch_length)
    if epochs > 1:  # USB's epochs of steps // epochs steps: the same batches, in order
        train_lb = EpochSlices(train_lb, steps // epochs)
        train_ulb = EpochSlices(train_ulb, steps // epochs)
    val_loader = DataLoader(val_set, batch_size=loaders["val"]["batch_size"], shuffle=False)
    algorithm.loader_dict = {"train_lb": train_lb, "train_ulb": train_ulb, "eval": val_loader}

    print(
        f"peer_usb worker: semilearn {importlib.metadata.version('semilearn')}, {method} "
        f"({algorithm_name}, imb_algorithm {imb_algorithm}), seed {seed}, {steps} steps in "
        f"{epochs} epoch(s), {len(lb_y)} labeled / {len(ulb_y)} unlabeled / {len(val_y)} val "
        f"images, stubs {stubbed}, patched {patched}",
        flush=True,
    )
    train_start = time.time()
    algorithm.train()
    train_seconds = time.time() - train_start
    # What USB's evaluate() predicts with: ABC's evaluate asks for the auxiliary (balanced)
    # classifier's "logits_aux", the others for "logits".
    out_key = "logits_aux" if imb_algorithm == "abc" else "logits"

    def scores() -> tuple[float, list[float]]:
        model = algorithm.model
        model.eval()
        predicted = []
        with torch.no_grad():
            for batch in val_loader:
                predicted.append(model(batch["x_lb"])[out_key].argmax(dim=1))
        model.train()
        hits = torch.cat(predicted).numpy() == val_y
        recalls = [float(hits[val_y == c].mean()) for c in range(num_classes)]
        return float(hits.mean()), recalls

    final, recalls = scores()
    algorithm.ema.apply_shadow()  # what USB's own evaluate() scores
    ema, ema_recalls = scores()
    algorithm.ema.restore()
    result = {
        "top1": final,
        "ema_top1": ema,
        "recalls": recalls,
        "ema_recalls": ema_recalls,
        "out_key": out_key,
        "train_seconds": train_seconds,
        "worker_seconds": time.time() - start,
        "last_log": {k: float(v) for k, v in algorithm.log_dict.items()},
        "stubs": stubbed,
        "patched": patched,
    }
    if first_period is not None:  # DASO: steps that read the first period's counts so far
        result["daso_first_period_steps"] = first_period["steps"]
    pathlib.Path(spec["result"]).write_text(json.dumps(result, indent=2) + "\n")
    print(f"peer_usb worker: val top-1 {final:.4f} (EMA {ema:.4f}), {out_key}", flush=True)
    return 0


def usb_check() -> int:
    """Imports semilearn (with the stubs) and prints the environment's versions as JSON."""
    stubbed = install_stubs()
    patched = patch_torch_amp()
    import semilearn  # noqa: F401
    from semilearn import get_algorithm, get_config  # noqa: F401

    versions = {}
    for name in ("semilearn", "torch", "torchvision", "timm", "numpy", "pillow", "scikit-learn"):
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    print(json.dumps({"versions": versions, "stubs": stubbed, "patched": patched}))
    return 0


# ----------------------------------------------------------------------------------------------
# The main side: the project's environment (sesemi, Hydra).
# ----------------------------------------------------------------------------------------------


def run_logged(command: list[str], log: pathlib.Path, env: dict | None = None) -> int:
    """Runs `command`, its output appended to `log`; returns its exit status."""
    with open(log, "a") as out:
        out.write("$ " + shlex.join(command) + "\n")
        out.flush()
        return subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, env=env).returncode


def tail(log: pathlib.Path) -> str:
    """The last lines of a log, for an error message."""
    lines = log.read_text(errors="replace").splitlines()[-TAIL_LINES:]
    return f"last {len(lines)} lines of {log}:\n" + "\n".join(lines)


def ensure_usb_venv(workdir: pathlib.Path) -> tuple[pathlib.Path, dict, float]:
    """Creates (once) `<workdir>/usb_venv` with semilearn and returns its Python, its record
    (versions, stubs) and the seconds the set-up took now (0 when it was ready)."""
    venv = workdir / "usb_venv"
    python = venv / "bin" / "python"
    marker = venv / USB_MARKER
    if marker.is_file() and python.is_file():
        record = json.loads(marker.read_text())
        if record.get("versions", {}).get("semilearn") == USB_VERSION:
            return python, record, 0.0
    log = workdir / "logs" / "usb_venv.log"
    print(f"[usb] setting up {venv} (log: {log})", flush=True)
    start = time.time()
    if not python.is_file():
        if run_logged([sys.executable, "-m", "venv", str(venv)], log):
            raise RuntimeError(f"could not create {venv}; {tail(log)}")
    pip = [str(python), "-m", "pip", "install", "--disable-pip-version-check"]
    for packages in (USB_TORCH, (f"semilearn=={USB_VERSION}", "--no-deps"), USB_PACKAGES):
        if run_logged([*pip, *packages], log):
            raise RuntimeError(f"pip install {' '.join(packages)} failed; {tail(log)}")
    check = subprocess.run(
        [str(python), str(pathlib.Path(__file__).resolve()), "--usb-check"],
        capture_output=True,
        text=True,
    )
    if check.returncode != 0:
        raise RuntimeError(f"semilearn does not import in {venv}:\n{check.stderr[-3000:]}")
    record = json.loads(check.stdout.strip().splitlines()[-1])
    record["setup_seconds"] = time.time() - start
    record["packages"] = [*USB_TORCH, f"semilearn=={USB_VERSION} --no-deps", *USB_PACKAGES]
    marker.write_text(json.dumps(record, indent=2) + "\n")
    print(f"[usb] ready in {record['setup_seconds']:.0f} s: {record['versions']}", flush=True)
    return python, record, record["setup_seconds"]


def split_root(workdir: pathlib.Path, labels: int, split_seed: int) -> pathlib.Path:
    """Where the split of (labels per class, split seed) lives."""
    return workdir / f"digits_l{labels}_s{split_seed}"


def data_tag(args: argparse.Namespace) -> str:
    """The data part of run and log names: labels per class and, long-tailed, the ratio."""
    return f"l{args.labels}" + (f"_lt{args.imbalance:g}" if args.imbalance else "")


def data_root(args: argparse.Namespace, split_seed: int) -> pathlib.Path:
    """The folder both libraries train on: the split, or (`--imbalance`) its long-tailed copy."""
    if args.imbalance is None:
        return split_root(args.workdir, args.labels, split_seed)
    return args.workdir / f"digits_{data_tag(args)}_s{split_seed}"


def long_tailed_split(
    base: pathlib.Path, root: pathlib.Path, seed: int, ratio: float
) -> dict[str, list[int]]:
    """Writes `base`'s long-tailed copy to `root` with `realworld_digits.build_imbalanced` (the
    imbalance scenario's own code: class c keeps `ratio^(-c/9)` of the largest class's labeled
    and unlabeled images, val untouched); returns its labeled / unlabeled counts per class."""
    import realworld_digits  # benchmarks/ (this script's folder, on sys.path)

    if root.exists():  # rebuilt each time, as realworld_digits does
        shutil.rmtree(root)
    return realworld_digits.build_imbalanced(base, root, seed, ratio)


def sesemi_overrides(
    method: str, seed: int, split_seed: int, args: argparse.Namespace, root: pathlib.Path
) -> list[str]:
    """The Hydra overrides of sesemi's run (and of the config the USB run mirrors)."""
    from sesemi.config.resolvers import hydra_quoted  # here: this file also runs in USB's venv

    if args.imbalance is None:
        data = [
            f"data.prepare.labels_per_class={args.labels}",
            # The demo's digits.yaml sets no seed: prepare_digits' default (0) whatever run.seed.
            f"+data.prepare.seed={split_seed}",
        ]
    else:
        data = ["data.prepare=null"]  # the long-tailed folder is ready (as realworld_digits)
    overrides = [
        f"method={SESEMI_METHODS.get(method, method)}",
        f"run.seed={seed}",
        f"run.data_root={hydra_quoted(str(root))}",
        *data,
        f"run.num_iterations={args.steps}",
        f"trainer.val_check_interval={args.steps}",  # validate once, at the end
        f"run.dir={hydra_quoted(str(args.workdir / 'runs'))}",
        f"run.id={data_tag(args)}_{method}_s{seed}",
        "++trainer.num_sanity_val_steps=0",
        "++trainer.enable_progress_bar=false",
        "++trainer.enable_model_summary=false",
    ]
    if args.sesemi_ema:
        overrides.append(f"+learner.hparams.model.ema.decay={args.ema}")
    return [*overrides, *args.set]


def _require(condition: bool, what: str) -> None:
    if not condition:
        raise ValueError(f"the USB run cannot mirror sesemi's config: {what}")


def _loader(node: dict, run: dict, root: pathlib.Path, where: str) -> dict:
    """A training or val loader's subsets, size, batch size and effective drop_last."""
    dataset = node["dataset"]
    _require(dataset.get("name") == "image_folder", f"{where} is not an image_folder")
    _require(not dataset.get("root") and not dataset.get("kwargs"), f"{where}.dataset options")
    for key in ("sampler", "batch_sampler", "collate_fn"):
        _require(node.get(key) is None, f"{where}.{key} is set")
    subsets = dataset["subset"] if isinstance(dataset["subset"], list) else [dataset["subset"]]
    subsets = [s.rstrip("?") for s in subsets if (root / s.rstrip("?")).is_dir()]
    size = sum(1 for s in subsets for _ in (root / s).glob("*/*.png"))
    batch_size = node.get("batch_size") or run["batch_size_per_gpu"]
    # sesemi drops a last training batch of one image (BatchNorm cannot normalize it).
    drop_last = bool(node.get("drop_last")) or (size % batch_size == 1 and size > 1)
    full = bool(node.get("full_batches"))
    return {
        "subsets": subsets,
        "size": size,
        "batch_size": batch_size,
        "drop_last": drop_last and not full,
        "full": full,
    }


def _add_on_term(heads: dict, name: str, label: str, target: str) -> tuple[dict, dict]:
    """An add-on's loss term and head (ABC, DASO), checked for what USB can match: its class, no
    weight schedule, a mean reduction, the unlabeled loader."""
    term = heads[name]
    head = term["head"]
    _require(head["_target_"].endswith(target), f"the {label} head {head['_target_']}")
    _require(term.get("scheduler") is None, f"a weight schedule on the {label} term")
    _require(term.get("reduction", "mean") == "mean", f"the {label} term's reduction")
    _require(head.get("input_data") == "unlabeled", f"{label} on another loader than unlabeled")
    return term, head


def usb_spec(method: str, seed: int, split_seed: int, args: argparse.Namespace) -> dict:
    """The settings of sesemi's run, read from its composed config, as the USB worker's spec.

    Raises:
        ValueError: When the config holds something the USB run cannot mirror.
    """
    import sesemi
    from sesemi.config.resolvers import SESEMIConfigAttributes, resolve

    root = data_root(args, split_seed)
    cfg = sesemi.compose("demo", sesemi_overrides(method, seed, split_seed, args, root))
    known = SESEMIConfigAttributes(max_iterations=args.steps, num_gpus=0, num_nodes=1)
    run = resolve(cfg.run, known)
    data = resolve(cfg.data, known)
    trainer = resolve(cfg.trainer, known) or {}
    for key in ("accumulate_grad_batches", "gradient_clip_val", "precision"):
        _require(trainer.get(key) in (None, 1, 0, 32, "32", "32-true"), f"trainer.{key}")
    train = data["train"]
    _require(set(train) == {"supervised", "unlabeled"}, f"data.train loaders {sorted(train)}")
    labeled = _loader(train["supervised"], run, root, "data.train.supervised")
    unlabeled = _loader(train["unlabeled"], run, root, "data.train.unlabeled")
    val = _loader(data["val"], run, root, "data.val")
    val["drop_last"] = bool(data["val"].get("drop_last"))
    for name, node in (("supervised", train["supervised"]), ("unlabeled", train["unlabeled"])):
        _require(node.get("shuffle") is True, f"data.train.{name}.shuffle is not true")
    uratio, remainder = divmod(unlabeled["batch_size"], labeled["batch_size"])
    _require(remainder == 0, "the unlabeled batch is not a multiple of the labeled one")
    batches = [
        (n["size"] // n["batch_size"]) if n["drop_last"] else math.ceil(n["size"] / n["batch_size"])
        for n in (labeled, unlabeled)
    ]
    known.iterations_per_epoch = max(batches)
    known.num_classes = sum(1 for p in (root / "train").iterdir() if p.is_dir())
    hparams = resolve(cfg.learner, known)["hparams"]

    model = hparams["model"]
    backbone = dict(model["backbone"])
    _require(backbone.pop("_target_") == "sesemi.PyTorchImageModels", "the backbone's _target_")
    _require(not backbone.pop("freeze", False), "a frozen backbone")
    _require(not backbone.pop("pretrained", False), "pretrained weights")
    supervised = model["supervised_loss"]
    _require(
        supervised["callable"] == {"_target_": "torch.nn.CrossEntropyLoss"}
        and supervised.get("scheduler") is None
        and supervised.get("reduction", "mean") == "mean"
        and supervised.get("scale_factor", 1.0) == 1.0,
        f"supervised_loss {supervised}",
    )
    heads = model.get("regularization_loss_heads") or {}
    wanted = {"fixmatch", method} if method in ("abc", "daso") else {"fixmatch"}
    _require(set(heads) == wanted, f"loss heads {sorted(heads)} for method {method}")
    abc = daso = None
    if method == "daso":
        term, head = _add_on_term(heads, "daso", "DASO", ".DASOLossHead")
        _require(head.get("input_backbone", "backbone") == "backbone", "DASO on another backbone")
        daso = {
            "queue_size": int(head.get("queue_size", 256)),
            "proto_temperature": float(head.get("proto_temperature", 0.05)),
            "dist_temperature": float(head.get("dist_temperature", 1.5)),
            # sesemi's default is 2 % of the run, a float (12.0 at 600 steps); the head casts.
            "pretrain_steps": int(head.get("pretrain_steps", 0)),
            "dist_period": int(head.get("dist_period", 100)),
            "loss_ratio": float(term.get("scale_factor", 1.0)),
            "similarities": args.usb_daso_similarities,
        }
        _require(
            daso["pretrain_steps"] >= 1,
            "DASO without pretraining steps (USB's first blend reads a previous step's "
            "similarities)",
        )
    if method == "abc":
        _require(
            bool(model.get("balanced_head")), "ABC without learner.hparams.model.balanced_head"
        )
        term, head = _add_on_term(heads, "abc", "ABC", ".ABCLossHead")
        _require(
            head.get("input_head", "balanced_head") == "balanced_head"
            and head.get("input_backbone", "backbone") == "backbone",
            "ABC on another classifier or backbone",
        )
        total_steps = int(head["total_steps"])
        _require(total_steps == args.steps, f"ABC's total_steps {total_steps} (not the steps)")
        abc = {
            "threshold": float(head.get("threshold", 0.95)),
            "loss_ratio": float(term.get("scale_factor", 1.0)),
            "total_steps": total_steps,
        }
    else:
        _require(not model.get("balanced_head"), f"a balanced_head for method {method}")
    term = heads["fixmatch"]
    head = dict(term["head"])
    _require(head["_target_"].endswith(".FixMatchLossHead"), f"the head {head['_target_']}")
    _require(term.get("scheduler") is None, "a weight schedule on the FixMatch term")
    _require(term.get("reduction", "mean") == "mean", "the FixMatch term's reduction")
    _require(head.get("teacher", "student") == "student", "an EMA teacher for pseudo-labels")
    _require(head.get("temperature", 1.0) == 1.0, "a temperature (USB masks untempered)")
    joint = head.get("joint_forward", False)
    _require(joint in (False, "all"), f"joint_forward={joint!r} (USB: all or nothing)")
    threshold = head["threshold"]
    flexmatch_warmup = None
    if isinstance(threshold, dict):
        _require(
            threshold["_target_"].endswith(".FlexMatchThreshold") and method == "flexmatch",
            f"the threshold policy {threshold['_target_']} for method {method}",
        )
        _require(threshold.get("mapping", "convex") == "convex", "a non-convex mapping")
        _require(threshold.get("learning_status", "index") == "index", "estimated status")
        flexmatch_warmup = bool(threshold.get("warmup", True))
        threshold = threshold.get("threshold", 0.95)
    else:
        _require(method in ("fixmatch", "abc", "daso"), f"a fixed threshold for method {method}")
    optimizer = dict(hparams["optimizer"])
    _require(optimizer.pop("_target_") == "torch.optim.SGD", "an optimizer other than SGD")
    optimizer.pop("_partial_", None)
    scheduler = dict(hparams["lr_scheduler"]["scheduler"])
    _require(scheduler.pop("_target_") == "sesemi.PolynomialLR", "an LR schedule")
    _require(hparams["lr_scheduler"].get("interval", "step") == "step", "per-epoch LR steps")
    _require(hparams["lr_scheduler"].get("frequency", 1) == 1, "an LR step frequency")
    warmup_iters = scheduler.get("warmup_iters")
    if scheduler.get("warmup_epochs") is not None:
        warmup_iters = scheduler["warmup_epochs"] * scheduler["iters_per_epoch"]
    max_iters = int(scheduler["max_iters"])
    ema = model.get("ema")
    views = train["unlabeled"]["dataset"]["image_transform"]
    _require(
        views["_target_"] == "sesemi.transforms.MultiView" and len(views["views"]) == 2,
        "the unlabeled loader's transform is not MultiView([weak, strong])",
    )
    algorithm, imb_algorithm = USB_ALGORITHMS.get(method, (method, None))
    spec = {
        "method": method,
        "algorithm": algorithm,
        "imb_algorithm": imb_algorithm,
        # ABC's unlabeled keep rate falls with epoch / epochs in USB, with step / total_steps in
        # sesemi: an epoch of one step makes them the same.
        "usb_epochs": abc["total_steps"] if abc else 1,
        "abc": abc,
        "imbalance": args.imbalance,
        "seed": seed,
        "steps": args.steps,
        "threads": args.threads,
        "repo": str(REPO),
        "data_root": str(root),
        "labeled_subsets": labeled["subsets"],
        "unlabeled_subsets": unlabeled["subsets"],
        "val_subsets": val["subsets"],
        "num_classes": known.num_classes,
        "image_size": data.get("image_size"),
        "backbone": backbone,
        "loaders": {"labeled": labeled, "unlabeled": unlabeled, "val": val, "uratio": uratio},
        "optimizer": optimizer,
        "lr_schedule": {
            "warmup_iters": min(int(warmup_iters or 0), max_iters),
            "warmup_lr": float(scheduler.get("warmup_lr", 0.0)),
            "lr_pow": float(scheduler.get("lr_pow", 0.5)),
            "max_iters": max_iters,
        },
        "threshold": float(threshold),
        "flexmatch_warmup": flexmatch_warmup,
        "temperature": 1.0,
        "lambda_u": float(term.get("scale_factor", 1.0)),
        "use_cat": joint == "all",
        "sesemi_ema": ema.get("decay") if ema else None,
        "ema_m": args.ema,
        "transforms": {
            "labeled": train["supervised"]["dataset"]["image_transform"],
            "weak": views["views"][0],
            "strong": views["views"][1],
            "eval": data["val"]["dataset"]["image_transform"],
        },
        "usb_strong": args.usb_strong,
        "sampler": args.usb_sampler,
    }
    if daso:  # only DASO's specs carry the key (the other methods' specs stay as they were)
        spec["daso"] = daso
    return spec


def thread_env(threads: int) -> dict:
    """The environment of a run: its thread count, unbuffered output."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "OMP_WAIT_POLICY": "PASSIVE"}
    env["PYTHONUNBUFFERED"] = "1"
    return env


def per_class_recalls(run: pathlib.Path) -> list[float] | None:
    """A sesemi run's val recall per class (`val_per_class_accuracy.csv`, in class order)."""
    path = run / "val_per_class_accuracy.csv"
    if not path.is_file():
        return None
    with open(path, newline="") as f:
        rows = {row["class"]: float(row["accuracy"]) for row in csv.DictReader(f)}
    return [rows[name] for name in sorted(rows)]  # ImageFolder's class order (sorted names)


def run_sesemi(method: str, seed: int, split_seed: int, args: argparse.Namespace) -> dict:
    """One sesemi run; returns its val top-1 (final, EMA or None), per-class recalls and wall
    seconds."""
    root = data_root(args, split_seed)
    parent = args.workdir / "runs" / f"{data_tag(args)}_{method}_s{seed}"
    before = set(parent.glob("*")) if parent.is_dir() else set()
    command = [
        sys.executable,
        *("-m", "sesemi", "-cn", "demo"),
        *sesemi_overrides(method, seed, split_seed, args, root),
    ]
    log = args.workdir / "logs" / f"sesemi_{data_tag(args)}_{method}_s{seed}.log"
    log.write_text("")
    start = time.time()
    status = run_logged(command, log, thread_env(args.threads))
    seconds = time.time() - start
    new = sorted(set(parent.glob("*")) - before) if parent.is_dir() else []
    summaries = [d / "summary.json" for d in new if (d / "summary.json").is_file()]
    if status != 0 or len(summaries) != 1:
        raise RuntimeError(f"sesemi {method} seed {seed} failed (exit {status}); {tail(log)}")
    metrics = json.loads(summaries[0].read_text())["metrics"]
    shutil.rmtree(summaries[0].parent / "checkpoints", ignore_errors=True)
    if "val/top1" not in metrics:
        raise RuntimeError(f"{summaries[0]} has no val/top1; {tail(log)}")
    recalls = per_class_recalls(summaries[0].parent)
    if args.imbalance is not None and recalls is None:
        raise RuntimeError(f"{summaries[0].parent} has no val_per_class_accuracy.csv")
    return {
        "top1": metrics["val/top1"],
        "ema_top1": metrics.get("val/ema/top1"),
        "recalls": recalls,
        "ema_recalls": None,
        "seconds": seconds,
        "log": str(log),
        "command": command,
    }


def run_usb(
    python: pathlib.Path, method: str, seed: int, split_seed: int, args: argparse.Namespace
) -> dict:
    """One USB run in its own environment; returns its val top-1 and per-class recalls (final,
    EMA) and wall seconds."""
    spec = usb_spec(method, seed, split_seed, args)
    folder = args.workdir / "usb_runs" / f"{data_tag(args)}_{method}_s{seed}"
    folder.mkdir(parents=True, exist_ok=True)
    result = folder / "result.json"
    result.unlink(missing_ok=True)
    spec.update(result=str(result), save_dir=str(folder))
    (folder / "spec.json").write_text(json.dumps(spec, indent=2) + "\n")
    command = [str(python), str(pathlib.Path(__file__).resolve()), "--usb-worker"]
    command.append(str(folder / "spec.json"))
    log = args.workdir / "logs" / f"usb_{data_tag(args)}_{method}_s{seed}.log"
    log.write_text("")
    start = time.time()
    status = run_logged(command, log, thread_env(args.threads))
    seconds = time.time() - start
    if status != 0 or not result.is_file():
        raise RuntimeError(f"USB {method} seed {seed} failed (exit {status}); {tail(log)}")
    return {**json.loads(result.read_text()), "seconds": seconds, "log": str(log), "spec": spec}


def percent(value: float | None) -> str:
    """A top-1 in percent, or "-"."""
    return "-" if value is None else f"{100 * value:.1f}"


def mean_std(values: list[float | None]) -> str:
    """`mean ± std` in percent over seeds (sample std, n-1; 0 for one seed), or "-"."""
    if not values or any(v is None for v in values):
        return "-"
    a = [100 * v for v in values]
    return f"{statistics.fmean(a):.1f} ± {statistics.stdev(a) if len(a) > 1 else 0.0:.1f}"


def balanced(recalls: list[float] | None) -> float | None:
    """Balanced accuracy: the mean per-class recall (None without recalls)."""
    return None if recalls is None else statistics.fmean(recalls)


def worst(recalls: list[float] | None) -> float | None:
    """The worst class's recall (None without recalls)."""
    return None if recalls is None else min(recalls)


def worst_class(recalls: list[float] | None) -> str:
    """`<recall> (<class>)` of the worst class, or "-"."""
    if recalls is None:
        return "-"
    c = min(range(len(recalls)), key=recalls.__getitem__)
    return f"{percent(recalls[c])} ({c})"


def run_summary(r: dict) -> str:
    """A run's scores for its progress line."""
    text = f"val top-1 {percent(r['top1'])} % (EMA {percent(r['ema_top1'])})"
    if r.get("recalls") is not None:
        text += (
            f", balanced {percent(balanced(r['recalls']))} %, worst class "
            f"{worst_class(r['recalls'])}"
        )
        if r.get("ema_recalls") is not None:
            text += f" (EMA balanced {percent(balanced(r['ema_recalls']))} %)"
    return text


def format_table(results: dict, args: argparse.Namespace) -> str:
    """One row per (library, method, seed), then each (library, method)'s mean ± std."""
    if args.imbalance is not None:
        return format_imbalance_table(results, args)
    head = ["library", "method", "seed", "val top-1 (final)", "val top-1 (EMA)", "s/step"]
    lines = ["| " + " | ".join(head) + " |", "|---|---|---:|---:|---:|---:|"]
    for (library, method), runs in results.items():
        for seed, r in runs.items():
            row = [library, METHOD_LABELS[method], str(seed), percent(r["top1"])]
            row += [percent(r["ema_top1"]), f"{r['seconds'] / args.steps:.2f}"]
            lines.append("| " + " | ".join(row) + " |")
    for (library, method), runs in results.items():
        values = list(runs.values())
        per_step = statistics.fmean(r["seconds"] / args.steps for r in values)
        row = [f"**{library}**", f"**{METHOD_LABELS[method]}**", "mean ± std"]
        row += [mean_std([r["top1"] for r in values]), mean_std([r["ema_top1"] for r in values])]
        lines.append("| " + " | ".join([*row, f"{per_step:.2f}"]) + " |")
    return "\n".join(lines)


def format_imbalance_table(results: dict, args: argparse.Namespace) -> str:
    """Long-tailed data: balanced accuracy and the worst class's recall per run (final weights,
    and USB's EMA weights), each (library, method)'s mean ± std, then every run's per-class
    recalls."""
    head = [
        "library",
        "method",
        "seed",
        "balanced acc. (final)",
        "worst class (final)",
        "balanced acc. (EMA)",
        "worst class (EMA)",
        "top-1 (final)",
        "s/step",
    ]
    lines = ["| " + " | ".join(head) + " |", "|---|---|---:|" + "---:|" * 6]
    for (library, method), runs in results.items():
        for seed, r in runs.items():
            row = [library, METHOD_LABELS[method], str(seed)]
            row += [percent(balanced(r["recalls"])), worst_class(r["recalls"])]
            row += [percent(balanced(r["ema_recalls"])), worst_class(r["ema_recalls"])]
            row += [percent(r["top1"]), f"{r['seconds'] / args.steps:.2f}"]
            lines.append("| " + " | ".join(row) + " |")
    for (library, method), runs in results.items():
        values = list(runs.values())
        per_step = statistics.fmean(r["seconds"] / args.steps for r in values)
        row = [f"**{library}**", f"**{METHOD_LABELS[method]}**", "mean ± std"]
        for key in ("recalls", "ema_recalls"):
            row += [mean_std([balanced(r[key]) for r in values])]
            row += [mean_std([worst(r[key]) for r in values])]
        row += [mean_std([r["top1"] for r in values]), f"{per_step:.2f}"]
        lines.append("| " + " | ".join(row) + " |")
    classes = max(len(r["recalls"]) for runs in results.values() for r in runs.values())
    lines += [
        "",
        "Val recall (%) per class (final weights; the classes' labeled images fall from 0 to "
        f"{classes - 1}):",
        "",
        "| library | method | seed | " + " | ".join(map(str, range(classes))) + " |",
        "|---|---|---:|" + "---:|" * classes,
    ]
    for (library, method), runs in results.items():
        for seed, r in runs.items():
            cells = [f"{100 * v:.0f}" for v in r["recalls"]]
            lines.append(f"| {library} | {METHOD_LABELS[method]} | {seed} | {' | '.join(cells)} |")
    return "\n".join(lines)


def unmatched_settings(args: argparse.Namespace, usb_record: dict | None) -> list[str]:
    """The settings the USB runs could not (or, by option, do not) share with sesemi's."""
    items = [
        "Random streams: same architecture, initialization scheme, data and augmentation "
        "recipes, but each library draws its own initial weights, data order and augmentation "
        "parameters from the seed (sesemi seeds each sample's augmentation by (seed, epoch, "
        "index, pass); the USB worker uses the global generators and one torch.Generator per "
        "loader).",
        "Forward passes per step: both run the labeled batch, the weak view (no gradient) and "
        "the strong view as separate passes (sesemi joint_forward=false, USB use_cat=False), but "
        "USB runs labeled, strong, weak and sesemi labeled, weak, strong: the BatchNorm running "
        "statistics (used at evaluation) see the batches in another order.",
        "EMA: USB's EMA (ema_m) averages the parameters only (the EMA model is evaluated with "
        "the live BatchNorm statistics) and starts from the initial weights; sesemi's EMA teacher "
        "(only with --sesemi-ema) averages parameters and BatchNorm buffers, its first update "
        "copies the student. In USB ema_m changes evaluation only (pseudo-labels come from the "
        f"model itself), so the USB runs use ema_m={args.ema} and report both top-1s.",
        "Time per step: sesemi's includes Lightning (logging every 10 steps, last.ckpt and the "
        "best checkpoint written at the end); the USB worker writes no checkpoints (its "
        "Evaluation/Checkpoint hooks are removed: they call .cuda()), logs every 10 steps and "
        "copies the EMA into its ema_model every step (USB's EMAHook). Both include Python start "
        "and imports (Hydra + Lightning vs semilearn).",
        "USB on the CPU needed patches (no CUDA calls in the training step itself): the worker "
        "replaces process_batch (USB's moves batches with .cuda()), removes TimerHook (CUDA "
        "events), EvaluationHook and CheckpointHook, and scores the val set itself (final "
        "weights, then ema.apply_shadow() as USB's evaluate does); the optimizer and scheduler "
        "USB builds are replaced by sesemi's (SGD with weight decay on every parameter: USB's "
        "get_optimizer exempts biases and BatchNorm; the polynomial LR with warm-up, "
        "sesemi.schedulers.lr.polynomial_lr in a LambdaLR: USB has a cosine schedule only).",
    ]
    if args.usb_strong == "usb":
        items.append(
            "Strong view (--usb-strong usb): USB's RandAugment(3, 5) on sesemi's crop: 3 ops "
            "(sesemi: 2, the paper's), geometric ops fill black (sesemi: the mean colour), cutout "
            "drawn in PIL with colour (125, 123, 114) before normalization (sesemi: after "
            "normalization, the mean colour), cutout skipped at size 0."
        )
    else:
        items.append(
            "Strong view: USB's BasicDataset takes sesemi's transforms, so both run sesemi's "
            "code (FixMatch's RandAugment, 2 ops, then the square cutout); USB's own recipe, "
            "RandAugment(3, 5) with 3 ops, black fill and a PIL cutout, is --usb-strong usb."
        )
    if args.usb_sampler == "usb":
        items.append(
            "Batches (--usb-sampler usb): USB's RandomSampler fills every labeled batch (32) "
            "by repeating the labeled set, as sesemi's data.train.supervised.full_batches=true "
            "does, and seeds its shuffling with the epoch (0), not the run's "
            "seed: the data order is the same for every seed."
        )
    else:
        items.append(
            "Batches (--usb-sampler sesemi): the USB runs draw sesemi's default batches "
            "(full_batches=false: shuffled passes, the labeled loader's short last batch kept, "
            "the unlabeled loader's dropped, all loaders restarted every epoch of the longest, "
            "Lightning's max_size_cycle); USB's own RandomSampler (labeled batches always full, "
            "shuffling seeded by the epoch, not the seed) is --usb-sampler usb."
        )
    items.append(
        "Models: the worker wraps USB's model and EMA model in torch.nn.DataParallel, as USB's "
        "send_model_cuda does with gpu=None (its ABC reaches its classifier through "
        "model.module); on the CPU DataParallel only calls the model."
    )
    if "abc" in args.methods:
        items += [
            "ABC in USB: imb_algorithm='abc' over algorithm='fixmatch', built as USB's "
            "get_imb_algorithm builds it (a class over both), abc_p_cutoff and abc_loss_ratio "
            "read from sesemi's ABC head. USB counts the labeled images per class (N_c, whole "
            "labeled set, as sesemi's class_counts) from dataset_dict['train_lb'].targets while "
            "it is built, so the worker hands it the datasets through set_dataset (USB builds "
            "dataset_dict from its own dataset names only); the loaders USB then builds from "
            "them are replaced as for the other methods.",
            "ABC's unlabeled keep rate: USB decays it by epoch, 1 - (epoch / epochs) (1 - N_min /"
            " N_c), sesemi by step, 1 - (step / total_steps) (...). The USB runs have epochs = "
            "steps (num_iter_per_epoch 1; the worker's loaders hand USB's epoch loop one batch "
            "per epoch from the batch stream a one-epoch run draws, with either sampler), "
            "so epoch = step and the decay is the same at every step (USB's own long-tailed "
            "configs use far fewer epochs than steps: a staircase).",
            "ABC evaluation: USB's ABC evaluate() predicts with the auxiliary classifier "
            "('logits_aux') of the EMA weights; the worker scores logits_aux of the final weights"
            " and of the EMA weights (both in the table); sesemi predicts with balanced_head, "
            "final weights.",
        ]
    if "daso" in args.methods:
        items += [
            "DASO in USB: imb_algorithm='daso' over algorithm='fixmatch', built as ABC is "
            "(a class over both); daso_queue_len, daso_T_proto, daso_T_dist, "
            "daso_assign_loss_ratio, daso_num_pl_dist_iter and daso_num_pretrain_iter read "
            "from sesemi's DASO head and term (queue_size, proto_temperature, dist_temperature, "
            "scale_factor, dist_period, int(pretrain_steps)), daso_with_dist_aware=True (so "
            "daso_interp_alpha is unused). USB's DASO runs on the CPU as it is: its extra "
            "labeled forward under ema.apply_shadow() and out_dict['feat'] work with the "
            "worker's model (which returns 'feat') and DataParallel wrapper.",
            "DASO mask: USB's FixMatch computes the mask (max p >= threshold) on the linear "
            "probabilities p before its DASO pseudo-labeling hook blends them, so it keeps the "
            "images the linear classifier is sure of, with the blended pseudo-label's class; "
            "sesemi thresholds the blended p' (as, its docstring says, the original DASO code "
            "does).",
            "DASO semantic pseudo-labels: USB computes the weak views' similarity softmax "
            "(probs_sim) in DASO.train_step after FixMatch's train_step has already made the "
            "pseudo-labels, so a step's blend uses the previous step's probs_sim: the "
            "similarities of the previous unlabeled batch's images (and the previous weights), "
            "row by row against this batch's linear probabilities. sesemi blends each image's "
            "own similarities of this step. "
            + (
                "The USB runs here (--usb-daso-similarities current) are patched to blend "
                "each image's own similarities of this step (patch_daso_current_similarities: "
                "the weak pass's features, kept by a forward hook, against USB's prototypes)."
                if args.usb_daso_similarities == "current"
                else "Not changed in the USB runs (USB as installed; --usb-daso-similarities "
                "current patches it)."
            ),
            "DASO prototype queues: USB fills them with the EMA model's features (ema_m "
            f"{args.ema}: its parameters, in training mode, so the labeled batch's own BatchNorm "
            "statistics and dropout) from an extra forward pass of the labeled batch each step, "
            "before the step's pseudo-labels; that extra pass also updates the BatchNorm running"
            " statistics used at evaluation. sesemi queues the student's features of its "
            "supervised pass, after the step's pseudo-labels. A class with an empty queue has "
            "a zero prototype (cosine 0) in USB, a far-below logit in sesemi (here every class "
            "is normally queued within the first steps, before pretraining ends: batches of "
            "32 of the labeled images).",
            "DASO start: USB adds the alignment loss from step num_pretrain_iter - 1 (its "
            "check is it + 1 < num_pretrain_iter) and blends from step num_pretrain_iter; "
            "sesemi starts both at step pretrain_steps (0-based steps).",
            "DASO first period: USB's pseudo-label distribution starts at all zeros, which "
            "its normalization turns into NaN (every blended pseudo-label class 0) from "
            "num_pretrain_iter until the first period of num_pl_dist_iter steps closes; USB's "
            "defaults (5120 and 100) never reach that, these runs do (pretraining shorter than "
            "a period). The worker's patch (patch_daso_first_period) makes USB's hook read the "
            "counts so far until then, sesemi's rule; from the first closed period on, both use "
            "the last period's counts.",
        ]
    if usb_record and usb_record.get("stubs"):
        items.append(
            "Stubbed in the USB process (imported by `import semilearn`, used only by its audio, "
            f"NLP, W&B, Aim and MedMNIST code): {', '.join(usb_record['stubs'])}."
        )
    if usb_record and usb_record.get("patched"):
        items.append(f"Patched for this torch: {', '.join(usb_record['patched'])}.")
    return items


def _transform(node: dict) -> str:
    """A short description of a sesemi.transforms recipe node (its defaults filled in)."""
    import sesemi.transforms

    recipe = getattr(sesemi.transforms, node["_target_"].rpartition(".")[2])
    values = {
        name: p.default
        for name, p in inspect.signature(recipe).parameters.items()
        if p.default is not inspect.Parameter.empty
    }
    values.update({k: v for k, v in node.items() if not k.startswith("_")})
    size = f"{values['input_h']}x{values['input_w']}"
    norm = f"normalize mean {values['norm_mean']} std {values['norm_std']}"
    if "scale" not in values:
        return f"resize + center crop {size} (crop_pct {values['crop_pct']}), {norm}"
    text = (
        f"RandomResizedCrop {size} scale {tuple(values['scale'])} ratio "
        f"{tuple(values['ratio'])} {values['interpolation']}, flip p {values['p_hflip']}"
    )
    if values.get("recipe") == "fixmatch":
        text += (
            f", FixMatch RandAugment ({values['num_ops']} ops, random magnitudes), square cutout"
            f" up to {values['cutout']} of the width"
        )
    elif "recipe" in values:
        text += f", timm {values['rand_augment']}, RandomErasing p {values['cutout_p']}"
    return f"{text}, {norm}"


def shared_settings(specs: dict[str, dict]) -> str:
    """What both libraries' runs share, from the USB specs of sesemi's configs (by method)."""
    spec = next(iter(specs.values()))
    backbone = ", ".join(f"{k} {v}" for k, v in spec["backbone"].items() if k != "name")
    loaders, optimizer, schedule = spec["loaders"], spec["optimizer"], spec["lr_schedule"]
    labeled = loaders["labeled"]
    thresholds = []
    for method, s in specs.items():
        text = f"{METHOD_LABELS[method]} threshold {s['threshold']}"
        if s["flexmatch_warmup"] is not None:
            warmup = "with" if s["flexmatch_warmup"] else "without"
            text += f" (class-wise, convex mapping, per-image status, {warmup} threshold warm-up)"
        if s["abc"]:
            abc = s["abc"]
            text += (
                f", plus ABC (a second linear classifier on the same backbone features, trained "
                f"on the FixMatch passes' features: labeled CE kept with probability N_min / N_c,"
                f" strong-view CE on the weak view's balanced prediction where it is at least "
                f"{abc['threshold']}, kept with probability 1 - (t / {abc['total_steps']}) "
                f"(1 - N_min / N_c) of its pseudo-label, t the 0-based step; weight "
                f"{abc['loss_ratio']}; evaluation predicts with it)"
            )
        if s.get("daso"):
            daso = s["daso"]
            text += (
                f", plus DASO (per class a queue of the last {daso['queue_size']} labeled "
                "features, prototypes = their means; the weak view's probabilities p, argmax k, "
                "blended with softmax(cos(z, prototypes) / "
                f"{daso['proto_temperature']}) with weight (m_k / max m)^(1 / "
                f"{daso['dist_temperature']}), m the pseudo-labels' class counts of the last "
                f"closed period of {daso['dist_period']} steps; alignment loss (soft CE of the "
                "strong view's similarity softmax to the weak view's, every unlabeled image) "
                f"weight {daso['loss_ratio']}; both after {daso['pretrain_steps']} pretraining "
                "steps; the linear classifier predicts)"
            )
        thresholds.append(text)
    transforms = spec["transforms"]
    unlabeled = loaders["unlabeled"]
    views = {name: _transform(transforms[name]) for name in ("weak", "strong", "eval")}
    if labeled.get("full"):
        batches = f"{labeled['batch_size']} (every batch full: full_batches, as USB's sampler)"
    elif labeled["size"] < labeled["batch_size"]:
        batches = f"{labeled['batch_size']} (all {labeled['size']} in one batch per step)"
    else:
        batches = f"{labeled['batch_size']} (drop_last {labeled['drop_last']})"
    weak = f"weak view: {views['weak']}"
    if transforms["labeled"] != transforms["weak"]:
        weak = f"labeled view: {_transform(transforms['labeled'])}; {weak}"
    return (
        f"timm {spec['backbone']['name']} (pretrained=False, num_classes=0, {backbone}) + a "
        f"linear classifier; {labeled['size']} labeled images, batches of {batches}, "
        f"{unlabeled['size']} "
        f"unlabeled images ({' + '.join(unlabeled['subsets'])}), batches of "
        f"{loaders['uratio']} x {labeled['batch_size']} (drop_last {unlabeled['drop_last']}); "
        f"SGD {optimizer} on every parameter; LR warm-up {schedule['warmup_iters']} steps from "
        f"{schedule['warmup_lr']}, then polynomial decay (power {schedule['lr_pow']}) to 0 at "
        f"step {schedule['max_iters']}, stepped every step; {'; '.join(thresholds)}; lambda_u "
        f"{spec['lambda_u']}; hard pseudo-labels, temperature {spec['temperature']}; unlabeled "
        "loss = mean over the unlabeled batch of mask x CE; labeled loss = mean CE; "
        f"{weak}; strong view (sesemi): {views['strong']}; eval: {views['eval']}"
    )


def footer(
    argv: list[str],
    args: argparse.Namespace,
    usb_record: dict | None,
    setup_seconds: float,
    wall: float,
    loads: tuple,
    specs: dict[str, dict],
) -> str:
    """Command, date, machine, versions, settings and what could not be matched."""
    versions = []
    for name in SESEMI_VERSIONS:
        try:
            versions.append(f"{name} {importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            pass
    split = "the run's seed" if args.split_seed is None else str(args.split_seed)
    lines = [
        f"- command: `{shlex.join(['python', os.path.relpath(sys.argv[0]), *argv])}`",
        f"- date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}",
        f"- machine: {platform.machine()}, {os.cpu_count()} CPUs, "
        f"{platform.platform()}; OMP_NUM_THREADS={args.threads} (torch.set_num_threads in the USB "
        f"worker), OMP_WAIT_POLICY=PASSIVE, DataLoader workers 0, one run at a time; load average"
        f" {loads[0]:.1f} at the start, {loads[1]:.1f} at the end",
        f"- sesemi environment: {', '.join(versions)}, Python {platform.python_version()}",
    ]
    if usb_record:
        usb = ", ".join(f"{k} {v}" for k, v in usb_record["versions"].items() if v)
        setup = f"{setup_seconds:.0f} s now" if setup_seconds else "reused"
        first = usb_record.get("setup_seconds")
        lines.append(
            f"- USB environment ({args.workdir / 'usb_venv'}, set-up {setup}"
            + (f"; {first:.0f} s when created" if first else "")
            + f"): {usb}; installed: {', '.join(usb_record.get('packages', []))}"
        )
    if args.imbalance is None:
        data = (
            f"- data: digits, {args.labels} labeled image(s) per class, split seed = {split} "
            "(sesemi.datasets.digits.prepare_digits; both libraries read the same PNG folders); "
            "unlabeled = train + unlabeled images (USB's include_lb_to_ulb); val = the 30% "
            "stratified val split"
        )
        metric = "top-1 (%) on the val split"
    else:
        counts = args.split_counts
        data = (
            f"- data: long-tailed digits, imbalance ratio {args.imbalance:g}, made as "
            "benchmarks/realworld_digits.py's imbalance scenario makes them (its build_imbalanced"
            f" and long_tail_counts): from the split of {args.labels} labeled images per class "
            f"(prepare_digits, split seed = {split}), class c keeps round(largest x "
            f"{args.imbalance:g}^(-c/9)) of the labeled and of the unlabeled images, drawn with "
            f"the split seed; per class 0..9 labeled {counts['labeled']}, unlabeled "
            f"{counts['unlabeled']} (split seed {args.split_counts_seed}); the demo's unlabeled "
            "loader reads train + unlabeled (USB's include_lb_to_ulb); val = the balanced 30% "
            "stratified val split; both libraries read the same PNG folders"
        )
        metric = (
            "balanced accuracy (the mean per-class recall, %) and the worst class's recall (%, "
            "its digit in brackets) on the val split, top-1 beside them"
        )
    lines += [
        data,
        f"- settings shared (read from sesemi's composed demo config): {shared_settings(specs)}",
        f"- budget: {args.steps} steps per run; metric: {metric} after the last"
        " step (final weights; EMA weights where evaluated: USB always, sesemi with --sesemi-ema"
        f"); mean ± sample std (n-1) over seeds {', '.join(map(str, args.seeds))}",
        "- s/step: the run's whole process wall time / steps (without the USB environment's "
        "set-up and the data preparation)",
        f"- total wall time: {wall / 60:.1f} min",
        "",
        "Settings that could not be matched (or differ by option):",
        "",
        *[f"- {item}" for item in unmatched_settings(args, usb_record)],
    ]
    return "\n".join(lines)


def parse_args(argv: list[str]) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--labels",
        type=int,
        default=None,
        help="labeled images per class (of the largest class with --imbalance); default 1, "
        "with --imbalance 10 (realworld_digits' imbalance scenario)",
    )
    parser.add_argument(
        "--imbalance",
        type=float,
        default=None,
        metavar="R",
        help="long-tailed labeled and unlabeled sets with imbalance ratio R, as "
        "realworld_digits.py's imbalance scenario (val stays balanced); reports balanced "
        "accuracy and the worst class's recall",
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=300, help="training steps of every run")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--libraries", nargs="+", choices=LIBRARIES, default=list(LIBRARIES))
    parser.add_argument("--workdir", default="/tmp/peer_usb", help="USB env, data, runs, logs")
    parser.add_argument("--out", default=None, help="also write the markdown report here")
    parser.add_argument("--threads", type=int, default=2, help="torch threads of every run")
    parser.add_argument(
        "--split-seed",
        type=int,
        default=None,
        help="the digits split's seed for every run (default: the run's seed)",
    )
    parser.add_argument(
        "--ema", type=float, default=0.999, help="USB's ema_m (evaluation only; USB's default)"
    )
    parser.add_argument(
        "--sesemi-ema",
        action="store_true",
        help="give sesemi the same evaluation-only EMA teacher (+learner.hparams.model.ema)",
    )
    parser.add_argument(
        "--usb-strong",
        choices=("sesemi", "usb"),
        default="sesemi",
        help="the USB runs' strong view: sesemi's transform (default) or USB's RandAugment(3, 5)",
    )
    parser.add_argument(
        "--usb-sampler",
        choices=("sesemi", "usb"),
        default=None,
        help="the USB runs' batches: USB's RandomSampler (labeled batches always full) or drawn "
        "as sesemi draws unfilled ones; default: as sesemi's config (its labeled loader's "
        "full_batches: false unless --set data.train.supervised.full_batches=true)",
    )
    parser.add_argument(
        "--usb-daso-similarities",
        choices=("previous", "current"),
        default="previous",
        help="DASO's semantic pseudo-labels in the USB runs: USB's, computed after the step's "
        "pseudo-labels, so a blend reads the previous step's (default), or the step's own",
    )
    parser.add_argument(
        "--set",
        nargs="+",
        default=[],
        metavar="OVERRIDE",
        help="Hydra overrides of sesemi's runs, which the USB runs mirror "
        "(e.g. data.train.supervised.full_batches=true)",
    )
    args = parser.parse_args(argv)
    if args.usb_sampler is None:
        import sesemi

        cfg = sesemi.compose("demo", ["method=fixmatch", *args.set])
        args.usb_sampler = "usb" if cfg.data.train.supervised.full_batches else "sesemi"
    args.methods = list(dict.fromkeys(args.methods))
    args.libraries = [lib for lib in LIBRARIES if lib in args.libraries]
    args.workdir = pathlib.Path(args.workdir).resolve()
    if args.labels is None:
        args.labels = 1 if args.imbalance is None else 10
    if args.imbalance is not None and args.imbalance < 1.0:
        parser.error("--imbalance must be at least 1")
    if args.steps < 1 or args.labels < 1 or args.threads < 1:
        parser.error("--steps, --labels and --threads must be at least 1")
    if not 0.0 <= args.ema < 1.0:
        parser.error("--ema must be in [0, 1)")
    return args


def main(argv: list[str] | None = None) -> int:
    """Runs the grid and prints (and optionally writes) the markdown report."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--usb-worker"] and len(argv) == 2:
        return usb_worker(pathlib.Path(argv[1]))
    if argv == ["--usb-check"]:
        return usb_check()
    args = parse_args(argv)
    from sesemi.datasets.digits import prepare_digits

    (args.workdir / "logs").mkdir(parents=True, exist_ok=True)
    start, load_start = time.time(), os.getloadavg()[0]
    results: dict = {(lib, m): {} for lib in args.libraries for m in args.methods}
    usb_record, setup_seconds, python = None, 0.0, None
    try:
        if "usb" in args.libraries:
            python, usb_record, setup_seconds = ensure_usb_venv(args.workdir)
        run_start = time.time()
        for seed in args.seeds:
            split_seed = seed if args.split_seed is None else args.split_seed
            root = prepare_digits(
                split_root(args.workdir, args.labels, split_seed),
                labels_per_class=args.labels,
                seed=split_seed,
            )
            if args.imbalance is not None:
                counts = long_tailed_split(
                    root, data_root(args, split_seed), split_seed, args.imbalance
                )
                root = data_root(args, split_seed)
                if seed == args.seeds[0]:
                    args.split_counts, args.split_counts_seed = counts, split_seed
                print(f"[data] {root}: labeled {counts['labeled']}, unlabeled "
                      f"{counts['unlabeled']} per class", flush=True)  # fmt: skip
            for method in args.methods:
                for library in args.libraries:
                    if library == "sesemi":
                        r = run_sesemi(method, seed, split_seed, args)
                    else:
                        r = run_usb(python, method, seed, split_seed, args)
                    results[(library, method)][seed] = r
                    print(
                        f"[{library} {method} seed {seed}] {run_summary(r)}, "
                        f"{r['seconds'] / args.steps:.2f} s/step; split {root.name}; log "
                        f"{r['log']}",
                        flush=True,
                    )
    except (RuntimeError, ValueError, FileExistsError) as error:
        print(f"peer_usb: {error}", file=sys.stderr)
        return 1
    print(f"runs took {(time.time() - run_start) / 60:.1f} min", flush=True)
    loads = (load_start, os.getloadavg()[0])
    split_seed = args.seeds[0] if args.split_seed is None else args.split_seed
    specs = {m: usb_spec(m, args.seeds[0], split_seed, args) for m in args.methods}
    if args.imbalance is None:
        title = f"val top-1 (%) on digits, {args.labels} label(s) per class, {args.steps} steps"
    else:
        title = (
            f"balanced val accuracy (%) on long-tailed digits (imbalance ratio "
            f"{args.imbalance:g}, {args.labels} labels for the largest class), {args.steps} steps"
        )
    report = (
        f"## sesemi vs USB (semilearn {USB_VERSION}): {title}\n\n"
        + format_table(results, args)
        + "\n\n"
        + footer(argv, args, usb_record, setup_seconds, time.time() - start, loads, specs)
        + "\n"
    )
    emit(report, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
