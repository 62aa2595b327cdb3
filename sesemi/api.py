"""The Python API: compose a config, train it, and load a checkpoint for predictions.

import sesemi
cfg = sesemi.compose("demo", ["method=fixmatch", "run.num_iterations=100"])
result = sesemi.fit(cfg)                      # a RunResult: metrics, checkpoints, run folder
model = sesemi.load_classifier(result.best_checkpoint)
model.predict(["a.png", "b.png"])             # class names, probabilities, unknown score
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence

from omegaconf import DictConfig, OmegaConf

from sesemi.config.structs import RunMode

BUILTIN_CONFIGS = "sesemi.conf"


def compose(
    name: str = "sesemi_config",
    overrides: Sequence[str] = (),
    config_dir: str | os.PathLike | None = None,
) -> DictConfig:
    """Composes a config as `open_sesemi -cn NAME [-cd CONFIG_DIR] OVERRIDES...` would.

    Args:
        name: A built-in config (demo, base, imagewoof, sesemi_config) or one in `config_dir`.
        overrides: Hydra overrides, e.g. `["method=fixmatch", "run.seed=1"]`.
        config_dir: A folder of your own configs, searched before the built-in ones.

    Returns:
        The composed config (interpolations such as `${sesemi:...}` still unresolved).
    """
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir, initialize_config_module

    import sesemi.config  # noqa: F401  (the schema and resolvers)

    if config_dir is None:
        with initialize_config_module(BUILTIN_CONFIGS, version_base=None):
            return hydra_compose(config_name=name, overrides=list(overrides))
    folder = os.path.abspath(config_dir)
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"config_dir '{folder}' does not exist")
    # Your folder first, then the built-in configs (`defaults: [base]`), as `-cd` does.
    searchpath = f"hydra.searchpath=[pkg://{BUILTIN_CONFIGS}]"
    with initialize_config_dir(folder, version_base=None):
        return hydra_compose(config_name=name, overrides=[*overrides, searchpath])


def new_run_dir(parent: str) -> str:
    """Creates a new, empty run folder `parent/<timestamp>` (a suffix when the name is taken)."""
    from sesemi.config.resolvers import claim_new_dir

    return claim_new_dir(os.path.join(parent, time.strftime("%Y-%m-%d_%H-%M-%S")))


def fit(cfg: DictConfig, run_dir: str | os.PathLike | None = None):
    """Trains a composed config, as `open_sesemi` does, and returns its `RunResult`.

    Args:
        cfg: A config from `compose` (its `run.mode` is set to FIT).
        run_dir: Where outputs go; default a new `run.dir/run.id/<timestamp>` folder.

    Returns:
        The result: metrics (`result.metrics["val/top1"]`), checkpoints, run folder, seconds.
    """
    from sesemi.runner import run

    cfg = cfg.copy()
    cfg.run.mode = RunMode.FIT
    if run_dir is None:
        run_dir = new_run_dir(os.path.join(cfg.run.dir, cfg.run.id))
    run_dir = os.fspath(run_dir)
    os.makedirs(os.path.join(run_dir, ".hydra"), exist_ok=True)
    OmegaConf.save(cfg, os.path.join(run_dir, ".hydra", "config.yaml"))
    return run(cfg, run_dir)


def load_classifier(checkpoint: str | os.PathLike, ema: bool = False):
    """Loads a checkpoint's classifier for inference on the CPU (weights only, no code).

    Args:
        checkpoint: A checkpoint written by a sesemi run.
        ema: Use the EMA teacher's weights (runs with `model.ema`).

    Returns:
        A `TrainedModel`: `.predict(images or paths)` gives class names and probabilities (the
        numbers `open_sesemi predict` writes), `.net` is the `torch.nn.Module`, `.class_names`
        and `.preprocessing` say what it expects.
    """
    from sesemi.inference import load_trained_model

    return load_trained_model(os.fspath(checkpoint), ema=ema)
