"""Calibration (run during training): the held-out normal training images of every pool scored, for
predict's thresholds and, with scoring.mpo_fusion = sum, the terms' statistics (term_stats). Several
processes each score a share and gather the terms; the statistics and the scores are then finished
from the gathered terms with the scoring's own fuse and keep stages."""

from __future__ import annotations

import jax
import numpy as np

from maskad_jax.common import progress
from maskad_jax.common.batching import row_batches, run_batched
from maskad_jax.common.errors import NonFiniteError
from maskad_jax.common.parallel import (
    gather_rows,
    place_for_scoring,
    process_share,
)
from maskad_jax.common.specs import DataSpec, ScoringSpec
from maskad_jax.data.tiling import image_level
from maskad_jax.engine.scoring import (
    apply_keep,
    device_pools,
    fuse,
    keep_mask,
    make_score_features_fn,
    needs_term_stats,
)
from maskad_jax.engine.trained_model import TrainedModel
from maskad_jax.training.feature_cache import Features


def calibrate(sc: ScoringSpec, d: DataSpec, tm: TrainedModel, feats: Features, f_own=None, stats=None) -> dict:
    """Score the held-out normal training images of every pool (for predict's thresholds and, with
    scoring.mpo_fusion = sum, the terms' statistics): {"cal_scores": {class: image scores},
    "cal_map_max": {class: pixel-map maxima}, "term_stats": (K, 4) held-out mean and std of P and of
    M_po per pool, or None when the scoring does not standardise them}.

    tm: the trained model (its extractor is not used: the features are given); feats: the training
    images' features and content boxes (training/feature_cache.Features; rows at the pools'
    calibration positions are used; boxes count with data.geometry = pad); f_own: the flow's own
    backbone's features of the same images, or None; stats: given term statistics (K, 4) to score
    with instead of computing them from these images (cross_fitted's other folds). Several
    processes each score a share and gather the terms; the statistics and the scores are then
    finished from the gathered terms with the scoring's own fuse and keep stages."""
    pools = tm.pools
    fn = _score_features_jit(sc, tm.model, tm.mpo)
    params, dev_pools = place_for_scoring(sc.devices, (tm.params, device_pools(pools, tm.mpo)))
    boxes = feats.boxes if d.geometry == "pad" else None
    held = [np.asarray(pools.held_out.get(cls, np.zeros(0, int)), np.int64) for cls in pools.class_names]
    pos = np.concatenate(held)  # training-image positions, class by class
    pool = np.concatenate([np.full(len(p), k, np.int32) for k, p in enumerate(held)])
    rows = process_share(len(pos))
    bs, size = d.eval_batch_size, d.image_size

    def run(x, t, pidx, k, *extra):  # extra: the flow's own features, the fine embedding, the boxes
        out = fn(params, dev_pools, x, t, pidx, k, size, *extra)
        terms = {k: out[k] for k in ("patch", "mpo_map", "score")}
        return dict(terms, map_max=out["map"].max(axis=(1, 2)))

    at = pos[rows]  # this process's held-out images, by their training-set position
    of = lambda a: None if a is None else a[at]  # noqa: E731
    arrays = (of(feats.h_in), of(feats.target), pool[rows], of(feats.keys), of(f_own), of(feats.fine), of(boxes))
    with progress.bar(len(rows), "calibration") as pbar:
        res, _ = run_batched(run, row_batches(arrays, bs), bar=pbar)
    terms = (None,) * 4 if res is None else (res["patch"], res["mpo_map"], res["score"], res["map_max"])
    patch, mpo_map, scores, map_max = gather_rows(len(pos), rows, *terms)
    if needs_term_stats(sc):
        stats = term_stats(patch, mpo_map, pool, len(held)) if stats is None else np.asarray(stats, np.float32)
        keep = (None if boxes is None else boxes[pos], dev_pools.get("ignore"), pool)
        scores, map_max = _finish(sc, (patch, mpo_map, stats[pool]), keep, d)
    bad = ~np.isfinite(scores) | ~np.isfinite(map_max)
    if bad.any() or (stats is not None and not np.all(np.isfinite(stats))):
        raise NonFiniteError(
            f"the scores of {int(bad.sum())} held-out normal training images are not finite, so no "
            f"threshold can be calibrated: training or the fit produced NaNs"
        )
    bounds = np.cumsum([0] + [len(p) for p in held])
    per = lambda v: {cls: v[bounds[k] : bounds[k + 1]].tolist() for k, cls in enumerate(pools.class_names)}  # noqa: E731
    return {"cal_scores": per(scores), "cal_map_max": per(map_max), "term_stats": stats}


_JITTED: dict = {}  # (scoring, reconstructor, M_po) -> the jitted score_features, for the folds of one fit


def _score_features_jit(sc: ScoringSpec, model, mpo):
    """jax.jit(make_score_features_fn(sc, model, mpo)), built once per (sc, model, mpo) so the folds of
    cross_fitted trace and compile it once (a few recent ones kept; an unhashable M_po, the flow's
    arrays, is built afresh)."""
    try:
        key = (sc, model, mpo)
        hash(key)
    except TypeError:
        return jax.jit(make_score_features_fn(sc, model, mpo), static_argnums=(6,))
    if key not in _JITTED:
        while len(_JITTED) >= 4:
            _JITTED.pop(next(iter(_JITTED)))
        _JITTED[key] = jax.jit(make_score_features_fn(sc, model, mpo), static_argnums=(6,))
    return _JITTED[key]


def cross_fitted(sc: ScoringSpec, d: DataSpec, tm: TrainedModel, feats: Features, folds: tuple) -> dict:
    """calibrate() over every fold: tm.pools' held-out images first (their term statistics, as
    calibrate computes them), then each fit of `folds` (fit.cross_fits: the same classes' pools
    fitted without another block of the images) on its own held-out images, scored with those
    statistics and that fold's pools and scales. folds: (the fits, image_of of tiled data or None).
    The result is calibrate's, per image, with every fold's scores and map maxima joined class by class,
    so a threshold rests on every image held out by some fold. The reconstructor is the one trained on
    all images: only the pools' term is out of sample."""
    fits, image_of = folds
    cal = image_level(calibrate(sc, d, tm, feats), tm.pools.held_out, image_of)
    for fit in fits:
        more = image_level(calibrate(sc, d, tm.with_pools(fit), feats, stats=cal["term_stats"]), fit.held_out, image_of)
        for key in ("cal_scores", "cal_map_max"):
            cal[key] = {c: list(cal[key][c]) + list(more[key].get(c, [])) for c in cal[key]}
    return cal


def term_stats(patch, mpo_map, pool, k: int) -> np.ndarray:
    """(k, 4): per pool, the mean and standard deviation of P over its held-out images' patches, then
    of M_po over their positions (float64 sums). A pool without held-out images gets (0, 1, 0, 1)."""
    out = np.tile(np.asarray([0.0, 1.0, 0.0, 1.0]), (k, 1))
    for i in range(k):
        sel = pool == i
        if sel.any():
            p, m = patch[sel].astype(np.float64), mpo_map[sel].astype(np.float64)
            out[i] = [p.mean(), max(p.std(), 1e-12), m.mean(), max(m.std(), 1e-12)]
    return out.astype(np.float32)


def _finish(sc: ScoringSpec, terms: tuple, keep: tuple, d: DataSpec):
    """Image scores and pixel-map maxima from stored terms: the scoring's fuse and keep stages, batched.
    terms: (P, M_po, each row's term statistics); keep: (boxes (N, 4) or None, ignore masks (K, S, S)
    or None, pool index (N,))."""
    (patch, mpo_map, stats), (boxes, ignore, pool) = terms, keep
    size, bs = d.image_size, d.eval_batch_size

    def finish(p, m, st, bx, pidx):
        score, pixel_map = apply_keep(*fuse(p, m, st, sc, size), keep_mask(bx, ignore, pidx, size))
        return score, pixel_map.max(axis=(1, 2))

    res, _ = run_batched(jax.jit(finish), row_batches((patch, mpo_map, stats, boxes, pool), bs), place=lambda a: a)
    return (np.zeros(0, np.float32),) * 2 if res is None else res
