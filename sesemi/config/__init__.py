"""Configuration: structured schemas, the `${sesemi:...}` resolver and Hydra ConfigStore nodes."""

from hydra.core.config_store import ConfigStore

from sesemi.config.resolvers import SESEMIConfigAttributes, register_resolvers
from sesemi.config.structs import (
    ClassifierConfig,
    ClassifierHParams,
    DataConfig,
    DataLoaderConfig,
    DatasetConfig,
    LearnerConfig,
    RunConfig,
    RunMode,
    SESEMIBaseConfig,
    SESEMIConfig,
)

__all__ = [
    "ClassifierConfig",
    "ClassifierHParams",
    "DataConfig",
    "DataLoaderConfig",
    "DatasetConfig",
    "LearnerConfig",
    "RunConfig",
    "RunMode",
    "SESEMIBaseConfig",
    "SESEMIConfig",
    "SESEMIConfigAttributes",
    "register_config_store",
]


def register_config_store() -> None:
    """Stores the schema nodes that the built-in YAML configs name in their defaults lists."""
    cs = ConfigStore.instance()
    cs.store(name="sesemi_base_config", node=SESEMIBaseConfig)
    cs.store(group="learner", name="classifier", node=ClassifierConfig)


register_resolvers()
register_config_store()
