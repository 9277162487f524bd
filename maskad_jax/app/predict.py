"""Predict on new images: `--mode=predict --config.predict.input=PATH` (an image or a folder, recursive).

Writes into a new folder <workdir>/predictions/<date-time>/ per run (named in predictions/latest.txt,
so one run's files never mix with another's): scores.json and scores.csv (per image: file, class,
score, normalised score (1.0 = the threshold: thresholds.py), threshold, decision, and the regions of
the map at or above the map's threshold: box, area in pixels of the original image, peak),
maps/<name>.npy (the anomaly map at the image's original size and aspect; NaN where the geometry did
not look: crop's sides), maps/<name>.png (scaled by the map's threshold: 255 = twice it) and
overlays/<name>.png (the heatmap over the original image, regions outlined in white, the part not
inspected darkened). The map's threshold is the score's when the pixel map is the score's own map,
else the same quantile of the held-out images' map maxima (scoring.pixel_map). Names are flattened
from the input's relative paths to letters, digits, '-' and '_', so nothing can be written outside
the workdir.

Images reach the model under the geometry it was trained with (data.geometry; the fit records it).
Class: `predict.class_name`, or (empty) the pool whose tokens lie nearest to the image's on average.
Threshold: thresholds.py (predict.threshold, predict.threshold_rule; never from test labels).
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

from maskad_jax.app.overlay import overlay, unique_names
from maskad_jax.common import progress
from maskad_jax.common.batching import iter_batched
from maskad_jax.common.errors import ConfigError, DataError, MissingInputError, NonFiniteError
from maskad_jax.common.parallel import place_for_scoring, scoring_sharding
from maskad_jax.common.specs import DataSpec, PredictSpec, ScoringSpec
from maskad_jax.data.geometry import place, to_original
from maskad_jax.data.preprocess import ImageDecodeError, open_image, preprocess_image, to_rgb
from maskad_jax.data.splits import image_key
from maskad_jax.data.tiling import tiles_on
from maskad_jax.engine.coreset import nearest
from maskad_jax.engine.scoring import device_pools, make_score_fn
from maskad_jax.runtime.serve_export import regions_over, stitch_tiles, tile_boxes
from maskad_jax.training.thresholds import class_threshold, class_thresholds, normal_medians, normalised, threshold_rule

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


def predict(
    sc: ScoringSpec, d: DataSpec, pc: PredictSpec, workdir: str, extractor, model, params, pools, log=print, mpo=None
) -> list[dict]:
    """Score the images of predict.input; results in a new folder of <workdir>/predictions (output_folder).

    mpo: the M_po in use (engine/mpo.py; training/mpo.restore_mpo)."""
    if sc.mpo_normalisation != "calibration":
        raise ConfigError(
            "predict scores images one by one: scoring.mpo_normalisation must be 'calibration' "
            f"(got {sc.mpo_normalisation!r}, which needs a whole test set)"
        )
    class_thresholds(pc, sc, pools)  # refuses here, before any work, thresholds calibrated under another scoring
    root, rels, unreadable = collect_inputs(pc.input, log)
    final, out_dir = output_folder(workdir)
    try:
        rows = _predict_into(sc, d, pc, out_dir, root, rels, extractor, model, params, pools, mpo, log)
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
    note = crop_note(r["inspected_fraction"] for r in rows if r.get("score") is not None)
    if note:
        log(note)
    log(
        f"predicted {scored} images from {root}: {flagged} anomalous ({threshold_rule(pc, pools)}); "
        f"{skipped} skipped"
        + (f", {len(unreadable)} folder(s) unreadable" if unreadable else "")
        + f"; results in {final}"
    )
    return rows


def _predict_into(
    sc: ScoringSpec, d: DataSpec, pc: PredictSpec, out_dir, root, rels, extractor, model, params, pools, mpo, log
) -> list[dict]:
    """Score the images in batches (their tiles, with data.tiles), writing maps and overlays into
    out_dir; a row per image."""
    fixed = int(pools.pool_index([pc.class_name])[0]) if pc.class_name else None
    names = dict(zip(rels, unique_names(rels, "")))  # flat, unique file names for the outputs
    rows, pending = [], {}
    for chunk, pidx, out in scored_batches(sc, d, root, rels, extractor, model, params, pools, mpo, rows, log, fixed):
        maps, scores = np.asarray(out["map"]), np.asarray(out["score"])
        for i, (rel, _) in enumerate(chunk["entries"]):
            got = pending.setdefault(rel, {"maps": [], "scores": [], "pidx": [], "placed": [], "crops": []})
            got["img"] = chunk["originals"][i]
            for key, v in (("maps", maps[i]), ("scores", scores[i]), ("pidx", pidx[i])):
                got[key].append(v)
            got["placed"].append(chunk["placed"][i])
            got["crops"].append(chunk["crops"][i])
            if len(got["maps"]) == chunk["tiles_per_image"]:
                row = _write_image(sc, pc, pools, out_dir, rel, names[rel], pending.pop(rel))
                note = "; ".join(filter(None, [chunk["notes"].get(rel), shape_note(pools, row["class"], got["img"])]))
                if note:
                    row["note"] = note
                rows.append(row)
    return rows


def shape_note(pools, cls, img) -> str:
    """A note when an image's aspect ratio lies outside its class's training images' (the fit's
    record): under crop or resize it reaches the model shaped otherwise than anything it learned."""
    if pools.shape_fits(cls, *img.size):
        return ""
    aspect = pools.aspect_range(cls)
    return (
        f"its shape (width/height {img.size[0] / img.size[1]:.3g}) is outside class {cls}'s training images' "
        f"({aspect[0]:.3g} to {aspect[1]:.3g}): the map and score are less reliable; train on images of this shape"
    )


def scored_batches(
    sc: ScoringSpec,
    d: DataSpec,
    root,
    rels,
    extractor,
    model,
    params,
    pools,
    mpo,
    rows,
    log,
    pool_of=None,
    desc="predict",
):
    """Score the images at root/rels in batches (with data.tiles, each image's tiles, in order): yields
    (_load_chunk's {"entries": (path, tile or -1), "placed", "crops", "originals", "notes"} of what
    was read, and "tiles_per_image"; their pool indices; the score program's outputs). An image that
    cannot be read gets a row in `rows` with its error. pool_of: one pool index for all, an array of
    one per path, or None (the nearest pool, tile by tile)."""
    params, dev_pools = place_for_scoring(sc.devices, (params, device_pools(pools, mpo)))
    score = make_score_fn(sc, extractor, model, mpo)
    assign = jax.jit(lambda v, x: assign_pools(extractor.apply(v, x), dev_pools))
    wanted = None if pool_of is None else dict(zip(rels, np.broadcast_to(np.asarray(pool_of, np.int32), len(rels))))
    # one compiled shape: the configured batch, but never padded far beyond the images there are (one
    # image with eval_batch_size 1024 would otherwise score 1024): at most the next multiple of 8, and
    # a whole number per device
    shard = scoring_sharding(sc.devices, d.eval_batch_size)
    per = len(shard.device_set)
    t = int(np.prod(d.tiles)) if tiles_on(d.tiles) else 1
    entries = [(r, k) for r in rels for k in (range(t) if t > 1 else [-1])]  # an image, or its tiles
    bs = -(-min(d.eval_batch_size, -(-len(entries) // 8) * 8) // per) * per

    def source(pbar):
        for start in range(0, len(entries), bs):
            loaded = _load_chunk(entries[start : start + bs], root, d, rows, log)
            pbar.update(len(entries[start : start + bs]))
            images, ok = loaded["images"], loaded["entries"]
            if not images:
                continue
            batch = np.stack(images + [images[-1]] * (bs - len(images)))  # a fixed shape: one compiled program
            pidx = (
                None
                if wanted is None
                else np.asarray([wanted[r] for r, _ in ok] + [wanted[ok[-1][0]]] * (bs - len(ok)))
            )
            keys = np.asarray([image_key(im) for im in batch])
            inputs = (batch, pidx, keys) + boxes_for(d, loaded["placed"], bs)
            yield inputs, np.arange(bs) < len(images), {"loaded": dict(loaded, tiles_per_image=t)}

    def run(x, pidx, keys, *boxes):
        if pidx is None:  # the nearest pool, input by input
            pidx = jax.device_put(np.asarray(assign(extractor.variables, x)), shard)
        out = score(params, extractor.variables, dev_pools, x, pidx, keys, *boxes)
        return {"map": out["map"], "score": out["score"], "pool": pidx}

    with progress.bar(len(entries), desc) as pbar:
        for out, host, _ in iter_batched(run, source(pbar), place=lambda a: jax.device_put(a, shard)):
            yield host["loaded"], out["pool"], out


def boxes_for(d: DataSpec, placed, bs) -> tuple:
    """(the content boxes, padded to the batch,) for data.geometry = pad, else (): the score leaves
    pad's padding out (the other geometries fill the frame, and keep the program without boxes)."""
    if d.geometry != "pad":
        return ()
    return (np.asarray([p.box for p in placed] + [placed[-1].box] * (bs - len(placed)), np.int32),)


def crop_note(seen) -> str:
    """ "" when every image was seen whole, else how much of them the geometry inspected (seen: the
    images' inspected fractions of their area)."""
    seen = list(seen)
    if not seen or min(seen) > 0.999:
        return ""
    return (
        f"data.geometry = crop inspected {100 * float(np.mean(seen)):.0f}% of the images' area on average "
        f"(least {100 * min(seen):.0f}%): the rest is NaN in the maps; resize or pad inspects every pixel"
    )


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


def _load_chunk(entries, root, d: DataSpec, rows, log) -> dict:
    """The entries' (path, tile index or -1) model inputs: {"images", "entries", "placed" (each input's
    placement), "crops" (its tile's rectangle, or None), "originals" (the whole RGB image), "notes"}. An
    image that cannot be used gets one row with its error and a log line (its tiles are all left out)."""
    size, geometry = d.image_size, d.geometry
    out = {"images": [], "entries": [], "placed": [], "crops": [], "originals": [], "notes": {}}
    last, failed = (None, None), set()
    for rel, k in entries:
        if rel in failed:
            continue
        try:
            if last[0] != rel:
                img = open_image(os.path.join(root, rel), source=rel)
                if img.info.get("frames", 1) > 1:
                    out["notes"][rel] = f"{img.info['frames']} frames: the first is scored"
                    log(f"{rel}: {out['notes'][rel]}")
                last = (rel, to_rgb(img, rel))
            img, crop = last[1], None
            if k >= 0:
                crop = tile_boxes(*img.size, *d.tiles, d.tile_overlap)[k]
            part = img if crop is None else img.crop(crop)
            out["images"].append(preprocess_image(part, size, source=rel, geometry=geometry))
            out["placed"].append(place(part.size[0], part.size[1], size, geometry))
            for key, v in (("crops", crop), ("originals", img), ("entries", (rel, k))):
                out[key].append(v)
        except (ImageDecodeError, ValueError, OSError) as e:
            failed.add(rel)
            log(f"skipped {rel}: {e}")
            rows.append(
                {"file": rel, "class": "", "score": None, "threshold": None, "anomalous": None, "error": str(e)}
            )
    return out


def _write_image(sc: ScoringSpec, pc: PredictSpec, pools, out_dir, rel, name, got) -> dict:
    """maps/<name>.npy and .png and overlays/<name>.png of a scored image, at its original size (NaN
    in the .npy where the geometry did not look: crop's sides; tiles stitched, their maximum where
    they overlap); its row. got: its inputs' maps, scores, pool indices, placements and crops."""
    img = got["img"]
    tiles = [to_original(m, p) for m, p in zip(got["maps"], got["placed"])]
    full = tiles[0] if got["crops"][0] is None else stitch_tiles(tiles, got["crops"], img.size)
    score, k = float(np.max(got["scores"])), int(np.bincount(got["pidx"]).argmax())  # tiles: max, majority class
    cls = pools.class_names[k]
    thr, map_thr = class_threshold(pc, sc, pools, cls), class_threshold(pc, sc, pools, cls, of="map")
    if not (np.isfinite(thr) and np.isfinite(score) and all(np.isfinite(m).all() for m in got["maps"])):
        raise NonFiniteError(
            f"{rel}: its score ({score}) or the threshold of class {cls!r} ({thr}) is not "
            f"finite; the checkpoint or the fit is damaged: retrain, or check the weights"
        )
    np.save(os.path.join(out_dir, "maps", name + ".npy"), full)
    scaled = np.clip(np.nan_to_num(full, nan=0.0) / max(2 * map_thr, 1e-12) * 255, 0, 255).astype(np.uint8)
    Image.fromarray(scaled, "L").save(os.path.join(out_dir, "maps", name + ".png"))
    image01 = np.asarray(img, np.float32) / 255.0
    Image.fromarray(overlay(image01, full, 0.0, 2 * map_thr, map_thr)).save(
        os.path.join(out_dir, "overlays", name + ".png")
    )
    return {
        "file": rel,
        "class": cls,
        "score": score,
        "normalised_score": normalised(score, thr, normal_medians(pools)[k]),
        "threshold": thr,
        "anomalous": bool(score >= thr),
        "regions": regions_over(full, map_thr),
        "inspected_fraction": round(float(np.isfinite(full).mean()), 4),
        "output_name": name,
    }


def _write_tables(out_dir, rows):
    """scores.json (every field, the regions listed) and scores.csv (a line per image: the regions
    counted, the largest peak's box given)."""
    with open(os.path.join(out_dir, "scores.json"), "w") as f:
        json.dump(rows, f, indent=2)
    num = lambda v: "" if v is None else f"{v:.6g}"  # noqa: E731
    with open(os.path.join(out_dir, "scores.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(
            [
                "file",
                "class",
                "score",
                "normalised_score",
                "threshold",
                "anomalous",
                "regions",
                "top_region_box",
                "top_region_area",
                "output_name",
                "error",
                "note",
            ]
        )
        for r in rows:
            top = (r.get("regions") or [None])[0]
            w.writerow(
                [
                    r["file"],
                    r["class"],
                    num(r["score"]),
                    num(r.get("normalised_score")),
                    num(r["threshold"]),
                    r["anomalous"],
                    "" if r.get("regions") is None else len(r["regions"]),
                    "" if top is None else " ".join(str(v) for v in top["box"]),
                    "" if top is None else top["area"],
                    r.get("output_name", ""),
                    r.get("error", ""),
                    r.get("note", ""),
                ]
            )
