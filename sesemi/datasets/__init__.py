"""Datasets: a registry of builders by name; built in: image_folder, pseudo_labeled, webdataset."""

from sesemi.datasets import image_folder as _image_folder  # noqa: F401  (registers image_folder)
from sesemi.datasets import pseudo_labeled as _pseudo_labeled  # noqa: F401  (registers it)
from sesemi.datasets import wds_shards as _wds_shards  # noqa: F401  (registers webdataset)
from sesemi.datasets._registry import dataset, list_datasets, register_dataset

__all__ = ["dataset", "list_datasets", "register_dataset"]
