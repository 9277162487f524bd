"""Predict on new images: `--mode=predict --config.predict.input=PATH` (an image or a folder, recursive).

Writes into <workdir>/predictions/: scores.csv and scores.json (file, class, image score, threshold,
decision), maps/<name>.npy (the anomaly map), maps/<name>.png (the map scaled by the threshold:
255 = twice the threshold) and overlays/<name>.png (heatmap over the image, the region at or above
the threshold outlined in white). Names are flattened from the input's relative paths to letters,
digits, '-' and '_', so nothing can be written outside the workdir.

Class: `predict.class_name`, or (empty) the pool whose tokens lie nearest to the image's on average.
Threshold: `predict.threshold` when >= 0, else the `predict.threshold_quantile` quantile of the
scores of normal training images held out of the pool (never from test labels).
"""
from __future__ import annotations

import csv
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from maskad_jax.coreset import nearest
from maskad_jax.data import image_key
from maskad_jax.overlay import overlay, safe_name
from maskad_jax.preprocess import ImageDecodeError, open_image, preprocess_image
from maskad_jax.train import place_for_scoring, scoring_sharding

EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


def collect_inputs(path: str) -> tuple[str, list[str]]:
    """(root, sorted relative paths) of the images at path (a file or a folder, recursively)."""
    path = os.path.abspath(os.path.expanduser(path))
    if os.path.isfile(path):
        return os.path.dirname(path), [os.path.basename(path)]
    if not os.path.isdir(path):
        raise FileNotFoundError(f"predict.input {path!r} is neither an image file nor a folder")
    rels = []
    for d, _, files in os.walk(path):
        rels += [os.path.relpath(os.path.join(d, f), path) for f in files if f.lower().endswith(EXTENSIONS)]
    if not rels:
        raise FileNotFoundError(f"no images ({', '.join(EXTENSIONS)}) under {path}")
    return path, sorted(rels)


def _assign_pools(h, pools_dev):
    """(B,) index of the pool whose nearest tokens are closest on average to each image's tokens."""
    b, gh, gw, c = h.shape
    tok = h.reshape(b, gh * gw, c)

    def per_pool(pool, valid):
        d, _ = jax.vmap(lambda t: nearest(t, pool, valid))(tok)
        return jnp.mean(jnp.sqrt(d), axis=1)

    dist = jax.vmap(per_pool, out_axes=1)(pools_dev["pool_in"], pools_dev["valid"])
    return jnp.argmin(dist, axis=1).astype(jnp.int32)


def predict(config, workdir: str, extractor, model, params, pools, log=print, flow=None) -> list[dict]:
    """flow: the trained flow (flow_fit.FlowState) when scoring.mpo = 'flow' (pipeline.restore_flow_state)."""
    from maskad_jax.pipeline import device_pools
    from maskad_jax.scoring import make_score_fn
    pc = config.predict
    if not pc.input:
        raise ValueError("--mode=predict needs --config.predict.input=PATH (an image or a folder)")
    if config.scoring.mpo_normalisation != "calibration":
        raise ValueError("predict scores images one by one: scoring.mpo_normalisation must be 'calibration' "
                         f"(got {config.scoring.mpo_normalisation!r}, which needs a whole test set)")
    root, rels = collect_inputs(pc.input)
    out_dir = os.path.join(workdir, "predictions")
    for sub in ("maps", "overlays"):
        os.makedirs(os.path.join(out_dir, sub), exist_ok=True)
    size = config.data.image_size
    params, dev_pools = place_for_scoring(config, (params, device_pools(pools, flow)))
    score = make_score_fn(config, extractor, model, flow and flow.module, flow and flow.embedder)
    assign = jax.jit(lambda v, x: _assign_pools(extractor.apply(v, x), dev_pools))
    fixed = None
    if pc.class_name:
        fixed = int(pools.pool_index([pc.class_name])[0])
    rows, used = [], set()
    bs = config.data.eval_batch_size
    shard = scoring_sharding(config)
    for start in range(0, len(rels), bs):
        chunk = rels[start:start + bs]
        images, ok_rels = [], []
        for rel in chunk:
            try:
                images.append(preprocess_image(open_image(os.path.join(root, rel)), size, source=rel))
                ok_rels.append(rel)
            except (ImageDecodeError, ValueError) as e:
                log(f"skipped {rel}: {e}")
                rows.append({"file": rel, "class": "", "score": None, "threshold": None, "anomalous": None,
                             "error": str(e)})
        if not images:
            continue
        n = len(images)
        batch = np.stack(images + [images[-1]] * (bs - n))  # pad to a fixed shape: one compiled program
        keys = np.asarray([image_key(x) for x in batch])
        x = jax.device_put(batch, shard)
        pidx = np.full(bs, fixed, np.int32) if fixed is not None else np.asarray(assign(extractor.variables, x))
        out = score(params, extractor.variables, dev_pools, x, jax.device_put(pidx, shard),
                    jax.device_put(keys, shard))
        maps, scores = np.asarray(out["map"]), np.asarray(out["score"])
        for i, rel in enumerate(ok_rels):
            cls = pools.class_names[pidx[i]]
            thr = float(pc.threshold) if pc.threshold >= 0 else pools.threshold(cls, pc.threshold_quantile)
            name = safe_name(rel, "")
            while name in used:  # two inputs that flatten to one name
                name += "_"
            used.add(name)
            np.save(os.path.join(out_dir, "maps", name + ".npy"), maps[i])
            scaled = np.clip(maps[i] / max(2 * thr, 1e-12) * 255, 0, 255).astype(np.uint8)
            Image.fromarray(scaled, "L").save(os.path.join(out_dir, "maps", name + ".png"))
            Image.fromarray(overlay(batch[i], maps[i], 0.0, 2 * thr, thr)).save(
                os.path.join(out_dir, "overlays", name + ".png"))
            rows.append({"file": rel, "class": cls, "score": float(scores[i]), "threshold": thr,
                         "anomalous": bool(scores[i] >= thr), "output_name": name})
    with open(os.path.join(out_dir, "scores.json"), "w") as f:
        json.dump(rows, f, indent=2)
    with open(os.path.join(out_dir, "scores.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["file", "class", "score", "threshold", "anomalous", "output_name", "error"])
        for r in rows:
            w.writerow([r["file"], r["class"], "" if r["score"] is None else f"{r['score']:.6g}",
                        "" if r["threshold"] is None else f"{r['threshold']:.6g}", r["anomalous"],
                        r.get("output_name", ""), r.get("error", "")])
    flagged = sum(1 for r in rows if r.get("anomalous"))
    log(f"predicted {len(rows)} images from {root}: {flagged} anomalous; results in {out_dir}")
    return rows
