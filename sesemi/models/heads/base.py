"""The loss-head interface: what a regularization head gets each step and what it returns."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor, nn


@dataclass
class HeadInputs:
    """What the learner hands every loss head at each training step.

    Attributes:
        data: The training batch, one entry per loader named in `data.train`.
        backbones: Feature extractors by name: "backbone" is the model being trained; methods
            with a teacher also find "teacher_backbone" (no gradient) here.
        heads: Prediction heads by name: "supervised_head" maps backbone features to class
            logits; with a teacher, "teacher_supervised_head" too.
        features: A per-step cache of computed tensors that heads may share (e.g. the supervised
            batch's features under "supervised_backbone").
        step: The global optimizer step.
    """

    data: Mapping[str, Any]
    backbones: Mapping[str, nn.Module]
    heads: Mapping[str, nn.Module]
    features: dict[str, Tensor] = field(default_factory=dict)
    step: int = 0


class LossHead(nn.Module):
    """A regularization loss computed from one named training batch.

    Subclasses may create layers in `build`, once the backbone's width is known, and implement
    `forward`, returning one loss per sample; the learner reduces, weights and sums them. Extra
    scalars to log (e.g. a mask rate) go in `self.log_values` during `forward`.
    """

    def __init__(self, input_data: str, input_backbone: str = "backbone") -> None:
        """Initializes the head.

        Args:
            input_data: The name of the `data.train` loader whose batch the head reads.
            input_backbone: The name of the backbone it extracts features with.
        """
        super().__init__()
        self.input_data = input_data
        self.input_backbone = input_backbone
        self.log_values: dict[str, Any] = {}

    def build(self, backbones: Mapping[str, nn.Module], heads: Mapping[str, nn.Module]) -> None:
        """Creates layers that depend on the backbones or heads (called once by the learner)."""

    def forward(self, inputs: HeadInputs) -> Tensor:
        """Returns per-sample losses `(N,)` (or a scalar) for the head's batch."""
        raise NotImplementedError
