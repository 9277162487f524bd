"""Predict on new images: `--mode=predict --config.predict.input=PATH` (an image or a folder, recursive).

Writes into a new folder <workdir>/predictions/<date-time>/ per run (named in predictions/latest.txt,
so one run's files never mix with another's): scores.csv and scores.json (file, class, image score, threshold,
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
import time

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from maskad_jax import progress
from maskad_jax.coreset import nearest
from maskad_jax.data import image_key
from maskad_jax.errors import ConfigError, MissingInputError, NonFiniteError
from maskad_jax.fit import scoring_signature
from maskad_jax.overlay import overlay, unique_names
from maskad_jax.parallel import place_for_scoring, scoring_sharding
from maskad_jax.preprocess import ImageDecodeError, open_image, preprocess_image
from maskad_jax.scoring import device_pools, make_score_fn

EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


def collect_inputs(path: str) -> tuple[str, list[str]]:
    """(root, sorted relative paths) of the images at path (a file or a folder, recursively)."""
    path = os.path.abspath(os.path.expanduser(path))
    if os.path.isfile(path):
        return os.path.dirname(path), [os.path.basename(path)]
    if not os.path.isdir(path):
        raise MissingInputError(f"predict.input {path!r} is neither an image file nor a folder")
    rels = []
    for d, _, files in os.walk(path):
        rels += [os.path.relpath(os.path.join(d, f), path) for f in files if f.lower().endswith(EXTENSIONS)]
    if not rels:
        raise MissingInputError(f"no images ({', '.join(EXTENSIONS)}) under {path}")
    return path, sorted(rels)


def assign_pools(h, pools_dev):
    """(B,) index of the pool whose nearest tokens are closest on average to each image's tokens."""
    b, gh, gw, c = h.shape
    tok = h.reshape(b, gh * gw, c)

    def per_pool(pool, valid):
        d, _ = jax.vmap(lambda t: nearest(t, pool, valid))(tok)
        return jnp.mean(jnp.sqrt(d), axis=1)

    dist = jax.vmap(per_pool, out_axes=1)(pools_dev["pool_in"], pools_dev["valid"])
    return jnp.argmin(dist, axis=1).astype(jnp.int32)


def predict(config, workdir: str, extractor, model, params, pools, log=print, flow=None) -> list[dict]:
    """Score the images of predict.input; results in a new folder of <workdir>/predictions (output_folder).

    flow: the trained flow (flow.FlowState) when scoring.mpo = 'flow' (pipeline.restore_flow_state)."""
    pc = config.predict
    if config.scoring.mpo_normalisation != "calibration":
        raise ConfigError(
            "predict scores images one by one: scoring.mpo_normalisation must be 'calibration' "
            f"(got {config.scoring.mpo_normalisation!r}, which needs a whole test set)"
        )
    class_thresholds(config, pools)  # refuses here, before any work, thresholds calibrated under another scoring
    root, rels = collect_inputs(pc.input)
    out_dir = output_folder(workdir)
    params, dev_pools = place_for_scoring(config, (params, device_pools(pools, flow)))
    score = make_score_fn(config, extractor, model, flow)
    assign = jax.jit(lambda v, x: assign_pools(extractor.apply(v, x), dev_pools))
    fixed = int(pools.pool_index([pc.class_name])[0]) if pc.class_name else None
    names = dict(zip(rels, unique_names(rels, "")))  # flat, unique file names for the outputs
    rows, bs, shard = [], config.data.eval_batch_size, scoring_sharding(config)
    with progress.bar(len(rels), "predict") as pbar:
        for start in range(0, len(rels), bs):
            images, ok_rels = _load_chunk(rels[start : start + bs], root, config.data.image_size, rows, log)
            if images:
                batch = np.stack(images + [images[-1]] * (bs - len(images)))  # a fixed shape: one compiled program
                x = jax.device_put(batch, shard)
                pidx = np.full(bs, fixed, np.int32) if fixed is not None else np.asarray(assign(extractor.variables, x))
                out = score(
                    params,
                    extractor.variables,
                    dev_pools,
                    x,
                    jax.device_put(pidx, shard),
                    jax.device_put(np.asarray([image_key(im) for im in batch]), shard),
                )
                rows += _write_images(config, pools, out_dir, batch, ok_rels, [names[r] for r in ok_rels], pidx, out)
            pbar.update(len(rels[start : start + bs]))
    _write_tables(out_dir, rows)
    flagged = sum(1 for r in rows if r.get("anomalous"))
    log(
        f"predicted {len(rows)} images from {root}: {flagged} anomalous ({threshold_rule(config)}); results in "
        f"{out_dir}"
    )
    return rows


def output_folder(workdir: str) -> str:
    """A new folder <workdir>/predictions/<date-time>[-N] for this run (a run never mixes with an
    earlier one's files); <workdir>/predictions/latest.txt names it."""
    base = os.path.join(workdir, "predictions")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    name, k = stamp, 1
    while os.path.exists(os.path.join(base, name)):
        k += 1
        name = f"{stamp}-{k}"
    out = os.path.join(base, name)
    for sub in ("maps", "overlays"):
        os.makedirs(os.path.join(out, sub))
    with open(os.path.join(base, "latest.txt"), "w") as f:
        f.write(name + "\n")
    return out


def class_threshold(config, pools, cls: str) -> float:
    """predict.threshold when set, else the calibrated quantile of the pool's held-out normal scores."""
    pc = config.predict
    if pc.threshold >= 0:
        return float(pc.threshold)
    return pools.threshold(cls, pc.threshold_quantile, scoring_signature(config))


def class_thresholds(config, pools) -> list[float]:
    """class_threshold of every pool, in the pools' order."""
    return [class_threshold(config, pools, c) for c in pools.class_names]


def threshold_rule(config) -> str:
    pc = config.predict
    if pc.threshold >= 0:
        return f"threshold {pc.threshold:g}, set by predict.threshold"
    return (
        f"threshold per class = the {pc.threshold_quantile:g} quantile of the scores of normal training images "
        f"held out of the pools (predict.threshold_quantile)"
    )


def _load_chunk(chunk, root, size, rows, log):
    images, ok_rels = [], []
    for rel in chunk:
        try:
            images.append(preprocess_image(open_image(os.path.join(root, rel)), size, source=rel))
            ok_rels.append(rel)
        except (ImageDecodeError, ValueError) as e:
            log(f"skipped {rel}: {e}")
            rows.append(
                {"file": rel, "class": "", "score": None, "threshold": None, "anomalous": None, "error": str(e)}
            )
    return images, ok_rels


def _write_images(config, pools, out_dir, batch, rels, names, pidx, out) -> list[dict]:
    """maps/<name>.npy and .png and overlays/<name>.png of each scored image; its row."""
    maps, scores = np.asarray(out["map"]), np.asarray(out["score"])
    rows = []
    for i, (rel, name) in enumerate(zip(rels, names)):
        cls = pools.class_names[pidx[i]]
        thr = class_threshold(config, pools, cls)
        if not (np.isfinite(thr) and np.isfinite(scores[i]) and np.isfinite(maps[i]).all()):
            raise NonFiniteError(
                f"{rel}: its score ({scores[i]}) or the threshold of class {cls!r} ({thr}) is not "
                f"finite; the checkpoint or the fit is damaged: retrain, or check the weights"
            )
        np.save(os.path.join(out_dir, "maps", name + ".npy"), maps[i])
        scaled = np.clip(maps[i] / max(2 * thr, 1e-12) * 255, 0, 255).astype(np.uint8)
        Image.fromarray(scaled, "L").save(os.path.join(out_dir, "maps", name + ".png"))
        Image.fromarray(overlay(batch[i], maps[i], 0.0, 2 * thr, thr)).save(
            os.path.join(out_dir, "overlays", name + ".png")
        )
        rows.append(
            {
                "file": rel,
                "class": cls,
                "score": float(scores[i]),
                "threshold": thr,
                "anomalous": bool(scores[i] >= thr),
                "output_name": name,
            }
        )
    return rows


def _write_tables(out_dir, rows):
    with open(os.path.join(out_dir, "scores.json"), "w") as f:
        json.dump(rows, f, indent=2)
    with open(os.path.join(out_dir, "scores.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["file", "class", "score", "threshold", "anomalous", "output_name", "error"])
        for r in rows:
            w.writerow(
                [
                    r["file"],
                    r["class"],
                    "" if r["score"] is None else f"{r['score']:.6g}",
                    "" if r["threshold"] is None else f"{r['threshold']:.6g}",
                    r["anomalous"],
                    r.get("output_name", ""),
                    r.get("error", ""),
                ]
            )
