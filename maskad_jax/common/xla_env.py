"""XLA's CPU settings this package runs with, set in the environment before JAX starts its backend.

- YNNPACK fusions off (`--xla_cpu_experimental_ynn_fusion_type=`): jaxlib 0.10's CPU backend hands
  matmuls, reductions and elementwise ops to YNNPACK by default; with that off (Eigen matmuls, XLA's
  own loops) the reconstructor trained 15-20% faster and scored about 15% faster on a 2-core CPU
  (benchmarks/RESULTS.md). Only for the jaxlib it was measured on (the flag is experimental; an
  unknown flag aborts XLA); GPUs and TPUs ignore it. Set by `import maskad_jax` and by run.py, so the
  Python API and run.py compile the same programs (the same numbers, bit for bit).
- Every core as an XLA device (`--xla_force_host_platform_device_count`, run.py only): the
  data-parallel feature extraction then uses them all. Harmless on GPU/TPU hosts.
Either flag is left alone when XLA_FLAGS already names it; nothing changes once JAX's backend runs.
JAX's persistent compilation cache (compilation_cache) is set here too, for run.py and the API alike.
"""

from __future__ import annotations

import os


def _jaxlib_version() -> str:
    try:
        from importlib.metadata import version

        return version("jaxlib")
    except Exception:  # not installed the usual way: leave XLA's defaults
        return ""


def set_cpu_flags(force_devices: bool = False) -> None:
    """Add this package's XLA CPU flags to XLA_FLAGS (see the module's text)."""
    flags = os.environ.get("XLA_FLAGS", "")
    if force_devices and "xla_force_host_platform_device_count" not in flags:
        flags += f" --xla_force_host_platform_device_count={max(1, min(os.cpu_count() or 1, 8))}"
    if "xla_cpu_experimental_ynn_fusion_type" not in flags and _jaxlib_version().startswith("0.10."):
        flags += " --xla_cpu_experimental_ynn_fusion_type="
    if flags.strip() != os.environ.get("XLA_FLAGS", "").strip():
        os.environ["XLA_FLAGS"] = flags.strip()


def compilation_cache(path: str | None = None) -> None:
    """JAX's persistent compilation cache (run.py's --xla_cache, maskad_jax.load's cache): `path`; else
    $JAX_COMPILATION_CACHE_DIR (JAX reads it and its JAX_PERSISTENT_CACHE_* settings itself); else the
    folder a caller (a notebook) already chose; else ~/.cache/maskad_jax/xla (at most 2 GiB, least
    recently used entries go first). "none", "off" or "": no cache. A second process then loads the
    compiled program instead of compiling it."""
    import jax

    if path is not None and path.lower() in ("", "none", "off"):
        jax.config.update("jax_enable_compilation_cache", False)
        return
    if path is None and (os.environ.get("JAX_COMPILATION_CACHE_DIR") or jax.config.jax_compilation_cache_dir):
        return
    if path is None:
        path = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "maskad_jax", "xla")
        jax.config.update("jax_compilation_cache_max_size", 2 * 2**30)
    jax.config.update("jax_compilation_cache_dir", path)
