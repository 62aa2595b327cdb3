"""Confidence-thresholded pseudo-labelling heads: FixMatch and FlexMatch.

Both read `([weak, strong], targets[, indices])` batches from an unlabeled loader whose image
transform is `sesemi.transforms.MultiView(views=[<weak>, <strong>])` (e.g. `train_transforms` and
`strong_transforms`). The class predicted on the weakly augmented view is the pseudo-label of
the strongly augmented view; a threshold policy (`sesemi.models.heads.thresholds`) decides how
much each pseudo-label counts: FixMatch's fixed threshold or FlexMatch's class-wise ones. Targets
are only used to log the pseudo-labels' accuracy where they are known (>= 0); unlabeled-only
folders give -1.

Reduction: the heads return `mask * CE(strong logits, pseudo-label)` for EVERY image of the
unlabeled batch, 0 for the masked-out ones, so the learner's default `reduction: mean` divides
by the whole unlabeled batch size `mu * B`, as the papers' unlabeled loss does (and not by the
number of confident images). The unlabeled loss weight `lambda_u` is the head's `scale_factor`.

Batch sizes: the papers draw `mu` times as many unlabeled as labeled images per step (FixMatch:
mu = 7); set the unlabeled loader's `batch_size` to `mu` times the supervised loader's.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from sesemi.models.heads.base import SUPERVISED, HeadContext, HeadInputs, LossHead, views_key
from sesemi.models.heads.thresholds import FixedThreshold, FlexMatchThreshold, ThresholdPolicy
from sesemi.models.net import debiased, with_reference_image

TEACHERS = ("student", "ema")


class FixMatchLossHead(LossHead):
    """FixMatch: cross-entropy between the prediction on a strongly augmented view and the
    confident hard pseudo-label from a weakly augmented view of the same unlabeled image.

    For each unlabeled image, `q = softmax(logits(weak) / temperature)` is computed without
    gradient (under `torch.no_grad()`), the pseudo-label is `argmax q` and the mask is the
    threshold policy's weight of `q` (FixMatch: `max q >= threshold`); the per-image loss is
    `mask * CE(logits(strong), argmax q)` (see the module docstring for the reduction over the
    whole unlabeled batch). In training, the policy's state (if any) is then updated with `q`.

    With `teacher="ema"` the weak view is predicted by the EMA teacher
    (`learner.hparams.model.ema`, "teacher_backbone" and "teacher_supervised_head") instead of
    the student; the strong view always goes through the student.

    Reference: Sohn et al., "FixMatch: Simplifying Semi-Supervised Learning with Consistency
    and Confidence", arXiv:2001.07685. Deviations:

    * How the images meet BatchNorm (`joint_forward`): "all" puts the labeled, weak and strong
      images through the network in one pass, one set of batch statistics, as the reference
      code does (USB's `use_cat`); "unlabeled" (or True) joins weak and strong only; False
      (the default) runs the weak view alone without gradient, then the strong view, so their
      statistics are per pass. With a joint pass the weak logits are detached (no gradient, as
      the paper's stop-gradient), but their activations stay in memory until the backward pass.
    * `temperature` (default 1, as in the paper) sharpens or flattens `q` before thresholding;
      the pseudo-labels stay hard.
    * The paper uses its EMA model for evaluation only; `teacher="ema"` (pseudo-labels from the
      EMA teacher, which runs in the learner's mode) is an option, not the paper's method.

    With the learner's reference image (CDMAD, arXiv:2403.10391; `method=[fixmatch,cdmad]`),
    that featureless image joins the weak views' pass and its logits are subtracted from
    theirs before the softmax: `q = softmax((z_weak - z_ref) / T)`. With a DASO head
    (`sesemi.models.heads.daso`; `method=[fixmatch,daso]`), `q` is blended with its
    similarity-based pseudo-labels before the policy sees it.

    Logs `mask_rate` (the mean mask: the share of unlabeled images used), `confidence` (mean max
    probability), when some used images have known targets `pseudo_label_acc` (accuracy of the
    pseudo-labels of used images with targets >= 0), and the policy's values.
    """

    teacher_alternative = "teacher=student"
    uses_reference_image = True
    takes_blends = True

    def __init__(
        self,
        input_data: str,
        input_backbone: str = "backbone",
        threshold: float | ThresholdPolicy = 0.95,
        teacher: str = "student",
        temperature: float = 1.0,
        joint_forward: bool | str = False,
        input_head: str = "supervised_head",
        teacher_backbone: str = "teacher_backbone",
        teacher_head: str = "teacher_supervised_head",
    ) -> None:
        """Initializes the head.

        Args:
            input_data: The `data.train` loader giving `([weak, strong], targets)` batches.
            input_backbone: The student backbone.
            threshold: The confidence threshold tau in [0, 1] (images whose max probability on
                the weak view is at least tau are used) or a threshold policy.
            teacher: Who predicts the weak view: "student" (the paper) or "ema" (the EMA
                teacher; needs `learner.hparams.model.ema`).
            temperature: Divides the weak logits before the softmax (1 is the paper's).
            joint_forward: False (separate passes), "unlabeled" / True (weak and strong in one
                pass) or "all" (labeled, weak and strong in one pass); student teacher only.
            input_head: The student classifier.
            teacher_backbone: The EMA teacher's backbone.
            teacher_head: The EMA teacher's classifier.
        """
        super().__init__(input_data, input_backbone, input_head)
        if teacher not in TEACHERS:
            raise ValueError(f"unknown teacher '{teacher}'; use one of: {', '.join(TEACHERS)}")
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        if joint_forward is True:
            joint_forward = "unlabeled"
        if joint_forward not in (False, "unlabeled", "all"):
            raise ValueError(
                f"joint_forward must be false, 'unlabeled' or 'all', got {joint_forward!r}"
            )
        if joint_forward and teacher == "ema":
            raise ValueError("joint_forward runs the student on both views; use teacher=student")
        if not isinstance(threshold, ThresholdPolicy):
            threshold = FixedThreshold(threshold)
        self.policy = threshold
        self.teacher = teacher
        self.temperature = float(temperature)
        self.joint_forward = joint_forward
        self.teacher_backbone = teacher_backbone
        self.teacher_head = teacher_head
        self.reference_image: tuple[float, ...] | None = None  # the learner's, once built

    @property
    def uses_teacher(self) -> bool:
        """Whether the EMA teacher predicts the weak view."""
        return self.teacher == "ema"

    def build(self, context: HeadContext) -> None:
        """Checks the student (and teacher) exist and builds the threshold policy."""
        super().build(context)
        self.policy.build(context, self.input_data)
        self.reference_image = context.reference_image

    def _weak_batch(self, weak: Tensor) -> Tensor:
        """The weak views, with the reference image appended when debiasing."""
        if self.reference_image is None:
            return weak
        return with_reference_image(weak, self.reference_image)

    def _logits(self, inputs: HeadInputs, weak: Tensor, strong: Tensor) -> tuple[Tensor, Tensor]:
        """Returns the weak-view logits (no gradient; debiased with a reference image) and the
        strong-view student logits."""
        weak_logits, strong_logits = self._pass(inputs, self._weak_batch(weak), strong)
        if self.reference_image is not None:
            weak_logits = debiased(weak_logits)
        return weak_logits, strong_logits

    def _pass(self, inputs: HeadInputs, weak: Tensor, strong: Tensor) -> tuple[Tensor, Tensor]:
        """Runs both views as `joint_forward` and `teacher` say (weak logits without gradient).
        The student's features of both views are left in `inputs.features` (`views_key`) for
        other heads (ABC) to reuse."""
        if self.uses_teacher:
            return self.logits(inputs, weak, teacher=True), self.logits(inputs, strong)
        head = inputs.heads[self.input_head]
        if self.joint_forward == "all":  # the learner ran them with the labeled batch
            (weak_features, weak_logits), (strong_features, strong_logits) = inputs.features[
                f"joined/{self.name}"
            ]
        elif self.joint_forward:
            features = self.features(inputs, torch.cat([weak, strong]))
            logits = head(features)
            weak_features, strong_features = features[: len(weak)], features[len(weak) :]
            weak_logits, strong_logits = logits[: len(weak)], logits[len(weak) :]
        else:
            with torch.no_grad():
                weak_features = self.features(inputs, weak)
                weak_logits = head(weak_features)
            strong_features = self.features(inputs, strong)
            strong_logits = head(strong_features)
        # Without the reference image (CDMAD) that may close the weak batch.
        inputs.features[views_key(self.input_data)] = (
            weak_features[: len(strong)].detach(),
            strong_features,
        )
        return weak_logits.detach(), strong_logits

    def joined_views(self, data: Mapping[str, Any]) -> list[Tensor]:
        """With `joint_forward="all"`, the weak and strong views join the labeled forward pass."""
        if self.joint_forward != "all":
            return []
        views = data[self.input_data][0]
        return [self._weak_batch(views[0]), views[1]]

    def forward(self, inputs: HeadInputs) -> Tensor:
        """Returns `mask * CE(strong logits, pseudo-label)` for each unlabeled image `(B,)`."""
        weak, strong, targets, indices = self.two_views(
            inputs,
            names=("<weak>", "<strong>"),
            hint=" (e.g. sesemi.transforms.train_transforms and strong_transforms)",
        )
        weak_logits, strong_logits = self._logits(inputs, weak, strong)
        labeled = inputs.data.get(SUPERVISED)
        if self.training and labeled is not None:
            self.policy.observe_labeled(labeled[1])  # distribution alignment counts classes
        with torch.no_grad():
            probs = F.softmax(weak_logits.float() / self.temperature, dim=1)  # (B, C)
            if self.blenders:  # DASO: mixed with similarity-based pseudo-labels
                weak_features = inputs.features[views_key(self.input_data)][0]
                for blender in self.blenders:
                    probs = blender.blend(probs, weak_features, inputs.step)
            # The policy weighs each pseudo-label in [0, 1] (and moves its state in training).
            label_probs, mask = self.policy(probs, indices)
            confidence, pseudo_labels = label_probs.max(dim=1)
        strong_logits = self.policy.adjust_logits(strong_logits.float())
        losses = mask * F.cross_entropy(strong_logits, pseudo_labels, reduction="none")
        extra = self.policy.extra_loss(strong_logits, mask)
        if extra is not None:  # a batch-level term on every sample: the mean adds it once
            losses = losses + extra
        self.log_values = {
            **pseudo_label_stats(mask, confidence, pseudo_labels, targets),
            **self.policy.logged,  # the state the weights were computed with
        }
        return losses


@torch.no_grad()
def pseudo_label_stats(
    mask: Tensor, confidence: Tensor, pseudo_labels: Tensor, targets: Tensor | None
) -> dict[str, Tensor]:
    """`mask_rate`, `confidence` (mean max probability) and, where used images have known
    targets (>= 0), `pseudo_label_acc` of a batch's hard pseudo-labels."""
    stats = {"mask_rate": mask.mean(), "confidence": confidence.mean()}
    if targets is not None:
        used = (mask > 0) & (targets >= 0)
        if used.any():
            stats["pseudo_label_acc"] = (pseudo_labels[used] == targets[used]).float().mean()
    return stats


class FlexMatchLossHead(FixMatchLossHead):
    """FlexMatch: FixMatch with class-wise thresholds that follow how well each class is learned
    (curriculum pseudo-labelling), i.e. FixMatch with a `FlexMatchThreshold` policy.

    Each class c has its threshold `T_c = M(beta_c) * threshold`, where beta_c is the share of
    unlabeled images confidently predicted as c (normalized; with the paper's warm-up) and
    `M(x) = x / (2 - x)`: every threshold starts at 0 and rises towards `threshold` as its class
    is learned. See `sesemi.models.heads.thresholds.FlexMatchThreshold` for the formulas and the
    two ways to keep the learning status ("estimate", needing no sample indices, and "index",
    the paper's). The state lives in the policy's buffers (`policy.class_status` or
    `policy.selected_label`), saved in checkpoints and kept equal on every DDP process.

    Reference: Zhang et al., "FlexMatch: Boosting Semi-Supervised Learning with Curriculum
    Pseudo Labeling", arXiv:2110.08263. Deviations: the "estimate" learning status; a
    prediction counts as confident at `max q >= threshold` (the same test as FixMatch's mask);
    the FixMatch deviations of `FixMatchLossHead` apply (separate forward passes, optional
    temperature and EMA teacher). Logs, besides FixMatch's values, `threshold_min`,
    `threshold_mean`, `threshold_max` (the class thresholds used) and `unused_rate` (the share
    of unlabeled images not confidently predicted yet).
    """

    def __init__(self, input_data: str, **kwargs: Any) -> None:
        """Initializes the head.

        Args:
            input_data: The `data.train` loader giving `([weak, strong], targets)` batches.
            **kwargs: `FlexMatchThreshold`'s arguments (threshold, warmup, mapping,
                learning_status, num_classes, unlabeled_size) and `FixMatchLossHead`'s other
                arguments (input_backbone, teacher, temperature, ...), by name.
        """
        names = inspect.signature(FlexMatchThreshold).parameters
        policy = FlexMatchThreshold(**{k: kwargs.pop(k) for k in list(kwargs) if k in names})
        super().__init__(input_data, threshold=policy, **kwargs)
