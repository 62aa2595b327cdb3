"""The `${sesemi:name}` resolver: run-time facts (iterations per epoch, devices) for configs."""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, fields
from typing import Any

from omegaconf import OmegaConf


class AttributeResolver:
    """Exposes its dataclass fields to OmegaConf under one resolver name.

    Fields still `None` when a config is resolved raise a clear error rather than resolving to
    null, since that means the value is not known yet (e.g. no training data was configured).
    """

    def _check(self, name: str) -> None:
        names = [f.name for f in fields(self)]  # type: ignore[arg-type]
        if name not in names:
            raise ValueError(f"unknown attribute '${{sesemi:{name}}}'; known: {', '.join(names)}")

    def __call__(self, name: str) -> Any:
        self._check(name)
        value = getattr(self, name)
        if value is None:
            raise ValueError(
                f"'${{sesemi:{name}}}' is not known yet: it is set when the run is built "
                "(it needs data.train for the iteration counts and the class count)"
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
        num_classes: The number of classes of the labeled images (the supervised loader's, else
            the val or test loader's class folders).
    """

    iterations_per_epoch: int | None = None
    max_iterations: int | None = None
    num_gpus: int | None = None
    num_nodes: int | None = None
    num_classes: int | None = None


class RunTimePlaceholders(SESEMIConfigAttributes):
    """Resolves every `${sesemi:name}` to a readable placeholder, for printing a config before
    any run is built (`open_sesemi --cfg job --resolve`)."""

    def __call__(self, name: str) -> Any:
        self._check(name)
        return f"<{name}: known when the run is built>"


# The values `${sesemi:...}` resolves to, set only while the runner resolves a config.
_CURRENT: ContextVar[SESEMIConfigAttributes | None] = ContextVar("sesemi_attributes", default=None)


@contextmanager
def use_attributes(attributes: SESEMIConfigAttributes) -> Iterator[SESEMIConfigAttributes]:
    """Makes `${sesemi:...}` resolve to `attributes` inside the `with` block."""
    token = _CURRENT.set(attributes)
    try:
        yield attributes
    finally:
        _CURRENT.reset(token)


def resolve(node: Any, attributes: SESEMIConfigAttributes) -> Any:
    """A plain, fully resolved copy (dicts and lists) of a config node under `attributes`."""
    with use_attributes(attributes):
        if OmegaConf.is_config(node):
            return OmegaConf.to_container(node, resolve=True)
        return node


_CLAIMED: dict[str, str] = {}
# Folders that could not be created, by the stand-in folder handed out instead (see below).
FAILED_CLAIMS: dict[str, str] = {}


def claim_new_dir(path: str) -> str:
    """Creates the folder `path` for this process alone and returns it: when another process
    (a run started in the same second) already has it, `path_1`, `path_2`, ... instead. The
    same `path` asked again in this process gives the same folder. The processes of one
    `torchrun` or `srun` launch share one folder (`sesemi.launch.shared_run_dir`).

    When the folder cannot be created (`run.dir` is a file, or not writable), a temporary
    stand-in folder is returned and the reason kept in `FAILED_CLAIMS`, so that the run stops
    with one line naming it (`sesemi.runner.run`) instead of Hydra's traceback.
    """
    from sesemi.launch import shared_run_dir

    if path not in _CLAIMED:
        _CLAIMED[path] = shared_run_dir(path, _claim) or _claim(path)
    return _CLAIMED[path]


def _claim(path: str) -> str:
    try:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    except OSError as e:
        stand_in = tempfile.mkdtemp(prefix="sesemi-unusable-run-dir-")
        FAILED_CLAIMS[stand_in] = (
            f"cannot create the run folder '{path}' ({e.strerror or e}); set run.dir to a "
            "writable folder"
        )
        return stand_in
    for attempt in range(1000):
        candidate = path if attempt == 0 else f"{path}_{attempt}"
        try:
            os.mkdir(candidate)  # atomic: exactly one process creates a given folder
        except FileExistsError:
            continue
        return candidate
    raise FileExistsError(f"could not create a new run folder next to '{path}'")


def _multiply(*factors: Any) -> Any:
    if any(f is None for f in factors):
        raise ValueError(
            "${sesemi.mul:...} got null: set the value it multiplies (e.g. run.batch_size_per_gpu)"
        )
    product = 1
    for f in factors:
        product *= f
    return product


def gpu_count(gpus: Any, without_gpus: Any = 0) -> Any:
    """The number of GPUs per node that `run.gpus` asks for (a count, a list of ids or "0,1"),
    or `without_gpus` for a CPU run (0, null, []): what a cluster launcher requests per node.
    -1 ("every GPU there is") is not a count a scheduler can reserve, so it is refused."""
    if isinstance(gpus, str):  # "4" or "0,1"
        text = gpus.strip()
        is_count = text.lstrip("-").isdigit()
        gpus = int(text) if is_count else [g for g in text.split(",") if g.strip()]
    count = int(gpus or 0) if gpus is None or isinstance(gpus, int) else len(gpus)
    if count < 0:
        raise ValueError(
            f"run.gpus={gpus} (every GPU there is) cannot size a cluster job; set run.gpus to "
            "the GPUs per node to reserve, e.g. run.gpus=4"
        )
    return count if count > 0 else without_gpus


def _attribute(name: str) -> Any:
    return (_CURRENT.get() or SESEMIConfigAttributes())(name)


def register_resolvers() -> None:
    """Registers `${sesemi:name}`, `${sesemi.mul:a,b}` (a product), `${sesemi.new_dir:path}`
    (a run folder no other process has) and `${sesemi.gpu_count:gpus,default}` with OmegaConf."""
    if not OmegaConf.has_resolver("sesemi"):
        OmegaConf.register_new_resolver("sesemi", _attribute)
    if not OmegaConf.has_resolver("sesemi.mul"):
        OmegaConf.register_new_resolver("sesemi.mul", _multiply)
    if not OmegaConf.has_resolver("sesemi.new_dir"):
        # Cached in the config, so a launcher's job processes (joblib, submitit) that receive
        # the config get the folder the parent claimed instead of claiming another.
        OmegaConf.register_new_resolver("sesemi.new_dir", claim_new_dir, use_cache=True)
    if not OmegaConf.has_resolver("sesemi.gpu_count"):
        OmegaConf.register_new_resolver("sesemi.gpu_count", gpu_count)


def hydra_quoted(value: str) -> str:
    """`value` as a double-quoted Hydra override value, for values Hydra's grammar refuses
    unquoted (a checkpoint named `epoch=59-step=300.ckpt`, a path with spaces)."""
    # Inside quotes Hydra unescapes `\\"` and the backslashes right before a quote.
    return '"' + re.sub(r'(\\*)"', lambda m: m[1] * 2 + '\\"', value) + '"'
