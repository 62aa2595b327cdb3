"""Classic semi-supervised heads on unlabeled batches: entropy minimization, Pi model, Mean Teacher;
and outlier exposure, on images of none of the classes.

All four read the supervised classifier's predictions (`inputs.heads["supervised_head"]`) on
a loader's batch (unlabeled images; outlier exposure: its own outliers) and return one loss
per sample; the learner reduces and weights them (`scale_factor * scheduler(step)`, e.g. a
`SigmoidRampupScheduler` ramp-up).

Consistency losses (`loss=`):

* "mse": the squared Euclidean distance between the two class-probability vectors, summed over
  the classes: `sum_c (p_student[c] - p_target[c]) ** 2`, in [0, 2]. Laine & Aila (and the
  Mean Teacher code) also divide by the number of classes C; we do not, so the loss (and the
  weight it needs) does not change with C: their weight `w` corresponds to `w / C` here (e.g.
  w_max = 100 on CIFAR-10 is `scale_factor: 10`).
* "kl": `KL(p_target || p_student) = sum_c p_target[c] (log p_target[c] - log p_student[c])`.

Both are 0 exactly when the two predictions agree. The target side never gets a gradient (the
Pi model can opt back into the original two-sided gradient with `detach_target: false`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from sesemi.models.heads.base import HeadInputs, LossHead

CONSISTENCY_LOSSES = ("mse", "kl")


def consistency_loss(student_logits: Tensor, target_logits: Tensor, loss: str = "mse") -> Tensor:
    """The per-sample disagreement `(N,)` between student and target class predictions.

    Args:
        student_logits: The student's logits `(N, C)`.
        target_logits: The target's logits `(N, C)`; detach them first for a one-sided loss.
        loss: "mse" (squared distance of the probabilities, summed over classes) or "kl"
            (`KL(softmax(target) || softmax(student))`).

    Returns:
        One non-negative loss per sample, 0 where the two predictions are equal.
    """
    _check_loss(loss)
    # Probabilities in float32 even under mixed precision: squared differences of fp16
    # probabilities lose most of their digits.
    student_logits, target_logits = student_logits.float(), target_logits.float()
    if loss == "mse":
        diff = F.softmax(student_logits, dim=1) - F.softmax(target_logits, dim=1)
        return diff.pow(2).sum(dim=1)
    return F.kl_div(
        F.log_softmax(student_logits, dim=1),
        F.log_softmax(target_logits, dim=1),
        reduction="none",
        log_target=True,
    ).sum(dim=1)


def _check_loss(loss: str) -> str:
    if loss not in CONSISTENCY_LOSSES:
        raise ValueError(
            f"unknown consistency loss '{loss}'; use one of: {', '.join(CONSISTENCY_LOSSES)}"
        )
    return loss


@torch.no_grad()
def prediction_stats(logits: Tensor, targets: Tensor | None, prefix: str = "") -> dict[str, Tensor]:
    """Mean max-probability and, over samples with a known label (target >= 0), the top-1
    accuracy of the argmax "pseudo-label": values worth logging for any unlabeled-data head."""
    probs = F.softmax(logits.float(), dim=1)
    confidence, predicted = probs.max(dim=1)
    stats = {f"{prefix}max_prob": confidence.mean()}
    if targets is not None:
        known = targets >= 0
        if known.any():
            correct = (predicted[known] == targets[known]).float().mean()
            stats[f"{prefix}pseudo_label_top1"] = correct
    return stats


def _agreement(student_logits: Tensor, target_logits: Tensor) -> Tensor:
    return (student_logits.argmax(dim=1) == target_logits.argmax(dim=1)).float().mean().detach()


class EntropyMinimizationLossHead(LossHead):
    """The entropy `H(p) = -sum_c p_c log p_c` of the classifier's prediction on each unlabeled
    image: minimizing it pushes the decision boundary away from dense regions of unlabeled data.

    Reads `(images (B, C, H, W), targets (B,))` batches (a plain training transform); targets
    are used only to log the pseudo-label accuracy where they are known (>= 0).

    Reference: Grandvalet & Bengio, "Semi-supervised Learning by Entropy Minimization", NeurIPS
    2004 (no arXiv id). Deviations: the paper weights the entropy term by a fixed lambda chosen
    by cross-validation; here the weight is the head's `scale_factor * scheduler(step)`, and a
    ramp-up (e.g. `SigmoidRampupScheduler`) is recommended so that the few-label model's early,
    often wrong, predictions are not made confident. Entropy is in nats (natural log), so it is
    at most log(num_classes).
    """

    def __init__(
        self,
        input_data: str,
        input_backbone: str = "backbone",
        input_head: str = "supervised_head",
    ) -> None:
        """Initializes the head.

        Args:
            input_data: The `data.train` loader of unlabeled images.
            input_backbone: The backbone to extract features with.
            input_head: The classifier that maps those features to class logits.
        """
        super().__init__(input_data, input_backbone, input_head)

    def forward(self, inputs: HeadInputs) -> Tensor:
        """Returns the prediction entropy of each image `(B,)`, in nats."""
        images, targets, _ = self.single_view(inputs)
        logits = self.logits(inputs, images).float()
        log_probs = F.log_softmax(logits, dim=1)
        entropy = -(log_probs.exp() * log_probs).sum(dim=1)
        self.log_values = prediction_stats(logits, targets)
        return entropy


class OutlierExposureLossHead(LossHead):
    """Outlier exposure: the classifier's prediction on each image known to be of none of the
    classes is pulled towards the uniform distribution u, by the cross-entropy
    `-1/K sum_c log p_c = logsumexp(z) - mean_c z_c`, so that the classifier learns to be unsure
    on images like them and `predict`'s confidence-based unknown scores flag them.

    Reads `(images (B, C, H, W), targets)` batches of such images (a plain training transform;
    targets are ignored). The cross-entropy is `log K + KL(u || p)`; the head returns the KL
    term, 0 exactly at the uniform prediction (the same gradients, a loss that reads as a
    distance).

    Reference: Hendrycks, Mazeika and Dietterich, "Deep Anomaly Detection with Outlier
    Exposure", ICLR 2019, arXiv:1812.04606 (weight 0.5 in its classification experiments).
    Deviation: the paper draws its outliers from an auxiliary dataset; here they are images the
    user (or `predict`'s unknown score on a first run) set apart from the unlabeled folder.
    Logs `max_prob`, the outliers' mean largest class probability.
    """

    def forward(self, inputs: HeadInputs) -> Tensor:
        """Returns each image's `KL(uniform || p)` `(B,)`, in nats."""
        images, _, _ = self.single_view(inputs)
        logits = self.logits(inputs, images).float()
        self.log_values = prediction_stats(logits, None)
        return logits.logsumexp(dim=1) - logits.mean(dim=1) - math.log(logits.shape[1])


class PiModelLossHead(LossHead):
    """Consistency between the model's predictions on two random augmentations of each image.

    Reads `([view_1, view_2], targets)` batches, as made by a
    `sesemi.transforms.MultiView(views=[t, t])` image transform with a random `t` (dropout in
    the backbone adds more noise). The prediction on view 1 is the target, the prediction on
    view 2 is trained towards it with `loss` (see the module docstring for "mse" and "kl").

    Reference: Laine & Aila, "Temporal Ensembling for Semi-Supervised Learning",
    arXiv:1610.02242 (the Pi model). Deviations:

    * The target (view 1) gets no gradient by default (`detach_target=True`), as in Mean Teacher
      and most later methods, and its forward pass runs without autograd (less memory); the
      paper back-propagates through both branches (`detach_target=False`).
    * "mse" sums the squared probability differences over classes without the paper's 1/C, so
      its w_max = 100 (CIFAR-10, C = 10) is `scale_factor: 10` here.
    * Each view is a separate forward pass (BatchNorm batch statistics are per view), so two
      identical views in eval mode give exactly 0.
    """

    def __init__(
        self,
        input_data: str,
        input_backbone: str = "backbone",
        loss: str = "mse",
        detach_target: bool = True,
        input_head: str = "supervised_head",
    ) -> None:
        """Initializes the head.

        Args:
            input_data: The `data.train` loader giving two views of each unlabeled image.
            input_backbone: The backbone to extract features with.
            loss: The consistency loss, "mse" or "kl".
            detach_target: Whether the view-1 prediction is a fixed target (no gradient).
            input_head: The classifier that maps features to class logits.
        """
        super().__init__(input_data, input_backbone, input_head)
        self.loss = _check_loss(loss)
        self.detach_target = detach_target

    def forward(self, inputs: HeadInputs) -> Tensor:
        """Returns the consistency loss of each image `(B,)`."""
        view_1, view_2, targets, _ = self.two_views(inputs)
        if self.detach_target:
            with torch.no_grad():
                target_logits = self.logits(inputs, view_1)
        else:
            target_logits = self.logits(inputs, view_1)
        student_logits = self.logits(inputs, view_2)
        losses = consistency_loss(student_logits, target_logits, self.loss)
        self.log_values = {
            **prediction_stats(target_logits, targets),
            "agreement": _agreement(student_logits, target_logits),
        }
        return losses


class MeanTeacherLossHead(LossHead):
    """Consistency between the student's prediction on one augmentation of each image and an
    exponential-moving-average teacher's prediction on another.

    Reads `([view_1, view_2], targets)` batches (a `sesemi.transforms.MultiView` transform).
    The teacher (`learner.hparams.model.ema`, offered as "teacher_backbone" and
    "teacher_supervised_head") predicts view 1 under `torch.no_grad()`; the student's prediction
    on view 2 is trained towards it with `loss`. The teacher follows the student after every
    optimizer step (`sesemi.models.ema.EMATeacher`), so it never receives a gradient.

    Reference: Tarvainen & Valpola, "Mean teachers are better role models",
    arXiv:1703.01780. Deviations:

    * "mse" sums the squared probability differences over classes without the 1/C of the
      authors' code, so their consistency weight 100 (CIFAR-10, C = 10) is `scale_factor: 10`.
    * The paper ramps the EMA decay (0.99 during ramp-up, 0.999 after); here it is the single
      `ema.decay`. The consistency-weight ramp-up is the head's `scheduler`
      (`SigmoidRampupScheduler`), as in the paper.
    * The teacher runs in the learner's mode (train mode while training: dropout and batch
      statistics, i.e. the teacher's input noise of the paper).
    * The paper's optional separate consistency classifier ("two outputs") is not provided.
    """

    def __init__(
        self,
        input_data: str,
        input_backbone: str = "backbone",
        teacher_backbone: str = "teacher_backbone",
        loss: str = "mse",
        input_head: str = "supervised_head",
        teacher_head: str = "teacher_supervised_head",
    ) -> None:
        """Initializes the head.

        Args:
            input_data: The `data.train` loader giving two views of each unlabeled image.
            input_backbone: The student backbone.
            teacher_backbone: The EMA teacher's backbone.
            loss: The consistency loss, "mse" or "kl".
            input_head: The student classifier.
            teacher_head: The EMA teacher's classifier.
        """
        super().__init__(input_data, input_backbone, input_head)
        self.teacher_backbone = teacher_backbone
        self.teacher_head = teacher_head
        self.loss = _check_loss(loss)

    def forward(self, inputs: HeadInputs) -> Tensor:
        """Returns the student-teacher consistency loss of each image `(B,)`."""
        view_1, view_2, targets, _ = self.two_views(inputs)
        teacher_logits = self.logits(inputs, view_1, teacher=True)
        student_logits = self.logits(inputs, view_2)
        losses = consistency_loss(student_logits, teacher_logits, self.loss)
        self.log_values = {
            **prediction_stats(teacher_logits, targets, prefix="teacher_"),
            **prediction_stats(student_logits, targets, prefix="student_"),
            "agreement": _agreement(student_logits, teacher_logits),
        }
        return losses
