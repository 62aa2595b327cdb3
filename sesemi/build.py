"""Config to objects, in one place: the learner's parts, the learner, and the Trainer."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import pytorch_lightning as pl
from hydra.utils import get_class, instantiate
from pytorch_lightning.callbacks import Callback, ModelCheckpoint, ProgressBar
from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger

from sesemi.callbacks import LastCheckpoint, ValidateLastStep, progress_bar
from sesemi.devices import DevicePlan, warn_slow_cpu_precision
from sesemi.learners import SUPERVISED, Classifier, LRSchedulerSpec
from sesemi.schedulers.weight import WeightedTerm

EMA_KEYS = {"decay"}
KNN_KEYS = {"k", "temperature"}
DEBIAS_KEYS = {"pixel", "mean", "std"}


def _accepts(fn: Callable, name: str) -> bool:
    """Whether `fn` (a class or function) names a keyword argument `name` in its signature.

    `**kwargs` does not count: `nn.Module.__init__` takes them and refuses unknown ones.
    """
    try:
        parameters = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return False
    keyword = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return any(p.name == name and p.kind in keyword for p in parameters)


def build_loss(node: Mapping[str, Any]) -> Callable:
    """Builds a loss node; `reduction="none"` is passed when the callable accepts it, so the
    learner sees per-sample losses and owns reduction and weighting for every term alike."""
    target = get_class(node["_target_"]) if isinstance(node.get("_target_"), str) else None
    if target is not None and "reduction" not in node and _accepts(target, "reduction"):
        return instantiate(node, reduction="none")
    return instantiate(node)


def build_term(node: Mapping[str, Any]) -> WeightedTerm:
    """A term's weighting from a `LossCallableConfig` / `LossHeadConfig`-shaped node."""
    scheduler = node.get("scheduler")
    return WeightedTerm(
        node.get("reduction", "mean"),
        node.get("scale_factor", 1.0),
        instantiate(scheduler) if scheduler is not None else None,
    )


def _checked_keys(node: Mapping[str, Any] | None, known: set[str], where: str) -> dict | None:
    if node is None:
        return None
    unknown = set(node) - known
    if unknown:
        raise ValueError(
            f"{where} has unknown key(s) {sorted(unknown)}; known: {', '.join(sorted(known))}"
        )
    return dict(node)


def ema_decay(model: Mapping[str, Any]) -> float | None:
    """The EMA teacher's decay from `model.ema` (`{decay: ...}`), or None without a teacher."""
    ema = _checked_keys(model.get("ema"), EMA_KEYS, "learner.hparams.model.ema")
    if ema is None:
        return None
    return float(ema.get("decay", 0.999))


def reference_image(model: Mapping[str, Any]) -> list[float] | None:
    """CDMAD's reference image from `model.debias_logits` (`{pixel, mean, std}`): its normalized
    value per channel, `(pixel - mean_c) / std_c`, or None without debiasing."""
    where = "learner.hparams.model.debias_logits"
    node = model.get("debias_logits")
    if node is not None and not isinstance(node, Mapping):
        raise ValueError(
            f"{where} must be null or {{pixel, mean, std}} (method=cdmad sets it), got {node!r}"
        )
    node = _checked_keys(node, DEBIAS_KEYS, where)
    if node is None:
        return None
    pixel, mean, std = node.get("pixel", 0.0), node.get("mean"), node.get("std")
    if not 0.0 <= float(pixel) <= 1.0:
        raise ValueError(f"{where}.pixel must be in [0, 1] (0 black, 1 white), got {pixel}")
    if not mean or not std or len(mean) != len(std) or min(map(float, std)) <= 0:
        raise ValueError(
            f"{where} needs the input normalization's mean and std, one positive std per "
            f"channel (e.g. mean: ${{data.norm_mean}}, std: ${{data.norm_std}}), got mean {mean} "
            f"and std {std}"
        )
    return [(float(pixel) - float(m)) / float(s) for m, s in zip(mean, std, strict=True)]


def knn_options(hparams: Mapping[str, Any]) -> dict[str, Any] | None:
    """The kNN evaluation options from `hparams.knn` (`{k, temperature}`), or None."""
    return _checked_keys(hparams.get("knn"), KNN_KEYS, "learner.hparams.knn")


def lr_scheduler_spec(node: Mapping[str, Any] | None) -> LRSchedulerSpec | None:
    """The LR scheduler factory and stepping options from an `LRSchedulerConfig` node."""
    if not node or node.get("scheduler") is None:
        return None
    factory = instantiate(node["scheduler"], _partial_=True)
    return LRSchedulerSpec(
        factory=lambda optimizer: factory(optimizer=optimizer),
        interval=node.get("interval", "step"),
        frequency=node.get("frequency", 1),
        monitor=node.get("monitor"),
    )


def build_classifier(
    hparams: Mapping[str, Any],
    dataset_sizes: Mapping[str, int] | None = None,
    cls: type[Classifier] = Classifier,
    class_counts: Mapping[str, Sequence[int]] | None = None,
) -> Classifier:
    """Builds a `Classifier` from resolved `ClassifierHParams`: backbone, losses, heads and
    their weights, EMA, optimizer and scheduler factories, handed to the learner built.

    Args:
        hparams: Plain, resolved `learner.hparams`.
        dataset_sizes: `data.train` loader name -> dataset length (for heads that need it).
        cls: The class to build (`Classifier` or a subclass with the same constructor).
        class_counts: `data.train` loader name -> images per class (for heads that need it).
    """
    model = hparams["model"]
    heads, weights = {}, {SUPERVISED: build_term(model["supervised_loss"])}
    for name, node in (model.get("regularization_loss_heads") or {}).items():
        if node is None:  # switched off, e.g. regularization_loss_heads.rotation_prediction=null
            continue
        heads[name] = instantiate(node["head"])
        weights[name] = build_term(node)
    optimizer = instantiate(hparams["optimizer"], _partial_=True)
    if not callable(optimizer):
        raise TypeError("learner.hparams.optimizer must name an optimizer class (_target_)")
    return cls(
        backbone=instantiate(model["backbone"]),
        num_classes=int(hparams["num_classes"]),
        optimizer=optimizer,
        supervised_loss=build_loss(model["supervised_loss"]["callable"]),
        heads=heads,
        weights=weights,
        lr_scheduler=lr_scheduler_spec(hparams.get("lr_scheduler")),
        ema_decay=ema_decay(model),
        reference_image=reference_image(model),
        balanced_head=bool(model.get("balanced_head") or False),
        input_normalization=hparams.get("input_normalization"),
        channels_last=bool(hparams.get("channels_last", False)),
        compile=hparams.get("compile") or False,
        dataset_sizes=dataset_sizes,
        class_counts=class_counts,
        config=hparams,
    )


def build_learner(
    learner: Mapping[str, Any],
    dataset_sizes: Mapping[str, int] | None = None,
    class_counts: Mapping[str, Sequence[int]] | None = None,
) -> pl.LightningModule:
    """Builds the learner of a resolved `learner` node.

    A `Classifier` (or subclass) target is assembled from its hyperparameters by
    `build_classifier`; any other target (your own LightningModule) is instantiated with the
    node's other keys, as Hydra would.
    """
    target = get_class(learner["_target_"])
    if isinstance(target, type) and issubclass(target, Classifier):
        return build_classifier(learner["hparams"], dataset_sizes, target, class_counts)
    return instantiate(dict(learner), _recursive_=False)


def _callbacks(trainer_cfg: dict[str, Any], checkpoint_dir: str, monitor: str | None) -> list:
    callbacks = [instantiate(c) for c in trainer_cfg.pop("callbacks", None) or []]
    checkpoints = [c for c in callbacks if isinstance(c, ModelCheckpoint)]
    if not checkpoints:
        checkpoints = [ModelCheckpoint(monitor=monitor, mode="max")]
        callbacks += checkpoints
    for c in checkpoints:
        if c.dirpath is None:
            c.dirpath = checkpoint_dir
        # LastCheckpoint owns last.ckpt: Lightning's save_last goes stale between improvements.
        c.save_last = False
    return [*callbacks, LastCheckpoint(checkpoints[0].dirpath)]


def _loggers(trainer_cfg: dict[str, Any], run_dir: str) -> Any:
    if "logger" in trainer_cfg:
        node = trainer_cfg.pop("logger")
        if isinstance(node, (list, tuple)):
            return [instantiate(n) for n in node]
        return instantiate(node) if isinstance(node, dict) else node
    return [
        TensorBoardLogger(run_dir, name="", version="", default_hp_metric=False),
        CSVLogger(run_dir, name="", version=""),
    ]


def build_trainer(
    trainer_cfg: Mapping[str, Any] | None,
    run: Mapping[str, Any],
    plan: DevicePlan,
    run_dir: str,
    monitor: str | None,
    steps_per_epoch: int | None,
    extra_callbacks: list[Callback] = (),
) -> pl.Trainer:
    """Builds the Trainer from the run options plus the free-form `trainer:` section (which wins).

    Args:
        trainer_cfg: The resolved `trainer` node (Trainer arguments; `callbacks` and `logger`
            entries are instantiated).
        run: The resolved `run` node (its length: num_epochs or num_iterations).
        plan: The devices and strategy.
        run_dir: Where logs and checkpoints go.
        monitor: The metric the default checkpoint callback follows (None: the last).
        steps_per_epoch: Optimizer steps per epoch, to log short epochs' curves too.
        extra_callbacks: Callbacks of ours to add (kNN evaluation, reports).
    """
    trainer_cfg = dict(trainer_cfg or {})
    callbacks = _callbacks(trainer_cfg, f"{run_dir}/checkpoints", monitor)
    kwargs: dict[str, Any] = {
        **plan.trainer_kwargs(),
        "default_root_dir": run_dir,
        "logger": _loggers(trainer_cfg, run_dir),
        "callbacks": [*callbacks, *extra_callbacks],
        # Short epochs still log their training curves.
        "log_every_n_steps": max(1, min(10, steps_per_epoch or 10)),
    }
    if run.get("num_epochs") is not None:
        kwargs["max_epochs"] = run["num_epochs"]
    elif run.get("num_iterations") is not None:
        kwargs.update(max_epochs=-1, max_steps=run["num_iterations"])
        kwargs["callbacks"].append(ValidateLastStep())
    kwargs.update(trainer_cfg)
    if kwargs.get("enable_progress_bar", True) is not False and not any(
        isinstance(c, ProgressBar) for c in kwargs["callbacks"]
    ):
        kwargs["callbacks"].append(progress_bar())
    warn_slow_cpu_precision(plan, kwargs.get("precision"))
    return pl.Trainer(**kwargs)
