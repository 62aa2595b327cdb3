"""The loss-head interface: what a head is built from, what it reads each step, shared plumbing."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

# How to give the learner an EMA teacher, for every head that reads one.
SUPERVISED = "supervised"  # The data.train loader the supervised loss reads, and its term's name.
# What a head that blends pseudo-labels (DASO) needs beside it.
BLEND_BASE_HINT = "add one, e.g. 'method=[fixmatch,daso]'"
EMA_HINT = (
    "set learner.hparams.model.ema: {decay: 0.999} "
    "(on the command line: +learner.hparams.model.ema.decay=0.999)"
)


@dataclass
class HeadContext:
    """What a head may look at when the learner builds it (once, before training or loading a
    checkpoint).

    Attributes:
        backbones: Feature extractors by name: "backbone" (the student) and, when the learner
            has an EMA teacher, "teacher_backbone".
        heads: Prediction heads by name: "supervised_head" (features to class logits), with
            an EMA teacher "teacher_supervised_head", and with `model.balanced_head`
            "balanced_head" (ABC's class-balanced classifier, which evaluation predicts with).
        num_classes: The classifier's number of classes.
        dataset_sizes: The number of images in each `data.train` loader's whole dataset (over
            all processes), by loader name; loaders of unknown size are absent.
        name: The head's name in the learner (its key in `regularization_loss_heads`).
        reference_image: The featureless image (normalized value per channel) whose logits
            pseudo-labels should be debiased by (CDMAD; `sesemi.models.net.ClassifierNet`), or
            None.
        class_counts: The number of images of each class in each `data.train` loader's whole
            dataset, by loader name; loaders with unlabeled images are absent.
    """

    backbones: Mapping[str, nn.Module]
    heads: Mapping[str, nn.Module]
    num_classes: int
    dataset_sizes: Mapping[str, int] = field(default_factory=dict)
    name: str = ""
    reference_image: tuple[float, ...] | None = None
    class_counts: Mapping[str, tuple[int, ...]] = field(default_factory=dict)


@dataclass
class HeadInputs:
    """What the learner hands every loss head at each training step.

    Attributes:
        data: The training batch, one entry per loader named in `data.train`.
        backbones: Feature extractors by name: "backbone" is the model being trained; methods
            with a teacher also find "teacher_backbone" (no gradient) here.
        heads: Prediction heads by name: "supervised_head" maps backbone features to class
            logits; with a teacher, "teacher_supervised_head" too; with `model.balanced_head`,
            "balanced_head".
        features: A per-step cache of computed tensors that heads may share (e.g. the supervised
            batch's features under "supervised_backbone", and under "joined/<head name>" the
            student's `(features, logits)` of each batch a head asked to join the supervised
            forward pass; a FixMatch-family head leaves the student's `(weak features, strong
            features)` of its loader's two views under `views_key(loader)`).
        step: The global optimizer step.
    """

    data: Mapping[str, Any]
    backbones: Mapping[str, nn.Module]
    heads: Mapping[str, nn.Module]
    features: dict[str, Any] = field(default_factory=dict)
    step: int = 0


def views_key(loader: str) -> str:
    """The `HeadInputs.features` key of the student's `(weak, strong)` features of `loader`'s
    two views, left there by the FixMatch-family head that read them."""
    return f"views/{loader}"


def _require(owner: str, kind: str, name: str, available: Mapping[str, Any], hint: str) -> None:
    if name not in available:
        raise ValueError(
            f"{owner} reads the {kind} '{name}', which the learner does not offer "
            f"(it has: {', '.join(available) or 'none'}){hint}"
        )


class LossHead(nn.Module):
    """A regularization loss computed from one named training batch.

    A head names what it reads: the loader `input_data`, the backbone `input_backbone`, the
    classifier `input_head` (unless `reads_classifier` is False) and, when `uses_teacher`, the EMA
    teacher's `teacher_backbone` and `teacher_head`. `build` checks once that the learner offers
    them all; subclasses then create their layers there. `forward` returns one loss per sample
    (the learner reduces, weights and sums them) and puts extra scalars to log (e.g. a mask rate)
    in `self.log_values`.

    Batches are `(images, targets)` or `(images, targets, indices)`: `images` is a tensor
    `(B, C, H, W)` or, from a `sesemi.transforms.MultiView` transform, a list of such views;
    `targets` `(B,)` (or None); `indices` `(B,)` the samples' dataset indices.
    """

    #: Whether the head reads the classifier `input_head` (False: backbone features only).
    reads_classifier: ClassVar[bool] = True
    #: Whether the head debiases its pseudo-labels by `HeadContext.reference_image` (CDMAD).
    uses_reference_image: ClassVar[bool] = False
    #: Whether the head trains the learner's `balanced_head` (ABC).
    trains_balanced_head: ClassVar[bool] = False
    #: Whether the head blends other heads' pseudo-labels (DASO: `blend(probs, features, step)`);
    #: the learner hands it to each head of the same loader that `takes_blends`.
    blends_pseudo_labels: ClassVar[bool] = False
    #: Whether the head lets a blending head (DASO) refine its weak-view probabilities.
    takes_blends: ClassVar[bool] = False
    #: An alternative to adding an EMA teacher, named in the missing-teacher error.
    teacher_alternative: ClassVar[str] = ""
    teacher_backbone: str | None = None
    teacher_head: str | None = None

    def __init__(
        self,
        input_data: str,
        input_backbone: str = "backbone",
        input_head: str = "supervised_head",
    ) -> None:
        """Initializes the head.

        Args:
            input_data: The name of the `data.train` loader whose batch the head reads.
            input_backbone: The name of the backbone it extracts features with.
            input_head: The name of the classifier mapping features to class logits (ignored by
                heads that do not read one).
        """
        super().__init__()
        self.input_data = input_data
        self.input_backbone = input_backbone
        self.input_head = input_head
        self.name = ""  # the learner's name for the head, known once built
        self.log_values: dict[str, Any] = {}
        # The heads that blend this one's pseudo-labels (`takes_blends`; `link_blenders`): a
        # plain list, so they are not registered (and saved) a second time under this head.
        self.blenders: list[LossHead] = []

    @property
    def uses_teacher(self) -> bool:
        """Whether the head reads the EMA teacher (`teacher_backbone` and `teacher_head`)."""
        return self.teacher_backbone is not None

    def build(self, context: HeadContext) -> None:
        """Checks that every backbone and head the head reads exists (called once by the learner).

        Subclasses that create layers call this first.

        Raises:
            ValueError: A name the learner does not offer; a missing teacher says how to add one.
        """
        owner = type(self).__name__
        self.name = context.name
        _require(owner, "backbone", self.input_backbone, context.backbones, "")
        if self.reads_classifier:
            _require(owner, "head", self.input_head, context.heads, "")
        if self.uses_teacher:
            alternative = f" or use {self.teacher_alternative}" if self.teacher_alternative else ""
            hint = f"; it is the EMA teacher's: {EMA_HINT}{alternative}"
            _require(owner, "backbone", str(self.teacher_backbone), context.backbones, hint)
            _require(owner, "head", str(self.teacher_head), context.heads, hint)

    def joined_views(self, data: Mapping[str, Any]) -> list[Tensor]:
        """Image batches of the head's loader that the learner should put through the student in
        the same forward pass as the supervised batch (shared BatchNorm statistics); their
        `(features, logits)` then reach the head as `inputs.features["joined/<name>"]`, in
        order. None here."""
        return []

    def features(self, inputs: HeadInputs, images: Tensor, teacher: bool = False) -> Tensor:
        """The student's (or, under `torch.no_grad()`, the teacher's) features of `images`."""
        if teacher:
            with torch.no_grad():
                return inputs.backbones[str(self.teacher_backbone)](images)
        return inputs.backbones[self.input_backbone](images)

    def logits(self, inputs: HeadInputs, images: Tensor, teacher: bool = False) -> Tensor:
        """The student's (or, under `torch.no_grad()`, the teacher's) class logits `(B, K)`."""
        if teacher:
            with torch.no_grad():
                features = inputs.backbones[str(self.teacher_backbone)](images)
                return inputs.heads[str(self.teacher_head)](features)
        return inputs.heads[self.input_head](inputs.backbones[self.input_backbone](images))

    def batch(self, inputs: HeadInputs) -> tuple[Any, Tensor | None, Tensor | None]:
        """Returns `(images or views, targets, indices or None)` of the head's batch."""
        if self.input_data not in inputs.data:
            raise ValueError(
                f"{type(self).__name__} reads data.train.{self.input_data}, which the batch "
                f"lacks (it has: {', '.join(inputs.data) or 'none'})"
            )
        batch = inputs.data[self.input_data]
        if not isinstance(batch, (list, tuple)) or len(batch) not in (2, 3):
            raise ValueError(
                f"data.train.{self.input_data} batches must be (images, targets) or "
                "(images, targets, indices)"
            )
        return batch[0], batch[1], batch[2] if len(batch) == 3 else None

    def single_view(self, inputs: HeadInputs) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """Returns `(images (B, C, H, W), targets, indices)` of a one-view batch."""
        images, targets, indices = self.batch(inputs)
        if isinstance(images, (list, tuple)):
            raise ValueError(
                f"data.train.{self.input_data} gives several views per image; this head reads "
                "one view, so give that loader a plain image_transform (e.g. "
                "sesemi.transforms.train_transforms)"
            )
        return images, targets, indices

    def two_views(
        self,
        inputs: HeadInputs,
        names: Sequence[str] = ("<transform>", "<transform>"),
        hint: str = "",
    ) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
        """Returns the first two views, the targets and the indices of a multi-view batch.

        Args:
            inputs: The step's inputs.
            names: What the two views are, for the error message (e.g. "<weak>", "<strong>").
            hint: Appended to the error message (e.g. which transforms to use).
        """
        views, targets, indices = self.batch(inputs)
        if not isinstance(views, (list, tuple)) or len(views) < 2:
            raise ValueError(
                f"data.train.{self.input_data} must give two views of each image; set its "
                "image_transform to {_target_: sesemi.transforms.MultiView, views: "
                f"[{names[0]}, {names[1]}]}}{hint}"
            )
        return views[0], views[1], targets, indices

    def forward(self, inputs: HeadInputs) -> Tensor:
        """Returns per-sample losses `(N,)` (or a scalar) for the head's batch."""
        raise NotImplementedError


def link_blenders(heads: Mapping[str, LossHead]) -> None:
    """Hands each head that blends pseudo-labels (DASO) to the heads of its loader that take
    blends (the FixMatch family), which call its `blend` on their weak-view probabilities.

    Raises:
        ValueError: A blending head with no such head, or one whose pseudo-labels come from the
            EMA teacher (the blend needs the student's features of the weak views).
    """
    for name, head in heads.items():
        if not head.blends_pseudo_labels:
            continue
        bases = {
            n: h for n, h in heads.items() if h.takes_blends and h.input_data == head.input_data
        }
        if not bases:
            raise ValueError(
                f"regularization_loss_heads.{name} ({type(head).__name__}) blends the "
                f"pseudo-labels of a FixMatch-family head reading data.train.{head.input_data}, "
                f"and there is none; {BLEND_BASE_HINT}"
            )
        for base_name, base in bases.items():
            if base.uses_teacher:
                raise ValueError(
                    f"regularization_loss_heads.{name} blends with the student's features of the "
                    f"weak views, but {base_name} pseudo-labels with the EMA teacher; set "
                    f"regularization_loss_heads.{base_name}.head.teacher=student"
                )
            if head not in base.blenders:
                base.blenders.append(head)
