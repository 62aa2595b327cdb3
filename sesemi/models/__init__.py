"""Models: backbones and loss heads."""
