"""OpenMatch: semi-supervised learning when the unlabeled images include classes nobody labeled.

Reference: Saito, Kim and Saenko, "OpenMatch: Open-set Consistency Regularization for
Semi-supervised Learning with Outliers", NeurIPS 2021, arXiv:2105.14148.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sesemi.models.heads.base import SUPERVISED, HeadContext, HeadInputs, LossHead


def ova_probabilities(logits: Tensor) -> Tensor:
    """`(B, 2K)` one-vs-all logits -> `(B, 2, K)` probabilities: `[:, 0]` outlier, `[:, 1]`
    inlier, for each of the K classes' binary classifiers."""
    return logits.view(len(logits), 2, -1).float().softmax(dim=1)


def ova_loss(probs: Tensor, targets: Tensor) -> Tensor:
    """The labeled one-vs-all loss `(B,)`: `-log p_inlier(y)` for the image's class y plus the
    hardest negative, `max_{k != y} -log p_outlier(k)`."""
    positive = F.one_hot(targets, probs.shape[2]).bool()
    inlier = -torch.log(probs[:, 1][positive] + 1e-8)
    outlier = -torch.log(probs[:, 0] + 1e-8)
    hardest = outlier.masked_fill(positive, float("-inf")).max(dim=1).values
    return inlier + hardest


def ova_entropy(probs: Tensor) -> Tensor:
    """Each image's mean binary entropy over the K classifiers `(B,)`."""
    return -(probs * torch.log(probs + 1e-8)).sum(dim=1).mean(dim=1)


def soft_consistency(probs_1: Tensor, probs_2: Tensor) -> Tensor:
    """SOCR per image `(B,)`: the squared distance between two views' one-vs-all outputs,
    summed over both outcomes of every classifier."""
    return (probs_1 - probs_2).pow(2).sum(dim=(1, 2))


def inlier_score(probs: Tensor, classes: Tensor) -> Tensor:
    """`p_inlier` of each image's predicted class `(B,)` (1 - this is OpenMatch's outlier
    score)."""
    return probs[:, 1].gather(1, classes.view(-1, 1)).squeeze(1)


class OpenMatchLossHead(LossHead):
    """OpenMatch's unlabeled-data terms with one-vs-all (OVA) outlier detectors.

    The head owns K binary classifiers, one linear layer `features -> 2K` (`self.ova`), saved in
    checkpoints with the model (`open_sesemi predict` reads them for its `ova` unknown score).
    At each step, for labeled images (x, y) (the `supervised` batch, its features from the
    learner's pass) and unlabeled images in three views (two weak, one strong), it returns

        mean_l L_ova(x, y) + lambda_em mean_u H_ova + lambda_socr mean_u SOCR
        + mean_u [mask_u * CE(z_strong, argmax q_weak)],

    L_ova the labeled OVA loss (`ova_loss`: the class's inlier term plus the hardest
    negative), H_ova the OVA entropy of both weak views (`ova_entropy`), SOCR the soft open-set
    consistency between them (`soft_consistency`), and the FixMatch term on the images that
    look like inliers: `mask_u = [max q >= threshold] * [p_inlier(argmax q) >= inlier_threshold]`
    with q the classifier's softmax on the first weak view; the FixMatch term starts at step
    `fixmatch_start` (OpenMatch: after 10 of 512 epochs). The unlabeled views go through the
    backbone in one pass.

    Deviations: OpenMatch picks the inliers for its FixMatch term once per epoch, scoring the
    whole unlabeled set with the model in eval mode; here each batch's weak view is scored as it
    comes, in training mode. The labeled batch is one view (OpenMatch: two). The supervised
    cross-entropy is the learner's supervised term.

    Logs `inlier_rate` (share of unlabeled images whose predicted class's OVA calls them
    inliers), `mask_rate`, `labeled_ova` (L_ova), `ova_entropy`, `socr`, and
    `pseudo_label_acc` where targets are known.
    """

    def __init__(
        self,
        input_data: str,
        input_backbone: str = "backbone",
        input_head: str = "supervised_head",
        threshold: float = 0.95,
        inlier_threshold: float = 0.5,
        lambda_em: float = 0.1,
        lambda_socr: float = 0.5,
        fixmatch_start: float = 0,
    ) -> None:
        """Initializes the head.

        Args:
            input_data: The `data.train` loader giving `([weak, weak, strong], targets)`.
            input_backbone: The student backbone.
            input_head: The student classifier.
            threshold: FixMatch's confidence threshold on the classifier's weak prediction.
            inlier_threshold: The OVA inlier probability an image's predicted class needs.
            lambda_em: The weight of the OVA entropy on unlabeled images.
            lambda_socr: The weight of the soft open-set consistency.
            fixmatch_start: The optimizer step the FixMatch term starts at.
        """
        super().__init__(input_data, input_backbone, input_head)
        for name, value in (("threshold", threshold), ("inlier_threshold", inlier_threshold)):
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {value}")
        if lambda_em < 0 or lambda_socr < 0:
            raise ValueError("lambda_em and lambda_socr must be at least 0")
        self.threshold = float(threshold)
        self.inlier_threshold = float(inlier_threshold)
        self.lambda_em = float(lambda_em)
        self.lambda_socr = float(lambda_socr)
        self.fixmatch_start = int(fixmatch_start)

    def build(self, context: HeadContext) -> None:
        """Checks the student exists and creates the one-vs-all classifiers."""
        super().build(context)
        in_features = context.backbones[self.input_backbone].out_features
        self.ova = nn.Linear(in_features, 2 * context.num_classes)

    def _views(self, inputs: HeadInputs) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
        views, targets, _ = self.batch(inputs)
        if not isinstance(views, (list, tuple)) or len(views) != 3:
            raise ValueError(
                f"data.train.{self.input_data} must give three views of each image (weak, weak, "
                "strong); set its image_transform to {_target_: sesemi.transforms.MultiView, "
                "views: [<weak>, <weak>, <strong>]} (method=openmatch does)"
            )
        return views[0], views[1], views[2], targets

    def forward(self, inputs: HeadInputs) -> Tensor:
        """Returns the head's loss (a scalar: the terms are batch means, see the class)."""
        weak_1, weak_2, strong, targets = self._views(inputs)
        features = self.features(inputs, torch.cat([weak_1, weak_2, strong]))
        n = len(weak_1)
        ova = ova_probabilities(self.ova(features[: 2 * n]))
        entropy = ova_entropy(ova).mean()
        socr = soft_consistency(ova[:n], ova[n:]).mean()
        loss = self.lambda_em * entropy + self.lambda_socr * socr
        labeled = inputs.data.get(SUPERVISED)
        ova_labeled = features.new_zeros(())
        if labeled is not None and "supervised_backbone" in inputs.features:
            classes = labeled[1].argmax(dim=1) if labeled[1].ndim == 2 else labeled[1]
            labeled_probs = ova_probabilities(self.ova(inputs.features["supervised_backbone"]))
            ova_labeled = ova_loss(labeled_probs, classes).mean()
            loss = loss + ova_labeled
        head = inputs.heads[self.input_head]
        strong_logits = head(features[2 * n :]).float()
        with torch.no_grad():
            probs = head(features[:n]).float().softmax(dim=1)
            confidence, pseudo_labels = probs.max(dim=1)
            inliers = inlier_score(ova[:n].detach(), pseudo_labels) >= self.inlier_threshold
            mask = ((confidence >= self.threshold) & inliers).float()
            if inputs.step < self.fixmatch_start:
                mask = torch.zeros_like(mask)
        fixmatch = (mask * F.cross_entropy(strong_logits, pseudo_labels, reduction="none")).mean()
        self.log_values = {
            "inlier_rate": inliers.float().mean(),
            "mask_rate": mask.mean(),
            "labeled_ova": ova_labeled.detach(),
            "ova_entropy": entropy.detach(),
            "socr": socr.detach(),
        }
        if targets is not None:
            used = (mask > 0) & (targets >= 0)
            if used.any():
                accuracy = (pseudo_labels[used] == targets[used]).float().mean()
                self.log_values["pseudo_label_acc"] = accuracy
        return loss + fixmatch
