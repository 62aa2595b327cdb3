"""Loss heads: regularization losses on named training batches."""

from sesemi.models.heads.base import HeadInputs, LossHead
from sesemi.models.heads.consistency import (
    EntropyMinimizationLossHead,
    MeanTeacherLossHead,
    PiModelLossHead,
)
from sesemi.models.heads.fixmatch import FixMatchLossHead, FlexMatchLossHead
from sesemi.models.heads.jigsaw import JigsawPredictionLossHead
from sesemi.models.heads.loss import RotationPredictionLossHead

__all__ = [
    "EntropyMinimizationLossHead",
    "FixMatchLossHead",
    "FlexMatchLossHead",
    "HeadInputs",
    "JigsawPredictionLossHead",
    "LossHead",
    "MeanTeacherLossHead",
    "PiModelLossHead",
    "RotationPredictionLossHead",
]
