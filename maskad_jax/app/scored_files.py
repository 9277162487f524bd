"""Scoring the image files of a folder against given pools, in batches, without thresholds: the
held-out F1 thresholds of data.validation (validation.py). Images go through the one image path
(detector.as_rgb, serve_export.inputs_of) and the same scoring program as predict and eval.
"""

from __future__ import annotations

import dataclasses
import os

import jax
import numpy as np

from maskad_jax.app.detector import as_rgb
from maskad_jax.app.export import tiles_entry
from maskad_jax.common import progress
from maskad_jax.common.batching import iter_batched
from maskad_jax.common.errors import ImageInputError
from maskad_jax.common.parallel import place_for_scoring, scoring_sharding
from maskad_jax.common.specs import DataSpec, ScoringSpec
from maskad_jax.data.geometry import place
from maskad_jax.data.splits import image_key
from maskad_jax.data.tiling import tiles_on
from maskad_jax.engine.coreset import assign_pools
from maskad_jax.engine.scoring import device_pools, make_score_fn
from maskad_jax.engine.trained_model import TrainedModel
from maskad_jax.runtime import serve_export


@dataclasses.dataclass(frozen=True)
class Files:
    """Image files to score: root/rels; pool_of: one pool index for all, an array of one per path,
    or None (the nearest pool, tile by tile); desc: the progress bar's name."""

    root: str
    rels: list
    pool_of: object = None
    desc: str = "predict"


def scored_batches(sc: ScoringSpec, d: DataSpec, tm: TrainedModel, files: Files, rows: list, log):
    """Score the files in batches (with data.tiles, each image's tiles, in order): yields
    (_load_chunk's {"entries": (path, tile or -1), "placed", "crops", "originals", "notes"} of what
    was read, and "tiles_per_image"; their pool indices; the score program's outputs). An image that
    cannot be read gets a row in `rows` with its error."""
    root, rels, pool_of, extractor = files.root, files.rels, files.pool_of, tm.extractor
    params, dev_pools = place_for_scoring(sc.devices, (tm.params, device_pools(tm.pools, tm.mpo)))
    score = make_score_fn(sc, extractor, tm.model, tm.mpo)
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

    with progress.bar(len(entries), files.desc) as pbar:
        for out, host, _ in iter_batched(run, source(pbar), place=lambda a: jax.device_put(a, shard)):
            yield host["loaded"], out["pool"], out


def boxes_for(d: DataSpec, placed, bs) -> tuple:
    """(the content boxes, padded to the batch,) for data.geometry = pad, else (): the score leaves
    pad's padding out (the other geometries fill the frame, and keep the program without boxes)."""
    if d.geometry != "pad":
        return ()
    return (np.asarray([p.box for p in placed] + [placed[-1].box] * (bs - len(placed)), np.int32),)


def _load_chunk(entries, root, d: DataSpec, rows, log) -> dict:
    """The entries' (path, tile index or -1) model inputs: {"images", "entries", "placed" (each input's
    placement), "crops" (its tile's rectangle, or None), "originals" (the whole RGB image), "notes"},
    through the one image path (detector.as_rgb, serve_export.inputs_of). An image that cannot be used
    gets one row with its error and a log line (its tiles are all left out)."""
    out = {"images": [], "entries": [], "placed": [], "crops": [], "originals": [], "notes": {}}
    tiles = tiles_entry(d)
    last, failed = (None, None), set()
    for rel, k in entries:
        if rel in failed:
            continue
        try:
            if last[0] != rel:
                img, frames = as_rgb(os.path.join(root, rel), rel)
                if frames > 1:
                    out["notes"][rel] = f"{frames} frames: the first is scored"
                    log(f"{rel}: {out['notes'][rel]}")
                last = (rel, img, serve_export.inputs_of(img, d.image_size, d.geometry, tiles)[0])
        except ImageInputError as e:
            failed.add(rel)
            log(f"skipped {e}")
            rows.append(
                {"file": rel, "class": "", "score": None, "threshold": None, "anomalous": None, "error": str(e)}
            )
            continue
        u8, _, (pw, ph), crop = last[2][max(k, 0)]
        out["images"].append(np.asarray(u8, np.float32) / 255.0)
        out["placed"].append(place(pw, ph, d.image_size, d.geometry))
        for key, v in (("crops", crop), ("originals", last[1]), ("entries", (rel, k))):
            out[key].append(v)
    return out
