"""--mode=update: add new good images to a trained workdir without retraining the reconstructor.

    python run.py --config=configs/folder.py --config.data.manual_dir=/parts --workdir=runs/parts \
        --mode=update --config.new_images.input=/parts/new_good [--config.new_images.class_name=bracket]

The new images' tokens join their class's pools (training/fit.grow_class): greedy k-center continued
from the current pool (coreset.extend_kcenter) picks fit.pool_ratio of the new tokens (fit.fine_pool_ratio for the fine
pool), the ones the pool covers least. The held-out training images are scored again (calibration:
thresholds, term statistics), the validation thresholds are recomputed when data.validation is
given (dropped otherwise: they were for the old pools), and data.ignore_masks replaces the fit's
regions when given. The reconstructor's checkpoint is not touched. fit/pools.json records each
update (class, files with their SHA-256, tokens added), and a later export carries the record.

Refused, with one line and nothing written: another geometry or image size than the fit's, a class
the model does not have (or none named when it has several), images whose aspect ratio lies outside
the class's training images' (they would reach the model distorted differently), images already
added (same SHA-256), the flow M_po (its flow is trained on the pool: retrain instead).
"""

from __future__ import annotations

import os
import time

import jax
import numpy as np

from maskad_jax.app.predict import collect_inputs
from maskad_jax.common import progress
from maskad_jax.common.batching import run_batched
from maskad_jax.common.digests import sha256_file
from maskad_jax.common.errors import ConfigError, DataError
from maskad_jax.common.parallel import local_batch_sharding
from maskad_jax.common.specs import DataSpec, FitSpec, NewImagesSpec, ScoringSpec
from maskad_jax.data.preprocess import ImageDecodeError, open_image, preprocess_image, to_rgb
from maskad_jax.data.tiling import tiles_on
from maskad_jax.engine.scoring import fine_embedding
from maskad_jax.engine.trained_model import TrainedModel
from maskad_jax.runtime.serve_export import tile_boxes
from maskad_jax.training import feature_cache
from maskad_jax.training.fit import grow_class


def update_class(ni: NewImagesSpec, pools) -> int:
    """The pool index the new images join: new_images.class_name, or the only class."""
    name = ni.class_name
    if not name:
        if len(pools.class_names) != 1:
            raise ConfigError(
                f"new_images.class_name is needed: the model has {len(pools.class_names)} classes "
                f"({', '.join(pools.class_names)}); name the one the new good images show"
            )
        return 0
    if name not in pools.class_names:
        raise DataError(f"new_images.class_name {name!r} is not a class of this model: {', '.join(pools.class_names)}")
    return pools.class_names.index(name)


def check_images(paths, rels, pools, k) -> tuple[list, list]:
    """(the images as RGB, their SHA-256): refused when one cannot be read, was added before, or has
    an aspect ratio outside the class's training range (pools.geometry["aspect"])."""
    seen = {d: "an earlier update" for rec in pools.added for d in rec["files"].values()}
    aspect = pools.aspect_range(pools.class_names[k])
    images, digests, bad = [], [], []
    for path, rel in zip(paths, rels):
        try:
            img = to_rgb(open_image(path, source=rel), rel)
        except (ImageDecodeError, ValueError, OSError) as e:
            raise DataError(f"new_images.input: {rel} cannot be read ({e}); nothing was added") from None
        digest = sha256_file(path)
        if digest in seen:
            where = seen[digest] if seen[digest] == "an earlier update" else f"{seen[digest]} in this update"
            raise DataError(
                f"new_images.input: {rel} is the same image (same SHA-256) as {where}: already added to "
                f"this workdir; nothing was added"
            )
        seen[digest] = rel
        if not pools.shape_fits(pools.class_names[k], *img.size):
            bad.append(f"{rel} ({img.size[0]} x {img.size[1]})")
        images.append(img)
        digests.append(digest)
    if bad:
        raise DataError(
            f"new_images.input: {len(bad)} image(s) have another shape than class {pools.class_names[k]!r}'s training "
            f"images (width/height {aspect[0]:.3g} to {aspect[1]:.3g}): {', '.join(bad[:3])}"
            f"{' ...' if len(bad) > 3 else ''}; nothing was added"
        )
    return images, digests


def new_features(sc: ScoringSpec, d: DataSpec, extractor, images):
    """(h_in, h_tgt or None, fine or None) of the images (their tiles, with data.tiles), as the
    training features were computed."""
    size, geometry = d.image_size, d.geometry
    shard = local_batch_sharding(d.eval_batch_size)
    per = len(shard.device_set)
    raw = sc.regress_raw
    fn = jax.jit(feature_cache.feature_fn(extractor, raw, fine_embedding(sc)))
    if tiles_on(d.tiles):  # each image as its tiles, as the training images were
        rows, cols = d.tiles
        images = [im.crop(b) for im in images for b in tile_boxes(*im.size, rows, cols, d.tile_overlap)]
    bs = -(-min(d.eval_batch_size, len(images)) // per) * per

    def source():  # preprocessed a batch at a time, the last padded by repeating its last image
        for s in range(0, len(images), bs):
            chunk = [preprocess_image(im, size, geometry=geometry) for im in images[s : s + bs]]
            yield (np.stack(chunk + [chunk[-1]] * (bs - len(chunk))),), np.arange(bs) < len(chunk), {}

    res, _ = run_batched(lambda x: fn(extractor.variables, x), source(), place=lambda a: jax.device_put(a, shard))
    return tuple(res) if res is not None else (None, None, None)


def add_images(sc: ScoringSpec, d: DataSpec, fs: FitSpec, ni: NewImagesSpec, tm: TrainedModel, log=progress.log):
    """(the fit with class k's pools grown by the images of new_images.input (training/fit.grow_class), the
    record of what was added); the trained model's fit is not changed."""
    pools = tm.pools
    if sc.mpo == "flow":
        raise ConfigError(
            "--mode=update works with the nearest-neighbour M_po; the flow M_po is trained on the pool: retrain"
        )
    if not ni.input:
        raise ConfigError("--mode=update needs new_images.input: a folder (or an image) of new good images")
    pools.require_geometry(d)
    k = update_class(ni, pools)
    root, rels, unreadable = collect_inputs(ni.input, log, field="new_images.input")
    if unreadable:
        raise DataError(f"new_images.input: {len(unreadable)} folder(s) under {root} cannot be read; nothing was added")
    images, digests = check_images([os.path.join(root, r) for r in rels], rels, pools, k)
    h_in, h_tgt, fine = new_features(sc, d, tm.extractor, images)
    grown, added, fine_added = grow_class(pools, k, h_in, h_tgt, fine, fs)
    record = {
        "pool_index": k,
        "class": pools.class_names[k],
        "input": root,
        "time": time.strftime("%Y-%m-%d %H:%M:%S"),
        "files": dict(zip(rels, digests)),
        "tokens_added": int(added),
        "fine_tokens_added": int(fine_added),
    }
    log(
        f"update: {len(rels)} new good image(s) of class {record['class']}: {added} token(s) joined its pool "
        f"(now {int(grown.valid[k].sum())})" + (f", {fine_added} its fine pool" if fine_added else "")
    )
    return grown, record


def aspect_ranges(data) -> dict:
    """{class: [min, max] of width/height} over a split's images (from their headers)."""
    out = {}
    for (w, h), cid in zip(data.sizes if data.sizes is not None else [], data.class_ids):
        if w and h:
            lo, hi = out.get(data.class_names[cid], [float("inf"), 0.0])
            out[data.class_names[cid]] = [min(lo, w / h), max(hi, w / h)]
    return out
