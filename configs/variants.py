"""Variants shared by the dataset configs: `configs/<dataset>.py:<variant>[,<variant>...]`.

The config itself is maskad_jax/configs/variants.py (shipped in the package: `--config=variants` names it from any
directory); this file lets `--config=configs/variants.py` and `from configs import variants` keep working in a clone.
"""

from maskad_jax.configs.variants import *  # noqa: F403
from maskad_jax.configs.variants import apply, cpu, smoke  # noqa: F401
