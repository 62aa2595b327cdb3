"""The `${sesemi:name}` resolver: run-time facts (iterations per epoch, devices) for configs."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from omegaconf import OmegaConf


class AttributeResolver:
    """Exposes its dataclass fields to OmegaConf under one resolver name.

    Fields still `None` when a config is resolved raise a clear error rather than resolving to
    null, since that means the value is not known yet (e.g. no training data was configured).
    """

    def __call__(self, name: str) -> Any:
        names = [f.name for f in fields(self)]  # type: ignore[arg-type]
        if name not in names:
            raise ValueError(f"unknown attribute '${{sesemi:{name}}}'; known: {', '.join(names)}")
        value = getattr(self, name)
        if value is None:
            raise ValueError(
                f"'${{sesemi:{name}}}' is not known yet: it is set when the run is built "
                "(it needs data.train for the iteration counts)"
            )
        return value


@dataclass
class SESEMIConfigAttributes(AttributeResolver):
    """The attributes exposed to SESEMI configuration files.

    These attributes can be referenced in the config files by following the omegaconf syntax for
    custom resolvers. For example, ${sesemi:iterations_per_epoch} will reference the
    `iterations_per_epoch` attribute.

    Attributes:
        iterations_per_epoch: The number of training iterations per epoch on each process (the
            longest training loader sets it), if training data is available.
        max_iterations: The maximum number of training iterations if training data is available.
        num_gpus: The number of GPUs that will be used (0 on the CPU).
        num_nodes: The number of compute nodes that will be used.
    """

    iterations_per_epoch: int | None = None
    max_iterations: int | None = None
    num_gpus: int | None = None
    num_nodes: int | None = None


_ATTRIBUTES = SESEMIConfigAttributes()


def set_attributes(attributes: SESEMIConfigAttributes) -> None:
    """Makes `attributes` the values that `${sesemi:...}` resolves to."""
    global _ATTRIBUTES
    _ATTRIBUTES = attributes


def get_attributes() -> SESEMIConfigAttributes:
    """Returns the values that `${sesemi:...}` currently resolves to."""
    return _ATTRIBUTES


def register_resolvers() -> None:
    """Registers the `sesemi` resolver with OmegaConf (idempotent)."""
    if not OmegaConf.has_resolver("sesemi"):
        OmegaConf.register_new_resolver("sesemi", lambda name: _ATTRIBUTES(name))
