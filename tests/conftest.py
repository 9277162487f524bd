import atexit
import os
import shutil
import tempfile

import pytest
from helpers import SHARED_MTD

# One persistent XLA compilation cache for this test session, inherited by the run.py and worker
# subprocesses: the end-to-end tests rerun the same programs (eval after train, predict, resume),
# which then load instead of compiling again. A fresh directory, so no test sees another session's.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _cache = tempfile.mkdtemp(prefix="maskad-xla-cache-")
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")


@pytest.fixture(scope="session")
def mtd_root():
    """../shared/data/mtd (real magnetic-tile data), or a skip with the reason."""
    if not (SHARED_MTD / "magnetic_tile" / "train" / "good").is_dir():
        pytest.skip(
            f"real data folder {SHARED_MTD} is absent (it sits beside the repository only on the "
            f"developers' and CI machines)"
        )
    return SHARED_MTD
