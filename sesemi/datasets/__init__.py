"""Datasets: a registry of builders by name, and the built-in `image_folder`, `pseudo_labeled`."""

from sesemi.datasets import image_folder as _image_folder  # noqa: F401  (registers image_folder)
from sesemi.datasets import pseudo_labeled as _pseudo_labeled  # noqa: F401  (registers it)
from sesemi.datasets._registry import dataset, list_datasets, register_dataset

__all__ = ["dataset", "list_datasets", "register_dataset"]
