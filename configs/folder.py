"""Any directory of classes in MVTec layout (set data.manual_dir); CPU-sized model by default.

The config itself is maskad_jax/configs/folder.py (shipped in the package: `--config=folder` names it from any
directory); this file lets `--config=configs/folder.py` and `from configs import folder` keep working in a clone.
"""

from maskad_jax.configs.folder import *  # noqa: F403
from maskad_jax.configs.folder import get_config  # noqa: F401
