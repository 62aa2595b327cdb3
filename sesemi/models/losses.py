"""Supervised losses beyond plain cross-entropy."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sesemi.models.distributed import global_class_counts, global_sums

REDUCTIONS = ("none", "mean", "sum")


class LogitAdjustedCrossEntropy(nn.Module):
    """Cross-entropy on logits shifted by the log class prior, for long-tailed labeled sets.

    In training, the loss of `(z, y)` is `CE(z + tau log pi, y)` with `pi` the labeled class
    frequencies: rare classes' logits are lowered in the loss, so the model learns to score
    them higher by a margin `tau (log pi_max - log pi_c)`; predictions use the plain logits
    `z`, which are then balanced. With `tau = 1` this is the Bayes-consistent loss of the
    balanced error. `pi` counts the labeled training targets seen so far (over all DDP
    processes; a class index, or a soft target's probabilities), so it matches the labeled
    set's frequencies after one labeled epoch and is uniform until the first batch; it is
    saved in checkpoints (`labeled_counts`). Evaluation (`model.eval()`) neither counts nor
    shifts: the loss is then plain cross-entropy.

    Reference: Menon et al., "Long-tail learning via logit adjustment", ICLR 2021,
    arXiv:2007.07314 (the logit-adjusted loss, eq. 11).
    """

    def __init__(self, num_classes: int, tau: float = 1.0, reduction: str = "mean") -> None:
        """Initializes the loss.

        Args:
            num_classes: The number of classes.
            tau: The strength of the adjustment (0: cross-entropy).
            reduction: "none" (per-sample losses, as the learner asks), "mean" or "sum".
        """
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be at least 1, got {num_classes}")
        if tau < 0:
            raise ValueError(f"tau must be at least 0, got {tau}")
        if reduction not in REDUCTIONS:
            raise ValueError(f"unknown reduction '{reduction}'; use one of: none, mean, sum")
        self.num_classes = int(num_classes)
        self.tau = float(tau)
        self.reduction = reduction
        self.register_buffer("labeled_counts", torch.zeros(self.num_classes))

    def prior(self) -> Tensor:
        """The labeled class frequencies `pi` `(C,)` counted so far (uniform before any)."""
        total = self.labeled_counts.sum()
        uniform = torch.full_like(self.labeled_counts, 1.0 / self.num_classes)
        return torch.where(total > 0, self.labeled_counts / total.clamp(min=1.0), uniform)

    @torch.no_grad()
    def observe(self, targets: Tensor) -> None:
        """Counts the (global) batch's targets: class indices (< 0 skipped) or probabilities."""
        if targets.ndim == 2:
            (counts,) = global_sums(targets.float().sum(dim=0))
        else:
            counts = global_class_counts(targets, self.num_classes)
        self.labeled_counts.add_(counts.to(self.labeled_counts))

    def forward(self, logits: Tensor, targets: Tensor) -> Tensor:
        """`CE(z + tau log pi, y)` in training (after counting the batch), `CE(z, y)` in eval."""
        if logits.shape[-1] != self.num_classes:
            raise ValueError(
                f"logit-adjusted loss for {self.num_classes} classes got logits of "
                f"{logits.shape[-1]}; set its num_classes to the classifier's"
            )
        if self.training:
            self.observe(targets)
            # A class never seen gets the smallest seen frequency (not log 0 = -inf).
            prior = self.prior()
            seen = prior > 0
            floor = torch.where(seen, prior, torch.full_like(prior, float("inf"))).min()
            prior = torch.where(seen, prior, floor)
            logits = logits + self.tau * prior.log().to(logits.dtype)
        return F.cross_entropy(logits, targets, reduction=self.reduction)
