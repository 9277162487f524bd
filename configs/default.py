"""Shared base config (ml_collections). Dataset configs and variants override parts of it.

The config itself is maskad_jax/configs/default.py (shipped in the package: `--config=default` names it from any
directory); this file lets `--config=configs/default.py` and `from configs import default` keep working in a clone.
"""

from maskad_jax.configs.default import *  # noqa: F403
from maskad_jax.configs.default import get_config  # noqa: F401
