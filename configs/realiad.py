"""Real-IAD (30 classes, single view) with the paper's hyperparameters (B4 features, dim-768 5+5-block

The config itself is maskad_jax/configs/realiad.py (shipped in the package: `--config=realiad` names it from any
directory); this file lets `--config=configs/realiad.py` and `from configs import realiad` keep working in a clone.
"""

from maskad_jax.configs.realiad import *  # noqa: F403
from maskad_jax.configs.realiad import get_config  # noqa: F401
