"""Runs a composed config: check, build data and learner, fit / validate / test, summarize."""

from __future__ import annotations

import json
import logging
import os
import shlex
import shutil
import time
import warnings
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import pytorch_lightning as pl
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import ModelCheckpoint

from sesemi.build import build_learner, build_trainer, knn_options
from sesemi.callbacks import (
    CheckpointMetadata,
    ConfusionReport,
    DataEpoch,
    KNNEvaluation,
    LastCheckpoint,
)
from sesemi.checkpoints import (
    METADATA_KEY,
    find_checkpoint,
    load_pretrained_weights,
    read_checkpoint,
    state_mismatch,
)
from sesemi.compare import SUMMARY_NAME
from sesemi.config.resolvers import (
    FAILED_CLAIMS,
    SESEMIConfigAttributes,
    hydra_quoted,
    resolve,
)
from sesemi.config.structs import RunMode
from sesemi.data import LOADER_GROUPS, SESEMIDataModule
from sesemi.devices import DevicePlan, choose_channels_last, plan_devices
from sesemi.inference import preprocessing_from_transform
from sesemi.learners import UNTRAINED_BALANCED_HEAD, Classifier
from sesemi.threads import ThreadShare

log = logging.getLogger(__name__)


STAGES = {RunMode.FIT: ("train", "val"), RunMode.VALIDATE: ("val",), RunMode.TEST: ("test",)}


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

    def objective(self) -> float | None:
        """The value a sweep maximizes: the best val/top1, else val/top1, else test/top1."""
        for key in ("val/top1_best", "val/top1", "test/top1"):
            if key in self.metrics:
                return self.metrics[key]
        return None


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
    for key in ("num_epochs", "num_iterations", "num_nodes", "batch_size_per_gpu"):
        if run[key] is not None and run[key] < 1:
            raise ValueError(f"run.{key} must be at least 1, got {run[key]}")
    for key in ("pretrained_checkpoint_path", "resume_from_checkpoint"):
        if isinstance(run.get(key), str) and not run[key].strip():
            # An unset shell variable, say: never train afresh or score an untrained model.
            raise ValueError(f"run.{key} is empty: give a checkpoint file, or null for none")
    if mode != RunMode.FIT and not (run.pretrained_checkpoint_path or run.resume_from_checkpoint):
        log.warning(
            f"run.mode={mode.value} with no checkpoint: this evaluates the model as built "
            "(untrained unless its backbone is pretrained); set run.pretrained_checkpoint_path"
        )
    return mode


def _labeled(data: SESEMIDataModule) -> list[tuple[str, list[str]]]:
    return [(s.where, s.dataset.classes) for s in data.specs() if getattr(s.dataset, "classes", [])]


def check_class_lists(data: SESEMIDataModule) -> None:
    """Checks that the labeled loaders have the same class folders (before any count: a count
    is only worth fixing once the lists agree)."""
    labeled = _labeled(data)
    for where, classes in labeled[1:]:
        if classes != labeled[0][1]:
            only_first = sorted(set(labeled[0][1]) - set(classes))
            only_here = sorted(set(classes) - set(labeled[0][1]))
            parts = [f"only in {labeled[0][0]}: {', '.join(only_first)}" * bool(only_first)]
            parts += [f"only in {where}: {', '.join(only_here)}" * bool(only_here)]
            differ = "; ".join(p for p in parts if p) or "the same names in another order"
            raise ValueError(
                f"{where} and {labeled[0][0]} have different class folders ({differ}); give "
                "them the same class folders"
            )


def check_classes(data: SESEMIDataModule, num_classes: int) -> None:
    """Checks the labeled loaders' class lists, then that their count is `num_classes`."""
    check_class_lists(data)
    labeled = _labeled(data)
    if labeled and len(labeled[0][1]) != num_classes:
        where, classes = labeled[0]
        raise ValueError(
            f"learner.hparams.num_classes={num_classes} but {where} has {len(classes)} "
            f"classes ({', '.join(classes[:10])}{', ...' if len(classes) > 10 else ''}); "
            f"set learner.hparams.num_classes={len(classes)} (in the built-in configs: "
            f"data.num_classes={len(classes)}, or data.num_classes='${{sesemi:num_classes}}' "
            "to count the class folders)"
        )


def check_resumable(learner: pl.LightningModule, path: str, world_size: int | None = None) -> None:
    """Refuses, before training, a checkpoint whose weights do not fit the configured model, or
    one written by a run on another number of processes (`world_size`): its step count, LR
    schedule and each process's share of the data were laid out for that number, so resuming on
    another would not continue the same run."""
    checkpoint = read_checkpoint(path)
    state = checkpoint.get("state_dict")
    if not isinstance(state, Mapping):
        raise ValueError(f"'{path}' holds no state_dict to resume from")
    written_by = (checkpoint.get(METADATA_KEY) or {}).get("world_size")
    if world_size is not None and written_by is not None and int(written_by) != world_size:
        raise ValueError(
            f"'{path}' was written by a run on {written_by} process(es) and this run has "
            f"{world_size} (run.num_nodes x GPUs or trainer.devices): resume on {written_by}, or "
            f"start a new run from its weights with run.pretrained_checkpoint_path={path}"
        )
    resized, missing, unexpected = state_mismatch(learner.state_dict(), state)
    if missing or unexpected or resized:
        example = (resized or missing or unexpected)[0]
        raise ValueError(
            f"'{path}' was written by another model than this config builds ({len(resized)} "
            f"weights of another shape, {len(missing)} missing, {len(unexpected)} unexpected; "
            f"e.g. {example}); resume with the config that wrote it, or start from its weights "
            "with run.pretrained_checkpoint_path"
        )


def check_head_inputs(heads: Mapping[str, Any] | None, data: SESEMIDataModule) -> None:
    """Checks that every loss head names its class and reads a configured training loader."""
    for name, node in (heads or {}).items():
        if node is None:  # switched off
            continue
        head = node.get("head") or {}
        if "_target_" not in head:
            raise ValueError(
                f"regularization_loss_heads.{name}.head names no class; give it a _target_ "
                "(e.g. sesemi.models.heads.fixmatch.FixMatchLossHead)"
            )
        wanted = head.get("input_data")
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
    data: Mapping[str, Any], normalization: Mapping[str, Any] | None = None
) -> dict[str, Any] | None:
    """The preprocessing a checkpoint records: the val (else test, else supervised) transform's.

    A transform with `uint8_output: true` leaves normalization to the learner, so the learner's
    `input_normalization` (`{mean, std}`) is recorded instead.

    Args:
        data: The resolved loader groups (`train`, `val`, `test`).
        normalization: The learner's `input_normalization`.
    """
    loaders = [data.get("val"), data.get("test"), (data.get("train") or {}).get("supervised")]
    for loader in loaders:
        node = loader["dataset"].get("image_transform") if loader is not None else None
        found = preprocessing_from_transform(node) if isinstance(node, Mapping) else None
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


def _attributes(
    cfg: DictConfig, data: SESEMIDataModule, plan: DevicePlan
) -> SESEMIConfigAttributes:
    names = class_names(data)
    attributes = SESEMIConfigAttributes(
        num_gpus=plan.num_gpus,
        num_nodes=plan.num_nodes,
        num_classes=len(names) if names else None,
    )
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


def _drop_training_parts(learner: DictConfig) -> None:
    # Evaluation steps no optimizer and computes no training loss: the LR schedule and the loss
    # heads go (they may name training-only attributes such as ${sesemi:max_iterations}, or
    # need the training data's size, as FlexMatch's per-image state does, and VALIDATE and
    # TEST build no training data).
    hparams = learner.get("hparams")
    if hparams is None:
        return
    if "lr_scheduler" in hparams:
        hparams.lr_scheduler = None
    model = hparams.get("model")
    if model is not None and "regularization_loss_heads" in model:
        model.regularization_loss_heads = None


def build_data(cfg: DictConfig, mode: RunMode, plan: DevicePlan) -> SESEMIDataModule:
    """Prepares the data (`data.prepare`) and builds every dataset the mode needs."""
    known = SESEMIConfigAttributes(num_gpus=plan.num_gpus, num_nodes=plan.num_nodes)
    prepare = resolve(cfg.data.get("prepare"), known)
    if prepare is not None:
        instantiate(prepare)
    data = SESEMIDataModule(
        {group: resolve(cfg.data.get(group), known) for group in LOADER_GROUPS},
        cfg.run.data_root,
        cfg.run.batch_size_per_gpu,
        STAGES[mode],
        plan.loader_defaults(),
        plan.world_size,
        cfg.run.seed,
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
    return data


def _callbacks(
    learner: pl.LightningModule,
    loaders: Mapping[str, Any],
    hparams: Mapping[str, Any],
    data: SESEMIDataModule,
    run_dir: str,
    mode: RunMode,
) -> list:
    if not isinstance(learner, Classifier):
        return []
    names = class_names(data)
    preprocessing = eval_preprocessing(loaders, hparams.get("input_normalization"))
    callbacks: list = [
        CheckpointMetadata(names, preprocessing, data.hand_labeled_counts()),
        ConfusionReport(run_dir, names, learner.num_classes),
    ]
    knn = knn_options(hparams)
    if knn is not None:
        if mode == RunMode.FIT and "supervised" in data.train and data.val is not None:
            callbacks.append(KNNEvaluation(data.knn_bank_loader(), **knn))
        else:  # VALIDATE / TEST build no training data to vote with
            log.info("kNN evaluation runs only in FIT with data.val; skipped")
    return callbacks


def _not_an_advert(record: logging.LogRecord) -> bool:
    # Lightning's "💡 Tip: ... try installing litlogger / litmodels" lines, on every run.
    return not str(record.msg).startswith("💡 Tip:")


def quiet_known_warnings() -> None:
    """Silences warnings that say nothing to a sesemi user (by design, or third-party noise)."""
    rank_zero = logging.getLogger("pytorch_lightning.utilities.rank_zero")
    if _not_an_advert not in rank_zero.filters:
        rank_zero.addFilter(_not_an_advert)
    warnings.filterwarnings("ignore", message=r".*treespec, LeafSpec.*")
    # Lightning 2 counts the logging interval over the whole run, not per epoch: short epochs
    # (few labels) still log every log_every_n_steps steps.
    warnings.filterwarnings("ignore", message=r".*smaller than the logging interval.*")
    warnings.filterwarnings("ignore", message=r".*pin_memory.*no accelerator.*")
    warnings.filterwarnings("ignore", message=r".*'set_vital' is deprecated.*")  # torchdata
    # The model summary's size estimate under 16-bit precision (seen on a GPU with bf16-mixed).
    warnings.filterwarnings("ignore", message=r".*is not supported by the model summary.*")
    # The learner's on_after_batch_transfer (device normalization) is meant to be used.
    warnings.filterwarnings("ignore", message=r".*overridden `on_after_batch_transfer`.*")
    # The run directory is new; it holds only the run's config files, which the CSV logger keeps.
    warnings.filterwarnings(
        "ignore", message=r".*Experiment logs directory .* exists and is not empty.*"
    )


def run(cfg: DictConfig, run_dir: str) -> RunResult:
    """Runs the configured job and returns its result.

    Args:
        cfg: The composed `SESEMIConfig`.
        run_dir: Where outputs (logs, checkpoints) go.
    """
    start = time.time()
    quiet_known_warnings()
    if run_dir in FAILED_CLAIMS:  # Hydra got a stand-in folder: say why the real one failed
        shutil.rmtree(run_dir, ignore_errors=True)  # it holds only Hydra's copy of the config
        raise FileExistsError(FAILED_CLAIMS[run_dir])
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
    data = build_data(cfg, mode, plan)
    check_class_lists(data)
    attributes = _attributes(cfg, data, plan)
    if mode != RunMode.FIT:
        _drop_training_parts(cfg.learner)
    learner_cfg = resolve(cfg.learner, attributes)
    hparams = learner_cfg.get("hparams") or {}
    if "hparams" in learner_cfg:
        hparams["channels_last"] = choose_channels_last(
            hparams.get("channels_last"),
            plan,
            (cfg.trainer or {}).get("precision"),
            hparams.get("compile"),
        )
    if hparams.get("num_classes") is not None:
        check_classes(data, int(hparams["num_classes"]))
    if mode == RunMode.FIT:
        model = hparams.get("model", {})
        heads = model.get("regularization_loss_heads") or {}
        check_head_inputs(heads, data)
        if model.get("balanced_head") and not any(heads.values()):
            raise ValueError(UNTRAINED_BALANCED_HEAD)
    check_fresh_run_dir(run_dir)
    learner = build_learner(learner_cfg, data.dataset_sizes(), data.class_counts())
    loaders = {group: resolve(cfg.data.get(group), attributes) for group in LOADER_GROUPS}
    callbacks = [
        DataEpoch(data),
        ThreadShare(cfg.run.threads),
        *_callbacks(learner, loaders, hparams, data, run_dir, mode),
    ]
    resume = cfg.run.resume_from_checkpoint
    ckpt_path = None
    weights = ("pretrained_checkpoint_path", cfg.run.pretrained_checkpoint_path)
    if resume and mode == RunMode.FIT:
        ckpt_path = find_checkpoint(resume, "resume_from_checkpoint", cfg.run.dir, cfg.run.id)
        # Data only; the weights must fit the model and the run its number of processes.
        check_resumable(learner, ckpt_path, plan.world_size)
    elif resume and not weights[1]:  # evaluation continues nothing: it reads the weights
        weights = ("resume_from_checkpoint", resume)
    if weights[1]:
        path = find_checkpoint(weights[1], weights[0], cfg.run.dir, cfg.run.id)
        # Evaluating weights that do not fit the model would score an untrained part of it.
        load_pretrained_weights(learner, path, evaluation=mode != RunMode.FIT)
    trainer = build_trainer(
        resolve(cfg.trainer, attributes),
        resolve(cfg.run, attributes),
        plan,
        run_dir,
        "val/top1" if data.val is not None else None,
        attributes.iterations_per_epoch,
        callbacks,
    )
    # Checkpoints are read as data (weights_only) whatever TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD says.
    if mode == RunMode.FIT:
        trainer.fit(learner, datamodule=data, ckpt_path=ckpt_path, weights_only=True)
    elif mode == RunMode.VALIDATE:
        trainer.validate(learner, datamodule=data, ckpt_path=ckpt_path, weights_only=True)
    else:
        trainer.test(learner, datamodule=data, ckpt_path=ckpt_path, weights_only=True)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
    skipped = sum(getattr(spec.dataset, "skipped", 0) for spec in data.specs())
    if skipped:
        metrics["skipped_unreadable_images"] = float(skipped)
    checkpoint = next((c for c in trainer.callbacks if isinstance(c, ModelCheckpoint)), None)
    last = next(c for c in trainer.callbacks if isinstance(c, LastCheckpoint))
    result = RunResult(
        mode=mode,
        run_dir=run_dir,
        metrics=metrics,
        best_checkpoint=_existing(checkpoint.best_model_path if checkpoint else None),
        last_checkpoint=last.path if os.path.isfile(last.path) else None,
        seconds=time.time() - start,
        reports=[p for c in callbacks if isinstance(c, ConfusionReport) for p in c.reports],
    )
    if trainer.is_global_zero:
        write_summary(result)
    return result


def _existing(path: str | None) -> str | None:
    # A checkpoint deleted during the run (its folder removed, say) is not reported.
    return path if path and os.path.isfile(path) else None


def write_summary(result: RunResult) -> str:
    """Writes the result as `summary.json` in its run folder (what multirun tables read)."""
    path = os.path.join(result.run_dir, SUMMARY_NAME)
    record = {**asdict(result), "mode": result.mode.value}
    os.makedirs(result.run_dir, exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(record, f, indent=2)
    os.replace(path + ".tmp", path)
    return path


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
        weights = shlex.quote(f"run.pretrained_checkpoint_path={hydra_quoted(ckpt)}")
        lines.append(f"  next: {command} run.mode=VALIDATE {weights}")
        lines.append(
            f"  predict: open_sesemi predict {ckpt} <images or folders> -o predictions.csv"
        )
    lines.append(f"  metrics: tensorboard --logdir {result.run_dir}  (or metrics.csv there)")
    return "\n".join(lines)
