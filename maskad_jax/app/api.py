"""The public API: `maskad_jax.load(path)` and `maskad_jax.train(...)` (docs/api.md).

import maskad_jax
det = maskad_jax.train("demo:smoke", workdir="runs/smoke")     # the training job; its Detector
det = maskad_jax.load("runs/smoke")                             # a workdir, or an export folder
result = det.predict(uint8_array)                               # detector.py: Prediction
"""

from __future__ import annotations

import importlib
import importlib.util
import os

from maskad_jax.app.detector import Detector, apply_overrides, workdir_config
from maskad_jax.common.errors import ConfigError, MissingInputError
from maskad_jax.common.xla_env import compilation_cache
from maskad_jax.runtime import serve_export

# A detector loaded from an export needs only the runtime; from a workdir, the restore code (orbax,
# the models); a mode (train, update, export, evaluate), the pipeline (TFDS, the trainer, the report).
# Each is imported when first needed (the only function-local imports of the package besides
# convert_weights', checked by tests/test_structure.py).


def load(path: str, overrides: dict | None = None, runtime: str = "auto", cache: str | None = None) -> Detector:
    """A Detector from a workdir (its config.json, checkpoint and fit) or an export folder (its
    manifest.json and scorer). overrides (workdir only): {"predict.threshold_quantile": 0.995, ...}; fields
    that define the trained model are refused as in run.py. runtime (export only): auto | stablehlo |
    onnx. cache: JAX's persistent compilation cache folder (default as run.py: ~/.cache/maskad_jax/xla;
    "none": no cache; common/xla_env.compilation_cache)."""
    path = os.path.abspath(os.path.expanduser(os.fspath(path)))
    if os.path.isfile(os.path.join(path, "manifest.json")) and not os.path.isfile(os.path.join(path, "config.json")):
        return _load_export(path, runtime)
    if not os.path.isdir(path):
        raise MissingInputError(f"{path}: no such folder (load takes a trained workdir or an export folder)")
    compilation_cache(cache)
    from maskad_jax.app import restore  # noqa: PLC0415  (see the module's note)

    config = apply_overrides(workdir_config(path), overrides or {})
    trained = restore.restore_for(config, path, "predict")
    run, contract = restore.program(trained)
    return Detector(run, contract, path, trained=trained, config=config, modes=_modes)


def _modes(config, workdir: str, mode: str):
    """A pipeline mode on a workdir for Detector's methods ("load": the workdir loaded again)."""
    from maskad_jax.app.pipeline import train_and_evaluate  # noqa: PLC0415  (see the module's note)

    return load(workdir) if mode == "load" else train_and_evaluate(config, workdir, mode)


def _load_export(folder: str, runtime: str) -> Detector:
    try:
        manifest = serve_export.load_manifest(folder)
        run = serve_export.choose_runtime(folder, manifest, runtime)
    except serve_export.ArtifactError as e:
        raise MissingInputError(str(e)) from None
    contract = dict(manifest, max_batch=int((manifest.get("onnx") or {}).get("batch") or 32))
    return Detector(run, contract, folder)


def train(config="demo", workdir: str | None = None, images: str | None = None, overrides: dict | None = None):
    """Run the training job (train_and_eval, or train when the data has no test images) and return
    the Detector of the trained workdir. config: a ConfigDict, a config name with variants ("demo",
    "demo:smoke", "folder") or a config file's path ("configs/folder.py:paper"); images: a folder of
    good images (or one in MVTec layout), which selects the folder config when config is the default.
    workdir: default runs/<config name>."""
    from maskad_jax.app.pipeline import train_and_evaluate  # noqa: PLC0415  (see the module's note)

    if images is not None and config == "demo":
        config = "folder"
    cfg = load_config(config)
    if images is not None:
        cfg = apply_overrides(cfg, {"data.manual_dir": os.fspath(images)})
    cfg = apply_overrides(cfg, overrides or {})
    workdir = workdir or os.path.join("runs", str(cfg.get("name", "run")))
    train_and_evaluate(cfg, workdir, "train_and_eval")
    return load(workdir)


def load_config(spec):
    """A ConfigDict from a ConfigDict, a config name with variants ("demo:smoke") or a file path."""
    if hasattr(spec, "to_dict"):
        return spec
    name, _, variant = str(spec).partition(":")
    if name.endswith(".py"):
        if not os.path.isfile(name):
            raise MissingInputError(f"config {name}: no such file")
        mod_spec = importlib.util.spec_from_file_location("maskad_user_config", name)
        module = importlib.util.module_from_spec(mod_spec)
        mod_spec.loader.exec_module(module)
    else:
        try:
            module = importlib.import_module(f"maskad_jax.configs.{name}")
        except ModuleNotFoundError:
            raise ConfigError(f"config {spec!r}: no config of that name (demo, folder, mvtec, visa, realiad)") from None
    return module.get_config(variant) if variant else module.get_config()


config = load_config  # maskad_jax.config("demo:smoke"): the public name
