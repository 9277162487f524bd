"""The test-time engine: one jitted function from images to anomaly maps and image scores.

score(params, backbone_vars, pools, images, pool_idx, image_ids) runs, in one XLA program, these
stages (each a pure function below, testable alone):
  1. reference_and_knn: the nearest pool token of every position (the reference map r) and its
     distance over the pool's calibration scale (the kNN M_po); flow_mpo replaces M_po when
     scoring.mpo = flow;
  2. test_masks: N masks per image (prototype-oriented top-k of M_po at each ratio, random, block,
     and the zero mask), from keys folded from (seed, image id), so an image gets the same map
     alone or in a batch;
  3. branch_errors: the 2N masked maps (h and r) reconstructed, per-patch errors E_h, E_r (N each);
  4. rec_and_assdis: the errors in scoring.error_units, Rec = their mean over the h branches and
     AssDis = the OT between the h and r samples of each patch (association.py);
  5. combine + to_map: (Rec + AssDis) x M_po (or the released code's weighting), align-corners
     upsampling, Gaussian smoothing; the image score is the map's max.
Invalid scoring.* values are refused when the function is built, not inside jit.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from maskad_jax import association, threefry
from maskad_jax import masks as masks_lib
from maskad_jax.coreset import nearest
from maskad_jax.errors import ConfigError
from maskad_jax.flow import flow_logp_fn, residual_logp
from maskad_jax.reconstructor import patch_errors
from maskad_jax.resize import resize_map_align_corners
from maskad_jax.smoothing import gaussian_smooth

CHOICES = {
    "mpo": ("knn", "flow", "none"),
    "error_units": ("reference", "absolute"),
    "ot": ("paper", "exact", "code"),
    "combine": ("paper", "code"),
}


def validate(sc) -> None:
    """Refuse unknown scoring.* choices with a message naming the field."""
    for field, allowed in CHOICES.items():
        if sc[field] not in allowed:
            raise ConfigError(f"scoring.{field} must be {' | '.join(allowed)}, got {sc[field]!r}")


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
    d, idx = jax.vmap(nearest)(tokens, pools["pool_in"][pool_idx], pools["valid"][pool_idx])
    return idx, jnp.sqrt(d) / pools["cal_scale"][pool_idx][:, None]


def gather_pool(pool, pool_idx, idx):
    """The pool rows idx (B, n) of each image's pool: (B, n, C)."""
    return jnp.take_along_axis(pool[pool_idx], idx[..., None], axis=1)


def flow_mpo(flow, flow_pools, tokens, residuals, pool_idx, grid, cond_dim, f_flow=None):
    """The flow's M_po map 1 - exp(min(L - L_ref, 0)): (B, gh, gw), or (B, fh, fw) on the flow
    backbone's own grid when f_flow (B, fh, fw, Cf) is given (flow.features = 'backbone')."""
    b = tokens.shape[0]
    if f_flow is None:  # the reconstructor's own features: the residuals to r are at hand
        fgrid = grid
        logp = residual_logp(flow, flow_pools["params"], residuals, fgrid, cond_dim)
    else:  # the flow backbone's features against its own pool
        fgrid = f_flow.shape[1:3]
        logp = flow_logp_fn(flow, fgrid)(
            flow_pools["params"],
            f_flow.reshape(b, fgrid[0] * fgrid[1], -1),
            flow_pools["pool"][pool_idx],
            flow_pools["valid"][pool_idx],
            cond_dim,
        )
    return (1.0 - jnp.exp(jnp.minimum(logp - flow_pools["logp_ref"][pool_idx][:, None], 0.0))).reshape((b,) + fgrid)


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
    """The per-patch score before M_po: paper Rec + AssDis; code 0.6 x 1e4 x AssDis + 0.4 x Rec; ones
    when neither term is on (M_po alone, the nearest-neighbour baseline)."""
    if not (sc.use_rec or (sc.use_assdis and sc.use_reference)):
        return jnp.ones_like(rec)
    if sc.combine == "paper":
        return rec + ass
    return sc.ot_weight * sc.ot_scale * ass + (1 - sc.ot_weight) * rec


def to_map(patch, mpo_map, sc, out_size: int):
    """(B, gh, gw) patch scores x the upsampled M_po (when on) -> smoothed (B, S, S) map."""
    size = (out_size, out_size)
    up = resize_map_align_corners(patch, size)
    if sc.use_mpo and sc.mpo in ("knn", "flow"):
        up = up * resize_map_align_corners(mpo_map, size)
    return gaussian_smooth(up, sc.sigma)


# ----------------------------------------------------------------------------------- composition
def make_score_features_fn(config, model, flow=None, with_terms: bool = False):
    """Scoring from features: f(params, pools, h_in, h_tgt, pool_idx, image_ids, out_size) -> dict.

    pools: device_pools(...). flow: the trained flow (flow.FlowState) when scoring.mpo = 'flow';
    with flow.features = 'backbone', f_flow (B, fh, fw, Cf) gives its own backbone's features.
    with_terms: also return the raw branch errors "e_h", "e_r" (B, n, N) and the "masks" (B, N, n)."""
    sc = config.scoring
    validate(sc)
    if sc.mpo == "flow" and flow is None:
        raise ValueError("scoring.mpo = 'flow' needs the trained flow (flow_fit.restore_flow)")
    stochastic = bool(sc.test_drop_path)

    def score_features(params, pools, h_in, h_tgt, pool_idx, image_ids, out_size, f_flow=None):
        b, gh, gw, c = h_in.shape
        n = gh * gw
        tokens = h_in.reshape(b, n, c)
        idx, mpo = reference_and_knn(pools, tokens, pool_idx)
        r_in = gather_pool(pools["pool_in"], pool_idx, idx)
        mpo_map = mpo.reshape(b, gh, gw)  # the M_po map that weights the final map (upsampled)
        if sc.mpo == "flow":
            mpo_map = flow_mpo(
                flow.module, pools["flow"], tokens, tokens - r_in, pool_idx, (gh, gw), config.flow.cond_dim, f_flow
            )
            mpo = mpo_map if mpo_map.shape[1:] == (gh, gw) else resize_map_align_corners(mpo_map, (gh, gw))
            mpo = mpo.reshape(b, n)
        r_tgt = gather_pool(pools["pool_tgt"], pool_idx, idx)
        m, keys = test_masks(config.seed, image_ids, mpo, (gh, gw), sc)

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
        amap = to_map(combine(rec, ass, sc).reshape(b, gh, gw), mpo_map, sc, out_size)
        out = {
            "map": amap,
            "score": jnp.max(amap, axis=(1, 2)),
            "mpo": mpo.reshape(b, gh, gw),
            "rec": rec.reshape(b, gh, gw),
            "assdis": ass.reshape(b, gh, gw),
            "ot_uncertified": uncertified,
        }
        if with_terms:
            out.update(e_h=e_h, e_r=e_r, masks=m)
        return out

    return score_features


def make_score_fn(config, extractor, model, flow=None):
    """Jitted f(params, backbone_vars, pools, images01, pool_idx, image_ids) -> dict of maps and scores.

    pools: device_pools(...); flow: the trained flow (flow.FlowState) when scoring.mpo = 'flow'. With
    flow.features = 'backbone' its own backbone (flow.embedder) runs in the same program, its
    variables in pools["flow"]["backbone_vars"]."""
    score_features = make_score_features_fn(config, model, flow)
    regress_raw = config.train.target == "unnormalized"
    embedder = flow.embedder if flow is not None else None

    def score(params, backbone_vars, pools, images, pool_idx, image_ids):
        h_in = extractor.apply(backbone_vars, images, normalize=True)
        h_tgt = extractor.apply(backbone_vars, images, normalize=False) if regress_raw else h_in
        f_flow = None if embedder is None else embedder.apply(pools["flow"]["backbone_vars"], images)
        return score_features(params, pools, h_in, h_tgt, pool_idx, image_ids, images.shape[1], f_flow)

    return jax.jit(score)


def device_pools(pools, flow=None) -> dict:
    """The one layout of what scoring reads besides the parameters: the fit's pools (fit.Pools) and,
    with a trained flow (flow.FlowState), its parameters, L_ref and (flow.features = backbone) its own
    pool and backbone variables. Arrays are placed by the caller (parallel.place_for_scoring)."""
    dev = {
        "pool_in": jnp.asarray(pools.pool_in),
        "pool_tgt": jnp.asarray(pools.pool_tgt),
        "valid": jnp.asarray(pools.valid),
        "cal_scale": jnp.asarray(pools.cal_scale),
    }
    if flow is not None:
        dev["flow"] = {"params": flow.params, "logp_ref": jnp.asarray(flow.logp_ref)}
        if flow.embedder is not None:
            dev["flow"].update(
                pool=jnp.asarray(flow.pools.pool_in),
                valid=jnp.asarray(flow.pools.valid),
                backbone_vars=flow.embedder.variables,
            )
    return dev
