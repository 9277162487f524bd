"""The embedded default: the procedural synthetic dataset, packaged Lite0 weights, a CPU-sized model.

The config itself is maskad_jax/configs/demo.py (shipped in the package: `--config=demo` names it from any
directory); this file lets `--config=configs/demo.py` and `from configs import demo` keep working in a clone.
"""

from maskad_jax.configs.demo import *  # noqa: F403
from maskad_jax.configs.demo import get_config  # noqa: F401
