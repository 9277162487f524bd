"""Greedy k-center (coreset) selection and nearest-neighbour search, jitted.

greedy_kcenter: start at index `start`; repeatedly add the point farthest (L2) from the selected
set (Sener & Savarese 2018, as PatchCore/PMAD use it). An optional Gaussian random projection
to `projection_dim` dimensions (seeded) measures the distances; the selected points keep their
full features.
extend_kcenter: the same greedy rule continued from an existing set of centres (--mode=update).
nearest_in_pools: nearest for a batch of images, each against its own class's pool.
nearest: the L2 nearest pool row of each query, in chunks of the pool so memory stays bounded.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np


@functools.partial(jax.jit, static_argnames=("k",))
def _kcenter(x, k: int, start):
    sq = jnp.sum(x * x, axis=1)

    def dist_to(i):
        return jnp.maximum(sq - 2 * x @ x[i] + sq[i], 0.0)

    def body(t, carry):
        idx, mind = carry
        nxt = jnp.argmax(mind)
        return idx.at[t].set(nxt), jnp.minimum(mind, dist_to(nxt))

    idx = jnp.zeros((k,), jnp.int32).at[0].set(start)
    idx, _ = jax.lax.fori_loop(1, k, body, (idx, dist_to(start)))
    return idx


def greedy_kcenter(x: np.ndarray, k: int, *, start: int = 0, projection_dim: int = 0, seed: int = 0) -> np.ndarray:
    """Indices of k points of x (N, D) chosen by greedy k-center from `start`."""
    n, d = x.shape
    k = int(min(max(k, 1), n))
    xj = jnp.asarray(x, jnp.float32)
    if projection_dim and projection_dim < d:
        proj = np.random.default_rng(seed).normal(size=(d, projection_dim)).astype(np.float32) / np.sqrt(projection_dim)
        xj = jnp.dot(xj, jnp.asarray(proj), precision=jax.lax.Precision.HIGHEST)
    return np.asarray(_kcenter(xj, k, jnp.int32(start)))


@functools.partial(jax.jit, static_argnames=("k",))
def _extend(x, mind, k: int):
    sq = jnp.sum(x * x, axis=1)

    def body(t, carry):
        idx, mind = carry
        nxt = jnp.argmax(mind)
        return idx.at[t].set(nxt), jnp.minimum(mind, jnp.maximum(sq - 2 * x @ x[nxt] + sq[nxt], 0.0))

    idx, _ = jax.lax.fori_loop(0, k, body, (jnp.zeros((k,), jnp.int32), mind))
    return idx


def extend_kcenter(old: np.ndarray, new: np.ndarray, k: int, *, projection_dim: int = 0, seed: int = 0) -> np.ndarray:
    """Indices of k points of `new` (M, D) chosen by greedy k-center continued from the centres `old`
    (P, D): each pick is the new point farthest from the old centres and the earlier picks (under
    the same seeded projection as greedy_kcenter), so a pool grows by what it does not yet cover."""
    m, d = new.shape
    k = int(min(max(k, 0), m))
    if k == 0:
        return np.zeros((0,), np.int32)
    xo, xn = jnp.asarray(old, jnp.float32), jnp.asarray(new, jnp.float32)
    if projection_dim and projection_dim < d:
        proj = np.random.default_rng(seed).normal(size=(d, projection_dim)).astype(np.float32) / np.sqrt(projection_dim)
        xo = jnp.dot(xo, jnp.asarray(proj), precision=jax.lax.Precision.HIGHEST)
        xn = jnp.dot(xn, jnp.asarray(proj), precision=jax.lax.Precision.HIGHEST)
    mind = nearest(xn, xo)[0] if len(old) else jnp.full((m,), jnp.inf, jnp.float32)
    return np.asarray(_extend(xn, mind, k))


def nearest(queries: jax.Array, pool: jax.Array, pool_valid: jax.Array | None = None, chunk: int = 4096):
    """(squared distance, index) of the nearest valid pool row for each query row. Jittable."""
    p = pool.shape[0]
    chunk = min(chunk, p)
    pad = (-p) % chunk
    valid = jnp.ones((p,), bool) if pool_valid is None else pool_valid
    pool = jnp.pad(pool, ((0, pad), (0, 0)))
    valid = jnp.pad(valid, (0, pad))
    qsq = jnp.sum(queries * queries, axis=-1)
    hp = jax.lax.Precision.HIGHEST

    def step(carry, xs):
        best_d, best_i = carry
        block, vblock, offset = xs
        d = qsq[:, None] - 2 * jnp.dot(queries, block.T, precision=hp) + jnp.sum(block * block, -1)[None]
        d = jnp.where(vblock[None], jnp.maximum(d, 0.0), jnp.inf)
        j = jnp.argmin(d, axis=1)
        dj = jnp.take_along_axis(d, j[:, None], 1)[:, 0]
        better = dj < best_d
        return (jnp.where(better, dj, best_d), jnp.where(better, j + offset, best_i)), None

    nchunks = pool.shape[0] // chunk
    xs = (pool.reshape(nchunks, chunk, -1), valid.reshape(nchunks, chunk), jnp.arange(nchunks) * chunk)
    init = (jnp.full(queries.shape[:1], jnp.inf), jnp.zeros(queries.shape[:1], jnp.int32))
    (d, i), _ = jax.lax.scan(step, init, xs)
    return d, i


def nearest_in_pools(queries: jax.Array, pools: jax.Array, valid: jax.Array, pool_idx: jax.Array):
    """nearest for each image's queries (B, n, C) in its own pool pools[pool_idx] (pools (K, P, C),
    valid (K, P)): (squared distance, index), each (B, n). Jittable.

    With one pool (K = 1) the pool is passed unbatched: gathered per image, XLA's CPU compiler (jaxlib
    0.10.2 with its YNNPACK fusions on, as they are outside run.py: serve.py, notebooks) turns the
    gather into a broadcast and fuses the distance computation wrongly for batches of two or more
    (tests/test_scoring.py keeps this checked)."""
    if pools.shape[0] == 1:
        return jax.vmap(nearest, in_axes=(0, None, None))(queries, pools[0], valid[0])
    return jax.vmap(nearest)(queries, pools[pool_idx], valid[pool_idx])


def assign_pools(h, pools_dev):
    """(B,) index of the pool whose nearest tokens are closest on average to each image's tokens."""
    b, gh, gw, c = h.shape
    tok = h.reshape(b, gh * gw, c)

    def per_pool(pool, valid):
        d, _ = jax.vmap(lambda t: nearest(t, pool, valid))(tok)
        return jnp.mean(jnp.sqrt(d), axis=1)

    dist = jax.vmap(per_pool, out_axes=1)(pools_dev["pool_in"], pools_dev["valid"])
    return jnp.argmin(dist, axis=1).astype(jnp.int32)
