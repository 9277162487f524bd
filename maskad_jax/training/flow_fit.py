"""Training, calibration and restoring of the flow-based M_po (scoring.mpo = 'flow').

The flow models r = e - p, the residual between a position's feature e and its nearest nominal pool
token p (the fit's per-class pools), conditioned on the position's 2-D sin/cos encoding. Training
residuals are taken leave-one-image-out: a training image's tokens are matched against pool tokens
from *other* images (pool.src), so they are distributed like a test image's residuals, which never
meet their own tokens in the pool. Training runs in train.training_loop (mesh, device cache, orbax
checkpoints in <workdir>/flow_checkpoints, resume, flow_log.jsonl, TensorBoard tags flow/*).

M_po from the flow: L = per-dimension log-likelihood of each position; P = exp(min(L - L_ref, 0));
M_po = 1 - P. L_ref, per pool, is the largest L over the held-out normal (calibration) images of the
class, so an image is scored on its own. The released code's L_ref is the largest L over the class's
whole test set (scoring.mpo_normalisation = test_max).
"""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax

from maskad_jax.common.batching import row_batches, run_batched
from maskad_jax.common.errors import MissingInputError
from maskad_jax.common.specs import FlowSpec, with_role
from maskad_jax.engine.coreset import nearest
from maskad_jax.engine.mpo import flow_logp_fn
from maskad_jax.models.flow import build_flow, flow_loss, positional_encoding_2d
from maskad_jax.training.checkpoints import restore_trained
from maskad_jax.training.loop import LoopOptions, Objective, training_loop


def flow_fingerprint(f: FlowSpec, channels: int) -> dict:
    """What a flow checkpoint must agree with to be reused: the flow spec's fields of role "flow_model"
    (common/specs.py), the channels, and with its own backbone that backbone's model fields and pool."""
    out = {"channels": int(channels), **with_role(f, "flow_model")}
    if f.features == "backbone":
        out["backbone"] = {**with_role(f.backbone, "model"), "pool_ratio": f.pool_ratio}
    return out


def residuals_fn(tokens, pool, valid, src, image_pos):
    """tokens (B, n, C) -> (B, n, C) residuals to the nearest valid pool token not from image_pos (B,)."""
    keep = valid[None, :] & (src[None, :] != image_pos[:, None])  # (B, P)
    _, idx = jax.vmap(nearest, in_axes=(0, None, 0))(tokens, pool, keep)
    return tokens - pool[idx]


def compute_residuals(feats: np.ndarray, pools, pool_idx: np.ndarray, positions: np.ndarray, batch: int = 64):
    """Residuals of every training image's tokens (N, gh, gw, C) -> (N, gh*gw, C), leave-one-image-out."""
    n, gh, gw, c = feats.shape
    src = pools.src if pools.src is not None else np.full(pools.valid.shape, -1, np.int32)
    fn = jax.jit(residuals_fn)
    out = np.zeros((n, gh * gw, c), np.float32)
    tokens = feats.reshape(n, gh * gw, c)
    for k in range(len(pools.class_names)):
        sel = np.nonzero(pool_idx == k)[0]
        pool, valid, pool_src = (jnp.asarray(a[k]) for a in (pools.pool_in, pools.valid, src))
        res, _ = run_batched(
            lambda x, p: fn(x, pool, valid, pool_src, p), row_batches((tokens, positions), batch, rows=sel)
        )
        if res is not None:
            out[sel] = res
    return out


def _parts(f: FlowSpec, channels: int, grid):
    flow = build_flow(f, channels)
    pe = jnp.asarray(positional_encoding_2d(f.cond_dim, *grid))

    def init_params(key):
        return flow.init(key, jnp.zeros((1, channels)), jnp.zeros((1, f.cond_dim)))["params"]

    def make_tx(total, spe):
        warm = int(f.warmup_epochs * spe)  # linear from lr/10, then cosine (the released recipe)
        sched = optax.warmup_cosine_decay_schedule(f.lr / 10, f.lr, max(warm, 0), max(total, warm + 1), end_value=0.0)
        return optax.adam(sched), sched

    return flow, pe, init_params, make_tx


def train_flow(f: FlowSpec, feats: np.ndarray, pools, pool_idx: np.ndarray, workdir: str | None, opts: LoopOptions):
    """Train (or resume) the flow on the training images' residuals. Returns loop.TrainResult.

    opts: the loop's options (loop.LoopOptions; name "flow"; devices: train.devices, shared with the
    reconstructor's training)."""
    log = opts.log
    n, gh, gw, c = feats.shape
    if pools.src is None:
        log(
            "flow: these pools record no token sources (fitted before the flow existed); training "
            "residuals are taken against the whole pool"
        )
    res = compute_residuals(feats, pools, pool_idx, np.arange(n, dtype=np.int32))
    flow, pe, init_params, make_tx = _parts(f, c, (gh, gw))

    def loss_fn(params, arrays, idx, step):
        (r,) = arrays
        b = r.shape[0]
        z, logdet = flow.apply({"params": params}, r.reshape(b * gh * gw, c), jnp.tile(pe, (b, 1)))
        return flow_loss(z, logdet)

    objective = Objective(init_params, loss_fn, make_tx, flow_fingerprint(f, c))
    return training_loop(f, f.seed, (res,), objective, workdir, dataclasses.replace(opts, name="flow"))


def calibrate_flow(f: FlowSpec, params, feats: np.ndarray, pools, batch: int = 64) -> np.ndarray:
    """L_ref per pool: the largest per-position log-likelihood over the class's held-out normal images."""
    n, gh, gw, c = feats.shape
    flow = build_flow(f, c)
    fn = jax.jit(flow_logp_fn(flow, (gh, gw)), static_argnums=(5,))
    ref = np.zeros(len(pools.class_names), np.float32)
    for k, cls in enumerate(pools.class_names):
        pos = pools.held_out.get(cls, np.zeros(0, int))
        if len(pos) == 0:  # no held-out image: the pool's own images (optimistic, but defined)
            pos = np.unique(pools.src[k][pools.src[k] >= 0]) if pools.src is not None else np.arange(min(n, batch))
        pool, valid = jnp.asarray(pools.pool_in[k : k + 1]), jnp.asarray(pools.valid[k : k + 1])
        lp, _ = run_batched(
            lambda x: fn(params, x, pool, valid, jnp.zeros(len(x), jnp.int32), f.cond_dim),
            row_batches((feats.reshape(n, gh * gw, c),), batch, rows=pos),
        )
        ref[k] = float(np.max(lp)) if lp is not None else -np.inf
    return ref


def save_flow_reference(directory: str, ref: np.ndarray, class_names) -> None:
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "flow.json"), "w") as f:
        json.dump({"logp_ref": {c: float(r) for c, r in zip(class_names, ref)}}, f, indent=2)


def load_flow_reference(directory: str, class_names) -> np.ndarray:
    path = os.path.join(directory, "flow.json")
    if not os.path.isfile(path):
        raise MissingInputError(f"no flow calibration at {path}: train with scoring.mpo=flow first (--mode=train)")
    with open(path) as f:
        ref = json.load(f)["logp_ref"]
    missing = [c for c in class_names if c not in ref]
    if missing:
        raise MissingInputError(f"{path} has no flow calibration for pool(s) {missing}")
    return np.asarray([ref[c] for c in class_names], np.float32)


def restore_flow(workdir: str, f: FlowSpec, channels: int, grid):
    """(flow module, params, step) of the latest flow checkpoint in workdir."""
    flow, _, init_params, make_tx = _parts(f, channels, grid)
    params, step = restore_trained(workdir, f, "flow", init_params, make_tx, flow_fingerprint(f, channels))
    return flow, params, step
