"""Runs a composed config: check, build data and learner, fit / validate / test, summarize."""

from __future__ import annotations

import glob
import logging
import os
import time
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import pytorch_lightning as pl
import torch
from hydra.utils import instantiate, to_absolute_path
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger

from sesemi.callbacks import LastCheckpoint
from sesemi.config.resolvers import SESEMIConfigAttributes, set_attributes
from sesemi.config.structs import RunMode
from sesemi.data import SESEMIDataModule
from sesemi.devices import DevicePlan, plan_devices, warn_slow_cpu_precision
from sesemi.evaluation import write_confusion_report
from sesemi.inference import preprocessing_from_transform

log = logging.getLogger(__name__)


@dataclass
class RunResult:
    """What a run produced, for the summary and for callers."""

    mode: RunMode
    run_dir: str
    metrics: dict[str, float] = field(default_factory=dict)
    best_checkpoint: str | None = None
    last_checkpoint: str | None = None
    seconds: float = 0.0
    reports: list[str] = field(default_factory=list)


def missing_keys(node: Any, prefix: str = "") -> list[str]:
    """Dotted paths of values left `???` (read without resolving any interpolation)."""
    if isinstance(node, dict):
        items = node.items()
    elif isinstance(node, list):
        items = enumerate(node)
    else:
        return [prefix] if node == "???" else []
    return [m for k, v in items for m in missing_keys(v, f"{prefix}.{k}" if prefix else str(k))]


def check_run_config(run: DictConfig) -> RunMode:
    """Checks run options that must agree with each other; returns the mode."""
    mode = RunMode[run.mode] if isinstance(run.mode, str) else run.mode
    if run.num_epochs is not None and run.num_iterations is not None:
        raise ValueError("set run.num_epochs or run.num_iterations, not both")
    if mode == RunMode.FIT and run.num_epochs is None and run.num_iterations is None:
        raise ValueError("training needs a length: set run.num_epochs or run.num_iterations")
    for key in ("num_epochs", "num_iterations"):
        if run[key] is not None and run[key] < 1:
            raise ValueError(f"run.{key} must be at least 1, got {run[key]}")
    return mode


def check_classes(data: SESEMIDataModule, num_classes: int) -> None:
    """Checks that labeled loaders agree with each other and with `num_classes`."""
    labeled = [
        (s.where, s.dataset.classes) for s in data.specs() if getattr(s.dataset, "classes", None)
    ]
    for where, classes in labeled:
        if len(classes) != num_classes:
            raise ValueError(
                f"learner.hparams.num_classes={num_classes} but {where} has {len(classes)} "
                f"classes ({', '.join(classes[:10])}{', ...' if len(classes) > 10 else ''}); "
                f"set learner.hparams.num_classes={len(classes)}"
            )
    for where, classes in labeled[1:]:
        if classes != labeled[0][1]:
            diff = sorted(set(classes) ^ set(labeled[0][1]))
            raise ValueError(
                f"{where} and {labeled[0][0]} have different classes (differing: "
                f"{', '.join(diff)}); give them the same class folders"
            )


def check_head_inputs(cfg: DictConfig, data: SESEMIDataModule) -> None:
    """Checks that every loss head reads a configured training loader."""
    heads = cfg.learner.hparams.model.get("regularization_loss_heads") or {}
    for name, node in heads.items():
        wanted = node.head.get("input_data") if node is not None else None
        if wanted is not None and wanted not in data.train:
            raise ValueError(
                f"regularization_loss_heads.{name} reads data.train.{wanted}, which is not "
                f"configured (loaders: {', '.join(data.train) or 'none'}); add that loader or "
                f"switch the head off: learner.hparams.model.regularization_loss_heads.{name}=null"
            )


def class_names(data: SESEMIDataModule) -> list[str] | None:
    """The labeled data's class names: of the supervised loader, else of val or test."""
    for spec in [data.train.get("supervised"), data.val, data.test]:
        classes = getattr(spec.dataset, "classes", None) if spec is not None else None
        if classes:
            return list(classes)
    return None


def eval_preprocessing(
    data: DictConfig, normalization: Mapping[str, Any] | None = None
) -> dict[str, Any] | None:
    """The preprocessing a checkpoint records: the val (else test, else supervised) transform's.

    A transform with `uint8_output: true` leaves normalization to the learner, so the learner's
    `input_normalization` (`{mean, std}`) is recorded instead.
    """
    loaders = [data.get("val"), data.get("test"), (data.get("train") or {}).get("supervised")]
    for loader in loaders:
        node = loader.dataset.get("image_transform") if loader is not None else None
        if node is None:
            continue
        node = OmegaConf.to_container(node, resolve=True)
        found = preprocessing_from_transform(node)
        if found is None:
            continue
        if node.get("uint8_output") and normalization:
            found["norm_mean"] = list(normalization["mean"])
            found["norm_std"] = list(normalization["std"])
        return found
    return None


def check_fresh_run_dir(run_dir: str) -> None:
    """Refuses to write into a run directory that already holds checkpoints."""
    checkpoints = os.path.join(run_dir, "checkpoints")
    if os.path.isdir(checkpoints) and os.listdir(checkpoints):
        raise FileExistsError(
            f"'{checkpoints}' already holds checkpoints of another run; wait a second and "
            "launch again, or choose another run.id"
        )


def find_checkpoint(path: str, key: str, run: DictConfig) -> str:
    """Resolves a checkpoint option; "last" is the newest last.ckpt of this run id."""
    if path == "last":
        pattern = os.path.join(to_absolute_path(run.dir), run.id, "*", "checkpoints", "last.ckpt")
        found = sorted(glob.glob(pattern), key=os.path.getmtime)
        if not found:
            raise FileNotFoundError(f"run.{key}=last: no {pattern} exists yet")
        return found[-1]
    path = to_absolute_path(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"run.{key}: checkpoint '{path}' does not exist")
    if not zipfile.is_zipfile(path):  # torch.save writes zip archives
        raise ValueError(f"run.{key}: '{path}' is not a PyTorch checkpoint")
    return path


def load_pretrained_weights(model: torch.nn.Module, path: str) -> None:
    """Loads weights only (on the CPU), skipping tensors whose shapes differ, with a warning."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is the same user error
        raise ValueError(f"'{path}' is not a readable PyTorch checkpoint ({e})") from e
    state = checkpoint.get("state_dict", checkpoint) if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict):
        raise ValueError(f"'{path}' holds no state_dict")
    own = model.state_dict()
    skipped = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
    if skipped:
        log.warning("pretrained weights: skipping %s (shapes differ, e.g. class count)", skipped)
    state = {k: v for k, v in state.items() if k not in skipped}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        log.warning("pretrained weights: missing %s, unexpected %s", missing, unexpected)


def _callbacks(trainer_cfg: dict[str, Any], run_dir: str, monitor: str | None) -> list:
    callbacks = [instantiate(c) for c in trainer_cfg.pop("callbacks", None) or []]
    checkpoints = [c for c in callbacks if isinstance(c, ModelCheckpoint)]
    if not checkpoints:
        checkpoints = [ModelCheckpoint(monitor=monitor, mode="max")]
        callbacks += checkpoints
    for c in checkpoints:
        if c.dirpath is None:
            c.dirpath = os.path.join(run_dir, "checkpoints")
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
    cfg: DictConfig, plan: DevicePlan, run_dir: str, has_val: bool, steps_per_epoch: int | None
) -> tuple[pl.Trainer, list]:
    """Builds the Trainer from run options plus the free-form `trainer:` section (which wins)."""
    trainer_cfg = OmegaConf.to_container(cfg.trainer, resolve=True) if cfg.trainer else {}
    callbacks = _callbacks(trainer_cfg, run_dir, "val/top1" if has_val else None)
    kwargs: dict[str, Any] = {
        **plan.trainer_kwargs(),
        "default_root_dir": run_dir,
        "logger": _loggers(trainer_cfg, run_dir),
        "callbacks": callbacks,
        # Short epochs still log their training curves.
        "log_every_n_steps": max(1, min(10, steps_per_epoch or 10)),
    }
    if cfg.run.num_epochs is not None:
        kwargs["max_epochs"] = cfg.run.num_epochs
    elif cfg.run.num_iterations is not None:
        kwargs.update(max_epochs=-1, max_steps=cfg.run.num_iterations)
    kwargs.update(trainer_cfg)
    warn_slow_cpu_precision(plan, kwargs.get("precision"))
    return pl.Trainer(**kwargs), callbacks


def _attributes(
    cfg: DictConfig, data: SESEMIDataModule, plan: DevicePlan
) -> SESEMIConfigAttributes:
    attributes = SESEMIConfigAttributes(num_gpus=plan.num_gpus, num_nodes=plan.num_nodes)
    if data.train:
        accumulate = (cfg.trainer or {}).get("accumulate_grad_batches", 1) or 1
        for spec in data.train.values():
            if spec.batches_per_epoch(plan.world_size) == 0:
                raise ValueError(
                    f"{spec.where} gives 0 iterations per epoch: batch_size {spec.batch_size} "
                    f"is larger than its {len(spec.dataset)} images per process with drop_last; "
                    "lower the batch size or set drop_last: false"
                )
        per_epoch = data.iterations_per_epoch(plan.world_size, accumulate)
        attributes.iterations_per_epoch = per_epoch
        epochs, iterations = cfg.run.num_epochs, cfg.run.num_iterations
        attributes.max_iterations = iterations if iterations else (epochs or 0) * per_epoch
    return attributes


def run(cfg: DictConfig, run_dir: str) -> RunResult:
    """Runs the configured job and returns its result.

    Args:
        cfg: The composed `SESEMIConfig`.
        run_dir: Where outputs (logs, checkpoints) go.
    """
    start = time.time()
    missing = missing_keys(OmegaConf.to_container(cfg, resolve=False))
    if missing:
        raise ValueError(
            f"required field(s) left ??? : {', '.join(missing)}; set them in your config or on "
            "the command line (see open_sesemi -h)"
        )
    mode = check_run_config(cfg.run)
    if cfg.run.seed is not None:
        pl.seed_everything(cfg.run.seed, workers=True, verbose=False)
    cpu_devices = (cfg.trainer or {}).get("devices")
    plan = plan_devices(cfg.run.gpus, cfg.run.accelerator, cfg.run.num_nodes, cpu_devices)
    stages = {RunMode.FIT: ("train", "val"), RunMode.VALIDATE: ("val",), RunMode.TEST: ("test",)}
    data = SESEMIDataModule(
        cfg.data,
        cfg.run.data_root,
        cfg.run.batch_size_per_gpu,
        stages[mode],
        plan.loader_defaults(),
    )
    if mode == RunMode.FIT and "supervised" not in data.train:
        raise ValueError("data.train needs a 'supervised' loader of labeled images to train on")
    if mode != RunMode.FIT:
        stage = "val" if mode == RunMode.VALIDATE else "test"
        if getattr(data, stage) is None:
            raise ValueError(
                f"run.mode={mode.value} needs a data.{stage} loader; add one to the config "
                "(shaped like data.val, e.g. with subset: test)"
            )
        # Evaluation steps no optimizer, and its schedule may name training-only attributes.
        cfg.learner.hparams.lr_scheduler = None
    check_classes(data, cfg.learner.hparams.num_classes)
    if mode == RunMode.FIT:
        check_head_inputs(cfg, data)
    check_fresh_run_dir(run_dir)
    attributes = _attributes(cfg, data, plan)
    set_attributes(attributes)
    learner = instantiate(cfg.learner, _recursive_=False)
    if hasattr(learner, "set_metadata"):
        normalization = cfg.learner.get("hparams", {}).get("input_normalization")
        learner.set_metadata(class_names(data), eval_preprocessing(cfg.data, normalization))
    if getattr(learner, "knn", None) is not None:
        if "supervised" in data.train and data.val is not None:
            learner.knn_bank_loader = data.knn_bank_loader()
        else:  # VALIDATE / TEST build no training data to vote with
            log.info("kNN evaluation runs only in FIT with data.val; skipped")
    resume = cfg.run.resume_from_checkpoint
    ckpt_path = find_checkpoint(resume, "resume_from_checkpoint", cfg.run) if resume else None
    if cfg.run.pretrained_checkpoint_path:
        key = "pretrained_checkpoint_path"
        load_pretrained_weights(learner, find_checkpoint(cfg.run[key], key, cfg.run))
    trainer, callbacks = build_trainer(
        cfg, plan, run_dir, data.val is not None, attributes.iterations_per_epoch
    )
    if mode == RunMode.FIT:
        trainer.fit(learner, datamodule=data, ckpt_path=ckpt_path)
    elif mode == RunMode.VALIDATE:
        trainer.validate(learner, datamodule=data, ckpt_path=ckpt_path)
    else:
        trainer.test(learner, datamodule=data, ckpt_path=ckpt_path)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
    reports = []
    if trainer.is_global_zero:
        # FIT reports its last validation (the final weights, not the best checkpoint's).
        stage = "test" if mode == RunMode.TEST else "val"
        matrix = getattr(learner, "confusion_matrices", {}).get(stage)
        if matrix is not None:
            names = learner.class_names or [str(i) for i in range(matrix.shape[0])]
            reports = write_confusion_report(matrix, names, run_dir, stage)
    skipped = sum(getattr(spec.dataset, "skipped", 0) for spec in data.specs())
    if skipped:
        metrics["skipped_unreadable_images"] = float(skipped)
    checkpoint = next((c for c in callbacks if isinstance(c, ModelCheckpoint)), None)
    last = next(c for c in callbacks if isinstance(c, LastCheckpoint))
    return RunResult(
        mode=mode,
        run_dir=run_dir,
        metrics=metrics,
        best_checkpoint=(checkpoint.best_model_path or None) if checkpoint else None,
        last_checkpoint=last.path if os.path.isfile(last.path) else None,
        seconds=time.time() - start,
        reports=reports,
    )


def format_summary(result: RunResult, command: str = "open_sesemi") -> str:
    """A short end-of-run summary: metrics, where things are, time, and a next command."""
    m = result.metrics
    lines = [f"sesemi {result.mode.value} finished in {result.seconds:.0f}s"]
    keys = ("val/top1", "val/top1_best", "val/ema/top1", "val/knn/top1", "test/top1")
    for key in (*keys, "val/loss", "test/loss"):
        if key in m:
            lines.append(f"  {key:<14} {m[key]:.4f}")
    if "skipped_unreadable_images" in m:
        lines.append(f"  skipped        {int(m['skipped_unreadable_images'])} unreadable image(s)")
    lines.append(f"  outputs        {result.run_dir}")
    for report in result.reports:
        lines.append(f"  report         {report}")
    if result.best_checkpoint:
        lines.append(f"  best ckpt      {result.best_checkpoint}")
    if result.last_checkpoint:
        lines.append(f"  last ckpt      {result.last_checkpoint}")
    if result.mode == RunMode.FIT and (result.best_checkpoint or result.last_checkpoint):
        ckpt = result.best_checkpoint or result.last_checkpoint
        lines.append(f"  next: {command} run.mode=VALIDATE run.pretrained_checkpoint_path={ckpt}")
        lines.append(
            f"  predict: open_sesemi predict {ckpt} <images or folders> -o predictions.csv"
        )
    lines.append(f"  metrics: tensorboard --logdir {result.run_dir}  (or metrics.csv there)")
    return "\n".join(lines)
