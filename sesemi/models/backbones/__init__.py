"""Backbones: modules mapping images `(B, C, H, W)` to features `(B, out_features)`."""

from sesemi.models.backbones.timm import PyTorchImageModels

__all__ = ["PyTorchImageModels"]
