"""The EMA teacher: an exponential moving average of the student's backbone and classifier."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn


class EMATeacher(nn.Module):
    """Averages `theta_t = decay * theta_t + (1 - decay) * theta_s` after every optimizer step.

    Parameters and buffers (BatchNorm running statistics) are both averaged, using PyTorch's
    `AveragedModel`. The teacher never receives gradients; it starts as a copy of the student.
    Reference: Tarvainen & Valpola, "Mean teachers are better role models", arXiv:1703.01780.
    """

    def __init__(self, backbone: nn.Module, supervised_head: nn.Module, decay: float = 0.999):
        """Copies the student into the teacher.

        Args:
            backbone: The student backbone.
            supervised_head: The student classifier.
            decay: The EMA decay per optimizer step, in [0, 1).
        """
        super().__init__()
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"ema.decay must be in [0, 1), got {decay}")
        self.decay = decay
        student = nn.ModuleDict({"backbone": backbone, "supervised_head": supervised_head})
        self.average = AveragedModel(
            student, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True
        )
        self.average.requires_grad_(False)

    @property
    def backbone(self) -> nn.Module:
        """The teacher's backbone."""
        return self.average.module["backbone"]

    @property
    def supervised_head(self) -> nn.Module:
        """The teacher's classifier."""
        return self.average.module["supervised_head"]

    @torch.no_grad()
    def update(self, backbone: nn.Module, supervised_head: nn.Module) -> None:
        """Moves the teacher towards the student by one EMA step."""
        student = nn.ModuleDict({"backbone": backbone, "supervised_head": supervised_head})
        self.average.update_parameters(student)

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        """Returns the teacher's class logits `(B, num_classes)`."""
        return self.supervised_head(self.backbone(images))
