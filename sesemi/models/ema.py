"""The EMA teacher: an exponential moving average of the student's `ClassifierNet`."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from sesemi.models.net import ClassifierNet


class EMATeacher(nn.Module):
    """Averages `theta_t = decay * theta_t + (1 - decay) * theta_s` once per optimizer step.

    Parameters and buffers (BatchNorm running statistics) are both averaged, using PyTorch's
    `AveragedModel`. The teacher never receives gradients; it starts as a copy of the student.
    Reference: Tarvainen & Valpola, "Mean teachers are better role models", arXiv:1703.01780.
    """

    def __init__(self, student: ClassifierNet, decay: float = 0.999) -> None:
        """Copies the student into the teacher.

        Args:
            student: The student network.
            decay: The EMA decay per optimizer step, in [0, 1).
        """
        super().__init__()
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"ema.decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.average = AveragedModel(
            student, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True
        )
        self.average.requires_grad_(False)

    @property
    def net(self) -> ClassifierNet:
        """The teacher's network."""
        return self.average.module

    @torch.no_grad()
    def update(self, student: ClassifierNet) -> None:
        """Moves the teacher towards the student by one EMA step."""
        self.average.update_parameters(student)

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        """Returns the teacher's class logits `(B, num_classes)`."""
        return self.net(images)
