"""ABC: a second, class-balanced classifier for long-tailed labeled and unlabeled sets.

Reference: Lee, Shin and Kim, "ABC: Auxiliary Balanced Classifier for Class-imbalanced
Semi-supervised Learning", NeurIPS 2021, arXiv:2110.10368.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from sesemi.models.heads.base import SUPERVISED, HeadContext, HeadInputs, LossHead, views_key
from sesemi.models.heads.fixmatch import pseudo_label_stats

BALANCED_HINT = "set learner.hparams.model.balanced_head: true ('method=[fixmatch_da,abc]' does)"


def keep_probabilities(counts: Tensor) -> Tensor:
    """ABC's Bernoulli parameter per class `(K,)`: `N_min / N_c`, N_c the class's labeled
    images and N_min the fewest of any class that has some (1 for a class with none)."""
    counts = counts.float()
    present = counts > 0
    if not present.any():
        raise ValueError("ABC needs labeled images; the labeled set's class counts are all 0")
    fewest = counts[present].min()
    return torch.where(present, fewest / counts.clamp(min=1), torch.ones_like(counts))


def unlabeled_keep_probabilities(keep: Tensor, progress: float) -> Tensor:
    """The unlabeled images' Bernoulli parameter per pseudo-label class `(K,)` at a share
    `progress` in [0, 1] of training: `1 - progress * (1 - N_min / N_c)`, from 1 (every
    confident image) at the start to the labeled images' `N_min / N_c` at the end."""
    return 1.0 - min(max(progress, 0.0), 1.0) * (1.0 - keep)


class ABCLossHead(LossHead):
    """ABC's terms: the learner's `balanced_head` (a second linear classifier on the same
    backbone features, which evaluation predicts with) trained as if the classes were balanced.

    Each labeled image of class c counts with probability `N_min / N_c` (a Bernoulli mask `m`
    drawn per image per step), N_c the labeled images of class c and N_min the fewest of any
    class; so every class weighs about as much as the rarest. Each unlabeled image's balanced
    prediction on its weak view, `q = softmax(h(f(weak)))` (no gradient), is the target of its
    strong view where it is confident, and counts with a probability that falls over training
    from 1 to `N_min / N_c` for its pseudo-label c (`unlabeled_keep_probabilities`, t the step
    and T `total_steps`). Per unlabeled image (the learner's mean over the unlabeled batch adds
    the labeled term once):

        mask_u * CE(h(f(strong)), argmax q) + mean_l m_l * CE(h(f(x_l)), y_l),
        mask_u = [max q >= threshold] * Bernoulli(1 - (t / T) * (1 - N_min / N_argmax q)).

    The backbone f is shared: these terms train it too, besides the base method's (the
    FixMatch-family head that pseudo-labels with `supervised_head`). The features come from the
    passes the learner (labeled batch) and that head (both unlabeled views; `views_key`) made;
    without such a head, the views get passes of their own.

    Deviations: the paper's unlabeled mask decays by epoch, here by optimizer step; the class
    counts are those of the whole labeled set (`HeadContext.class_counts["supervised"]`).

    Logs `labeled_kept` (share of labeled images counted), `mask_rate`, `confidence` and, where
    unlabeled targets are known, `pseudo_label_acc` (of the balanced classifier's pseudo-labels).
    """

    trains_balanced_head = True

    def __init__(
        self,
        input_data: str,
        total_steps: int,
        threshold: float = 0.95,
        input_backbone: str = "backbone",
        input_head: str = "balanced_head",
    ) -> None:
        """Initializes the head.

        Args:
            input_data: The `data.train` loader giving `([weak, strong], targets)` batches.
            total_steps: The run's optimizer steps T, over which the unlabeled mask's keep
                probability falls to the labeled one's (`${sesemi:max_iterations}`).
            threshold: The confidence the balanced prediction on the weak view needs.
            input_backbone: The student backbone.
            input_head: The balanced classifier.
        """
        super().__init__(input_data, input_backbone, input_head)
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"threshold must be in [0, 1], got {threshold}")
        if int(total_steps) < 1:
            raise ValueError(f"total_steps must be at least 1, got {total_steps}")
        self.threshold = float(threshold)
        self.total_steps = int(total_steps)
        self.register_buffer("keep", torch.ones(0), persistent=False)

    def build(self, context: HeadContext) -> None:
        """Checks the balanced classifier exists and reads the labeled set's class counts."""
        if self.input_head not in context.heads:
            raise ValueError(
                f"ABCLossHead reads the classifier '{self.input_head}'; {BALANCED_HINT}"
            )
        super().build(context)
        counts = context.class_counts.get(SUPERVISED)
        if counts is None:  # e.g. evaluating a checkpoint: only training needs them
            self.keep = torch.ones(0)
            return
        if len(counts) > context.num_classes:
            raise ValueError(
                f"the labeled set has {len(counts)} classes but the classifier "
                f"{context.num_classes}; set learner.hparams.num_classes"
            )
        padded = torch.zeros(context.num_classes)
        padded[: len(counts)] = torch.tensor([float(c) for c in counts])
        self.keep = keep_probabilities(padded)

    def _unlabeled_features(self, inputs: HeadInputs) -> tuple[Tensor, Tensor, Tensor | None]:
        weak, strong, targets, _ = self.two_views(
            inputs,
            names=("<weak>", "<strong>"),
            hint=" ('method=[fixmatch_da,abc]' sets it up)",
        )
        cached = inputs.features.get(views_key(self.input_data))
        if cached is not None:
            return cached[0], cached[1], targets
        with torch.no_grad():
            weak_features = self.features(inputs, weak)
        return weak_features, self.features(inputs, strong), targets

    def forward(self, inputs: HeadInputs) -> Tensor:
        """Returns each unlabeled image's masked loss plus the labeled term `(B_u,)`."""
        if len(self.keep) == 0:
            raise ValueError(
                "ABCLossHead needs the labeled set's images per class: data.train.supervised "
                "must be a labeled image folder (every image in a class folder)"
            )
        head = inputs.heads[self.input_head]
        weak_features, strong_features, targets = self._unlabeled_features(inputs)
        keep = self.keep.to(strong_features.device)
        labeled = inputs.data.get(SUPERVISED)
        labeled_term = strong_features.new_zeros(())
        kept = None
        if labeled is not None and "supervised_backbone" in inputs.features:
            classes = labeled[1].argmax(dim=1) if labeled[1].ndim == 2 else labeled[1]
            with torch.no_grad():
                kept = torch.bernoulli(keep[classes])
            logits = head(inputs.features["supervised_backbone"]).float()
            labeled_term = (kept * F.cross_entropy(logits, classes, reduction="none")).mean()
        with torch.no_grad():
            probs = head(weak_features.detach()).float().softmax(dim=1)
            confidence, pseudo_labels = probs.max(dim=1)
            progress = inputs.step / self.total_steps
            keep_u = unlabeled_keep_probabilities(keep, progress)[pseudo_labels]
            mask = (confidence >= self.threshold).float() * torch.bernoulli(keep_u)
        strong_logits = head(strong_features).float()
        losses = mask * F.cross_entropy(strong_logits, pseudo_labels, reduction="none")
        self.log_values = pseudo_label_stats(mask, confidence, pseudo_labels, targets)
        if kept is not None:
            self.log_values["labeled_kept"] = kept.mean()
        return losses + labeled_term
