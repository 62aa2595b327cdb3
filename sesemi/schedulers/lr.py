"""Learning-rate schedules stepped once per optimizer step: pure functions and their schedulers."""

from __future__ import annotations

import warnings

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler


def polynomial_lr(
    step: int, base_lr: float, warmup_iters: int, warmup_lr: float, lr_pow: float, max_iters: int
) -> float:
    """The learning rate at `step` of a linear warm-up followed by polynomial decay.

    Warm-up goes linearly from `warmup_lr` (step 0) to `base_lr` (step `warmup_iters`); then
    lr = base_lr * (1 - progress) ** lr_pow, progress = (step - warmup_iters) /
    (max_iters - warmup_iters), clamped to [0, 1] so the rate is 0 from `max_iters` on.
    """
    if step < warmup_iters:
        return warmup_lr + (base_lr - warmup_lr) * step / warmup_iters
    decay_iters = max(max_iters - warmup_iters, 1)
    progress = min(max((step - warmup_iters) / decay_iters, 0.0), 1.0)
    return base_lr * (1.0 - progress) ** lr_pow


class PolynomialLR(LRScheduler):
    """Linear warm-up then polynomial decay, as a scheduler stepped every iteration."""

    def __init__(
        self,
        optimizer: Optimizer,
        max_iters: int,
        warmup_epochs: int | None = None,
        warmup_iters: int | None = None,
        iters_per_epoch: int | None = None,
        warmup_lr: float = 0.0,
        lr_pow: float = 0.5,
        last_epoch: int = -1,
    ) -> None:
        """Initializes the scheduler.

        Args:
            optimizer: The optimizer whose parameter groups' initial LRs are the base LRs.
            max_iters: The step at which the rate reaches 0.
            warmup_epochs: Warm-up length in epochs; needs `iters_per_epoch`. Exclusive with
                `warmup_iters`.
            warmup_iters: Warm-up length in iterations.
            iters_per_epoch: Iterations per epoch, to convert `warmup_epochs`.
            warmup_lr: The rate at step 0.
            lr_pow: The decay's exponent (1 is linear, 0.5 the square root).
            last_epoch: The index of the last step, for resuming (-1 starts fresh).
        """
        if warmup_epochs is not None and warmup_iters is not None:
            raise ValueError("PolynomialLR: set warmup_epochs or warmup_iters, not both")
        if warmup_epochs is not None:
            if iters_per_epoch is None:
                raise ValueError("PolynomialLR: warmup_epochs needs iters_per_epoch")
            warmup_iters = warmup_epochs * iters_per_epoch
        if max_iters is None or int(max_iters) < 1:
            raise ValueError(
                f"PolynomialLR: max_iters must be at least 1 (the step where the rate reaches 0), "
                f"got {max_iters}; set it to the run's length, e.g. ${{sesemi:max_iterations}}"
            )
        self.warmup_iters = int(warmup_iters or 0)
        self.max_iters = int(max_iters)
        self.warmup_lr = float(warmup_lr)
        self.lr_pow = float(lr_pow)
        if self.warmup_iters > self.max_iters:
            warnings.warn(
                f"PolynomialLR: warm-up ({self.warmup_iters} iterations) is longer than the run "
                f"({self.max_iters}); shortened to the whole run",
                stacklevel=2,
            )
            self.warmup_iters = self.max_iters
        super().__init__(optimizer, last_epoch)

    def get_lr(self) -> list[float]:
        """Returns each parameter group's rate at the current step (closed form, resumable)."""
        return [
            polynomial_lr(
                self.last_epoch,
                base,
                self.warmup_iters,
                self.warmup_lr,
                self.lr_pow,
                self.max_iters,
            )
            for base in self.base_lrs
        ]
