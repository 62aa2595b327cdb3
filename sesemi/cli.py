"""The `open_sesemi` command: compose the Hydra config, run it, print a summary."""

from __future__ import annotations

import difflib
import logging
import os
import shlex
import sys
import warnings

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

import sesemi.config  # noqa: F401  (registers the schema and the ${sesemi:...} resolver)
from sesemi.config.resolvers import RunTimePlaceholders, use_attributes
from sesemi.errors import exit_with, reporting_user_errors
from sesemi.launch import external_launch, peer_overrides


def _option(argv: list[str], *names: str) -> str | None:
    # The value of `-cn NAME`, `--config-name NAME` or `--config-name=NAME` (the last one given).
    value = None
    for i, arg in enumerate(argv):
        if arg in names and i + 1 < len(argv):
            value = argv[i + 1]
        elif any(arg.startswith(n + "=") for n in names if n.startswith("--")):
            value = arg.split("=", 1)[1]
    return value


def builtin_configs(group: str | None = None) -> list[str]:
    """The names of the configs shipped in `sesemi/conf` (or in one of its groups)."""
    from importlib.resources import files

    folder = files("sesemi.conf")
    if group is not None:
        folder = folder / group
    return sorted(f.name[:-5] for f in folder.iterdir() if f.name.endswith(".yaml"))


def missing_config_error(argv: list[str]) -> str | None:
    """A one-line error when `-cn` names a config that is neither built in nor in `-cd`."""
    name = _option(argv, "-cn", "--config-name")
    if not name or any(a.startswith(("hydra.searchpath", "-cp", "--config-path")) for a in argv):
        return None
    stem = name[:-5] if name.endswith(".yaml") else name
    config_dir = _option(argv, "-cd", "--config-dir")
    builtin = builtin_configs()
    if stem in builtin or stem == "sesemi_base_config":
        return None
    if config_dir is not None and os.path.isfile(os.path.join(config_dir, stem + ".yaml")):
        return None
    where = f" nor {os.path.join(config_dir, stem + '.yaml')}" if config_dir else ""
    close = difflib.get_close_matches(stem, builtin, n=3)
    hint = f"did you mean {' or '.join(close)}? " if close else ""
    base, _, method = stem.partition("_")
    if base in builtin and method:  # the old per-method names: demo_fixmatch, imagewoof_jigsaw
        methods = difflib.get_close_matches(method, builtin_configs("method"), n=1, cutoff=0.5)
        if methods:
            hint = f"did you mean -cn {base} method={methods[0]}? "
    return (
        f"no config named '{name}': not a built-in config{where}; {hint}built-in: "
        f"{', '.join(builtin)} (methods are chosen with method=NAME, e.g. -cn demo "
        "method=fixmatch); for your own configs use -cd DIR -cn NAME with DIR/NAME.yaml"
    )


def unknown_command_error(argv: list[str], commands: tuple[str, ...]) -> str | None:
    """A one-line error when the first argument is a bare word that is not a command: Hydra
    would read it as an override and fail on its grammar ("missing EQUAL at '<EOF>'")."""
    if not argv or argv[0].startswith(("-", "~", "+")) or "=" in argv[0]:
        return None
    word = argv[0]
    if word in builtin_configs():
        hint = f"to train with the built-in config '{word}': open_sesemi -cn {word}; "
    else:
        close = difflib.get_close_matches(word, commands, n=1, cutoff=0.6)
        hint = f"did you mean 'open_sesemi {close[0]}'? " if close else ""
    return (
        f"unknown command '{word}'; {hint}commands: {', '.join(commands)}; a training run "
        "takes key=value overrides (e.g. open_sesemi -cn demo method=fixmatch; open_sesemi -h)"
    )


def one_line_warning(message, category, filename, lineno, line=None) -> str:
    """`warnings.formatwarning` of the command line: `Category: message (file:line)`, without
    the source line Python adds; a warning raised in a class Hydra builds points into Hydra's
    own code, which says nothing to the user, so it gets no location."""
    if f"{os.sep}hydra{os.sep}" in filename:
        return f"{category.__name__}: {message}\n"
    return f"{category.__name__}: {message} ({os.path.basename(filename)}:{lineno})\n"


def version_line() -> str:
    """`open_sesemi --version`: sesemi's version and those of the libraries it runs on."""
    from importlib.metadata import PackageNotFoundError, version

    import sesemi

    parts = [f"open_sesemi (sesemi) {sesemi.__version__}"]
    for name, dist in (
        ("PyTorch", "torch"),
        ("Lightning", "pytorch-lightning"),
        ("Hydra", "hydra-core"),
        ("timm", "timm"),
    ):
        try:
            parts.append(f"{name} {version(dist)}")
        except PackageNotFoundError:
            parts.append(f"{name} not installed")
    return ", ".join(parts)


def yaml_syntax_error(argv: list[str]) -> str | None:
    """One line naming the file, line and column of the first YAML syntax error in the `-cd`
    folder's configs (Hydra would show a long traceback), or None."""
    import yaml

    folder = _option(argv, "-cd", "--config-dir")
    if not folder or not os.path.isdir(folder):
        return None
    for root, _, names in sorted(os.walk(folder)):
        for name in sorted(n for n in names if n.endswith((".yaml", ".yml"))):
            path = os.path.join(root, name)
            try:
                with open(path) as f:
                    yaml.safe_load(f)
            except yaml.MarkedYAMLError as e:
                mark = e.problem_mark
                where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "?"
                return f"{path}, {where}: {e.problem or e}; fix the YAML (tabs cannot indent)"
            except (yaml.YAMLError, OSError) as e:
                return f"{path}: {e}"
    return None


def _next_command(argv: list[str]) -> str:
    # The user's own invocation minus options the summary's suggestion replaces; in a multirun,
    # the job's own overrides instead of the sweep's.
    drop = ("run.mode=", "run.pretrained_checkpoint_path=", "run.resume_from_checkpoint=")
    hydra_cfg = HydraConfig.get()
    if str(hydra_cfg.mode) == "RunMode.MULTIRUN":
        flags, skip = [], False
        for i, arg in enumerate(argv):
            if skip:
                skip = False
                continue
            if arg in ("-cn", "--config-name", "-cd", "--config-dir", "-cp", "--config-path"):
                flags += argv[i : i + 2]
                skip = True
            elif arg.startswith("--config"):
                flags.append(arg)
        if not flags:  # a launcher's job process (submitit) has its own argv: ask Hydra
            sources = hydra_cfg.runtime.config_sources
            flags = [f"-cd={s.path}" for s in sources if s.provider == "command-line"]
            flags += ["-cn", hydra_cfg.job.config_name]
        argv = [*flags, *hydra_cfg.overrides.task]
    kept = [a for a in argv if not a.startswith(drop)]
    return shlex.join(["open_sesemi", *kept])


@hydra.main(version_base=None, config_path="conf", config_name="sesemi_config")
def cli(cfg: DictConfig) -> float | None:
    """Runs one composed configuration (one job of a multirun).

    Returns:
        The run's best val/top1 (else its val/top1 or test/top1), the value sweepers maximize.
    """
    from pytorch_lightning.utilities import rank_zero_only

    from sesemi.runner import format_summary, run

    output_dir = HydraConfig.get().runtime.output_dir
    result = reporting_user_errors("open_sesemi", lambda: run(cfg, output_dir))
    rank_zero_only(print)(format_summary(result, _next_command(sys.argv[1:])))
    return result.objective()


def main() -> None:
    """Console-script entry point: a checkpoint subcommand, or a Hydra training run."""
    from sesemi.commands import SUBCOMMANDS

    # `_target_: src.module.Name` in an experiment folder (the spec's layout) must import from
    # where the user launched, as with `python -m sesemi`; a console script does not add it.
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())

    if len(sys.argv) > 1 and sys.argv[1] in SUBCOMMANDS:
        from sesemi.commands import main as run_subcommand

        run_subcommand(sys.argv[1:])
        return
    if sys.argv[1:] == ["--version"]:  # Hydra's own flag would print Hydra's version alone
        print(version_line())
        return
    error = (
        unknown_command_error(sys.argv[1:], SUBCOMMANDS)
        or missing_config_error(sys.argv[1:])
        or yaml_syntax_error(sys.argv[1:])
    )
    if error is not None:
        exit_with("open_sesemi", ValueError(error))
    # The spec's own experiment configs (`defaults: [base]`) omit `_self_`; Hydra's default of
    # applying the file last is what they mean, so the upgrade notice is noise for users.
    warnings.filterwarnings("ignore", message=r".*Defaults list is missing `_self_`.*")
    warnings.formatwarning = one_line_warning
    # Optuna's storage layer (alembic) logs each of its plugins at INFO: noise in a sweep's output.
    logging.getLogger("alembic").setLevel(logging.WARNING)
    # One process of several started by torchrun or srun: rank 0 alone writes `.hydra/`.
    sys.argv += peer_overrides(external_launch())
    argv = sys.argv[1:]
    if "--resolve" in argv and any(a in ("-c", "--cfg") or a.startswith("--cfg=") for a in argv):
        # Printing a resolved config builds no run: ${sesemi:...} values print as placeholders.
        with use_attributes(RunTimePlaceholders()):
            cli()
        return
    cli()


if __name__ == "__main__":
    main()
