"""Fit after training: nominal token pools (greedy k-center) and calibration statistics per class.

For each class (or one shared pool with fit.per_class=False), its normal training images are split
by a seeded permutation: `calibration_fraction` of them are held out, the rest give the pool's
tokens (input features, and the paired target features when training regressed the unnormalised
view). The pool keeps ceil(pool_ratio x tokens) of them, chosen by greedy k-center. The held-out
images' tokens give `cal_scale`, the mean L2 distance of a normal token to its nearest pool token:
M_po divides by it, so an image is scored on its own, never against the rest of a test set.
With the fine embedding (scoring.knn_fine) a second pool per class is fitted the same way on its
tokens (k-center at fit.fine_pool_ratio), with its own calibration scale.
After training, calibration (calibration.calibrate) scores the held-out images and adds to the fit
their image scores, their pixel maps' maxima, and per class the mean and spread of the two terms
(term_stats) that scoring.mpo_fusion = sum standardises; all under one scoring signature. The fit's
parts, its file and its reading are engine/fit_state.py's.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from maskad_jax.engine.coreset import extend_kcenter, greedy_kcenter, nearest
from maskad_jax.engine.fit_state import Fit, NominalPools


def fit_pools(
    h_in: np.ndarray,
    h_tgt: np.ndarray | None,
    class_names_of_images,
    fit_cfg,
    seed: int,
    fine: np.ndarray | None = None,
    image_of: np.ndarray | None = None,
    fold: int = 0,
) -> Fit:
    """h_in (N, gh, gw, C) features of the normal training images; their class names. fine (N, fh, fw,
    Cf): their fine embeddings, for the fine pools (scoring.knn_fine). image_of (N,): with tiles
    (tiling.py), each row's image: images, not tiles, are held out. fold: which block of each class's
    permutation is held out (0: the fit that scores; the others only calibrate, cross_fits)."""
    names = np.asarray(class_names_of_images)
    groups = _class_groups(names, fit_cfg.per_class)
    pools, fine_pools, cal_pos = [], [], {}
    for gi, (cls, pos) in enumerate(groups.items()):
        rng = np.random.default_rng([seed, gi])
        cal, fit = _held_out(pos, rng, fit_cfg.calibration_fraction, image_of, fold)
        pools.append(_kcenter_pool(h_in, h_tgt, (cal, fit), fit_cfg.pool_ratio, fit_cfg, (seed, rng)))
        if fine is not None:  # its own generator: the token pool's draws stay as they were
            frng = np.random.default_rng([seed, gi, 1])
            fine_pools.append(_kcenter_pool(fine, None, (cal, fit), fit_cfg.fine_pool_ratio, fit_cfg, (seed, frng)))
        cal_pos[cls] = cal
    pool_in, pool_tgt, valid, src, cal_scale = _stack(pools)
    fine_parts = {}
    if fine is not None:
        f_in, _, f_valid, _, f_scale = _stack(fine_pools)
        record = {"strides": [int(s) for s in fit_cfg.fine_strides], "join": str(fit_cfg.fine_join)}
        fine_parts = dict(fine_in=f_in, fine_valid=f_valid, fine_cal_scale=f_scale, fine_embedding=record)
    return Fit(NominalPools(pool_in, pool_tgt, valid, cal_scale, tuple(groups), cal_pos, src=src, **fine_parts))


def cross_fits(h_in, h_tgt, class_names_of_images, fit_cfg, fine=None, image_of=None) -> list:
    """The fits of folds 1, 2, ... (fit_pools with another block of each class's images held out),
    as many as fit.calibration_folds asks (0: until every image of every class has been held out
    once): calibration scores each fold's held-out images against its pools, so a threshold rests on
    all of a class's good images, each scored by pools fitted without it (calibration.py)."""
    names = np.asarray(class_names_of_images)
    groups = _class_groups(names, fit_cfg.per_class).values()
    counts = [len(np.unique(image_of[g])) if image_of is not None else len(g) for g in groups]
    needed = max(folds(n, fit_cfg.calibration_fraction) for n in counts)
    count = needed if fit_cfg.calibration_folds == 0 else min(needed, fit_cfg.calibration_folds)
    seed = fit_cfg.seed
    return [fit_pools(h_in, h_tgt, names, fit_cfg, seed, fine, image_of, fold=j) for j in range(1, count)]


def _class_groups(names: np.ndarray, per_class: bool) -> dict:
    """{pool name: the rows of its images}: one per class in sorted order, or "*" for all (fit.per_class)."""
    if not per_class:
        return {"*": np.arange(len(names))}
    return {c: np.nonzero(names == c)[0] for c in sorted(set(names.tolist()))}


def _held_out(pos, rng, fraction, image_of=None, fold: int = 0):
    """(held-out positions, pool positions) of one class: `fraction` of its images (at least one,
    never all), drawn by rng; with image_of, whole images (all their tiles) at a time. fold j holds
    out the j-th block of that size of the same permutation (fold 0: the first; folds(...) says how
    many blocks cover every image); a fold past the last holds out nothing."""
    if image_of is None:
        pos = pos[rng.permutation(len(pos))]
        n_cal = held_count(len(pos), fraction)
        lo, hi = min(fold * n_cal, len(pos)), min((fold + 1) * n_cal, len(pos))
        return pos[lo:hi], np.concatenate([pos[:lo], pos[hi:]])
    images = np.unique(image_of[pos])
    cal_images, _ = _held_out(images, rng, fraction, fold=fold)
    held = np.isin(image_of[pos], cal_images)
    return pos[held], pos[~held]


def held_count(n: int, fraction: float) -> int:
    """How many of a class's n images one calibration fold holds out: round(fraction x n), at least
    one and never all (none of a single image)."""
    n_cal = int(round(fraction * n))
    return min(max(n_cal, 1), n - 1) if n > 1 else 0


def folds(n: int, fraction: float) -> int:
    """How many disjoint held-out blocks cover all n images of a class (1 for a single image)."""
    return max(1, -(-n // max(held_count(n, fraction), 1)))


def _kcenter_pool(feats, feats_tgt, split: tuple, ratio: float, fit_cfg, draw: tuple):
    """One class's pool: greedy k-center over the tokens of the images at `fit` (at most
    fit.max_pool_tokens of them, a random subset above it), and the calibration scale: the mean
    distance of the held-out images' (`cal`) tokens to it. split: (cal, fit) (_held_out's); draw:
    (the k-center's seed, the subset's generator). (tokens in, tokens tgt, src, scale)."""
    (cal, fit), (seed, rng) = split, draw
    c_dim = feats.shape[-1]
    tok_in = feats[fit].reshape(-1, c_dim)
    tok_tgt = (feats_tgt if feats_tgt is not None else feats)[fit].reshape(-1, c_dim)
    tok_src = np.repeat(fit, feats.shape[1] * feats.shape[2])
    if len(tok_in) > fit_cfg.max_pool_tokens:
        sub = rng.choice(len(tok_in), fit_cfg.max_pool_tokens, replace=False)
        tok_in, tok_tgt, tok_src = tok_in[sub], tok_tgt[sub], tok_src[sub]
    k = int(np.ceil(ratio * len(tok_in)))
    sel = greedy_kcenter(tok_in, k, start=0, projection_dim=fit_cfg.projection_dim, seed=seed)
    if len(cal):
        scale = mean_nearest(feats[cal], tok_in[sel])
    else:  # a single image: no held-out data; distances of pool tokens would be 0, so use 1
        scale = 1.0
    return tok_in[sel], tok_tgt[sel], tok_src[sel], scale


def mean_nearest(queries: np.ndarray, pool: np.ndarray) -> float:
    """The mean L2 distance of the query tokens (..., C) to their nearest pool token (a calibration scale)."""
    d, _ = nearest(jnp.asarray(queries.reshape(-1, queries.shape[-1])), jnp.asarray(pool))
    return float(jnp.mean(jnp.sqrt(d)))


def _stack(pools):
    """Per-class pools padded to one (K, P, C) layout: (in, tgt, valid, src, scales)."""
    p = max(len(a) for a, _, _, _ in pools)
    c_dim = pools[0][0].shape[-1]
    pool_in = np.zeros((len(pools), p, c_dim), np.float32)
    pool_tgt = np.zeros_like(pool_in)
    valid = np.zeros((len(pools), p), bool)
    src = np.full((len(pools), p), -1, np.int32)
    for i, (a, b, sr, _) in enumerate(pools):
        pool_in[i, : len(a)], pool_tgt[i, : len(b)], valid[i, : len(a)], src[i, : len(sr)] = a, b, True, sr
    return pool_in, pool_tgt, valid, src, np.asarray([sc for _, _, _, sc in pools], np.float32)


def grow_class(fit: Fit, k: int, h_in, h_tgt, fine, fs) -> tuple:
    """(fit with class k's pools grown by the new images' tokens, tokens added, fine tokens added):
    --mode=update's k-center continued from the pool, fit.pool_ratio of the new tokens (fit.fine_pool_ratio
    of the fine ones). The fit given is not changed."""
    c = h_in.shape[-1]
    tokens = h_in.reshape(-1, c)
    tgt = tokens if h_tgt is None else h_tgt.reshape(-1, c)
    pool_in, pool_tgt, valid, added = grow((fit.pool_in, fit.valid, fit.pool_tgt), k, (tokens, tgt), fs.pool_ratio, fs)
    changes = dict(pool_in=pool_in, pool_tgt=pool_tgt, valid=valid)
    if fit.src is not None:
        changes["src"] = _widen(fit.src + 1, pool_in.shape[1]) - 1  # new tokens come from no training image
    fine_added = 0
    if fine is not None and fit.fine_in is not None:
        f = fine.reshape(-1, fine.shape[-1])
        changes["fine_in"], _, changes["fine_valid"], fine_added = grow(
            (fit.fine_in, fit.fine_valid, None), k, (f, None), fs.fine_pool_ratio, fs
        )
    return fit.with_nominal(**changes), added, fine_added


def grow(pools: tuple, k: int, new: tuple, ratio: float, fit_cfg):
    """The (K, P', C) pools with class k's grown by k-center over its pool + new_tokens (M, C): the
    fit's ratio of the new tokens, the ones farthest from what the pool holds. pools: (pool, valid,
    pool_tgt or None); new: (new_tokens, new_tgt or None). (pool, tgt, valid, added)."""
    (pool, valid, pool_tgt), (new_tokens, new_tgt) = pools, new
    old = pool[k][valid[k]]
    m = int(np.ceil(ratio * len(new_tokens)))
    sel = extend_kcenter(old, new_tokens, m, projection_dim=fit_cfg.projection_dim, seed=fit_cfg.seed)
    n_k = len(old) + len(sel)
    width = max(pool.shape[1], n_k)
    grown, grown_valid = _widen(pool, width), _widen(valid, width)
    grown[k, len(old) : n_k], grown_valid[k, len(old) : n_k] = new_tokens[sel], True
    tgt = None
    if pool_tgt is not None:
        tgt = _widen(pool_tgt, width)
        tgt[k, len(old) : n_k] = new_tgt[sel]
    return grown, tgt, grown_valid, len(sel)


def _widen(a, width):
    out = np.zeros((a.shape[0], width) + a.shape[2:], a.dtype)
    out[:, : a.shape[1]] = a
    return out


def rescaled(fit: Fit, k: int, held_in, fine_held) -> Fit:
    """fit with pool k's calibration scales measured again (its held-out tokens' mean distance to the
    pool, and the fine pool's): after --mode=update grew the pool."""
    if not len(held_in):
        return fit
    scale = np.array(fit.cal_scale, np.float32)
    scale[k] = mean_nearest(held_in, fit.pool_in[k][fit.valid[k]])
    changes = {"cal_scale": scale}
    if fine_held is not None and fit.fine_in is not None:
        fine_scale = np.array(fit.fine_cal_scale, np.float32)
        fine_scale[k] = mean_nearest(fine_held, fit.fine_in[k][fit.fine_valid[k]])
        changes["fine_cal_scale"] = fine_scale
    return fit.with_nominal(**changes)
