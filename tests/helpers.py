"""Helpers shared by the tests (imported as `from helpers import ...`; conftest.py holds only
pytest's session setup and fixtures)."""

import os
import pathlib
import socket

import pytest

# For the subprocess smoke runs (run.py, the notebook, the multi-process helpers): tiny models, so
# compiling dominates, and LLVM's cheaper optimisation level halves it (same semantics; only the
# generated code is slower).
FAST_COMPILE = "--xla_backend_optimization_level=0"

ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED_MTD = ROOT.parent / "shared" / "data" / "mtd"


def forced_devices_env(devices: int) -> dict:
    """The environment for a CPU subprocess with `devices` forced host devices and FAST_COMPILE."""
    return dict(
        os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices} {FAST_COMPILE}", JAX_PLATFORMS="cpu"
    )


def loopback_coordinator() -> str:
    """host:port of a free loopback port, for jax.distributed's coordinator in multi-process tests."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"


def torch_or_skip():
    torch = pytest.importorskip("torch", reason="parity tests need torch==2.13.0 (pip install -e .[test])")
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    return torch


def train_specs(config) -> tuple:
    """train.train's leading arguments for a config: (train spec, model spec, image size)."""
    from maskad_jax.common.specs import resolve

    s = resolve(config)
    return s.train, s.model, s.data.image_size
