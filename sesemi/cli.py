"""The `open_sesemi` command: compose the Hydra config, run it, print a summary."""

from __future__ import annotations

import os
import shlex
import sys
import warnings

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException

import sesemi.config  # noqa: F401  (registers the schema and the ${sesemi:...} resolver)

# Mistakes a user can make in a config or on disk; they get one line, not a traceback.
USER_ERRORS = (
    ValueError,
    KeyError,
    TypeError,
    FileNotFoundError,
    FileExistsError,
    FloatingPointError,
    OSError,
    OmegaConfBaseException,
    InstantiationException,
)


def _root_cause(error: BaseException) -> BaseException:
    # Hydra wraps errors raised while building objects (InstantiationException); show the cause.
    while isinstance(error, InstantiationException) and error.__cause__ is not None:
        error = error.__cause__
    return error


def _one_line(error: BaseException) -> str:
    # Errors from DataLoader workers carry the worker's traceback; its last line is the message.
    text = str(_root_cause(error)).strip()
    if "Original Traceback" in text:
        text = text.splitlines()[-1].split(": ", 1)[-1]
    return text.strip("'\"").splitlines()[0] if text else type(error).__name__


def _next_command(argv: list[str]) -> str:
    # The user's own invocation minus options the summary's suggestion replaces.
    drop = ("run.mode=", "run.pretrained_checkpoint_path=", "run.resume_from_checkpoint=")
    kept = [a for a in argv if not a.startswith(drop)]
    return shlex.join(["open_sesemi", *kept])


@hydra.main(version_base=None, config_path="conf", config_name="sesemi_config")
def cli(cfg: DictConfig) -> None:
    """Runs one composed configuration (one job of a multirun)."""
    from pytorch_lightning.utilities import rank_zero_only

    from sesemi.runner import format_summary, run

    warnings.filterwarnings("ignore", message=r".*treespec, LeafSpec.*")
    warnings.filterwarnings("ignore", message=r".*pin_memory.*no accelerator.*")
    # The run directory is new; it holds only Hydra's own files, which the CSV logger keeps.
    warnings.filterwarnings(
        "ignore", message=r".*Experiment logs directory .* exists and is not empty.*"
    )
    try:
        result = run(cfg, HydraConfig.get().runtime.output_dir)
    except USER_ERRORS as e:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        print(f"open_sesemi: error: {_one_line(e)}", file=sys.stderr)
        sys.exit(1)
    rank_zero_only(print)(format_summary(result, _next_command(sys.argv[1:])))


def main() -> None:
    """Console-script entry point."""
    # The spec's own experiment configs (`defaults: [base]`) omit `_self_`; Hydra's default of
    # applying the file last is what they mean, so the upgrade notice is noise for users.
    warnings.filterwarnings("ignore", message=r".*Defaults list is missing `_self_`.*")
    cli()


if __name__ == "__main__":
    main()
