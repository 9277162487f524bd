import atexit
import os
import pathlib
import shutil
import socket
import tempfile

import pytest

# One persistent XLA compilation cache for this test session, inherited by the run.py and worker
# subprocesses: the end-to-end tests rerun the same programs (eval after train, predict, resume),
# which then load instead of compiling again. A fresh directory, so no test sees another session's.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _cache = tempfile.mkdtemp(prefix="maskad-xla-cache-")
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")

# For the subprocess smoke runs (run.py, the notebook, the multi-process helpers): tiny models, so
# compiling dominates, and LLVM's cheaper optimisation level halves it (same semantics; only the
# generated code is slower).
FAST_COMPILE = "--xla_backend_optimization_level=0"


def forced_devices_env(devices: int) -> dict:
    """The environment for a CPU subprocess with `devices` forced host devices and FAST_COMPILE."""
    return dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices} {FAST_COMPILE}",
                JAX_PLATFORMS="cpu")


def loopback_coordinator() -> str:
    """host:port of a free loopback port, for jax.distributed's coordinator in multi-process tests."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"

ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED_MTD = ROOT.parent / "shared" / "data" / "mtd"


@pytest.fixture(scope="session")
def mtd_root():
    """../shared/data/mtd (real magnetic-tile data), or a skip with the reason."""
    if not (SHARED_MTD / "magnetic_tile" / "train" / "good").is_dir():
        pytest.skip(f"real data folder {SHARED_MTD} is absent (it sits beside the repository only on the "
                    f"developers' and CI machines)")
    return SHARED_MTD


def torch_or_skip():
    torch = pytest.importorskip("torch", reason="parity tests need torch==2.13.0 (pip install -e .[test])")
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    return torch
