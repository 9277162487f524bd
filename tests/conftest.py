import atexit
import os
import shutil
import tempfile

import pytest
from helpers import FAST_COMPILE, SHARED_MTD

# One persistent XLA compilation cache for this test session, inherited by the run.py and worker
# subprocesses: the end-to-end tests rerun the same programs (eval after train, predict, resume),
# which then load instead of compiling again. A fresh directory, so no test sees another session's.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _cache = tempfile.mkdtemp(prefix="maskad-xla-cache-")
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")


# The tests' own process compiles at LLVM's cheaper optimisation level too, as the run.py and worker
# subprocesses do (helpers.FAST_COMPILE: compiling dominates the tiny models' tests; same semantics).
# Set before any test initialises JAX's backend, which reads XLA_FLAGS once.
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + FAST_COMPILE).strip()


@pytest.fixture(scope="session")
def mtd_root():
    """../shared/data/mtd (real magnetic-tile data), or a skip with the reason."""
    if not (SHARED_MTD / "magnetic_tile" / "train" / "good").is_dir():
        pytest.skip(
            f"real data folder {SHARED_MTD} is absent (it sits beside the repository only on the "
            f"developers' and CI machines)"
        )
    return SHARED_MTD
