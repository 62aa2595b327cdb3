"""The dataset registry: `register_dataset` fills it, `dataset` builds from it by name."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from torch.utils.data import Dataset, IterableDataset

DatasetBuilder = Callable[..., Dataset | IterableDataset]

_BUILDERS: dict[str, DatasetBuilder] = {}


def _origin(fn: Callable) -> str:
    try:
        return f"{inspect.getsourcefile(fn)}:{inspect.getsourcelines(fn)[1]}"
    except (OSError, TypeError):
        return getattr(fn, "__module__", "?")


def register_dataset(builder: DatasetBuilder | None = None, *, name: str | None = None) -> Any:
    """Registers a dataset builder under `name` (default: the function's name).

    Use as `@register_dataset` or `@register_dataset(name="my_data")`. The builder is called as
    `builder(root, subset, image_transform, **kwargs)`.

    Raises:
        ValueError: If the name is taken; the message says where it was first registered.
    """

    def decorate(fn: DatasetBuilder) -> DatasetBuilder:
        key = name or fn.__name__
        if key in _BUILDERS:
            raise ValueError(
                f"dataset '{key}' is already registered at {_origin(_BUILDERS[key])}; "
                "choose another name"
            )
        _BUILDERS[key] = fn
        return fn

    return decorate(builder) if builder is not None else decorate


def list_datasets() -> list[str]:
    """Returns the registered dataset names, sorted."""
    return sorted(_BUILDERS)


def dataset(
    name: str,
    root: str,
    subset: str | list[str] | None = None,
    image_transform: Callable | None = None,
    **kwargs: Any,
) -> Dataset | IterableDataset:
    """Builds a dataset.

    Args:
        name: The name of the dataset to build.
        root: The path to the image folder dataset.
        subset: The subset(s) to use.
        image_transform: The image transformations to apply.
        **kwargs: Any other arguments to forward to the underlying dataset builder.

    Returns:
        The dataset.
    """
    if name not in _BUILDERS:
        raise KeyError(
            f"unknown dataset '{name}'; registered datasets: {', '.join(list_datasets())} "
            "(add your own with @sesemi.register_dataset)"
        )
    return _BUILDERS[name](root=root, subset=subset, image_transform=image_transform, **kwargs)
