"""VisA (12 classes) with the paper's hyperparameters (B4 features, dim-768 5+5-block reconstructor, 600 epochs).

The config itself is maskad_jax/configs/visa.py (shipped in the package: `--config=visa` names it from any
directory); this file lets `--config=configs/visa.py` and `from configs import visa` keep working in a clone.
"""

from maskad_jax.configs.visa import *  # noqa: F403
from maskad_jax.configs.visa import get_config  # noqa: F401
