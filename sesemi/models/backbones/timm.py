"""The timm backbone: any `timm` model as a pooled feature extractor."""

from __future__ import annotations

import difflib
import os
from typing import Any

import timm
from torch import Tensor, nn


def _unknown_model_error(name: str) -> ValueError:
    close = difflib.get_close_matches(name, timm.list_models(), n=5, cutoff=0.6)
    hint = f"; did you mean {', '.join(close)}?" if close else "; see timm.list_models()"
    return ValueError(f"unknown timm backbone '{name}'{hint}")


class PyTorchImageModels(nn.Module):
    """A timm model without its classifier, returning pooled features `(B, out_features)`."""

    def __init__(
        self,
        name: str = "resnet50d",
        freeze: bool = False,
        pretrained: bool = False,
        global_pool: str = "avg",
        drop_rate: float = 0.0,
        **kwargs: Any,
    ) -> None:
        """Builds the backbone with `timm.create_model(name, num_classes=0, ...)`.

        Args:
            name: A timm model name (`timm.list_models()`).
            freeze: Whether to fix the weights and the BatchNorm statistics.
            pretrained: Whether to load timm's pretrained weights (from the local cache or the
                Hugging Face hub; offline, pass `pretrained_cfg_overlay={"file": path}`).
            global_pool: The pooling type ("avg", "max", "avgmax", ...).
            drop_rate: Dropout on the pooled features.
            **kwargs: Any other arguments to `timm.create_model`.
        """
        super().__init__()
        if not timm.is_model(name):
            raise _unknown_model_error(name)
        local = (kwargs.get("pretrained_cfg_overlay") or {}).get("file")
        if pretrained and local and not os.path.isfile(local):
            raise FileNotFoundError(
                f"pretrained_cfg_overlay.file '{local}' does not exist; give the path of a "
                "local weights file (.pth, .bin or .safetensors)"
            )
        try:
            self.model = timm.create_model(
                name,
                pretrained=pretrained,
                num_classes=0,
                global_pool=global_pool,
                drop_rate=drop_rate,
                **kwargs,
            )
        except (OSError, RuntimeError) as e:
            if not pretrained:
                raise
            raise RuntimeError(
                f"could not load pretrained weights for '{name}' ({type(e).__name__}: {e}); "
                "with no network, point to a local file with "
                "pretrained_cfg_overlay={file: /path/to/weights} or set pretrained: False"
            ) from e
        self.name = name
        self.freeze = freeze
        # Plain values that rebuild this backbone's architecture (see `spec`).
        plain = {k: v for k, v in kwargs.items() if k != "pretrained_cfg_overlay"}
        self._spec = {"name": name, "global_pool": global_pool, "drop_rate": drop_rate, **plain}
        # Models with a pre-logits MLP (e.g. MambaOut) return `head_hidden_size` features, not
        # `num_features`, even with num_classes=0.
        self.out_features: int = getattr(self.model, "head_hidden_size", None) or (
            self.model.num_features
        )
        self.pretrained_cfg: dict[str, Any] = dict(getattr(self.model, "pretrained_cfg", {}))
        if freeze:
            self.model.requires_grad_(False)
            self.model.eval()

    def spec(self) -> dict[str, Any]:
        """Plain values (name, pooling, dropout, other timm arguments) that rebuild the same
        architecture with `PyTorchImageModels(**spec)`; checkpoints store them, so a network is
        rebuilt from data, never from code named in a file."""
        return dict(self._spec)

    def train(self, mode: bool = True) -> PyTorchImageModels:
        """Sets training mode; a frozen backbone stays in eval mode (BatchNorm stats stay fixed)."""
        super().train(mode)
        if self.freeze:
            self.model.eval()
        return self

    def forward(self, images: Tensor) -> Tensor:
        """Maps images `(B, C, H, W)` to pooled features `(B, out_features)`."""
        return self.model(images)
