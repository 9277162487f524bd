"""The test-time engine: one jitted function from images to anomaly maps and image scores.

score(params, backbone_vars, pools, images, pool_idx, image_ids) runs, in one XLA program, these
stages (each a pure function below, testable alone):
  1. mpo_stage: reference_and_knn finds the nearest pool token of every position (the reference
     map r) and its distance over the pool's calibration scale; the M_po in use (engine/mpo.py: the
     nearest-neighbour one, on one grid or two, or the flow's) turns that into M_po;
  2. test_masks: N masks per image (prototype-oriented top-k of M_po at each ratio, random, block,
     and the zero mask), from keys folded from (seed, image id), so an image gets the same map
     alone or in a batch;
  3. branch_errors: the 2N masked maps (h and r) reconstructed, per-patch errors E_h, E_r (N each);
  4. rec_and_assdis: the errors in scoring.error_units, Rec = their mean over the h branches and
     AssDis = the OT between the h and r samples of each patch (association.py);
  5. combine + fuse: P = Rec + AssDis (or the released code's weighting), joined with M_po as
     P x M_po (the paper) or z(P) + z(M_po) (scoring.mpo_fusion = sum: each term in units of its
     held-out normal patches' mean and spread, term_stats), align-corners upsampling, Gaussian
     smoothing; the image score is that map's max. The pixel map is that map, or M_po's own
     (scoring.pixel_map = mpo).
The scoring.* values are checked before (app/config_check.py, from common/specs.py).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from maskad_jax.common.specs import FineEmbedding, ScoringSpec
from maskad_jax.engine import association, threefry
from maskad_jax.engine import masks as masks_lib
from maskad_jax.engine.coreset import nearest_in_pools
from maskad_jax.engine.mpo import NearestNeighbourMpo, gather_pool
from maskad_jax.engine.smoothing import gaussian_smooth
from maskad_jax.models.reconstructor import patch_errors
from maskad_jax.models.resize import resize_map_align_corners


def num_masks(sc) -> int:
    return len(sc.prototype_ratios) + sc.num_random + sc.num_block + int(sc.zero_mask)


def make_masks(key, mpo_patch, grid, sc):
    """(N, gh*gw) masks of one image, in the released code's order (+ the zero mask last)."""
    n = grid[0] * grid[1]
    out = [masks_lib.topk_mask(mpo_patch, max(1, int(n * r))) for r in sc.prototype_ratios]
    kr, kb = threefry.split(key)
    out += [masks_lib.random_mask(k, n, int(n * sc.random_ratio)) for k in threefry.split(kr, sc.num_random)]
    out += [masks_lib.block_mask(k, grid, int(n * sc.block_ratio)) for k in threefry.split(kb, sc.num_block)]
    if sc.zero_mask:
        out.append(jnp.zeros((n,), bool))
    return jnp.stack(out)


def _branch_steps(branches: int, per_step: int) -> int:
    """How many sequential groups the 2N branches are reconstructed in (per_step <= 0: one group)."""
    if per_step <= 0 or per_step >= branches:
        return 1
    steps = -(-branches // per_step)
    while branches % steps:  # equal groups: the smallest count of steps >= the request that divides 2N
        steps += 1
    return steps


# ------------------------------------------------------------------------------------------ stages
def reference_and_knn(pools, tokens, pool_idx):
    """tokens (B, n, C) -> (index of the nearest pool token (B, n), kNN M_po (B, n)).

    M_po = the L2 distance to the nearest token of the image's pool over the pool's calibration
    scale (the mean such distance of held-out normal tokens, fit.py)."""
    d, idx = nearest_in_pools(tokens, pools["pool_in"], pools["valid"], pool_idx)
    return idx, jnp.sqrt(d) / pools["cal_scale"][pool_idx][:, None]


def test_masks(seed: int, image_ids, mpo, grid, sc):
    """(B, N, n) masks: keys folded from (seed, image id), prototype masks from M_po (B, n)."""
    keys = jax.vmap(lambda i: threefry.fold_in(threefry.fold_in(threefry.key(seed), 0x5C0E), i))(image_ids)
    return jax.vmap(lambda k, s: make_masks(k, s, grid, sc))(keys, mpo), keys


def branch_errors(reconstruct, h_in, h_tgt, r_in, r_tgt, masks, per_step: int, key):
    """Errors of the 2N masked reconstructions: E_h, E_r (B, n, N).

    reconstruct(inputs, masks, targets, key) -> per-patch errors (k, n) of a (k, gh, gw, C) stack.
    per_step > 0 runs the branches in sequential groups inside the program (cache-sized on a CPU)."""
    b, gh, gw, c = h_in.shape
    n, nm = gh * gw, masks.shape[1]
    inputs = jnp.concatenate([jnp.repeat(h_in[:, None], nm, 1), jnp.repeat(r_in[:, None], nm, 1)], 1)
    targets = jnp.concatenate([jnp.repeat(h_tgt[:, None], nm, 1), jnp.repeat(r_tgt[:, None], nm, 1)], 1)
    all_masks = jnp.concatenate([masks, masks], 1)
    steps = _branch_steps(2 * nm, per_step)
    if steps == 1:  # all 2N x B reconstructions in one batched call (best on GPU/TPU)
        err = reconstruct(
            inputs.reshape(b * 2 * nm, gh, gw, c),
            all_masks.reshape(b * 2 * nm, n),
            targets.reshape(b * 2 * nm, gh, gw, c),
            key,
        )
    else:  # a loop inside the program over groups of branches: cache-sized batches (best on CPU)
        per = 2 * nm // steps
        move = lambda t: jnp.moveaxis(t, 1, 0).reshape((steps, per * b) + t.shape[2:])
        err = jax.lax.map(
            lambda a: reconstruct(*a), (move(inputs), move(all_masks), move(targets), threefry.split(key, steps))
        )
        err = jnp.moveaxis(err.reshape(2 * nm, b, n), 0, 1)
    err = err.reshape(b, 2, nm, n)
    return jnp.swapaxes(err[:, 0], 1, 2), jnp.swapaxes(err[:, 1], 1, 2)


def rec_and_assdis(e_h, e_r, sc):
    """(Rec (B, n), AssDis (B, n), patches whose Sinkhorn fell back to the exact optimum (B,)).

    error_units = reference: each patch's errors divided by the mean of its N reference errors
    first, so Rec = Rec_h / Rec_r and AssDis is measured on the same scale."""
    b, n = e_h.shape[:2]
    if sc.error_units == "reference" and sc.use_reference:
        unit = jnp.maximum(jnp.mean(e_r, axis=-1, keepdims=True), 1e-6)
        e_h, e_r = e_h / unit, e_r / unit
    rec = jnp.mean(e_h, axis=-1) if sc.use_rec else jnp.zeros((b, n))
    uncertified = jnp.zeros((b,), jnp.int32)
    if not (sc.use_assdis and sc.use_reference):
        return rec, jnp.zeros((b, n)), uncertified
    if sc.ot == "paper":
        res = association.paper_ot(e_h, e_r, sc.epsilon, sc.sinkhorn_iterations, sequential=sc.ot_sequential)
        return rec, res.cost, jnp.sum(~res.certified, axis=-1).astype(jnp.int32)
    if sc.ot == "exact":
        return rec, association.exact_assdis(e_h, e_r), uncertified
    return rec, jax.vmap(lambda a, r: association.code_assdis(a, r, sc.epsilon))(e_h, e_r), uncertified


def combine(rec, ass, sc):
    """P, the per-patch score before M_po: paper Rec + AssDis; code 0.6 x 1e4 x AssDis + 0.4 x Rec;
    None when neither term is on (M_po alone, the nearest-neighbour baseline)."""
    if not (sc.use_rec or (sc.use_assdis and sc.use_reference)):
        return None
    if sc.combine == "paper":
        return rec + ass
    return sc.ot_weight * sc.ot_scale * ass + (1 - sc.ot_weight) * rec


def fine_on(sc) -> bool:
    """Whether M_po includes the fine-grid kNN (scoring.knn_fine; the flow M_po has its own features)."""
    return bool(sc.knn_fine) and sc.mpo == "knn"


def fine_embedding(sc) -> FineEmbedding | None:
    """The fine kNN's embedding (fit.fine_strides, fit.fine_join) when the scoring uses it, else None."""
    return FineEmbedding(tuple(sc.fine_strides), sc.fine_join) if fine_on(sc) else None


def uses_mpo(sc) -> bool:
    return bool(sc.use_mpo) and sc.mpo in ("knn", "flow")


def needs_term_stats(sc) -> bool:
    """Whether the score standardises P and M_po by held-out normal statistics (term_stats)."""
    return sc.mpo_fusion == "sum" and uses_mpo(sc) and (sc.use_rec or (sc.use_assdis and sc.use_reference))


def fuse(patch, mpo_map, stats, sc, out_size: int):
    """(score map, pixel map), each (B, S, S) and smoothed, from P (B, gh, gw) or None and M_po
    (B, mh, mw). stats (B, 4): each image's class's held-out normal (mean, std) of P, then of M_po
    (used by mpo_fusion = sum). product: P x M_po; sum: z(P) + z(M_po); one term alone when the
    other is off. pixel_map = mpo: the pixel map is M_po's own (when M_po is on)."""
    size = (out_size, out_size)
    up = lambda x: resize_map_align_corners(x, size)  # noqa: E731
    mpo = mpo_map if uses_mpo(sc) else None
    if patch is None and mpo is None:
        raise ValueError("no term is on: scoring.use_rec, use_assdis (with use_reference) or use_mpo")
    if mpo is None:
        combined = up(patch)
    elif patch is None:
        combined = up(mpo)
    elif sc.mpo_fusion == "product":
        combined = up(patch) * up(mpo)
    else:
        z = lambda x, mu, sd: (x - mu[:, None, None]) / jnp.maximum(sd, 1e-12)[:, None, None]  # noqa: E731
        combined = up(z(patch, stats[:, 0], stats[:, 1])) + up(z(mpo, stats[:, 2], stats[:, 3]))
    score_map = gaussian_smooth(combined, sc.sigma)
    if sc.pixel_map == "mpo" and mpo is not None and patch is not None:
        return score_map, gaussian_smooth(up(mpo), sc.sigma)
    return score_map, score_map


def mpo_stage(mpo, pools, tokens, pool_idx, grid, f_own=None, f_fine=None):
    """M_po and the reference search: (nearest pool index (B, n), M_po on the token grid (B, n), which
    the prototype masks rank, M_po's map on its own grid: the token grid, the flow's, or the fine one).
    mpo: the M_po in use (engine/mpo.py); f_own: its own features (mpo.embed), f_fine: the fine grid's."""
    idx, knn = reference_and_knn(pools, tokens, pool_idx)
    mpo_tokens, mpo_map = mpo.map(pools, tokens, idx, knn, pool_idx, grid, f_own, f_fine)
    return idx, mpo_tokens, mpo_map


def keep_mask(boxes, ignore, pool_idx, size: int):
    """(B, S, S) bool: the pixels that count, or None when all do. boxes (B, 4) int32: each image's
    content box (x0, y0, x1, y1) in the input frame (data.geometry = pad leaves the rest out), or
    None; ignore (K, S, S) bool: each class's ignore region (data.ignore_masks), or None."""
    keep = None
    if boxes is not None:
        yy, xx = jnp.arange(size)[None, :, None], jnp.arange(size)[None, None, :]
        x0, y0, x1, y1 = (boxes[:, i][:, None, None] for i in range(4))
        keep = (xx >= x0) & (xx < x1) & (yy >= y0) & (yy < y1)
    if ignore is not None:
        kept = ~ignore[pool_idx]
        keep = kept if keep is None else keep & kept
    return keep


def apply_keep(score_map, pixel_map, keep):
    """(image score, pixel map): the score map's max over the kept pixels; the map zero elsewhere."""
    if keep is None:
        return jnp.max(score_map, axis=(1, 2)), pixel_map
    return jnp.max(jnp.where(keep, score_map, -jnp.inf), axis=(1, 2)), jnp.where(keep, pixel_map, 0.0)


# ----------------------------------------------------------------------------------- composition
def make_score_features_fn(sc: ScoringSpec, model, mpo=None, with_terms: bool = False):
    """Scoring from features: f(params, pools, h_in, h_tgt, pool_idx, image_ids, out_size) -> dict.

    pools: device_pools(...). mpo: the M_po in use (engine/mpo.py; None: the nearest-neighbour one of
    sc); f_own (B, fh, fw, Cf): its own features when it has them (the flow on its own backbone).
    f_fine: the fine embedding (FeatureExtractor.apply_with_fine) when scoring.knn_fine is on. Out:
    "map" (pixel map), "score", the terms term_stats standardise: "patch" (P; zeros when off) and
    "mpo_map" (M_po on its grid), and "mpo", "rec", "assdis" on the token grid. with_terms: also
    the raw branch errors "e_h", "e_r" (B, n, N) and the "masks" (B, N, n)."""
    mpo = NearestNeighbourMpo(fine_on(sc)) if mpo is None else mpo
    if (sc.mpo == "flow") != (mpo.kind == "flow"):
        raise ValueError(
            f"scoring.mpo = {sc.mpo!r} needs the trained flow (training/mpo.py), and this M_po is {mpo.kind}"
        )
    stochastic = bool(sc.test_drop_path)

    def score_features(params, pools, h_in, h_tgt, pool_idx, image_ids, out_size, f_own=None, f_fine=None, boxes=None):
        b, gh, gw, c = h_in.shape
        n = gh * gw
        tokens = h_in.reshape(b, n, c)
        idx, mpo_tok, mpo_map = mpo_stage(mpo, pools, tokens, pool_idx, (gh, gw), f_own, f_fine)
        r_in = gather_pool(pools["pool_in"], pool_idx, idx)
        r_tgt = gather_pool(pools["pool_tgt"], pool_idx, idx)
        m, keys = test_masks(sc.seed, image_ids, mpo_tok, (gh, gw), sc)

        def reconstruct(x, mk, t, key):
            rngs = {"dropout": key} if stochastic else {}
            pred = model.apply({"params": params}, x, mk, deterministic=not stochastic, rngs=rngs)
            return patch_errors(pred, t, squared=sc.squared_error)

        e_h, e_r = branch_errors(
            reconstruct,
            h_in,
            h_tgt,
            r_in.reshape(h_in.shape),
            r_tgt.reshape(h_in.shape),
            m,
            sc.branches_per_step,
            threefry.fold_in(keys[0], 1),
        )
        rec, ass, uncertified = rec_and_assdis(e_h, e_r, sc)
        patch = None if combine(rec, ass, sc) is None else combine(rec, ass, sc).reshape(b, gh, gw)
        score_map, pixel_map = fuse(patch, mpo_map, pools["term_stats"][pool_idx], sc, out_size)
        score, pixel_map = apply_keep(score_map, pixel_map, keep_mask(boxes, pools.get("ignore"), pool_idx, out_size))
        out = {
            "map": pixel_map,
            "score": score,
            "patch": jnp.zeros((b, gh, gw)) if patch is None else patch,
            "mpo_map": mpo_map,
            "mpo": mpo_tok.reshape(b, gh, gw),
            "rec": rec.reshape(b, gh, gw),
            "assdis": ass.reshape(b, gh, gw),
            "ot_uncertified": uncertified,
        }
        if with_terms:
            out.update(e_h=e_h, e_r=e_r, masks=m)
        return out

    return score_features


def make_score_fn(sc: ScoringSpec, extractor, model, mpo=None):
    """Jitted f(params, backbone_vars, pools, images01, pool_idx, image_ids) -> dict of maps and scores.

    pools: device_pools(...); mpo: the M_po in use (engine/mpo.py; None: the nearest-neighbour one of
    sc). Features of its own (the flow's backbone, flow.features = 'backbone') are computed in the same
    program (mpo.embed), its variables in pools["flow"]["backbone_vars"]."""
    mpo = NearestNeighbourMpo(fine_on(sc)) if mpo is None else mpo
    score_features = make_score_features_fn(sc, model, mpo)
    regress_raw = sc.regress_raw
    fine = fine_embedding(sc)

    def score(params, backbone_vars, pools, images, pool_idx, image_ids, boxes=None):
        f_fine = None
        if fine:
            h_in, f_fine = extractor.apply_with_fine(backbone_vars, images, fine)
        else:
            h_in = extractor.apply(backbone_vars, images, normalize=True)
        h_tgt = extractor.apply(backbone_vars, images, normalize=False) if regress_raw else h_in
        f_own = mpo.embed(pools, images)
        return score_features(params, pools, h_in, h_tgt, pool_idx, image_ids, images.shape[1], f_own, f_fine, boxes)

    return jax.jit(score)


def device_pools(pools, mpo=None) -> dict:
    """The one layout of what scoring reads besides the parameters: the fit's pools (fit_state.Fit) and
    the M_po's own state (mpo.device_state(): the flow's parameters, L_ref and, with
    flow.features = backbone, its own pool and backbone variables). Arrays are placed by the caller
    (parallel.place_for_scoring).
    term_stats: (K, 4) held-out statistics of P and M_po (mpo_fusion = sum); zeros and ones (no
    standardisation) until calibration has computed them. ignore: (K, S, S) bool, each class's ignore
    region (data.ignore_masks), when the fit has one."""
    k = len(pools.class_names)
    stats = pools.term_stats if pools.term_stats is not None else np.tile(np.float32([0, 1, 0, 1]), (k, 1))
    dev = {
        "pool_in": jnp.asarray(pools.pool_in),
        "pool_tgt": jnp.asarray(pools.pool_tgt),
        "valid": jnp.asarray(pools.valid),
        "cal_scale": jnp.asarray(pools.cal_scale),
        "term_stats": jnp.asarray(stats, jnp.float32),
    }
    if pools.fine_in is not None:
        dev.update(
            fine_in=jnp.asarray(pools.fine_in),
            fine_valid=jnp.asarray(pools.fine_valid),
            fine_cal_scale=jnp.asarray(pools.fine_cal_scale),
        )
    if pools.ignore is not None:
        dev["ignore"] = jnp.asarray(pools.ignore, bool)
    if mpo is not None:
        dev.update(mpo.device_state())
    return dev
