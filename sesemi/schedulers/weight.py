"""Loss weights: schedules of the global step, and how a weighted term enters the total loss."""

from __future__ import annotations

import math
from collections.abc import Callable

from torch import Tensor


class _Rampup:
    """A weight that ramps up from step 0 to `stop_rampup`, then holds `weight`."""

    def __init__(self, weight: float = 1.0, stop_rampup: int = 0) -> None:
        """Initializes the schedule.

        Args:
            weight: The weight reached at `stop_rampup`.
            stop_rampup: The step where the ramp-up ends (0 disables it).
        """
        self.weight = weight
        self.stop_rampup = stop_rampup

    def __call__(self, step: int) -> float:
        if self.stop_rampup <= 0 or step >= self.stop_rampup:
            return self.weight
        return self.weight * self.shape(max(step, 0) / self.stop_rampup)

    def shape(self, t: float) -> float:
        """The ramp's fraction of `weight` at progress `t` in [0, 1)."""
        raise NotImplementedError


class SigmoidRampupScheduler(_Rampup):
    """Ramps a weight up as exp(-5 (1 - t)^2), t = step / stop_rampup, then holds it.

    Reference: Laine & Aila, "Temporal Ensembling for Semi-Supervised Learning", arXiv:1610.02242.
    """

    def shape(self, t: float) -> float:
        return math.exp(-5.0 * (1.0 - t) ** 2)


class LinearRampupScheduler(_Rampup):
    """Ramps a weight up linearly from 0 at step 0 to `weight` at `stop_rampup`, then holds it."""

    def shape(self, t: float) -> float:
        return t


class WeightedTerm:
    """How one loss term enters the total: `scale_factor * scheduler(step) * reduce(losses)`."""

    REDUCTIONS = ("mean", "sum")

    def __init__(
        self,
        reduction: str = "mean",
        scale_factor: float = 1.0,
        scheduler: Callable[[int], float] | None = None,
    ) -> None:
        """Initializes the term.

        Args:
            reduction: How per-sample losses become a scalar: "mean" or "sum".
            scale_factor: A constant weight.
            scheduler: An optional factor of the global step (e.g. `SigmoidRampupScheduler`).
        """
        if reduction not in self.REDUCTIONS:
            raise ValueError(f"unknown loss reduction '{reduction}'; use 'mean' or 'sum'")
        self.reduction = reduction
        self.scale_factor = float(scale_factor)
        self.scheduler = scheduler

    def weight(self, step: int) -> float:
        """The term's weight at the global step."""
        factor = self.scheduler(step) if self.scheduler is not None else 1.0
        return self.scale_factor * factor

    def reduce(self, losses: Tensor) -> Tensor:
        """Reduces per-sample losses `(N,)` to a scalar (a scalar passes unchanged)."""
        if losses.ndim == 0:
            return losses
        return losses.mean() if self.reduction == "mean" else losses.sum()
