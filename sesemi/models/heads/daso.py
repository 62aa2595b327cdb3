"""DASO: a FixMatch-family head's pseudo-labels blended, class by class, with similarity-based ones.

Reference: Oh, Kim and Kweon, "DASO: Distribution-Aware Semantics-Oriented Pseudo-label for
Imbalanced Semi-Supervised Learning", CVPR 2022, arXiv:2106.05682.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import Tensor

from sesemi.models.distributed import global_class_counts, global_concat
from sesemi.models.heads.base import (
    BLEND_BASE_HINT,
    SUPERVISED,
    HeadContext,
    HeadInputs,
    LossHead,
    views_key,
)

log = logging.getLogger(__name__)
EMPTY_CLASS = -1e4  # the similarity logit of a class with no labeled features yet
LARGE_QUEUES = 512 * 2**20  # bytes of queues worth a warning (they live on the device)
NO_BASE_HINT = (
    f"it blends the pseudo-labels of a FixMatch-family head reading the same loader; "
    f"{BLEND_BASE_HINT}"
)


def blend_weights(counts: Tensor, temperature: float) -> Tensor:
    """DASO's blend weight per class `(C,)`: `(m_c / max m)^(1 / T)`, m the pseudo-labels'
    class counts and T the distribution temperature; zeros before any pseudo-label. The class
    predicted most often leans fully on the similarity-based pseudo-label, a rare one hardly."""
    peak = counts.max().clamp(min=1e-12)
    return torch.where(counts.max() > 0, (counts / peak) ** (1.0 / temperature), counts * 0)


def similarity_logits(features: Tensor, prototypes: Tensor, filled: Tensor, temperature: float):
    """Cosine similarity of each feature `(B, D)` to each class prototype `(C, D)` over the
    temperature `(B, C)`; a class without labeled features yet (`filled` False) gets a logit
    far below the others."""
    similarity = F.cosine_similarity(features.float().unsqueeze(1), prototypes.unsqueeze(0), dim=2)
    return (similarity / temperature).masked_fill(~filled, EMPTY_CLASS)


class DASOLossHead(LossHead):
    """DASO's two parts, on top of a FixMatch-family head of the same unlabeled loader.

    Prototypes: each class keeps a queue of the last `queue_size` student features of its
    labeled images (class-balanced: the same length for every class); its prototype `c_k` is
    their mean. The semantic pseudo-label of a weak view with features z is
    `q = softmax(cos(z, c_k) / T_proto)` over the classes.

    Blending (`blend`, called by the FixMatch-family head on its weak probabilities p before its
    threshold policy): with `k = argmax p` and `v_k = (m_k / max m)^(1 / T_dist)`, m the
    counts of the final pseudo-labels' classes over the last `dist_period` steps,

        p' = (1 - v_k) p + v_k q,

    so an image predicted as a frequent class, where the linear classifier over-predicts, leans
    on the prototypes (which favour rare classes), and one predicted as a rare class keeps p.
    The base head then thresholds and pseudo-labels p' (FixMatch: `max p' >= 0.95`).

    Semantic alignment (this head's loss, per unlabeled image): the strong view's similarity
    distribution is pulled to the weak view's, `-sum_k q_k log softmax(cos(z_strong, c_k) /
    T_proto)_k`, for every image (no mask); the learner's mean over the unlabeled batch and
    the head's `scale_factor` (the paper's lambda_align, 1) follow.

    For the first `pretrain_steps` the pseudo-labels stay the base head's and the loss is 0;
    the counts m gather from the first step (the base head's pseudo-labels then). Until the
    first `dist_period` closes, m is the counts so far. All state (queues, counts) is in
    buffers, saved in checkpoints, and equal on every DDP process (labeled features and counts
    are gathered over processes). The queues hold classes x `queue_size` x the backbone's width
    floats (5 MiB for 10 classes of ResNet-18's 512 features; 2 GiB for 1,000 classes of 2,048):
    above 512 MiB the head warns, naming `queue_size`.

    Deviations: the queues hold the student's features of the labeled batch (the learner's
    supervised pass), not an EMA model's, and take a step's labeled batch after that step's
    pseudo-labels; the pseudo-label counts are kept on the device. Like the reference code the
    mask thresholds the blended p' (USB's port thresholds p).

    Logs `blend_mean` (the mean v_k applied), `semantic_agreement` (share of weak views whose
    semantic and linear pseudo-labels agree) and, where unlabeled targets are known,
    `semantic_acc` (the semantic pseudo-labels' accuracy).
    """

    reads_classifier = False
    blends_pseudo_labels = True

    def __init__(
        self,
        input_data: str,
        queue_size: int = 256,
        proto_temperature: float = 0.05,
        dist_temperature: float = 1.5,
        pretrain_steps: float = 0,
        dist_period: int = 100,
        input_backbone: str = "backbone",
    ) -> None:
        """Initializes the head.

        Args:
            input_data: The `data.train` loader giving `([weak, strong], targets)` batches (the
                base FixMatch-family head's).
            queue_size: Labeled features kept per class (the paper's 256).
            proto_temperature: T_proto, dividing the cosine similarities (the paper's 0.05).
            dist_temperature: T_dist, flattening the blend weights (USB's 1.5; the reference
                code's default is 1).
            pretrain_steps: Steps before blending and the alignment loss start (the paper: 5k of
                250k, 2 %; `method=daso` sets 2 % of the run).
            dist_period: Steps over which the pseudo-label class counts m are gathered (100).
            input_backbone: The student backbone.
        """
        super().__init__(input_data, input_backbone)
        if int(queue_size) < 1:
            raise ValueError(f"queue_size must be at least 1, got {queue_size}")
        if proto_temperature <= 0 or dist_temperature <= 0:
            raise ValueError(
                "proto_temperature and dist_temperature must be positive, got "
                f"{proto_temperature} and {dist_temperature}"
            )
        if int(dist_period) < 1:
            raise ValueError(f"dist_period must be at least 1, got {dist_period}")
        self.queue_size = int(queue_size)
        self.proto_temperature = float(proto_temperature)
        self.dist_temperature = float(dist_temperature)
        self.pretrain_steps = int(pretrain_steps)
        self.dist_period = int(dist_period)
        self.blend_values: dict[str, Tensor] = {}
        # `blend`'s (weak features, semantic pseudo-labels) of the step, reused by `forward`.
        self.weak_semantic: tuple[Tensor, Tensor] | None = None

    def build(self, context: HeadContext) -> None:
        """Creates the queues (classes x `queue_size` x the backbone's width) and the counts."""
        super().build(context)
        width = getattr(context.backbones[self.input_backbone], "out_features", None)
        if not isinstance(width, int) or width < 1:
            raise ValueError("DASOLossHead needs the backbone's feature width (`out_features`)")
        classes = context.num_classes
        if "queue" in self._buffers:
            return
        size = classes * self.queue_size * width * 4
        if size > LARGE_QUEUES:
            log.warning(
                "DASO's queues take %.2f GiB (%d classes x queue_size %d x %d features, float32) "
                "on the device and in every checkpoint; lower "
                "regularization_loss_heads.%s.head.queue_size to shrink them",
                size / 2**30,
                classes,
                self.queue_size,
                width,
                self.name or "daso",
            )
        self.register_buffer("queue", torch.zeros(classes, self.queue_size, width))
        self.register_buffer("queue_filled", torch.zeros(classes, dtype=torch.long))
        self.register_buffer("queue_next", torch.zeros(classes, dtype=torch.long))
        self.register_buffer("label_counts", torch.zeros(classes))  # this period's
        self.register_buffer("label_distribution", torch.zeros(classes))  # the last period's
        self.register_buffer("periods", torch.zeros((), dtype=torch.long))

    def prototypes(self) -> tuple[Tensor, Tensor]:
        """The mean queued feature of each class `(C, D)` and which classes have any `(C,)`."""
        filled = self.queue_filled > 0
        means = self.queue.sum(dim=1) / self.queue_filled.clamp(min=1).unsqueeze(1).to(self.queue)
        return means, filled

    def semantic_logits(self, features: Tensor) -> Tensor:
        """`cos(z, c_k) / T_proto` of features `(B, D)` against the prototypes `(B, C)`."""
        prototypes, filled = self.prototypes()
        return similarity_logits(features, prototypes, filled, self.proto_temperature)

    def counts(self) -> Tensor:
        """m: the last closed period's pseudo-label class counts (this period's before any)."""
        return torch.where(self.periods > 0, self.label_distribution, self.label_counts)

    @torch.no_grad()
    def enqueue(self, features: Tensor, labels: Tensor) -> None:
        """Pushes labeled features `(N, D)` of classes `labels` `(N,)` into their class queues
        (the oldest out once full); labels < 0 are skipped."""
        features = features.detach().float().to(self.queue.device)
        for label in labels[labels >= 0].unique().tolist():
            rows = features[labels == label][-self.queue_size :]
            slots = (self.queue_next[label] + torch.arange(len(rows), device=rows.device)) % (
                self.queue_size
            )
            self.queue[label, slots] = rows
            self.queue_next[label] = (self.queue_next[label] + len(rows)) % self.queue_size
            filled = int(self.queue_filled[label]) + len(rows)
            self.queue_filled[label] = min(filled, self.queue_size)

    @torch.no_grad()
    def blend(self, probs: Tensor, weak_features: Tensor, step: int) -> Tensor:
        """The base head's weak probabilities `(B, C)`, blended with the semantic pseudo-labels
        of their features `(B, D)` (unchanged before `pretrain_steps`); in training, counts the
        final pseudo-labels' classes."""
        self.blend_values, self.weak_semantic = {}, None
        if step >= self.pretrain_steps:
            semantic = self.semantic_logits(weak_features).softmax(dim=1)
            self.weak_semantic = (weak_features, semantic)  # the alignment loss's target
            linear = probs.argmax(dim=1)
            weight = blend_weights(self.counts(), self.dist_temperature)[linear].unsqueeze(1)
            probs = (1.0 - weight) * probs + weight * semantic.to(probs)
            self.blend_values = {
                "blend_mean": weight.mean(),
                "semantic_agreement": (semantic.argmax(dim=1) == linear).float().mean(),
            }
        if self.training:
            self.label_counts += global_class_counts(probs.argmax(dim=1), len(self.label_counts))
        return probs

    def forward(self, inputs: HeadInputs) -> Tensor:
        """Returns each unlabeled image's semantic alignment loss `(B,)` (0 before
        `pretrain_steps`), then queues the labeled batch's features and closes a count period
        every `dist_period` steps."""
        _, strong, targets, _ = self.two_views(inputs, names=("<weak>", "<strong>"))
        cached = inputs.features.get(views_key(self.input_data))
        if cached is None:
            raise ValueError(f"DASOLossHead found no features of the weak views; {NO_BASE_HINT}")
        weak_features, strong_features = cached
        self.log_values = dict(self.blend_values)
        if inputs.step >= self.pretrain_steps:
            if self.weak_semantic is not None and self.weak_semantic[0] is weak_features:
                target = self.weak_semantic[1]  # `blend`'s, of these features and prototypes
            else:
                with torch.no_grad():
                    target = self.semantic_logits(weak_features).softmax(dim=1)
            log_probs = F.log_softmax(self.semantic_logits(strong_features), dim=1)
            losses = -(target * log_probs).sum(dim=1)
            if targets is not None and (targets >= 0).any():
                known = targets >= 0
                hits = target.argmax(dim=1)[known] == targets[known]
                self.log_values["semantic_acc"] = hits.float().mean()
        else:
            losses = strong_features.new_zeros(len(strong))
        self.weak_semantic = None
        labeled = inputs.data.get(SUPERVISED)
        if self.training and labeled is not None and "supervised_backbone" in inputs.features:
            labels = labeled[1].argmax(dim=1) if labeled[1].ndim == 2 else labeled[1]
            features = inputs.features["supervised_backbone"].detach()
            self.enqueue(global_concat(features.float()), global_concat(labels.long()))
        if self.training and (inputs.step + 1) % self.dist_period == 0:
            self.label_distribution.copy_(self.label_counts)
            self.label_counts.zero_()
            self.periods += 1
        return losses
