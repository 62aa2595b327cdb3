"""sesemi's built-in configs; importing this package registers the schema they build on.

Hydra imports it for `initialize_config_module("sesemi.conf")`, so a plain Hydra `compose` of a
built-in config works without importing anything else first.
"""

import sesemi.config  # noqa: F401  (registers the ConfigStore nodes and the resolvers)
