"""MVTec-AD (15 classes) with the paper's hyperparameters (B4 features, dim-768 5+5-block reconstructor, 600 epochs).

The config itself is maskad_jax/configs/mvtec.py (shipped in the package: `--config=mvtec` names it from any
directory); this file lets `--config=configs/mvtec.py` and `from configs import mvtec` keep working in a clone.
"""

from maskad_jax.configs.mvtec import *  # noqa: F403
from maskad_jax.configs.mvtec import get_config  # noqa: F401
