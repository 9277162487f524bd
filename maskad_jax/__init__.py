"""maskad_jax: MaskAD in JAX/Flax. The public API (docs/api.md):

    import maskad_jax
    det = maskad_jax.load("runs/demo")      # a trained workdir or an export folder -> Detector
    r = det.predict("part.png")             # or a PIL image, a uint8 array, a list: Prediction(s)
    det = maskad_jax.train("demo:smoke", workdir="runs/smoke")
    cfg = maskad_jax.config("folder:cpu")  # a shipped config by name (or a file's path), with variants

The names load quickly: JAX and the rest are imported on first use.
"""

from maskad_jax.common.xla_env import set_cpu_flags as _set_cpu_flags

_set_cpu_flags()  # before JAX starts: the CPU flags run.py uses, so both compile the same programs
__version__ = "0.1.0"
__all__ = ["Detector", "Prediction", "config", "load", "train"]

_WHERE = {
    "load": "maskad_jax.app.api",
    "config": "maskad_jax.app.api",
    "train": "maskad_jax.app.api",
    "Detector": "maskad_jax.app.detector",
    "Prediction": "maskad_jax.app.detector",
}


def __getattr__(name):
    if name in _WHERE:
        import importlib

        return getattr(importlib.import_module(_WHERE[name]), name)
    raise AttributeError(f"module 'maskad_jax' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)
