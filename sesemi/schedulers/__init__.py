"""Learning-rate and loss-weight schedules."""

from sesemi.schedulers.lr import PolynomialLR, polynomial_lr
from sesemi.schedulers.weight import LinearRampupScheduler, SigmoidRampupScheduler

__all__ = ["LinearRampupScheduler", "PolynomialLR", "SigmoidRampupScheduler", "polynomial_lr"]
