"""Loss heads: regularization losses on named training batches, and their threshold policies."""

from sesemi.models.heads.abc import ABCLossHead
from sesemi.models.heads.base import HeadContext, HeadInputs, LossHead
from sesemi.models.heads.consistency import (
    EntropyMinimizationLossHead,
    MeanTeacherLossHead,
    OutlierExposureLossHead,
    PiModelLossHead,
)
from sesemi.models.heads.fixmatch import FixMatchLossHead, FlexMatchLossHead
from sesemi.models.heads.jigsaw import JigsawPredictionLossHead
from sesemi.models.heads.loss import RotationPredictionLossHead, TransformationPredictionLossHead
from sesemi.models.heads.pseudo_label import PseudoLabelLossHead
from sesemi.models.heads.thresholds import (
    FixedThreshold,
    FlexMatchThreshold,
    FreeMatchThreshold,
    SoftMatchWeight,
    ThresholdPolicy,
    convex_mapping,
)

__all__ = [
    "ABCLossHead",
    "EntropyMinimizationLossHead",
    "FixMatchLossHead",
    "FixedThreshold",
    "FlexMatchLossHead",
    "FlexMatchThreshold",
    "FreeMatchThreshold",
    "HeadContext",
    "HeadInputs",
    "JigsawPredictionLossHead",
    "LossHead",
    "MeanTeacherLossHead",
    "OutlierExposureLossHead",
    "PiModelLossHead",
    "PseudoLabelLossHead",
    "RotationPredictionLossHead",
    "SoftMatchWeight",
    "ThresholdPolicy",
    "TransformationPredictionLossHead",
    "convex_mapping",
]
