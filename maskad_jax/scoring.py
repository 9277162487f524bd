"""The test-time engine: one jitted function from images to anomaly maps and image scores.

score(params, backbone_vars, pools, images, pool_idx, image_ids) runs, in one XLA program:
  backbone (once per image) -> h (and the target view) -> nearest pool token per position: the
  reference map r and M_po -> N masks per image (prototype-oriented top-k of M_po at each ratio,
  random, block, and the zero mask) -> the 2N masked maps (h and r) reconstructed in one batched
  call -> per-patch errors E_h, E_r (N per patch) -> Rec and the association discrepancy (OT)
  -> combination with M_po -> align-corners upsampling -> Gaussian smoothing -> map, max = score.
Masks come from keys folded from (seed, image id), so an image gets the same map alone or in a
batch, and the same seed gives the same maps.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from maskad_jax import association, masks as masks_lib
from maskad_jax.coreset import nearest
from maskad_jax.flow_fit import flow_logp_fn, residual_logp
from maskad_jax.reconstructor import patch_errors
from maskad_jax.resize import resize_map_align_corners
from maskad_jax.smoothing import gaussian_smooth


def num_masks(sc) -> int:
    return len(sc.prototype_ratios) + sc.num_random + sc.num_block + int(sc.zero_mask)


def make_masks(key, mpo_patch, grid, sc):
    """(N, gh*gw) masks of one image, in the released code's order (+ the zero mask last)."""
    n = grid[0] * grid[1]
    out = [masks_lib.topk_mask(mpo_patch, max(1, int(n * r))) for r in sc.prototype_ratios]
    kr, kb = jax.random.split(key)
    out += [masks_lib.random_mask(k, n, int(n * sc.random_ratio)) for k in jax.random.split(kr, sc.num_random)]
    out += [masks_lib.block_mask(k, grid, int(n * sc.block_ratio)) for k in jax.random.split(kb, sc.num_block)]
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


def make_score_features_fn(config, model, flow=None):
    """Scoring from features: f(params, pools, h_in, h_tgt, pool_idx, image_ids, out_size) -> dict.

    With scoring.mpo = 'flow', `flow` is the ConditionalFlow module and pools["flow"] holds its
    "params" and "logp_ref" (K,) (flow_fit.py); with flow.features = 'backbone' also its own "pool"
    (K, P, Cf) and "valid", and f_flow (B, fh, fw, Cf) gives the flow backbone's features."""
    sc = config.scoring
    seed = config.seed
    if sc.mpo not in ("knn", "flow", "none"):
        raise ValueError(f"scoring.mpo must be knn | flow | none, got {sc.mpo!r}")
    if sc.mpo == "flow" and flow is None:
        raise ValueError("scoring.mpo = 'flow' needs the trained flow (flow_fit.restore_flow)")

    def score_features(params, pools, h_in, h_tgt, pool_idx, image_ids, out_size, f_flow=None):
        b, gh, gw, c = h_in.shape
        n = gh * gw
        tokens = h_in.reshape(b, n, c)
        pool_in, pool_tgt, valid = pools["pool_in"][pool_idx], pools["pool_tgt"][pool_idx], pools["valid"][pool_idx]
        d, idx = jax.vmap(nearest)(tokens, pool_in, valid)
        dist = jnp.sqrt(d)  # (B, n)
        mpo = dist / pools["cal_scale"][pool_idx][:, None]
        r_in = jnp.take_along_axis(pool_in, idx[..., None], axis=1).reshape(b, gh, gw, c)
        mpo_map = mpo.reshape(b, gh, gw)  # the M_po map that weights the final map (upsampled)
        if sc.mpo == "flow":  # M_po = 1 - exp(min(L - L_ref, 0)) from the flow's log-likelihood of e - p
            fs = pools["flow"]
            if f_flow is None:  # the reconstructor's own features: the residuals to r are at hand
                fgrid = (gh, gw)
                logp = residual_logp(flow, fs["params"], tokens - r_in.reshape(b, n, c), fgrid, config.flow.cond_dim)
            else:  # the flow backbone's features against its own pool
                fgrid = f_flow.shape[1:3]
                logp = flow_logp_fn(flow, fgrid)(fs["params"], f_flow.reshape(b, fgrid[0] * fgrid[1], -1),
                                                 fs["pool"][pool_idx], fs["valid"][pool_idx], config.flow.cond_dim)
            mpo_map = (1.0 - jnp.exp(jnp.minimum(logp - fs["logp_ref"][pool_idx][:, None], 0.0))).reshape((b,) + fgrid)
            mpo = (mpo_map if fgrid == (gh, gw) else resize_map_align_corners(mpo_map, (gh, gw))).reshape(b, n)
        r_tgt = jnp.take_along_axis(pool_tgt, idx[..., None], axis=1).reshape(b, gh, gw, c)

        keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), 0x5C0E), i))(image_ids)
        m = jax.vmap(lambda k, s: make_masks(k, s, (gh, gw), sc))(keys, mpo)  # (B, N, n)
        nm = m.shape[1]
        inputs = jnp.concatenate([jnp.repeat(h_in[:, None], nm, 1), jnp.repeat(r_in[:, None], nm, 1)], 1)
        targets = jnp.concatenate([jnp.repeat(h_tgt[:, None], nm, 1), jnp.repeat(r_tgt[:, None], nm, 1)], 1)
        all_masks = jnp.concatenate([m, m], 1)
        stochastic = bool(sc.test_drop_path)
        dkey = jax.random.fold_in(keys[0], 1)

        def reconstruct(x, mk, t, key):
            """Errors of a (k, gh, gw, C) stack of masked maps: (k, n)."""
            rngs = {"dropout": key} if stochastic else {}
            pred = model.apply({"params": params}, x, mk, deterministic=not stochastic, rngs=rngs)
            return patch_errors(pred, t, squared=sc.squared_error)

        steps = _branch_steps(2 * nm, sc.branches_per_step)
        if steps == 1:  # all 2N x B reconstructions in one batched call (best on GPU/TPU)
            err = reconstruct(inputs.reshape(b * 2 * nm, gh, gw, c), all_masks.reshape(b * 2 * nm, n),
                              targets.reshape(b * 2 * nm, gh, gw, c), dkey)
        else:  # a loop inside the program over groups of branches: cache-sized batches (best on CPU)
            per = 2 * nm // steps
            move = lambda t: jnp.moveaxis(t, 1, 0).reshape((steps, per * b) + t.shape[2:])
            err = jax.lax.map(lambda a: reconstruct(*a), (move(inputs), move(all_masks), move(targets),
                                                          jax.random.split(dkey, steps)))
            err = jnp.moveaxis(err.reshape(2 * nm, b, n), 0, 1)
        err = err.reshape(b, 2, nm, n)
        e_h, e_r = jnp.swapaxes(err[:, 0], 1, 2), jnp.swapaxes(err[:, 1], 1, 2)  # (B, n, N)

        rec = jnp.mean(e_h, axis=-1) if sc.use_rec else jnp.zeros((b, n))
        if sc.use_assdis and sc.use_reference:
            if sc.ot == "paper":
                ass = association.paper_assdis(e_h, e_r, sc.epsilon, sc.sinkhorn_iterations)
            elif sc.ot == "exact":
                ass = association.exact_assdis(e_h, e_r)
            elif sc.ot == "code":
                ass = jax.vmap(lambda a, r: association.code_assdis(a, r, sc.epsilon))(e_h, e_r)
            else:
                raise ValueError(f"scoring.ot must be paper | exact | code, got {sc.ot!r}")
        else:
            ass = jnp.zeros((b, n))
        if sc.combine == "paper":
            patch = rec + ass
        elif sc.combine == "code":
            patch = sc.ot_weight * sc.ot_scale * ass + (1 - sc.ot_weight) * rec
        else:
            raise ValueError(f"scoring.combine must be paper | code, got {sc.combine!r}")
        if not (sc.use_rec or (sc.use_assdis and sc.use_reference)):
            patch = jnp.ones((b, n))  # M_po alone (the nearest-neighbour baseline)
        size = (out_size, out_size)
        up = resize_map_align_corners(patch.reshape(b, gh, gw), size)
        if sc.use_mpo and sc.mpo in ("knn", "flow"):
            up = up * resize_map_align_corners(mpo_map, size)
        amap = gaussian_smooth(up, sc.sigma)
        return {"map": amap, "score": jnp.max(amap, axis=(1, 2)), "mpo": mpo.reshape(b, gh, gw),
                "rec": rec.reshape(b, gh, gw), "assdis": ass.reshape(b, gh, gw)}

    return score_features


def make_score_fn(config, extractor, model, flow=None, flow_embedder=None):
    """Jitted f(params, backbone_vars, pools, images01, pool_idx, image_ids) -> dict of maps and scores.

    flow: the ConditionalFlow module (scoring.mpo = 'flow'); flow_embedder: the flow's own backbone
    (flow_features.FlowEmbedder, flow.features = 'backbone'), its variables in pools["flow"]["backbone_vars"]."""
    score_features = make_score_features_fn(config, model, flow)
    regress_raw = config.train.target == "unnormalized"

    def score(params, backbone_vars, pools, images, pool_idx, image_ids):
        h_in = extractor.apply(backbone_vars, images, normalize=True)
        h_tgt = extractor.apply(backbone_vars, images, normalize=False) if regress_raw else h_in
        f_flow = None
        if flow_embedder is not None:  # flow.features = 'backbone': the second backbone, in the same program
            f_flow = flow_embedder.apply(pools["flow"]["backbone_vars"], images)
        return score_features(params, pools, h_in, h_tgt, pool_idx, image_ids, images.shape[1], f_flow)

    return jax.jit(score)


def pools_to_device(pools) -> dict:
    return {"pool_in": jnp.asarray(pools.pool_in), "pool_tgt": jnp.asarray(pools.pool_tgt),
            "valid": jnp.asarray(pools.valid), "cal_scale": jnp.asarray(pools.cal_scale)}
