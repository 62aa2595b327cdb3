"""Confidence-thresholded pseudo-labelling heads: FixMatch and FlexMatch.

Both read `([weak, strong], targets)` batches from an unlabeled loader whose image transform is
`sesemi.transforms.MultiView(views=[<weak>, <strong>])` (e.g. `train_transforms` and
`strong_transforms`). The class predicted on the weakly augmented view is the pseudo-label of
the strongly augmented view; only predictions confident enough (max probability at least the
threshold) count. Targets are only used to log the pseudo-labels' accuracy where they are known
(>= 0); unlabeled-only folders give -1.

Reduction: the heads return `mask * CE(strong logits, pseudo-label)` for EVERY image of the
unlabeled batch, 0 for the masked-out ones, so the learner's default `reduction: mean` divides
by the whole unlabeled batch size `mu * B`, as the papers' unlabeled loss does (and not by the
number of confident images). The unlabeled loss weight `lambda_u` is the head's `scale_factor`.

Batch sizes: the papers draw `mu` times as many unlabeled as labeled images per step (FixMatch:
mu = 7); set the unlabeled loader's `batch_size` to `mu` times the supervised loader's.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from sesemi.models.heads.base import HeadInputs, LossHead

TEACHERS = ("student", "ema")


def _unpack(batch: Any, where: str) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
    """Returns weak view, strong view, targets and (when the batch has them) sample indices."""
    if not isinstance(batch, (list, tuple)) or len(batch) not in (2, 3):
        raise ValueError(
            f"data.train.{where} batches must be (views, targets) or (views, targets, indices)"
        )
    views, targets = batch[0], batch[1]
    indices = batch[2] if len(batch) == 3 else None
    if not isinstance(views, (list, tuple)) or len(views) < 2:
        raise ValueError(
            f"data.train.{where} must give a weak and a strong view of each image; set its "
            "image_transform to {_target_: sesemi.transforms.MultiView, views: [<weak>, "
            "<strong>]} (e.g. sesemi.transforms.train_transforms and strong_transforms)"
        )
    return views[0], views[1], targets, indices


def _require(kind: str, name: str, available: Mapping[str, nn.Module], owner: str) -> None:
    if name not in available:
        raise ValueError(
            f"{owner} reads the {kind} '{name}', which the learner does not offer "
            f"(it has: {', '.join(available) or 'none'})"
        )


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class FixMatchLossHead(LossHead):
    """FixMatch: cross-entropy between the prediction on a strongly augmented view and the
    confident hard pseudo-label from a weakly augmented view of the same unlabeled image.

    For each unlabeled image, `q = softmax(logits(weak) / temperature)` is computed without
    gradient (under `torch.no_grad()`), the pseudo-label is `argmax q` and the mask is
    `max q >= threshold`; the per-image loss is `mask * CE(logits(strong), argmax q)` (see the
    module docstring for the reduction over the whole unlabeled batch).

    With `teacher="ema"` the weak view is predicted by the EMA teacher
    (`learner.hparams.model.ema`, "teacher_backbone" and "teacher_supervised_head") instead of
    the student; the strong view always goes through the student.

    Reference: Sohn et al., "FixMatch: Simplifying Semi-Supervised Learning with Consistency
    and Confidence", arXiv:2001.07685. Deviations:

    * The unlabeled views go through the backbone in their own forward passes, not
      concatenated with the labeled batch, so BatchNorm's batch statistics are per pass (the
      reference code normalizes labeled, weak and strong images together). `joint_forward=True`
      runs weak and strong together in one pass (the weak logits are then detached, which still
      stops their gradient, but their activations are kept until the backward pass).
    * `temperature` (default 1, as in the paper) sharpens or flattens `q` before thresholding;
      the pseudo-labels stay hard.
    * The paper uses its EMA model for evaluation only; `teacher="ema"` (pseudo-labels from the
      EMA teacher, which runs in the learner's mode) is an option, not the paper's method.

    Logs `mask_rate` (share of unlabeled images above the threshold), `confidence` (mean max
    probability) and, when some masked images have known targets, `pseudo_label_acc` (accuracy
    of the pseudo-labels of masked images with targets >= 0).
    """

    def __init__(
        self,
        input_data: str,
        input_backbone: str = "backbone",
        threshold: float = 0.95,
        teacher: str = "student",
        temperature: float = 1.0,
        joint_forward: bool = False,
        input_head: str = "supervised_head",
        teacher_backbone: str = "teacher_backbone",
        teacher_head: str = "teacher_supervised_head",
    ) -> None:
        """Initializes the head.

        Args:
            input_data: The `data.train` loader giving `([weak, strong], targets)` batches.
            input_backbone: The student backbone.
            threshold: The confidence threshold tau in [0, 1]; images whose max probability on
                the weak view is at least tau are used.
            teacher: Who predicts the weak view: "student" (the paper) or "ema" (the EMA
                teacher; needs `learner.hparams.model.ema`).
            temperature: Divides the weak logits before the softmax (1 is the paper's).
            joint_forward: Run weak and strong views in one forward pass (student teacher only).
            input_head: The student classifier.
            teacher_backbone: The EMA teacher's backbone.
            teacher_head: The EMA teacher's classifier.
        """
        super().__init__(input_data, input_backbone)
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"threshold must be in [0, 1], got {threshold}")
        if teacher not in TEACHERS:
            raise ValueError(f"unknown teacher '{teacher}'; use one of: {', '.join(TEACHERS)}")
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        self.threshold = float(threshold)
        self.teacher = teacher
        self.temperature = float(temperature)
        self.joint_forward = joint_forward
        self.input_head = input_head
        self.teacher_backbone = teacher_backbone
        self.teacher_head = teacher_head

    def build(self, backbones: Mapping[str, nn.Module], heads: Mapping[str, nn.Module]) -> None:
        """Checks that the student (and, with `teacher="ema"`, the EMA teacher) exist."""
        owner = type(self).__name__
        _require("backbone", self.input_backbone, backbones, owner)
        _require("head", self.input_head, heads, owner)
        if self.teacher == "ema" and (
            self.teacher_backbone not in backbones or self.teacher_head not in heads
        ):
            raise ValueError(
                f"{owner} with teacher=ema needs an EMA teacher ('{self.teacher_backbone}' and "
                f"'{self.teacher_head}'), but the learner has none; set "
                "learner.hparams.model.ema: {decay: 0.999} "
                "(on the command line: +learner.hparams.model.ema.decay=0.999) or use "
                "teacher=student"
            )

    def _student(self, inputs: HeadInputs, images: Tensor) -> Tensor:
        features = inputs.backbones[self.input_backbone](images)
        return inputs.heads[self.input_head](features)

    def _logits(self, inputs: HeadInputs, weak: Tensor, strong: Tensor) -> tuple[Tensor, Tensor]:
        """Returns the weak-view logits (no gradient) and the strong-view student logits."""
        if self.teacher == "ema":
            with torch.no_grad():
                features = inputs.backbones[self.teacher_backbone](weak)
                weak_logits = inputs.heads[self.teacher_head](features)
        elif self.joint_forward:
            logits = self._student(inputs, torch.cat([weak, strong]))
            weak_logits, strong_logits = logits[: len(weak)].detach(), logits[len(weak) :]
            return weak_logits, strong_logits
        else:
            with torch.no_grad():
                weak_logits = self._student(inputs, weak)
        return weak_logits, self._student(inputs, strong)

    def class_thresholds(self) -> Tensor | float:
        """The confidence threshold each pseudo-label class must reach (FixMatch: one for all)."""
        return self.threshold

    def update_state(self, confidence: Tensor, pseudo_labels: Tensor, indices: Tensor | None):
        """Updates learning state after each training batch (FixMatch keeps none)."""

    def forward(self, inputs: HeadInputs) -> Tensor:
        """Returns `mask * CE(strong logits, pseudo-label)` for each unlabeled image `(B,)`."""
        weak, strong, targets, indices = _unpack(inputs.data[self.input_data], self.input_data)
        weak_logits, strong_logits = self._logits(inputs, weak, strong)
        with torch.no_grad():
            probs = F.softmax(weak_logits.float() / self.temperature, dim=1)
            confidence, pseudo_labels = probs.max(dim=1)
            thresholds = self.class_thresholds()
            if isinstance(thresholds, Tensor):
                thresholds = thresholds[pseudo_labels]
            mask = (confidence >= thresholds).float()
        losses = mask * F.cross_entropy(strong_logits.float(), pseudo_labels, reduction="none")
        self.log_values = self._stats(mask, confidence, pseudo_labels, targets)
        if self.training:
            self.update_state(confidence, pseudo_labels, indices)
        return losses

    @torch.no_grad()
    def _stats(
        self, mask: Tensor, confidence: Tensor, pseudo_labels: Tensor, targets: Tensor | None
    ) -> dict[str, Tensor]:
        stats = {"mask_rate": mask.mean(), "confidence": confidence.mean()}
        if targets is not None:
            used = (mask > 0) & (targets >= 0)
            if used.any():
                correct = pseudo_labels[used] == targets[used]
                stats["pseudo_label_acc"] = correct.float().mean()
        return stats


def convex_mapping(x: Tensor) -> Tensor:
    """FlexMatch's non-linear mapping `M(x) = x / (2 - x)`: 0 at 0, 1 at 1, convex in between."""
    return x / (2.0 - x)


MAPPINGS = {"convex": convex_mapping, "linear": lambda x: x}
LEARNING_STATUS = ("estimate", "index")


class FlexMatchLossHead(FixMatchLossHead):
    """FlexMatch: FixMatch with class-wise thresholds that follow how well each class is learned
    (curriculum pseudo-labelling).

    A class's learning effect `sigma_c` counts the unlabeled images whose latest confident
    prediction (max probability >= `threshold`) was class c. With the threshold warm-up, it is
    normalized as `beta_c = sigma_c / max(max_k sigma_k, N - sum_k sigma_k)` (N - sum sigma: the
    images never predicted confidently yet); without it, `beta_c = sigma_c / max_k sigma_k`. The
    class threshold is `T_c = M(beta_c) * threshold` with `M(x) = x / (2 - x)` (`mapping:
    convex`; `linear` is M(x) = x), and the image's mask is `max q >= T_{argmax q}`. At the
    start every sigma is 0, so every threshold is 0 and every pseudo-label is used; thresholds
    rise towards `threshold` as classes are learned, well-learned classes first. Thresholds come
    from the state before the batch; the batch's confident predictions then update it.

    The papers' sigma needs each unlabeled image's index, which sesemi's image-folder batches do
    not carry. Two ways to keep the learning status (`learning_status`):

    * "estimate" (default, needs no indices): the fractions `f_c = sigma_c / N` are kept
      (buffer `class_status`, unused fraction `1 - sum f`) and moved by each batch in the
      expected way the paper's per-image update moves them: a batch of B images revisits B of
      the N images (rate `r = B / N`, N = `unlabeled_size`); the share q of them predicted
      confidently take their new class (share `q_c` for class c) and the rest keep their old
      status, so `f_c <- f_c * (1 - r * q) + r * q_c`. This assumes the revisited images' old
      statuses are distributed like the whole set's (in the paper, images not confident now were
      more likely unused before), so it is an approximation; N only sets how fast the estimate
      moves (one pass over N images is about one of the paper's epochs), so a rough value works.
    * "index" (the paper's algorithm): batches must be `(views, targets, indices)` with each
      image's dataset index in [0, unlabeled_size); buffer `selected_label` (N,) holds each
      image's latest confident class (-1: unused), as in the paper.

    The state is kept in registered buffers, so it is saved in checkpoints, restored on resume
    and moves with the module's device. Under DDP the per-batch counts ("estimate") or the
    indices and labels ("index") are gathered from every process before the update, so every
    process keeps the same state, computed from the global batch (exact, not approximate).

    Reference: Zhang et al., "FlexMatch: Boosting Semi-Supervised Learning with Curriculum
    Pseudo Labeling", arXiv:2110.08263. Deviations: the "estimate" learning status above; a
    prediction counts as confident at `max q >= threshold` (the same test as FixMatch's mask);
    the FixMatch deviations of `FixMatchLossHead` apply (separate forward passes, optional
    temperature and EMA teacher). Logs, besides FixMatch's values, `threshold_min`,
    `threshold_mean`, `threshold_max` (the class thresholds used) and `unused_rate` (the share
    of unlabeled images not confidently predicted yet).
    """

    def __init__(
        self,
        input_data: str,
        input_backbone: str = "backbone",
        threshold: float = 0.95,
        teacher: str = "student",
        temperature: float = 1.0,
        joint_forward: bool = False,
        input_head: str = "supervised_head",
        teacher_backbone: str = "teacher_backbone",
        teacher_head: str = "teacher_supervised_head",
        *,
        num_classes: int,
        unlabeled_size: int,
        threshold_warmup: bool = True,
        mapping: str = "convex",
        learning_status: str = "estimate",
    ) -> None:
        """Initializes the head (see `FixMatchLossHead` for the shared arguments).

        Args:
            input_data: The `data.train` loader giving `([weak, strong], targets)` batches.
            input_backbone: The student backbone.
            threshold: The fixed threshold tau the class thresholds are scaled from.
            teacher: "student" or "ema", as for FixMatch.
            temperature: Divides the weak logits before the softmax.
            joint_forward: Run weak and strong views in one forward pass.
            input_head: The student classifier.
            teacher_backbone: The EMA teacher's backbone.
            teacher_head: The EMA teacher's classifier.
            num_classes: The number of classes (the supervised classifier's outputs).
            unlabeled_size: N, the number of images in the unlabeled loader's dataset.
            threshold_warmup: Normalize by `max(max sigma, N - sum sigma)` (the paper's
                warm-up) rather than by `max sigma`.
            mapping: "convex" (`M(x) = x / (2 - x)`, the paper's choice) or "linear".
            learning_status: "estimate" or "index" (see the class docstring).
        """
        super().__init__(
            input_data,
            input_backbone,
            threshold,
            teacher,
            temperature,
            joint_forward,
            input_head,
            teacher_backbone,
            teacher_head,
        )
        if num_classes < 1:
            raise ValueError(f"num_classes must be at least 1, got {num_classes}")
        if unlabeled_size < 1:
            raise ValueError(f"unlabeled_size must be at least 1, got {unlabeled_size}")
        if mapping not in MAPPINGS:
            raise ValueError(f"unknown mapping '{mapping}'; use one of: {', '.join(MAPPINGS)}")
        if learning_status not in LEARNING_STATUS:
            raise ValueError(
                f"unknown learning_status '{learning_status}'; use one of: "
                f"{', '.join(LEARNING_STATUS)}"
            )
        self.num_classes = int(num_classes)
        self.unlabeled_size = int(unlabeled_size)
        self.threshold_warmup = threshold_warmup
        self.mapping = mapping
        self.learning_status = learning_status
        if learning_status == "estimate":
            self.register_buffer("class_status", torch.zeros(self.num_classes))
        else:
            self.register_buffer(
                "selected_label", torch.full((self.unlabeled_size,), -1, dtype=torch.long)
            )

    def build(self, backbones: Mapping[str, nn.Module], heads: Mapping[str, nn.Module]) -> None:
        """Checks the student, the teacher and that num_classes matches the classifier."""
        super().build(backbones, heads)
        out = getattr(heads[self.input_head], "out_features", None)
        if out is not None and out != self.num_classes:
            raise ValueError(
                f"FlexMatchLossHead has num_classes={self.num_classes} but the classifier "
                f"'{self.input_head}' predicts {out} classes; set num_classes: "
                "${learner.hparams.num_classes}"
            )

    def learning_effect(self) -> tuple[Tensor, Tensor]:
        """Returns `sigma / N` per class `(C,)` and the unused share `1 - sum sigma / N`."""
        if self.learning_status == "estimate":
            sigma = self.class_status
        else:
            selected = self.selected_label[self.selected_label >= 0]
            sigma = torch.bincount(selected, minlength=self.num_classes).float()
            sigma = sigma / self.unlabeled_size
        return sigma, (1.0 - sigma.sum()).clamp(min=0.0)

    def normalized_effect(self) -> Tensor:
        """Returns beta `(C,)`: the learning effects normalized as the paper does."""
        sigma, unused = self.learning_effect()
        top = sigma.max()
        if self.threshold_warmup:
            top = torch.maximum(top, unused)
        return torch.where(top > 0, sigma / top.clamp(min=1e-12), torch.zeros_like(sigma))

    def class_thresholds(self) -> Tensor:
        """Returns `T_c = M(beta_c) * threshold` per class `(C,)`."""
        return MAPPINGS[self.mapping](self.normalized_effect()) * self.threshold

    @torch.no_grad()
    def update_state(
        self, confidence: Tensor, pseudo_labels: Tensor, indices: Tensor | None
    ) -> None:
        """Moves the learning status by the batch's confident predictions (see the class)."""
        confident = confidence >= self.threshold
        if self.learning_status == "index":
            self._update_selected(confident, pseudo_labels, indices)
            return
        counts = torch.bincount(pseudo_labels[confident], minlength=self.num_classes).float()
        counts = torch.cat([counts, counts.new_tensor([len(pseudo_labels)])])
        if _distributed():
            dist.all_reduce(counts)
        per_class, batch = counts[:-1], counts[-1].clamp(min=1.0)
        rate = (batch / self.unlabeled_size).clamp(max=1.0)  # a tensor: no GPU sync
        q_c = per_class / batch
        status = self.class_status
        status.mul_(1.0 - rate * q_c.sum()).add_(rate * q_c)

    def _update_selected(
        self, confident: Tensor, pseudo_labels: Tensor, indices: Tensor | None
    ) -> None:
        if indices is None:
            raise ValueError(
                f"FlexMatchLossHead(learning_status=index) needs each image's dataset index: "
                f"data.train.{self.input_data} batches must be (views, targets, indices); "
                "use learning_status=estimate for (views, targets) batches"
            )
        indices = indices.to(self.selected_label.device).long()
        labels = torch.where(confident, pseudo_labels, torch.full_like(pseudo_labels, -1))
        packed = torch.stack([indices, labels.to(indices.device)])  # (2, B)
        if _distributed():
            size = torch.tensor([packed.shape[1]], device=packed.device)
            dist.all_reduce(size, op=dist.ReduceOp.MAX)
            padded = packed.new_full((2, int(size)), -1)
            padded[:, : packed.shape[1]] = packed
            gathered = [torch.empty_like(padded) for _ in range(dist.get_world_size())]
            dist.all_gather(gathered, padded)
            packed = torch.cat(gathered, dim=1)
        indices, labels = packed[0], packed[1]
        keep = (indices >= 0) & (labels >= 0)
        if keep.any() and int(indices[keep].max()) >= self.unlabeled_size:
            raise ValueError(
                f"sample index {int(indices[keep].max())} is out of range for "
                f"unlabeled_size={self.unlabeled_size}; set it to the unlabeled dataset's size"
            )
        self.selected_label[indices[keep]] = labels[keep]

    def _stats(
        self, mask: Tensor, confidence: Tensor, pseudo_labels: Tensor, targets: Tensor | None
    ) -> dict[str, Tensor]:
        stats = super()._stats(mask, confidence, pseudo_labels, targets)
        with torch.no_grad():
            thresholds = self.class_thresholds()
            stats["threshold_min"] = thresholds.min()
            stats["threshold_mean"] = thresholds.mean()
            stats["threshold_max"] = thresholds.max()
            stats["unused_rate"] = self.learning_effect()[1]
        return stats
