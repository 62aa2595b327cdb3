"""Structured-config dataclasses: the schema of every run, with the spec's names and defaults."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from omegaconf import MISSING


class RunMode(Enum):
    """What a run does with the learner: train it, or evaluate it on the val or test loader."""

    FIT = "FIT"
    VALIDATE = "VALIDATE"
    TEST = "TEST"


@dataclass
class RunConfig:
    """The run configuration.

    Attributes:
        seed: An optional random seed used on initialization.
        num_epochs: The number of training epochs to train. Cannot be set with `num_iterations`.
        num_iterations: The number of training iterations to run. Cannot be set with `num_epochs`.
        gpus: Either an integer specifying the number of GPUs to use, a list of GPU integer IDs, a
            comma-separated list of GPU IDs, or None to train on the CPU. Setting this to -1 uses
            all GPUs (or the CPU, with a warning, when there is none) and 0 uses the CPU.
        num_nodes: The number of nodes to use during training (defaults to 1).
        accelerator: The multi-device strategy: "ddp" (the default when several devices are used)
            or any Lightning 2 strategy name. The old "dp" is mapped to "ddp" with a warning.
        batch_size_per_gpu: An optional default batch size per device for every data loader.
        data_root: The parent of relative dataset roots (see `DatasetConfig`); a relative
            data_root is taken from the directory `open_sesemi` was launched in.
        id: The identifier to use for the run.
        dir: The directory to store run outputs (logs, configurations, checkpoints).
        mode: The run's mode.
        resume_from_checkpoint: An optional checkpoint path to restore the full trainer state, or
            "last" for the newest `last.ckpt` of this run id.
        pretrained_checkpoint_path: An optional checkpoint path to load model weights only.
        threads: Intra-op CPU threads of the training process; None (auto): the cores this
            process may use divided by the sesemi training processes running on the machine
            (parallel multirun jobs, runs side by side, DDP ranks), re-checked as they come and
            go, unless OMP_NUM_THREADS is set in the environment (then torch's choice stands).
    """

    seed: int | None = None
    num_epochs: int | None = None
    num_iterations: int | None = None
    gpus: Any = -1
    num_nodes: int = 1
    accelerator: str | None = None
    batch_size_per_gpu: int | None = None
    data_root: str | None = "./data"
    id: str = "default"
    dir: str = "./runs"
    mode: RunMode = RunMode.FIT
    resume_from_checkpoint: str | None = None
    pretrained_checkpoint_path: str | None = None
    threads: int | None = None


@dataclass
class DatasetConfig:
    """A dataset built by `sesemi.dataset`.

    Attributes:
        name: The registered dataset name (e.g. "image_folder").
        root: The dataset root; relative roots are joined to `run.data_root`, and a null root is
            `run.data_root` itself.
        subset: A subfolder name, a list of them (concatenated with one class index), or null for
            every subfolder.
        image_transform: The image transform, usually a `_target_` node.
        kwargs: Any other keyword arguments for the dataset builder.
        pseudo_labels: An optional folder written by `open_sesemi pseudo-label` (relative to
            `run.data_root` like `root`): its images join this labeled dataset with their top
            class, through the same transform. CReST's expanded labeled set
            (`pseudo-label --balance crest`, then train again with this set).
    """

    name: str = MISSING
    root: str | None = None
    subset: Any = None
    image_transform: Any = None
    kwargs: dict[str, Any] = field(default_factory=dict)
    pseudo_labels: str | None = None


@dataclass
class DataLoaderConfig:
    """A `torch.utils.data.DataLoader` over one dataset; fields mirror the DataLoader's arguments.

    Attributes:
        dataset: The dataset configuration.
        batch_size: The batch size per device; defaults to `run.batch_size_per_gpu`.
        shuffle: Whether to reshuffle every epoch.
        sampler: An optional sampler node; a `_partial_: true` node is called with the dataset.
        batch_sampler: An optional batch sampler node, treated like `sampler`.
        num_workers: The number of loading processes (0 loads in the main process); null
            (the default) is 0 on the CPU and, on GPUs, the node's CPU cores per GPU minus one,
            at most 8.
        collate_fn: An optional collation node, e.g. `sesemi.collation.RotationTransformer`.
        pin_memory: Whether to copy batches into pinned memory; null (the default): on GPUs.
        drop_last: Whether to drop the last incomplete batch.
        full_batches: For a shuffled training loader: every batch full, the last of each pass
            completed from a new shuffle (fresh augmentations; repeats when the dataset is
            smaller than a batch), as FixMatch's and USB's code draw labeled batches;
            `method=fixmatch` and the methods built on it set it for `data.train.supervised`
            (but for `flexmatch_da`, `fixmatch_balanced` and `flexmatch_balanced`, measured
            better unfilled). On a stream (shards) it has no effect, with a warning.
        class_balanced: For a shuffled training loader over labeled images: each pass draws
            every class equally often (rare classes' images repeated, each repeat a new crop),
            for long-tailed labeled sets.
        timeout: Seconds to wait for a batch from a worker (0 waits forever).
        worker_init_fn: An optional worker initialization node.
        prefetch_factor: Batches loaded in advance by each worker.
        persistent_workers: Whether workers survive between epochs; null (the default): when
            there are workers.
    """

    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    batch_size: int | None = None
    shuffle: bool = False
    sampler: Any = None
    batch_sampler: Any = None
    num_workers: int | None = None
    collate_fn: Any = None
    pin_memory: bool | None = None
    drop_last: bool | None = False
    full_batches: bool = False
    class_balanced: bool = False
    timeout: float = 0
    worker_init_fn: Any = None
    prefetch_factor: int | None = None
    persistent_workers: bool | None = None


@dataclass
class DataConfig:
    """The data group configuration.

    Attributes:
        train: An optional dictionary of data loader configurations. This configuration is
            directly mapped into dictionaries of data batches. A null entry is switched off
            (e.g. `data.train.rotation_prediction=null` on the command line).
        val: An optional data loader configuration to use during validation.
        test: An optional data loader configuration to use for testing.
        num_classes: The number of classes of the labeled images; `${sesemi:num_classes}`
            counts the supervised loader's class folders.
        image_size: The side of the square images the model sees, in pixels.
        norm_mean: The per-channel mean that image transforms subtract.
        norm_std: The per-channel standard deviation that image transforms divide by.
        unlabeled_subset: The subset(s) that losses on unlabeled images read (e.g.
            `[train, unlabeled]`; a name ending in `?` is read only where it exists).
        transforms: The data's image transforms by role, which loaders name by interpolation:
            `train` (the labeled images' augmentation, FixMatch's weak view), `strong`
            (RandAugment-style, FixMatch's strong view) and `eval` (val / test / predict).
        prepare: An optional node called once before any dataset is built (e.g. to write a
            dataset to disk: `sesemi.datasets.digits.prepare_digits`).

    The fields after `test` are facts of the data that `method` configs read by interpolation
    (`${data.transforms.train}`, `${data.unlabeled_subset}`); a `data` group file sets them.
    """

    train: dict[str, DataLoaderConfig | None] | None = None
    val: DataLoaderConfig | None = None
    test: DataLoaderConfig | None = None
    num_classes: int | None = None
    image_size: int | None = None
    norm_mean: list[float] | None = None
    norm_std: list[float] | None = None
    unlabeled_subset: Any = None
    transforms: Any = None
    prepare: Any = None


@dataclass
class LossCallableConfig:
    """A loss callable with its weighting.

    Attributes:
        callable: The loss node (e.g. `torch.nn.CrossEntropyLoss`); built with `reduction="none"`
            when it accepts one, so the learner sees per-sample losses.
        scheduler: An optional weight scheduler: a callable of the global step returning a factor.
        reduction: How per-sample losses are reduced: "mean" or "sum".
        scale_factor: A constant weight multiplied with the scheduler's factor.
    """

    callable: Any = MISSING
    scheduler: Any = None
    reduction: str = "mean"
    scale_factor: float = 1.0


@dataclass
class LossHeadConfig:
    """A regularization loss head with its weighting (see `LossCallableConfig`).

    Attributes:
        head: The loss head node, a `sesemi.models.heads.LossHead`.
        scheduler: An optional weight scheduler of the global step.
        reduction: How the head's per-sample losses are reduced: "mean" or "sum".
        scale_factor: A constant weight multiplied with the scheduler's factor.
    """

    head: Any = MISSING
    scheduler: Any = None
    reduction: str = "mean"
    scale_factor: float = 1.0


@dataclass
class EMAConfig:
    """An EMA teacher of the backbone and classifier (Mean Teacher, FixMatch with EMA, ...).

    Attributes:
        decay: The per-step decay: teacher = decay * teacher + (1 - decay) * student.
    """

    decay: float = 0.999


@dataclass
class KNNConfig:
    """kNN classification of val images by the labeled training images' backbone features.

    Features are L2-normalized; each val image takes its k most cosine-similar labeled images,
    each voting for its class with weight exp(similarity / temperature) (Wu et al.,
    arXiv:1805.01978). The labeled images are read with the val transform.

    Attributes:
        k: The number of neighbours.
        temperature: The softness of the vote weights.
    """

    k: int = 20
    temperature: float = 0.07


@dataclass
class ClassifierModelConfig:
    """The classifier's model.

    Attributes:
        backbone: The backbone node, e.g. `sesemi.PyTorchImageModels`.
        supervised_loss: The supervised loss on the "supervised" training batches.
        regularization_loss_heads: Named regularization loss heads on other batches; a null
            entry is switched off.
        ema: An optional EMA teacher, offered to heads as "teacher_backbone" and
            "teacher_supervised_head" and evaluated as val/ema/top1.
        debias_logits: CDMAD (Lee & Kim, CVPR 2024, arXiv:2403.10391), null or `{pixel, mean,
            std}`: the logits of a featureless reference image (every pixel `pixel` in [0, 1],
            e.g. 0 for black, normalized by `mean` and `std` per channel) are subtracted from
            the FixMatch-family heads' weak-view logits before pseudo-labelling and from every
            prediction in evaluation (val, test, predict, export). `method=cdmad` sets it.
        balanced_head: ABC (Lee et al., NeurIPS 2021, arXiv:2110.10368): a second linear
            classifier on the backbone, trained class-balanced by the `abc` loss head, which
            evaluation (val, test, predict, export) predicts with. `method=abc` sets it.
    """

    backbone: Any = MISSING
    supervised_loss: LossCallableConfig = field(default_factory=LossCallableConfig)
    regularization_loss_heads: dict[str, LossHeadConfig | None] | None = None
    # Any, not `EMAConfig | None`: Hydra cannot override a null structured node from the
    # command line, and `learner.hparams.model.ema={decay:0.999}` must work.
    ema: Any = None
    # Any, not a dataclass | None, for the same reason as `ema`.
    debias_logits: Any = None
    balanced_head: bool = False


@dataclass
class LRSchedulerConfig:
    """A learning-rate scheduler and how Lightning steps it.

    Attributes:
        scheduler: The scheduler node; it is built with `optimizer=` the learner's optimizer.
        frequency: Step the scheduler every `frequency` intervals.
        interval: "step" (per optimizer step, the default) or "epoch".
        monitor: The metric for schedulers such as ReduceLROnPlateau.
    """

    scheduler: Any = MISSING
    frequency: int = 1
    interval: str = "step"
    monitor: str | None = None


@dataclass
class ClassifierHParams:
    """The classifier's hyperparameters.

    Attributes:
        num_classes: The number of classes in the labeled data.
        model: The model configuration.
        optimizer: The optimizer node; it is built with the learner's parameters.
        lr_scheduler: An optional learning-rate scheduler configuration.
        knn: Optional kNN evaluation of the backbone's features at every validation, logged as
            val/knn/top1 (see `KNNConfig`); enable with `learner.hparams.knn={k:20}`.
        input_normalization: `{mean: [...], std: [...]}` applied on the device to uint8 image
            batches (transforms with `uint8_output: true`), after scaling to [0, 1].
        channels_last: Keep the model and image batches in channels-last memory format. null
            (default): on when training on the CPU (oneDNN's faster layout: 1.4x for a ResNet-18
            step at 32 px, benchmarks/step_overhead.py); on GPUs, on under 16-bit precision
            (1.66x for a ResNet-50 bf16 step on an H200) and off in fp32; off on a GPU whenever
            the backbone is compiled (see `sesemi.devices.choose_channels_last`).
        compile: `torch.compile` the backbone: true, or a dict of `torch.compile` arguments
            (e.g. `{mode: max-autotune}`).
    """

    num_classes: int = MISSING
    model: ClassifierModelConfig = field(default_factory=ClassifierModelConfig)
    optimizer: Any = MISSING
    lr_scheduler: LRSchedulerConfig | None = None
    # Any, not `KNNConfig | None`, for the same reason as `ClassifierModelConfig.ema`.
    knn: Any = None
    input_normalization: Any = None
    channels_last: bool | None = None
    compile: Any = False


@dataclass
class LearnerConfig:
    """A base learner configuration."""

    _target_: str = MISSING


@dataclass
class ClassifierConfig(LearnerConfig):
    """The classifier configuration.

    Attributes:
        hparams: The classifier's hyperparameters.
    """

    hparams: ClassifierHParams = field(default_factory=ClassifierHParams)
    _target_: str = "sesemi.Classifier"


@dataclass
class SESEMIBaseConfig:
    """The full SESEMI configuration before a learner is chosen.

    Attributes:
        run: The run config.
        data: The data config.
        learner: The learner config.
        trainer: Optional additional parameters that can be passed to a PyTorch Lightning Trainer
            object; `callbacks` and `logger` entries are instantiated.

    References:
        * https://lightning.ai/docs/pytorch/stable/common/trainer.html#trainer-class-api
    """

    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    learner: Any = MISSING
    trainer: Any = None


@dataclass
class SESEMIConfig(SESEMIBaseConfig):
    """The full SESEMI configuration with a classifier learner."""

    learner: LearnerConfig = field(default_factory=ClassifierConfig)
