"""Threshold policies: how much each pseudo-label counts, given the weak view's probabilities."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from sesemi.models.distributed import (
    distributed,
    global_class_counts,
    global_concat,
    global_sums,
)
from sesemi.models.heads.base import HeadContext


def _check_threshold(threshold: float) -> float:
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must be in [0, 1], got {threshold}")
    return float(threshold)


class ThresholdPolicy(nn.Module):
    """Decides how much each pseudo-label counts in a confidence-thresholded head (FixMatch).

    A policy sees the class probabilities `(B, C)` of the weak views (after the head's
    temperature) and weighs each image's pseudo-label in [0, 1]: a hard 0/1 mask (FixMatch,
    FlexMatch) or a soft weight (e.g. SoftMatch's truncated Gaussian). A policy with state
    (class-wise counts, running means of confidence) keeps it in registered buffers that exist
    once `build` has run, so checkpoints save and restore it; `update` moves it after each
    training batch, identically on every process.
    """

    def build(self, context: HeadContext, input_data: str) -> None:
        """Reads what it needs from the learner and creates its state (called once by the head).

        Args:
            context: The learner's modules, class count and dataset sizes.
            input_data: The `data.train` loader of the head's unlabeled images.
        """

    def mask(self, probs: Tensor) -> Tensor:
        """Returns each image's weight in [0, 1] `(B,)` from its class probabilities `(B, C)`."""
        raise NotImplementedError

    def update(self, probs: Tensor, pseudo_labels: Tensor, indices: Tensor | None) -> None:
        """Moves the state by a training batch (stateless policies keep none).

        Args:
            probs: The weak views' class probabilities `(B, C)`.
            pseudo_labels: Their argmax `(B,)`.
            indices: The images' dataset indices `(B,)`, when the batch carries them.
        """

    def log_values(self) -> dict[str, Tensor]:
        """Scalars worth logging about the policy's current state."""
        return {}

    def forward(self, probs: Tensor, indices: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Weighs a batch's pseudo-labels (and, in training, moves the state by the batch).

        The default order masks with the state before the batch, then updates it (FlexMatch);
        a policy that updates first (FreeMatch, SoftMatch) overrides this. `self.logged` keeps
        the logged values of the state the weights were computed with.

        Args:
            probs: The weak views' class probabilities `(B, C)`.
            indices: The images' dataset indices `(B,)`, when the batch carries them.

        Returns:
            The probabilities whose argmax is each image's pseudo-label `(B, C)`, and each
            image's weight in [0, 1] `(B,)`.
        """
        weights = self.mask(probs)
        self.logged = self.log_values()
        if self.training:
            self.update(probs, probs.argmax(dim=1), indices)
        return probs, weights

    def extra_loss(self, strong_logits: Tensor, weights: Tensor) -> Tensor | None:
        """An optional batch-level term added to the unlabeled loss (FreeMatch's fairness)."""
        return None

    def adjust_logits(self, strong_logits: Tensor) -> Tensor:
        """The strong-view logits the loss reads (DebiasPL's adaptive margin); unchanged here."""
        return strong_logits

    def observe_labeled(self, targets: Tensor) -> None:
        """Sees a training step's labeled targets `(B,)` (distribution alignment counts them)."""


class FixedThreshold(ThresholdPolicy):
    """FixMatch's rule: an image counts (weight 1) when its max probability is at least tau."""

    def __init__(self, threshold: float = 0.95) -> None:
        """Initializes the policy.

        Args:
            threshold: The confidence threshold tau in [0, 1].
        """
        super().__init__()
        self.threshold = _check_threshold(threshold)

    def mask(self, probs: Tensor) -> Tensor:
        """Returns `max_c probs >= threshold` as floats `(B,)`."""
        return (probs.max(dim=1).values >= self.threshold).float()


def convex_mapping(x: Tensor) -> Tensor:
    """FlexMatch's non-linear mapping `M(x) = x / (2 - x)`: 0 at 0, 1 at 1, convex in between."""
    return x / (2.0 - x)


def linear_mapping(x: Tensor) -> Tensor:
    """The identity mapping `M(x) = x`."""
    return x


MAPPINGS: dict[str, Callable[[Tensor], Tensor]] = {
    "convex": convex_mapping,
    "linear": linear_mapping,
}
LEARNING_STATUS = ("estimate", "index")


class FlexMatchThreshold(ThresholdPolicy):
    """FlexMatch's class-wise thresholds that follow how well each class is learned (curriculum
    pseudo-labelling).

    A class's learning effect `sigma_c` counts the unlabeled images whose latest confident
    prediction (max probability >= `threshold`) was class c. With the threshold warm-up, it is
    normalized as `beta_c = sigma_c / max(max_k sigma_k, N - sum_k sigma_k)` (N - sum sigma: the
    images never predicted confidently yet); without it, `beta_c = sigma_c / max_k sigma_k`. The
    class threshold is `T_c = M(beta_c) * threshold` with `M(x) = x / (2 - x)` (`mapping:
    convex`; `linear` is M(x) = x), and the image's mask is `max q >= T_{argmax q}`. At the
    start every sigma is 0, so every threshold is 0 and every pseudo-label is used; thresholds
    rise towards `threshold` as classes are learned, well-learned classes first. Thresholds come
    from the state before the batch; the batch's confident predictions then update it.

    The paper's sigma needs each unlabeled image's index. Two ways to keep the learning status
    (`learning_status`):

    * "index" (the default; the paper's algorithm and USB's): batches are `(views, targets,
      indices)` with each image's dataset index in [0, unlabeled_size) (sesemi's training
      loaders add it); buffer `selected_label` (N,) holds each image's latest confident class
      (-1: unused).
    * "estimate", an approximation for datasets that cannot give indices, which behaves
      differently: the fractions `f_c = sigma_c / N` are kept (buffer `class_status`, unused
      fraction `1 - sum f`) and moved by each batch as `f_c <- f_c * (1 - r * q) + r * q_c`
      (rate `r = B / N`; q the batch's confident share, `q_c` per class). It assumes the
      revisited images' old statuses are distributed like the whole set's, so it settles at
      `q_c / q`: the unused share always falls to 0 (ending the warm-up early, even when most
      images are never predicted confidently) and the class ratios follow per-visit confidence
      rather than per-image status. On a synthetic stream of 1,000 images of which a fixed easy
      46 % is confidently predicted, after 10 epochs the unused share is 0.010 (estimate)
      against 0.540 (index) and the highest class threshold 0.950 against 0.042
      (`tests/test_thresholds.py`).

    The state is kept in registered buffers, so it is saved in checkpoints, restored on resume
    and moves with the module's device. They are created as soon as `num_classes` and
    `unlabeled_size` are known: at construction when both are given, otherwise in `build`, which
    takes the classifier's class count and the unlabeled loader's dataset size. Under DDP the
    per-batch counts ("estimate") or the indices and labels ("index") are gathered from every
    process before the update, so every process keeps the same state, computed from the global
    batch (exact, not approximate).

    Reference: Zhang et al., "FlexMatch: Boosting Semi-Supervised Learning with Curriculum
    Pseudo Labeling", arXiv:2110.08263. Deviations: the optional "estimate" learning status
    above; a prediction counts as confident at `max q >= threshold` (the same test as FixMatch's
    mask).
    Logs `threshold_min`, `threshold_mean`, `threshold_max` (the class thresholds) and
    `unused_rate` (the share of unlabeled images not confidently predicted yet).
    """

    class_status: Tensor
    selected_label: Tensor

    def __init__(
        self,
        threshold: float = 0.95,
        warmup: bool = True,
        mapping: str = "convex",
        learning_status: str = "index",
        num_classes: int | None = None,
        unlabeled_size: int | None = None,
    ) -> None:
        """Initializes the policy.

        Args:
            threshold: The fixed threshold tau the class thresholds are scaled from.
            warmup: Normalize by `max(max sigma, N - sum sigma)` (the paper's threshold warm-up)
                rather than by `max sigma`.
            mapping: "convex" (`M(x) = x / (2 - x)`, the paper's choice) or "linear".
            learning_status: "estimate" or "index" (see the class docstring).
            num_classes: The number of classes; None: the classifier's (from `build`).
            unlabeled_size: N, the number of images in the unlabeled loader's dataset; None: the
                loader's dataset size (from `build`).
        """
        super().__init__()
        if mapping not in MAPPINGS:
            raise ValueError(f"unknown mapping '{mapping}'; use one of: {', '.join(MAPPINGS)}")
        if learning_status not in LEARNING_STATUS:
            raise ValueError(
                f"unknown learning_status '{learning_status}'; use one of: "
                f"{', '.join(LEARNING_STATUS)}"
            )
        for name, value in (("num_classes", num_classes), ("unlabeled_size", unlabeled_size)):
            if value is not None and value < 1:
                raise ValueError(f"{name} must be at least 1, got {value}")
        self.threshold = _check_threshold(threshold)
        self.warmup = warmup
        self.mapping = mapping
        self.learning_status = learning_status
        self.num_classes = num_classes
        self.unlabeled_size = unlabeled_size
        self.input_data = "<loader>"  # for error messages; `build` names the head's loader
        self._allocate()

    def _allocate(self) -> None:
        """Creates the state buffer once the class count and dataset size are known."""
        if self.num_classes is None or self.unlabeled_size is None:
            return
        if self.learning_status == "estimate" and "class_status" not in self._buffers:
            self.register_buffer("class_status", torch.zeros(self.num_classes))
        if self.learning_status == "index" and "selected_label" not in self._buffers:
            full = torch.full((self.unlabeled_size,), -1, dtype=torch.long)
            self.register_buffer("selected_label", full)

    def build(self, context: HeadContext, input_data: str) -> None:
        """Takes unset sizes from the learner, checks set ones, and creates the state."""
        self.input_data = input_data
        self.num_classes = _class_count(self.num_classes, context, "FlexMatch")
        if self.unlabeled_size is None:
            if input_data not in context.dataset_sizes:
                raise ValueError(
                    f"FlexMatch needs the number of images of data.train.{input_data}, which "
                    "the learner does not know; set the head's unlabeled_size"
                )
            self.unlabeled_size = int(context.dataset_sizes[input_data])
        self._allocate()

    def learning_effect(self) -> tuple[Tensor, Tensor]:
        """Returns `sigma / N` per class `(C,)` and the unused share `1 - sum sigma / N`."""
        if self.num_classes is None or self.unlabeled_size is None:
            raise RuntimeError(
                "FlexMatchThreshold has no state yet: build it (the learner does) or give "
                "num_classes and unlabeled_size"
            )
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
        if self.warmup:
            top = torch.maximum(top, unused)
        return torch.where(top > 0, sigma / top.clamp(min=1e-12), torch.zeros_like(sigma))

    def class_thresholds(self) -> Tensor:
        """Returns `T_c = M(beta_c) * threshold` per class `(C,)`."""
        return MAPPINGS[self.mapping](self.normalized_effect()) * self.threshold

    def mask(self, probs: Tensor) -> Tensor:
        """Returns `max q >= T_{argmax q}` as floats `(B,)`."""
        confidence, pseudo_labels = probs.max(dim=1)
        return (confidence >= self.class_thresholds()[pseudo_labels]).float()

    @torch.no_grad()
    def update(self, probs: Tensor, pseudo_labels: Tensor, indices: Tensor | None) -> None:
        """Moves the learning status by the batch's confident predictions (see the class)."""
        confident = probs.max(dim=1).values >= self.threshold
        if self.learning_status == "index":
            self._update_selected(confident, pseudo_labels, indices)
            return
        counts = torch.bincount(pseudo_labels[confident], minlength=self.num_classes).float()
        counts = torch.cat([counts, counts.new_tensor([len(pseudo_labels)])])
        if distributed():
            dist.all_reduce(counts)
        per_class, batch = counts[:-1], counts[-1].clamp(min=1.0)
        rate = (batch / self.unlabeled_size).clamp(max=1.0)  # a tensor: no GPU sync
        q_c = per_class / batch
        self.class_status.mul_(1.0 - rate * q_c.sum()).add_(rate * q_c)

    def _update_selected(
        self, confident: Tensor, pseudo_labels: Tensor, indices: Tensor | None
    ) -> None:
        if indices is None:
            raise ValueError(
                f"FlexMatch with learning_status=index needs each image's dataset index: "
                f"data.train.{self.input_data} batches must be (views, targets, indices); "
                "use learning_status=estimate for (views, targets) batches"
            )
        indices = indices.to(self.selected_label.device).long()
        labels = torch.where(confident, pseudo_labels, torch.full_like(pseudo_labels, -1))
        packed = torch.stack([indices, labels.to(indices.device)], dim=1)  # (B, 2)
        packed = global_concat(packed)  # every process's images, in rank order
        indices, labels = packed[:, 0], packed[:, 1]
        keep = (indices >= 0) & (labels >= 0)
        if keep.any() and int(indices[keep].max()) >= self.unlabeled_size:
            raise ValueError(
                f"sample index {int(indices[keep].max())} is out of range for "
                f"unlabeled_size={self.unlabeled_size}; set it to the unlabeled dataset's size"
            )
        self.selected_label[indices[keep]] = labels[keep]

    @torch.no_grad()
    def log_values(self) -> dict[str, Tensor]:
        """The class thresholds' min, mean and max, and the unused share of unlabeled images."""
        thresholds = self.class_thresholds()
        return {
            "threshold_min": thresholds.min(),
            "threshold_mean": thresholds.mean(),
            "threshold_max": thresholds.max(),
            "unused_rate": self.learning_effect()[1],
        }


class FreeMatchThreshold(ThresholdPolicy):
    """FreeMatch's self-adaptive thresholds and its self-adaptive fairness term.

    State (exponential moving averages with momentum m, over every process's unlabeled batch):
    the global threshold `tau = m tau + (1 - m) mean_b max_c q_b(c)`, the class-wise model
    prediction `p = m p + (1 - m) mean_b q_b` and the pseudo-label histogram
    `h = m h + (1 - m) hist(argmax q_b) / B`. The state moves first, then an image counts when
    `max_c q_b(c) >= tau * p(argmax q_b) / max_c p(c)` (self-adaptive thresholding, SAT).

    The fairness term (SAF) is added to the unlabeled loss with weight `fairness_weight`: over
    the images the mask keeps, with `s` their strong views' probabilities and `h_s` the
    histogram of `argmax s`, it is `sum_c P(c) log Q(c)` with `P = SumNorm(p / h)` and
    `Q = SumNorm(mean(s) / h_s)`; it pulls the batch's class balance away from the model's
    running one, towards diverse pseudo-labels.

    Reference: Wang et al., "FreeMatch: Self-adaptive Thresholding for Semi-supervised Learning",
    arXiv:2205.07246, and its implementation in USB (microsoft/Semi-supervised-learning), whose
    fairness term this is: the paper writes it as `-H(SumNorm(mean(s) / h_s))`; the code uses
    the cross-entropy form above with the running `p / h`. Deviations: `initial: uniform`
    (default) starts tau, p and h at 1/C as the paper says; USB starts them at 1 (`initial:
    ones`: a threshold of 1 that decays, so early steps use few pseudo-labels).
    """

    INITIAL = ("uniform", "ones")

    def __init__(
        self,
        momentum: float = 0.999,
        fairness_weight: float = 0.001,
        initial: str = "uniform",
        num_classes: int | None = None,
    ) -> None:
        """Initializes the policy.

        Args:
            momentum: The EMA momentum m of the state (USB: 0.999).
            fairness_weight: The fairness term's weight relative to the unlabeled loss (USB's
                CIFAR-10 configs: 0.001).
            initial: "uniform" (the paper: 1/C) or "ones" (USB's code) as the state's start.
            num_classes: The number of classes; None: the classifier's (from `build`).
        """
        super().__init__()
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        if initial not in self.INITIAL:
            raise ValueError(f"unknown initial '{initial}'; use one of: {', '.join(self.INITIAL)}")
        self.momentum = float(momentum)
        self.fairness_weight = float(fairness_weight)
        self.initial = initial
        self.num_classes = num_classes
        self._allocate()

    def _allocate(self) -> None:
        if self.num_classes is None or "global_threshold" in self._buffers:
            return
        start = 1.0 / self.num_classes if self.initial == "uniform" else 1.0
        self.register_buffer("global_threshold", torch.tensor(start))
        self.register_buffer("class_prediction", torch.full((self.num_classes,), start))
        self.register_buffer("label_histogram", torch.full((self.num_classes,), start))

    def build(self, context: HeadContext, input_data: str) -> None:
        """Takes the class count from the classifier and creates the state."""
        self.num_classes = _class_count(self.num_classes, context, "FreeMatch")
        self._allocate()

    def class_thresholds(self) -> Tensor:
        """Returns `tau * p(c) / max p` per class `(C,)`."""
        p = self.class_prediction
        return self.global_threshold * p / p.max().clamp(min=1e-12)

    def mask(self, probs: Tensor) -> Tensor:
        """Returns `max q >= tau_{argmax q}` as floats `(B,)`."""
        confidence, pseudo_labels = probs.max(dim=1)
        return (confidence >= self.class_thresholds()[pseudo_labels]).float()

    @torch.no_grad()
    def update(self, probs: Tensor, pseudo_labels: Tensor, indices: Tensor | None) -> None:
        """Moves tau, p and h by the (global) batch's means."""
        histogram = torch.bincount(pseudo_labels, minlength=probs.shape[1]).float()
        count = probs.new_tensor([len(probs)])
        confidence, mean_probs, histogram, count = global_sums(
            probs.max(dim=1).values.sum(), probs.sum(dim=0), histogram, count
        )
        m, n = self.momentum, count.clamp(min=1.0)
        self.global_threshold.mul_(m).add_((1 - m) * (confidence / n).squeeze())
        self.class_prediction.mul_(m).add_((1 - m) * mean_probs / n)
        self.label_histogram.mul_(m).add_((1 - m) * histogram / n)

    def forward(self, probs: Tensor, indices: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Updates the state (in training), then masks with it (as FreeMatch does)."""
        if self.training:
            self.update(probs, probs.argmax(dim=1), indices)
        weights = self.mask(probs)
        self.logged = self.log_values()
        return probs, weights

    def extra_loss(self, strong_logits: Tensor, weights: Tensor) -> Tensor | None:
        """The weighted fairness term over the images the mask keeps (0 when it keeps none)."""
        if self.fairness_weight == 0:
            return None
        kept = weights > 0
        if not kept.any():
            return strong_logits.new_zeros(())
        probs = F.softmax(strong_logits[kept].float(), dim=1)
        histogram = torch.bincount(probs.argmax(dim=1), minlength=probs.shape[1]).float()
        model = _sum_normalize(self.class_prediction * _safe_inverse(self.label_histogram))
        batch = _sum_normalize(probs.mean(dim=0) * _safe_inverse(histogram / len(probs)))
        return self.fairness_weight * (model * torch.log(batch + 1e-12)).sum()

    @torch.no_grad()
    def log_values(self) -> dict[str, Tensor]:
        """The global threshold and the class thresholds' min and max."""
        thresholds = self.class_thresholds()
        return {
            "global_threshold": self.global_threshold.clone(),
            "threshold_min": thresholds.min(),
            "threshold_max": thresholds.max(),
        }


class SoftMatchWeight(ThresholdPolicy):
    """SoftMatch's truncated-Gaussian sample weights, with uniform alignment.

    Uniform alignment (UA): the running mean prediction `p = m p + (1 - m) mean_b q_b` (started
    at the first batch's mean) aligns each weak prediction to the uniform class distribution,
    `q' = SumNorm(q / p)`. The confidence statistics move by the aligned predictions:
    `mu = m mu + (1 - m) mean_b max q'_b` and `var = m var + (1 - m) var_b(max q'_b)` (unbiased;
    started at 1/C and 1). An image weighs `exp(-(min(max q' - mu, 0))^2 / (2 var / n^2))`: 1 when
    its aligned confidence reaches mu, less the further below (n = `n_sigma` standard deviations
    of the Gaussian fall within `sqrt(var)`). Pseudo-labels stay the argmax of the unaligned q.
    The statistics move first, then weigh the batch.

    Reference: Chen et al., "SoftMatch: Addressing the Quantity-Quality Trade-off in
    Semi-supervised Learning", arXiv:2301.10921, and USB's implementation (n_sigma = 2,
    momentum 0.999, pseudo-labels from the unaligned predictions), which this follows.
    """

    def __init__(
        self,
        momentum: float = 0.999,
        n_sigma: float = 2.0,
        uniform_alignment: bool = True,
        num_classes: int | None = None,
    ) -> None:
        """Initializes the policy.

        Args:
            momentum: The EMA momentum m of the statistics.
            n_sigma: The Gaussian's width divisor: variance `var / n_sigma^2` (USB: 2).
            uniform_alignment: Align the predictions to the uniform distribution (UA).
            num_classes: The number of classes; None: the classifier's (from `build`).
        """
        super().__init__()
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        if n_sigma <= 0:
            raise ValueError(f"n_sigma must be positive, got {n_sigma}")
        self.momentum = float(momentum)
        self.n_sigma = float(n_sigma)
        self.uniform_alignment = uniform_alignment
        self.num_classes = num_classes
        self._allocate()

    def _allocate(self) -> None:
        if self.num_classes is None or "confidence_mean" in self._buffers:
            return
        self.register_buffer("confidence_mean", torch.tensor(1.0 / self.num_classes))
        self.register_buffer("confidence_var", torch.tensor(1.0))
        self.register_buffer("class_prediction", torch.zeros(self.num_classes))
        self.register_buffer("aligned_steps", torch.zeros((), dtype=torch.long))

    def build(self, context: HeadContext, input_data: str) -> None:
        """Takes the class count from the classifier and creates the state."""
        self.num_classes = _class_count(self.num_classes, context, "SoftMatch")
        self._allocate()

    def align(self, probs: Tensor) -> Tensor:
        """`SumNorm(q / p)`: the predictions aligned to the uniform class distribution."""
        if not self.uniform_alignment or int(self.aligned_steps) == 0:
            return probs
        target = 1.0 / probs.shape[1]
        return _sum_normalize(probs * (target + 1e-6) / (self.class_prediction + 1e-6), dim=1)

    def mask(self, probs: Tensor) -> Tensor:
        """Returns each image's truncated-Gaussian weight `(B,)` from aligned `probs`."""
        below = (probs.max(dim=1).values - self.confidence_mean).clamp(max=0.0)
        return torch.exp(-below.pow(2) / (2 * self.confidence_var / self.n_sigma**2))

    @torch.no_grad()
    def update_alignment(self, probs: Tensor) -> None:
        """Moves the running mean prediction by the (global) batch's mean."""
        total, count = global_sums(probs.sum(dim=0), probs.new_tensor([len(probs)]))
        mean = total / count.clamp(min=1.0)
        if int(self.aligned_steps) == 0:
            self.class_prediction.copy_(mean)
        else:
            self.class_prediction.mul_(self.momentum).add_((1 - self.momentum) * mean)
        self.aligned_steps += 1

    @torch.no_grad()
    def update(self, probs: Tensor, pseudo_labels: Tensor, indices: Tensor | None) -> None:
        """Moves mu and var by the (global) batch's aligned confidences."""
        confidence = probs.max(dim=1).values
        total, squares, count = global_sums(
            confidence.sum(), confidence.pow(2).sum(), probs.new_tensor([len(probs)])
        )
        n = count.clamp(min=2.0)
        mean = total / count.clamp(min=1.0)
        var = (squares - count * mean**2) / (n - 1)
        m = self.momentum
        self.confidence_mean.mul_(m).add_((1 - m) * mean.squeeze())
        self.confidence_var.mul_(m).add_((1 - m) * var.squeeze())

    def forward(self, probs: Tensor, indices: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Aligns (moving the mean prediction first), updates mu and var, weighs; pseudo-labels
        come from the unaligned predictions."""
        if self.training and self.uniform_alignment:
            self.update_alignment(probs)
        aligned = self.align(probs)
        if self.training:
            self.update(aligned, aligned.argmax(dim=1), indices)
        weights = self.mask(aligned)
        self.logged = self.log_values()
        return probs, weights

    @torch.no_grad()
    def log_values(self) -> dict[str, Tensor]:
        """The Gaussian's mean and standard deviation."""
        return {
            "confidence_mean": self.confidence_mean.clone(),
            "confidence_std": self.confidence_var.sqrt(),
        }


def _sum_normalize(x: Tensor, dim: int = -1) -> Tensor:
    return x / x.sum(dim=dim, keepdim=True).clamp(min=1e-12)


def _safe_inverse(x: Tensor) -> Tensor:
    # 1 / x with 0 where x is 0 (a class no pseudo-label fell into weighs nothing).
    return torch.where(x > 0, 1.0 / x.clamp(min=1e-12), torch.zeros_like(x))


def _class_count(given: int | None, context: HeadContext, owner: str) -> int:
    if given is None:
        return int(context.num_classes)
    if given != context.num_classes:
        raise ValueError(
            f"{owner} has num_classes={given} but the classifier predicts "
            f"{context.num_classes} classes; leave num_classes unset to use the classifier's"
        )
    return int(given)


class DistributionAlignment(ThresholdPolicy):
    """ReMixMatch's distribution alignment in front of another policy (FixMatch's threshold by
    default): each weak prediction is scaled by the target class distribution over the model's
    running mean prediction, `q' = SumNorm(q * p_target / p_model)`, and the wrapped policy
    thresholds (and takes its pseudo-labels from) `q'`.

    `p_model` is the mean of the last `window` unlabeled batches' mean predictions (ReMixMatch:
    128; the batch's own mean enters before it is aligned, as in USB's `DistAlignQueueHook`).
    `p_target` is "uniform" or "labeled": the class frequencies of the labeled training
    targets seen so far (counted from the `supervised` batches, over all processes; exact after
    one labeled epoch, uniform until the first labeled batch). On a long-tailed labeled set,
    "labeled" keeps the pseudo-labels' class balance at the labeled set's instead of letting
    the majority classes take over; "uniform" pushes towards balance.

    `sinkhorn_iterations: n > 0` goes further: after the scaling, n Sinkhorn-Knopp rounds on the
    global batch (each scales every class column so the batch's summed predictions match
    `B * p_target`, then renormalizes every row) make the batch's soft assignments hold the
    target's class balance, not only its running mean: the balanced assignment of SwAV (Caron et
    al., arXiv:2006.09882) and of Sinkhorn Label Allocation (Tai et al., arXiv:2102.08622),
    here in front of a threshold. A class the model keeps absorbing loses its least certain
    images to the classes short of their share within every batch.

    Reference: Berthelot et al., "ReMixMatch: Semi-Supervised Learning with Distribution
    Alignment and Augmentation Anchoring", arXiv:1911.09785, section 3.2. The state
    (`prediction_history`, `labeled_counts` and the wrapped policy's) is saved in checkpoints
    and equal on every DDP process. Logs the wrapped policy's values and `alignment_max`, the
    largest class scale `p_target / p_model`.
    """

    TARGETS = ("labeled", "uniform")

    def __init__(
        self,
        policy: ThresholdPolicy | float = 0.95,
        target: str = "labeled",
        window: int = 128,
        num_classes: int | None = None,
        sinkhorn_iterations: int = 0,
    ) -> None:
        """Initializes the policy.

        Args:
            policy: The policy thresholding the aligned predictions, or FixMatch's threshold.
            target: The distribution to align to: "labeled" or "uniform".
            window: How many recent unlabeled batches `p_model` averages.
            num_classes: The number of classes; None: the classifier's (from `build`).
            sinkhorn_iterations: Sinkhorn-Knopp rounds that balance the batch after the
                scaling (0: ReMixMatch's alignment alone).
        """
        super().__init__()
        if target not in self.TARGETS:
            raise ValueError(f"unknown alignment target '{target}'; use one of: labeled, uniform")
        if window < 1:
            raise ValueError(f"window must be at least 1, got {window}")
        if sinkhorn_iterations < 0:
            raise ValueError(f"sinkhorn_iterations must be at least 0, got {sinkhorn_iterations}")
        self.sinkhorn_iterations = int(sinkhorn_iterations)
        self.policy = policy if isinstance(policy, ThresholdPolicy) else FixedThreshold(policy)
        self.target = target
        self.window = int(window)
        self.num_classes = num_classes
        self._allocate()

    def _allocate(self) -> None:
        if self.num_classes is None or "prediction_history" in self._buffers:
            return
        self.register_buffer("prediction_history", torch.zeros(self.window, self.num_classes))
        self.register_buffer("history_size", torch.zeros((), dtype=torch.long))
        self.register_buffer("labeled_counts", torch.zeros(self.num_classes))

    def build(self, context: HeadContext, input_data: str) -> None:
        """Takes the class count from the classifier, creates the state, builds the policy."""
        self.num_classes = _class_count(self.num_classes, context, "distribution alignment")
        self._allocate()
        self.policy.build(context, input_data)

    @torch.no_grad()
    def observe_labeled(self, targets: Tensor) -> None:
        """Counts the (global) labeled batch's classes; targets < 0 (unknown) are skipped."""
        if self.target != "labeled":
            return
        counts = global_class_counts(targets, self.num_classes)
        self.labeled_counts.add_(counts.to(self.labeled_counts))

    def target_distribution(self) -> Tensor:
        """`p_target` `(C,)`: the labeled class frequencies, or uniform (also before any)."""
        uniform = torch.full_like(self.labeled_counts, 1.0 / self.num_classes)
        if self.target == "uniform":
            return uniform
        total = self.labeled_counts.sum()
        return torch.where(total > 0, self.labeled_counts / total.clamp(min=1.0), uniform)

    def model_distribution(self) -> Tensor:
        """`p_model` `(C,)`: the mean of the recent batch means (zeros before the first)."""
        filled = torch.arange(self.window, device=self.history_size.device) < self.history_size
        filled = filled.to(self.prediction_history).unsqueeze(1)
        return (self.prediction_history * filled).sum(dim=0) / filled.sum().clamp(min=1.0)

    def class_scale(self) -> Tensor:
        """`p_target / p_model` `(C,)`, ones before the first batch. Tensors only: no host sync
        in the training step."""
        scale = self.target_distribution() / self.model_distribution().clamp(min=1e-6)
        return torch.where(self.history_size > 0, scale, torch.ones_like(scale))

    @torch.no_grad()
    def update_history(self, probs: Tensor) -> None:
        """Adds the (global) batch's mean prediction to the window, replacing the oldest."""
        total, count = global_sums(probs.sum(dim=0), probs.new_tensor([len(probs)]))
        slot = (self.history_size % self.window).view(1)
        mean = (total / count.clamp(min=1.0)).to(self.prediction_history)
        self.prediction_history.index_copy_(0, slot, mean.view(1, -1))
        self.history_size += 1

    def align(self, probs: Tensor) -> Tensor:
        """`SumNorm(q * p_target / p_model)` (q unchanged before the first batch), then the
        Sinkhorn-Knopp rounds (if any)."""
        aligned = _sum_normalize(probs * self.class_scale(), dim=1)
        aligned = torch.where(self.history_size > 0, aligned, probs)
        return self.balance(aligned) if self.sinkhorn_iterations else aligned

    def balance(self, probs: Tensor) -> Tensor:
        """`sinkhorn_iterations` rounds of: each class column scaled so the (global) batch's
        column sums are `B * p_target`, then each row renormalized to sum to 1."""
        target = self.target_distribution().to(probs)
        (size,) = global_sums(probs.new_tensor([float(len(probs))]))
        balanced = probs.clamp(min=1e-12)
        for _ in range(self.sinkhorn_iterations):
            (columns,) = global_sums(balanced.sum(dim=0))
            balanced = _sum_normalize(balanced * (target * size / columns.clamp(min=1e-12)), 1)
        return balanced

    def forward(self, probs: Tensor, indices: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Adds the batch to the window (in training), aligns, and lets the policy weigh."""
        if self.training:
            self.update_history(probs)
        aligned = self.align(probs)
        label_probs, weights = self.policy(aligned, indices)
        self.logged = {**self.policy.logged, **self.log_values()}
        return label_probs, weights

    def extra_loss(self, strong_logits: Tensor, weights: Tensor) -> Tensor | None:
        """The wrapped policy's extra term."""
        return self.policy.extra_loss(strong_logits, weights)

    def adjust_logits(self, strong_logits: Tensor) -> Tensor:
        """The wrapped policy's logit adjustment."""
        return self.policy.adjust_logits(strong_logits)

    @torch.no_grad()
    def log_values(self) -> dict[str, Tensor]:
        """The largest class scale `p_target / p_model` (1 before the first batch)."""
        return {"alignment_max": self.class_scale().max()}


class DebiasedThreshold(ThresholdPolicy):
    """DebiasPL: pseudo-labels from predictions debiased by the model's own running class
    bias, thresholded as FixMatch does, and an adaptive margin in the strong view's loss.

    The running mean prediction `p = m p + (1 - m) mean_b q_b` (started uniform; every image of
    the global batch, before thresholding) moves first; the pseudo-labels and the mask come from
    `q' = SumNorm(q / p^lambda)`, which for the head's softmax is `softmax(z - lambda log p)`
    ("adaptive debiasing": classes the model over-predicts are pulled down, rare ones lifted),
    with `max q' >= threshold`. The strong view's loss reads `z_strong + lambda log p` with the
    `p` from before the batch ("adaptive marginal loss"), as USB's implementation does.

    Reference: Wang et al., "Debiased Learning from Naturally Imbalanced Pseudo-Labels",
    CVPR 2022, arXiv:2201.01490, and USB's `debiaspl` (lambda, their tau, 0.4; m 0.999). The
    state (`class_prediction`) is saved in checkpoints and equal on every DDP process. Logs
    `bias_max` and `bias_min`, the running mean prediction's largest and smallest class.
    """

    def __init__(
        self,
        threshold: float = 0.95,
        strength: float = 0.4,
        momentum: float = 0.999,
        marginal_loss: bool = True,
        num_classes: int | None = None,
    ) -> None:
        """Initializes the policy.

        Args:
            threshold: The confidence threshold on the debiased predictions.
            strength: lambda, how much of the log bias is removed (the paper's tau; 0: FixMatch).
            momentum: The EMA momentum m of the running mean prediction.
            marginal_loss: Add `lambda log p` to the strong view's logits in the loss.
            num_classes: The number of classes; None: the classifier's (from `build`).
        """
        super().__init__()
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        if strength < 0:
            raise ValueError(f"strength must be at least 0, got {strength}")
        self.threshold = _check_threshold(threshold)
        self.strength = float(strength)
        self.momentum = float(momentum)
        self.marginal_loss = marginal_loss
        self.num_classes = num_classes
        self._allocate()

    def _allocate(self) -> None:
        if self.num_classes is None or "class_prediction" in self._buffers:
            return
        self.register_buffer(
            "class_prediction", torch.full((self.num_classes,), 1.0 / self.num_classes)
        )

    def build(self, context: HeadContext, input_data: str) -> None:
        """Takes the class count from the classifier and creates the state."""
        self.num_classes = _class_count(self.num_classes, context, "DebiasPL")
        self._allocate()

    def debias(self, probs: Tensor) -> Tensor:
        """`SumNorm(q / p^lambda)` `(B, C)`."""
        return _sum_normalize(probs / self.class_prediction.clamp(min=1e-12) ** self.strength, 1)

    def mask(self, probs: Tensor) -> Tensor:
        """Returns `max_c probs >= threshold` as floats `(B,)` (of debiased `probs`)."""
        return (probs.max(dim=1).values >= self.threshold).float()

    def forward(self, probs: Tensor, indices: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Keeps the pre-batch bias for the margin, moves it by the batch, debiases, masks."""
        self._margin = self.strength * self.class_prediction.clamp(min=1e-12).log()
        if self.training:
            self.update(probs, probs.argmax(dim=1), indices)
        debiased = self.debias(probs)
        self.logged = self.log_values()
        return debiased, self.mask(debiased)

    @torch.no_grad()
    def update(self, probs: Tensor, pseudo_labels: Tensor, indices: Tensor | None) -> None:
        """Moves the running mean prediction by the (global) batch's mean."""
        total, count = global_sums(probs.sum(dim=0), probs.new_tensor([len(probs)]))
        mean = total / count.clamp(min=1.0)
        self.class_prediction.mul_(self.momentum).add_((1 - self.momentum) * mean)

    def adjust_logits(self, strong_logits: Tensor) -> Tensor:
        """`z_strong + lambda log p` (p before the batch) with the marginal loss on."""
        if not self.marginal_loss:
            return strong_logits
        return strong_logits + self._margin.to(strong_logits.dtype)

    @torch.no_grad()
    def log_values(self) -> dict[str, Tensor]:
        """The running mean prediction's largest and smallest class."""
        return {"bias_max": self.class_prediction.max(), "bias_min": self.class_prediction.min()}
