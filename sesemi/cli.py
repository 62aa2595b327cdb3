"""The `open_sesemi` command: compose the Hydra config, run it, print a summary."""

from __future__ import annotations

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

import sesemi.config  # noqa: F401  (registers the schema and the ${sesemi:...} resolver)


@hydra.main(version_base=None, config_path="conf", config_name="sesemi_config")
def cli(cfg: DictConfig) -> None:
    """Runs one composed configuration (one job of a multirun)."""
    from pytorch_lightning.utilities import rank_zero_only

    from sesemi.runner import format_summary, run

    hydra_cfg = HydraConfig.get()
    result = run(cfg, hydra_cfg.runtime.output_dir)
    rank_zero_only(print)(format_summary(result, hydra_cfg.job.config_name or ""))


def main() -> None:
    """Console-script entry point."""
    cli()


if __name__ == "__main__":
    main()
