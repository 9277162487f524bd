"""--mode=export: a trained workdir as one artifact that scores images without this package.

<workdir>/export/ holds
  scorer.stablehlo  the whole test-time program (backbone, nearest pool, test masks, the 2N masked
                    reconstructions, AssDis, combination, upsampling, smoothing, threshold) serialised
                    with jax.export, the trained parameters, pools and thresholds baked in, the batch
                    dimension symbolic. Inputs: images (B, S, S, 3) uint8 RGB, already resized and
                    cropped to S = data.image_size (manifest "preprocess"), and their mask keys (B,)
                    int32 (manifest "input.key": a CRC32 of the image's bytes as float32 / 255, the key
                    eval and predict derive from the same image). Outputs: map (B, S, S) float32,
                    score (B,), anomalous (B,) bool, class_index (B,) int32, threshold (B,).
  manifest.json     input size and layout, preprocessing, classes and how a class is chosen, the
                    thresholds and their rule, the config's fingerprint, the versions that made it, and
                    the SHA-256 of every file (serve.py refuses an artifact whose digest differs).
  scorer.onnx       the same program as ONNX for onnxruntime (export_onnx.py; export.onnx), batches of
                    exactly export.onnx_batch images, the same inputs and outputs.
  serve.py          a standalone loader (imports numpy, PIL, and jax or onnxruntime; never maskad_jax).
"""

from __future__ import annotations

import importlib.metadata as md
import os
import shutil
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from maskad_jax.app import export_onnx
from maskad_jax.app.trained import Trained
from maskad_jax.common import progress
from maskad_jax.common.digests import sha256_file
from maskad_jax.common.errors import ConfigError
from maskad_jax.common.parallel import to_local
from maskad_jax.common.specs import DataSpec, ExportSpec, PredictSpec, ScoringSpec
from maskad_jax.data.tiling import tiles_on
from maskad_jax.engine.coreset import assign_pools
from maskad_jax.engine.scoring import device_pools, make_score_fn
from maskad_jax.engine.thresholds import (
    class_threshold,
    class_thresholds,
    normal_medians,
    threshold_images,
    threshold_rule,
)
from maskad_jax.engine.trained_model import TrainedModel
from maskad_jax.runtime import serve_export
from maskad_jax.runtime.serve_export import MANIFEST_DIGEST, load_manifest, write_manifest

FORMAT = "maskad-jax export 1"
KEY_RULE = (
    "zlib.crc32 of the C-order bytes of image.astype(float32) / 255 (shape S x S x 3), & 0x7fffffff, as "
    "int32: the key that seeds the image's test masks in eval and predict"
)


BOX_RULE = "(x0, y0, x1, y1) of the input holding the image (pad's letterbox; x1, y1 exclusive): serve.placement"
GEOMETRY_RULES = {
    "crop": "shorter side to {s} px (PIL Lanczos, aspect kept), the centre {s} x {s} kept",
    "resize": "the whole image to {s} x {s} (PIL Lanczos, aspect not kept)",
    "pad": "longer side to {s} px (PIL Lanczos, aspect kept), centred on a {s} x {s} canvas of RGB (124, 116, 104)",
}


def scoring_program(sc: ScoringSpec, pc: PredictSpec, tm: TrainedModel):
    """(state, f(state, images uint8 (B, S, S, 3), keys int32 (B,)[, boxes int32 (B, 4) with
    data.geometry = pad]) -> dict): the whole test-time program (nearest pool, scoring, thresholds), its
    trained state (parameters, backbone variables, pools, the fit's ignore regions, thresholds) a
    pytree of host arrays apart from the function. The export bakes the state in (scorer_function);
    the Python API (detector.py) and --mode=predict pass it as an argument of one jitted call."""
    extractor, pools, mpo = tm.extractor, tm.pools, tm.mpo
    state = {
        "params": to_local(tm.params),
        "variables": extractor.variables,
        "pools": to_local(device_pools(pools, mpo)),
        "thresholds": np.asarray(class_thresholds(pc, sc, pools), np.float32),
    }
    score = make_score_fn(sc, extractor, tm.model, mpo)
    fixed = pools.pool_index([pc.class_name])[0] if pc.class_name else None

    def program(st, images, keys, *boxes):  # boxes (B, 4) int32 with data.geometry = pad only
        x = images.astype(jnp.float32) / 255.0
        if fixed is None:
            pidx = assign_pools(extractor.apply(st["variables"], x), st["pools"])
        else:
            pidx = jnp.full(images.shape[:1], fixed, jnp.int32)
        out = score(st["params"], st["variables"], st["pools"], x, pidx, keys, *boxes)
        thr = st["thresholds"][pidx]
        return {
            "map": out["map"],
            "score": out["score"],
            "anomalous": out["score"] >= thr,
            "class_index": pidx,
            "threshold": thr,
        }

    return state, program


def scorer_function(sc: ScoringSpec, pc: PredictSpec, tm: TrainedModel):
    """f(images uint8 (B, S, S, 3), keys int32 (B,)[, boxes int32 (B, 4) with data.geometry = pad]) ->
    dict: the eval program with everything baked in (the fit's ignore regions included)."""
    state, program = scoring_program(sc, pc, tm)
    state = jax.tree_util.tree_map(jnp.asarray, state)
    return lambda images, keys, *boxes: program(state, images, keys, *boxes)


def export_stablehlo(d: DataSpec, xs: ExportSpec, scorer) -> bytes:
    s = d.image_size
    (b,) = jax.export.symbolic_shape("b")
    args = (jax.ShapeDtypeStruct((b, s, s, 3), jnp.uint8), jax.ShapeDtypeStruct((b,), jnp.int32))
    if d.geometry == "pad":
        args += (jax.ShapeDtypeStruct((b, 4), jnp.int32),)
    exported = jax.export.export(jax.jit(scorer), platforms=tuple(xs.platforms))(*args)
    return bytes(exported.serialize())


def export(t: Trained) -> str:
    """Write <workdir>/export/ of the trained workdir t (replacing an earlier export, which is this
    program's own output), with t's specs (scoring, data, predict, export)."""
    sc, xs = t.specs.scoring, t.specs.export
    if sc.mpo_normalisation != "calibration":
        raise ConfigError(
            "export scores images one by one: scoring.mpo_normalisation must be 'calibration' "
            f"(got {sc.mpo_normalisation!r}, which needs a whole test set)"
        )
    onnx_skip = export_onnx.skip_reason(xs)  # before any work: export.onnx = 'yes' may refuse
    t0 = time.time()
    out = os.path.join(t.workdir, "export")
    tmp = out + ".partial"
    if os.path.lexists(tmp):  # an interrupted export's leftovers (never a usable artifact: no manifest digest)
        shutil.rmtree(tmp)
    os.makedirs(tmp)
    try:
        _write_artifact(t, tmp, onnx_skip, t0)
        swap_in(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    manifest = load_manifest(out)
    progress.log(
        f"export written to {out} ({', '.join(sorted(manifest['files']))}); try: python {out}/serve.py IMAGE_OR_FOLDER"
    )
    return out


def _write_artifact(t: Trained, tmp: str, onnx_skip, t0: float):
    """The export's files in the folder tmp: scorer(s), serve.py, manifest.json and its digest."""
    sc, d, pc, xs = t.specs.scoring, t.specs.data, t.specs.predict, t.specs.export
    scorer = scorer_function(sc, pc, t)
    with open(os.path.join(tmp, "scorer.stablehlo"), "wb") as f:
        f.write(export_stablehlo(d, xs, scorer))
    progress.log(f"exported the scoring program as StableHLO for {', '.join(xs.platforms)} in {time.time() - t0:.0f}s")
    onnx_note = _write_onnx(sc, d, xs, lambda s: scorer_function(s, pc, t), tmp, onnx_skip)
    here = os.path.dirname(serve_export.__file__)  # runtime/: the files that run without this package
    shutil.copyfile(os.path.join(here, "serve_export.py"), os.path.join(tmp, "serve.py"))
    for name in ("serve_http.py", "serve_page.html"):  # serve.py --http (docs/deploy.md)
        shutil.copyfile(os.path.join(here, name), os.path.join(tmp, name))
    write_manifest(tmp, build_manifest(t, tmp, onnx_note))


def swap_in(new: str, out: str) -> None:
    """Put the complete folder `new` at `out` by renames: the previous `out` is moved aside first and
    put back if the new one cannot take its place, so a failure at any point leaves the previous
    export whole. The previous one is then deleted; if that fails (a read-only entry), it stays at
    the path the log names and the new export is in place."""
    old = None
    if os.path.lexists(out):
        old = f"{out}.previous-{os.getpid()}"
        os.rename(out, old)
    try:
        os.rename(new, out)
    except BaseException:
        if old is not None:
            os.rename(old, out)
        raise
    if old is not None:
        shutil.rmtree(old, onerror=lambda *a: None)
        if os.path.lexists(old):
            progress.log(f"the previous export could not be deleted completely; what is left is in {old}")


def _write_onnx(sc: ScoringSpec, d: DataSpec, xs: ExportSpec, make_scorer, folder: str, why) -> dict:
    """scorer.onnx unless `why` (export_onnx.skip_reason) says why not; the manifest's "onnx" entry.

    make_scorer(scoring spec) -> scorer_function(...): export_onnx builds it with its own scoring (onnx_scoring)."""
    if why:
        progress.log(f"no ONNX export: {why}")
        return {"file": None, "why": why}
    t0 = time.time()
    with open(os.path.join(folder, "scorer.onnx"), "wb") as f:
        f.write(export_onnx.export_onnx(sc, d, xs, make_scorer))
    progress.log(f"exported the scoring program as ONNX (batch {xs.onnx_batch}) in {time.time() - t0:.0f}s")
    return {
        "file": "scorer.onnx",
        "batch": xs.onnx_batch,
        "opset": export_onnx.OPSET,
        "runtime": "onnxruntime (CPUExecutionProvider tested)",
    }


def tiles_entry(d: DataSpec) -> dict | None:
    """The manifest's tiling (data.tiles): each image cut into rows x cols tiles (serve.tile_boxes), each
    scored as an input, the maps stitched (their maximum), the score the tiles' maximum; or None."""
    if not tiles_on(d.tiles):
        return None
    rows, cols = d.tiles
    return {"rows": int(rows), "cols": int(cols), "overlap": float(d.tile_overlap)}


def threshold_entries(sc: ScoringSpec, pc: PredictSpec, pools) -> dict:
    """The manifest's thresholds, map levels, normal medians (the normalised score), ignore regions
    and the record of --mode=update (files and digests, not the local paths they came from)."""
    names = pools.class_names
    return {
        "thresholds": dict(zip(names, class_thresholds(pc, sc, pools))),
        "threshold_rule": threshold_rule(pc, pools),
        "map_thresholds": {c: class_threshold(pc, sc, pools, c, of="map") for c in names},
        "normal_medians": dict(zip(names, normal_medians(pools))),
        # how many images each threshold rests on (0: a number given by predict.threshold)
        "threshold_images": {c: threshold_images(pc, pools, c) for c in names},
        "normalised_score": "(score - normal_medians[class]) / (threshold - normal_medians[class]); 1 = threshold",
        "ignore_regions": [c for k, c in enumerate(names) if pools.ignore is not None and pools.ignore[k].any()],
        "updates": [{k: v for k, v in rec.items() if k != "input"} for rec in pools.added],
    }


def build_manifest(t: Trained, folder: str, onnx_note=None) -> dict:
    """manifest.json's content for the files in `folder`, of the trained workdir t (its specs)."""
    sc, d, pc, xs, pools = t.specs.scoring, t.specs.data, t.specs.predict, t.specs.export, t.pools
    s, geometry = d.image_size, d.geometry
    versions = {"python": sys.version.split()[0]}
    for pkg in ("jax", "jaxlib", "flax", "numpy", "ott-jax", "maskad-jax", "jax2onnx", "onnx", "onnxruntime"):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    files = {
        name: sha256_file(os.path.join(folder, name))
        for name in sorted(os.listdir(folder))
        if name not in ("manifest.json", MANIFEST_DIGEST)
    }
    return {
        "format": FORMAT,
        "created": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "input": {
            "dtype": "uint8",
            "shape": ["batch", s, s, 3],
            "layout": "NHWC, RGB, 0-255",
            "key": {"dtype": "int32", "shape": ["batch"], "rule": KEY_RULE},
            **({"boxes": {"dtype": "int32", "shape": ["batch", 4], "rule": BOX_RULE}} if geometry == "pad" else {}),
        },
        "preprocess": {
            "convert": "RGB (grey and palette images converted, alpha dropped)",
            "geometry": geometry,
            "how": GEOMETRY_RULES[geometry].format(s=s),
            "tiles": tiles_entry(d),
        },
        "outputs": {
            "map": ["batch", s, s, "float32, the anomaly map (higher = more anomalous)"],
            "score": ["batch", "float32, the map's maximum"],
            "anomalous": ["batch", "bool, score >= threshold"],
            "class_index": ["batch", "int32, index into classes"],
            "threshold": ["batch", "float32, the threshold of the image's class"],
        },
        "classes": list(pools.class_names),
        "class_choice": (
            f"fixed: {pc.class_name!r} (predict.class_name)"
            if pc.class_name
            else "per image, the pool whose nearest tokens are closest on average"
        ),
        **threshold_entries(sc, pc, pools),
        "platforms": list(xs.platforms),
        "scoring": {
            "mpo": sc.mpo,
            "ot": sc.ot,
            "combine": sc.combine,
            "error_units": sc.error_units,
        },
        "onnx": onnx_note,
        "config_sha256": xs.config_sha256,
        "versions": versions,
        "files": files,
    }
