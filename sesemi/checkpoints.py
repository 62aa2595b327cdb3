"""Checkpoint files: finding them, reading them as data (weights only), loading their weights."""

from __future__ import annotations

import glob
import logging
import os
import zipfile
from collections.abc import Mapping
from typing import Any

import torch
from hydra.utils import to_absolute_path
from torch import Tensor, nn

log = logging.getLogger(__name__)

METADATA_KEY = "sesemi"  # The checkpoint entry holding class names, preprocessing and the model.

# State-dict prefixes of checkpoints written before `Classifier` held a `ClassifierNet`.
_RENAMED = {"backbone.": "net.backbone.", "supervised_head.": "net.supervised_head."}
_RENAMED_HEADS = ("regularization_heads.", "heads.")
_HEADS = _RENAMED_HEADS[1]  # the loss heads' states: training only


def upgrade_state_dict(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Renames the keys of older sesemi checkpoints to today's layout (others pass unchanged)."""
    upgraded = {}
    for key, value in state.items():
        for old, new in _RENAMED.items():
            if key.startswith(old):
                key = new + key[len(old) :]
                break
        if key.startswith(_RENAMED_HEADS[0]):
            key = _RENAMED_HEADS[1] + key[len(_RENAMED_HEADS[0]) :]
        upgraded[key] = value
    return upgraded


def read_checkpoint(path: str) -> dict[str, Any]:
    """Reads a checkpoint on the CPU as data: `weights_only=True`, so no code in it runs."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint '{path}' does not exist")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is the same user error
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if not zipfile.is_zipfile(path):  # torch.save has written zip archives since 1.6
            reason = "it is not a file torch.save writes, not a zip archive; check the path"
        elif "Weights only load failed" in str(e):
            reason = "it holds Python objects other than tensors and plain values, which are "
            reason += "not loaded: a checkpoint is data, never code"
        raise ValueError(f"'{path}' is not a readable PyTorch checkpoint ({reason})") from None
    if not isinstance(checkpoint, dict):
        raise ValueError(f"'{path}' is not an open_sesemi checkpoint (no state_dict)")
    return checkpoint


def find_checkpoint(path: str, key: str, run_dir: str, run_id: str) -> str:
    """Resolves a `run.<key>` checkpoint option; "last" is the newest last.ckpt of this run id.

    Args:
        path: A file path (relative to the launch folder) or "last".
        key: The option's name, for messages ("resume_from_checkpoint", ...).
        run_dir: `run.dir`, where runs are written.
        run_id: `run.id`.
    """
    if path == "last":
        # The folders are names, not patterns: a run.id like "exp[1]" is matched literally.
        runs = glob.escape(os.path.join(to_absolute_path(run_dir), run_id))
        pattern = os.path.join(runs, "*", "checkpoints", "last.ckpt")
        found = sorted(glob.glob(pattern), key=os.path.getmtime)
        if not found:
            raise FileNotFoundError(f"run.{key}=last: no {pattern} exists yet")
        return found[-1]
    path = to_absolute_path(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"run.{key}: checkpoint '{path}' does not exist")
    if not zipfile.is_zipfile(path):  # torch.save writes zip archives
        raise ValueError(f"run.{key}: '{path}' is not a PyTorch checkpoint")
    return path


def state_mismatch(
    own: Mapping[str, Tensor], state: Mapping[str, Tensor]
) -> tuple[list[str], list[str], list[str]]:
    """The keys of `state` (a checkpoint's) that do not fit `own` (a model's state dict):
    those of another shape, those `own` has and `state` lacks, those only `state` has."""
    resized = sorted(
        k for k in set(own) & set(state) if tuple(own[k].shape) != tuple(state[k].shape)
    )
    return resized, sorted(set(own) - set(state)), sorted(set(state) - set(own))


def load_pretrained_weights(model: nn.Module, path: str, evaluation: bool = False) -> None:
    """Loads weights only (on the CPU), skipping tensors whose shapes differ, with a warning.

    With `evaluation` (VALIDATE / TEST, whose learner has no training loss heads) the
    checkpoint's loss-head states are left out quietly, and a model weight the checkpoint
    lacks or holds in another shape is an error: evaluation would score untrained weights.
    """
    checkpoint = read_checkpoint(path)
    state = checkpoint.get("state_dict", checkpoint)
    if not isinstance(state, dict):
        raise ValueError(f"'{path}' holds no state_dict")
    state = upgrade_state_dict(state)
    own = model.state_dict()
    if evaluation:
        state = {k: v for k, v in state.items() if not k.startswith(_HEADS) or k in own}
        resized, missing, _ = state_mismatch(own, state)
        if resized or missing:
            example = (resized or missing)[0]
            raise ValueError(
                f"'{path}' does not fit the model this config builds ({len(resized)} weights "
                f"of another shape, {len(missing)} missing; e.g. {example}); evaluate it with "
                "the config that trained it (its run's .hydra/config.yaml)"
            )
    skipped = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
    if skipped:
        log.warning("pretrained weights: skipping %s (shapes differ, e.g. class count)", skipped)
    state = {k: v for k, v in state.items() if k not in skipped}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        log.warning("pretrained weights: missing %s, unexpected %s", missing, unexpected)
