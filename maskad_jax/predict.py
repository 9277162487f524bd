"""Predict on new images: `--mode=predict --config.predict.input=PATH` (an image or a folder, recursive).

Writes into a new folder <workdir>/predictions/<date-time>/ per run (named in predictions/latest.txt,
so one run's files never mix with another's): scores.csv and scores.json (file, class, image score, threshold,
decision), maps/<name>.npy (the anomaly map), maps/<name>.png (the map scaled by the map's
threshold: 255 = twice it) and overlays/<name>.png (heatmap over the image, the region at or above
the map's threshold outlined in white). The map's threshold is the score's when the pixel map is the
score's own map, else the same quantile of the held-out images' map maxima (scoring.pixel_map).
Names are flattened from the input's relative paths to letters,
digits, '-' and '_', so nothing can be written outside the workdir.

Class: `predict.class_name`, or (empty) the pool whose tokens lie nearest to the image's on average.
Threshold: `predict.threshold` when >= 0, else the `predict.threshold_quantile` quantile of the
scores of normal training images held out of the pool (never from test labels).
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import time

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from maskad_jax import progress
from maskad_jax.coreset import nearest
from maskad_jax.data import image_key
from maskad_jax.errors import ConfigError, DataError, MissingInputError, NonFiniteError
from maskad_jax.fit import scoring_signature
from maskad_jax.overlay import overlay, unique_names
from maskad_jax.parallel import place_for_scoring, scoring_sharding
from maskad_jax.preprocess import ImageDecodeError, open_image, preprocess_image
from maskad_jax.scoring import device_pools, make_score_fn

EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


def collect_inputs(path: str, log=print) -> tuple[str, list[str], list[str]]:
    """(root, sorted relative paths of the images at path (a file or a folder, recursively), the
    subfolders that could not be read, each logged)."""
    path = os.path.abspath(os.path.expanduser(path))
    if os.path.isfile(path):
        return os.path.dirname(path), [os.path.basename(path)], []
    if not os.path.isdir(path):
        raise MissingInputError(f"predict.input {path!r} is neither an image file nor a folder")
    if not os.access(path, os.R_OK | os.X_OK):
        raise MissingInputError(f"predict.input {path}: the folder cannot be read (permission denied)")
    rels, unreadable = [], []

    def report(err):
        unreadable.append(err.filename)
        log(f"cannot read folder {err.filename} ({err.strerror}): its images are not scored")

    for d, _, files in os.walk(path, onerror=report):
        rels += [os.path.relpath(os.path.join(d, f), path) for f in files if f.lower().endswith(EXTENSIONS)]
    if not rels:
        why = f" ({len(unreadable)} subfolder(s) could not be read)" if unreadable else ""
        raise MissingInputError(f"no images ({', '.join(EXTENSIONS)}) under {path}{why}")
    return path, sorted(rels), unreadable


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
    root, rels, unreadable = collect_inputs(pc.input, log)
    final, out_dir = output_folder(workdir)
    try:
        rows = _predict_into(config, out_dir, root, rels, extractor, model, params, pools, flow, log)
        scored = sum(1 for r in rows if r.get("score") is not None)
        skipped = len(rows) - scored
        if not scored:
            raise DataError(
                f"predict scored none of the {len(rels)} image(s) under {root}: every one was skipped (the log "
                f"says why){'; ' + str(len(unreadable)) + ' folder(s) could not be read' if unreadable else ''}"
            )
        _write_tables(out_dir, rows)
        os.rename(out_dir, final)
        point_latest(workdir, os.path.basename(final))
    except BaseException:  # an interrupted or failed run leaves no half-written folder behind
        shutil.rmtree(out_dir, ignore_errors=True)
        raise
    flagged = sum(1 for r in rows if r.get("anomalous"))
    log(
        f"predicted {scored} images from {root}: {flagged} anomalous ({threshold_rule(config)}); {skipped} skipped"
        + (f", {len(unreadable)} folder(s) unreadable" if unreadable else "")
        + f"; results in {final}"
    )
    return rows


def _predict_into(config, out_dir, root, rels, extractor, model, params, pools, flow, log) -> list[dict]:
    """Score the images in batches, writing maps and overlays into out_dir; a row per image."""
    pc = config.predict
    params, dev_pools = place_for_scoring(config, (params, device_pools(pools, flow)))
    score = make_score_fn(config, extractor, model, flow)
    assign = jax.jit(lambda v, x: assign_pools(extractor.apply(v, x), dev_pools))
    fixed = int(pools.pool_index([pc.class_name])[0]) if pc.class_name else None
    names = dict(zip(rels, unique_names(rels, "")))  # flat, unique file names for the outputs
    # one compiled shape: the configured batch, but never padded far beyond the images there are (one
    # image with eval_batch_size 1024 would otherwise score 1024): at most the next multiple of 8, and
    # a whole number per device
    rows, shard = [], scoring_sharding(config)
    per = len(shard.device_set)
    bs = -(-min(config.data.eval_batch_size, -(-len(rels) // 8) * 8) // per) * per
    with progress.bar(len(rels), "predict") as pbar:
        for start in range(0, len(rels), bs):
            images, ok_rels, notes = _load_chunk(rels[start : start + bs], root, config.data.image_size, rows, log)
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
                new = _write_images(config, pools, out_dir, batch, ok_rels, [names[r] for r in ok_rels], pidx, out)
                for r in new:
                    if notes.get(r["file"]):
                        r["note"] = notes[r["file"]]
                rows += new
            pbar.update(len(rels[start : start + bs]))
    return rows


def output_folder(workdir: str) -> tuple[str, str]:
    """(<workdir>/predictions/<date-time>[-N], the same + ".partial"): the run writes into the second,
    created here, and renames it to the first when it is complete (a run never mixes with an earlier
    one's files, and an interrupted one leaves nothing that looks finished)."""
    base = os.path.join(workdir, "predictions")
    if os.path.lexists(base) and not os.path.isdir(base):
        raise DataError(f"{base} is not a folder: move it away so predict can write its results there")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    name, k = stamp, 1
    while os.path.lexists(os.path.join(base, name)) or os.path.lexists(os.path.join(base, name + ".partial")):
        k += 1
        name = f"{stamp}-{k}"
    out = os.path.join(base, name)
    for sub in ("maps", "overlays"):
        os.makedirs(os.path.join(out + ".partial", sub))
    return out, out + ".partial"


def point_latest(workdir: str, name: str) -> None:
    """<workdir>/predictions/latest.txt names the newest complete run: written beside and renamed over
    it, so a link there is replaced, never written through."""
    base = os.path.join(workdir, "predictions")
    latest = os.path.join(base, "latest.txt")
    if os.path.isdir(latest) and not os.path.islink(latest):
        raise DataError(f"{latest} is a folder: remove it; predict names its newest run in that file")
    tmp = os.path.join(base, f".latest.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        f.write(name + "\n")
    os.replace(tmp, latest)


def class_threshold(config, pools, cls: str, of: str = "score") -> float:
    """predict.threshold when set, else the calibrated quantile of the pool's held-out normal scores
    (of = "map": of their pixel maps' maxima, the level that outlines a map's region; with
    scoring.pixel_map = mpo the map has its own scale, so a set predict.threshold applies to the
    score only and the map's level stays calibrated)."""
    pc = config.predict
    own_map = of == "map" and config.scoring.pixel_map != "score"
    if pc.threshold >= 0 and not own_map:
        return float(pc.threshold)
    signature = None if own_map and pc.threshold >= 0 else scoring_signature(config)
    return pools.threshold(cls, pc.threshold_quantile, signature, of)


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
    """(the chunk's decoded images, their paths, {path: a note}); a file that cannot be used gets a row
    with its error and a log line."""
    images, ok_rels, notes = [], [], {}
    for rel in chunk:
        try:
            img = open_image(os.path.join(root, rel), source=rel)
            if img.info.get("frames", 1) > 1:
                notes[rel] = f"{img.info['frames']} frames: the first is scored"
                log(f"{rel}: {notes[rel]}")
            images.append(preprocess_image(img, size, source=rel))
            ok_rels.append(rel)
        except (ImageDecodeError, ValueError, OSError) as e:
            log(f"skipped {rel}: {e}")
            rows.append(
                {"file": rel, "class": "", "score": None, "threshold": None, "anomalous": None, "error": str(e)}
            )
    return images, ok_rels, notes


def _write_images(config, pools, out_dir, batch, rels, names, pidx, out) -> list[dict]:
    """maps/<name>.npy and .png and overlays/<name>.png of each scored image; its row."""
    maps, scores = np.asarray(out["map"]), np.asarray(out["score"])
    rows = []
    for i, (rel, name) in enumerate(zip(rels, names)):
        cls = pools.class_names[pidx[i]]
        thr, map_thr = class_threshold(config, pools, cls), class_threshold(config, pools, cls, of="map")
        if not (np.isfinite(thr) and np.isfinite(scores[i]) and np.isfinite(maps[i]).all()):
            raise NonFiniteError(
                f"{rel}: its score ({scores[i]}) or the threshold of class {cls!r} ({thr}) is not "
                f"finite; the checkpoint or the fit is damaged: retrain, or check the weights"
            )
        np.save(os.path.join(out_dir, "maps", name + ".npy"), maps[i])
        scaled = np.clip(maps[i] / max(2 * map_thr, 1e-12) * 255, 0, 255).astype(np.uint8)
        Image.fromarray(scaled, "L").save(os.path.join(out_dir, "maps", name + ".png"))
        Image.fromarray(overlay(batch[i], maps[i], 0.0, 2 * map_thr, map_thr)).save(
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
        w.writerow(["file", "class", "score", "threshold", "anomalous", "output_name", "error", "note"])
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
                    r.get("note", ""),
                ]
            )
