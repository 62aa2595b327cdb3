"""Loss heads: regularization losses on named training batches."""

from sesemi.models.heads.base import HeadInputs, LossHead
from sesemi.models.heads.loss import RotationPredictionLossHead

__all__ = ["HeadInputs", "LossHead", "RotationPredictionLossHead"]
