"""sesemi: image classification with few labels, via self- and semi-supervised loss heads."""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.2.0"

# Public names the configs use (`sesemi.Classifier`, ...), imported on first use so that
# `open_sesemi -h` does not pay for importing torch.
_LAZY = {
    "Classifier": "sesemi.learners",
    "PyTorchImageModels": "sesemi.models.backbones",
    "PolynomialLR": "sesemi.schedulers.lr",
    "dataset": "sesemi.datasets",
    "register_dataset": "sesemi.datasets",
    "list_datasets": "sesemi.datasets",
    "compose": "sesemi.api",
    "fit": "sesemi.api",
    "load_classifier": "sesemi.api",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'sesemi' has no attribute '{name}'")
