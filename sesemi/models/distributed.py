"""Sums over DDP processes for the state that heads and losses keep equal on every rank."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


def distributed() -> bool:
    """True inside a process group of more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def global_sums(*tensors: Tensor) -> list[Tensor]:
    """Sums each tensor over every DDP process (as one all-reduce); unchanged alone."""
    if not distributed():
        return list(tensors)
    sizes = [t.numel() for t in tensors]
    packed = torch.cat([t.reshape(-1).float() for t in tensors])
    dist.all_reduce(packed)
    return [p.reshape(t.shape) for p, t in zip(packed.split(sizes), tensors, strict=True)]


def global_class_counts(targets: Tensor, num_classes: int) -> Tensor:
    """How many of the (global) batch's class-index targets fall in each class `(C,)`, as
    floats; targets < 0 (unknown) are skipped."""
    known = targets[targets >= 0].long()
    (counts,) = global_sums(torch.bincount(known, minlength=num_classes).float())
    return counts


def global_concat(tensor: Tensor) -> Tensor:
    """The rows of `tensor` from every DDP process, in rank order `(sum of B_r, ...)`; unchanged
    alone. Processes may hold different numbers of rows."""
    if not distributed():
        return tensor
    world = dist.get_world_size()
    size = torch.tensor([len(tensor)], device=tensor.device)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    dist.all_gather(sizes, size)
    longest = int(max(s.item() for s in sizes))
    padded = tensor.new_zeros((longest, *tensor.shape[1:]))
    padded[: len(tensor)] = tensor
    gathered = [torch.zeros_like(padded) for _ in range(world)]
    dist.all_gather(gathered, padded)
    return torch.cat([g[: int(s.item())] for g, s in zip(gathered, sizes, strict=True)])
