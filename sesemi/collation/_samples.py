"""Reading images out of a list of dataset samples, for every collate function."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor


def stack_images(batch: Sequence[Any]) -> Tensor:
    """Stacks the images of a list of samples into `(B, C, H, W)`.

    Samples are `(image, label)` pairs, `(image, label, index)` triples or bare images
    `(C, H, W)`; only the images are kept.
    """
    return torch.stack([s[0] if isinstance(s, (tuple, list)) else s for s in batch])
