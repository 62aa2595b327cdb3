"""User errors: which exceptions are a user's mistake, and how they are reported in one line."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import NoReturn, TypeVar

from hydra.errors import InstantiationException
from omegaconf.errors import OmegaConfBaseException

# Mistakes a user can make in a config, on the command line or on disk; they get one line and
# exit status 1, not a traceback (HYDRA_FULL_ERROR=1 shows the traceback).
USER_ERRORS = (
    ValueError,
    KeyError,
    TypeError,
    FileNotFoundError,
    FileExistsError,
    FloatingPointError,
    OSError,
    ImportError,  # a `_target_` module that is not there, an optional extra not installed
    OmegaConfBaseException,
    InstantiationException,
)

T = TypeVar("T")


def root_cause(error: BaseException) -> BaseException:
    """The error Hydra wrapped while building an object (`InstantiationException`), or `error`."""
    while isinstance(error, InstantiationException) and error.__cause__ is not None:
        error = error.__cause__
    return error


def one_line(error: BaseException) -> str:
    """The error's message on one line.

    Errors from DataLoader workers carry the worker's traceback: its last line is the message.
    Messages that put their reason on following lines (Hydra's "Error loading 'x':") are joined.
    """
    cause = root_cause(error)
    text = str(cause).strip()
    worker = "Original Traceback" in text
    if worker:
        text = text.splitlines()[-1].split(": ", 1)[-1]
    if isinstance(cause, KeyError) or worker:
        text = text.strip("'\"")  # str(KeyError) quotes its message
    lines = (line.strip() for line in text.splitlines() if line.strip())
    return " ".join(lines) or type(error).__name__


def exit_with(prefix: str, error: BaseException) -> NoReturn:
    """Prints `<prefix>: error: <one line>` on stderr and exits with status 1."""
    print(f"{prefix}: error: {one_line(error)}", file=sys.stderr)
    sys.exit(1)


def reporting_user_errors(prefix: str, action: Callable[[], T]) -> T:
    """Runs `action`; a user error ends the process with one line (see `exit_with`).

    With `HYDRA_FULL_ERROR=1` in the environment the error propagates with its traceback.
    """
    try:
        return action()
    except USER_ERRORS as e:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        exit_with(prefix, e)
