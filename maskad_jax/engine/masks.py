"""Patch masks as jittable functions of PRNG keys (1 = masked), over a flattened row-major grid.

- random_mask: exactly k of n positions (the k largest of n uniforms, as the released code's argsort).
- block_mask: BEiT's block-wise generator (rectangles of >= min_patches, log-uniform aspect in
  [aspect, 1/aspect], added while they fit the remaining budget; up to 10 tries per rectangle;
  stops when the target is reached or a round of tries adds nothing). Same sampling as the
  released code, written with lax loops so it runs inside jit/vmap.
- foreground_mask: k positions drawn without replacement with probability proportional to a
  per-position foreground weight (Gumbel top-k). See `foreground_weights` for the definition.
- topk_mask: the prototype-oriented mask: positions whose score is >= the k-th largest (ties add).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from maskad_jax.engine import threefry


def random_mask(key, n: int, k: int) -> jax.Array:
    noise = threefry.uniform(key, (n,))
    thresh = jnp.sort(noise)[n - k] if k > 0 else jnp.inf
    return noise >= thresh if k > 0 else jnp.zeros((n,), bool)


def block_mask(
    key,
    grid: tuple[int, int],
    num_patches: int,
    min_patches: int = 4,
    aspect: float = 0.3,
    max_rounds: int | None = None,
) -> jax.Array:
    gh, gw = grid
    rows = jnp.arange(gh)[:, None]
    cols = jnp.arange(gw)[None, :]
    log_lo, log_hi = math.log(aspect), math.log(1.0 / aspect)
    max_rounds = max_rounds or num_patches + 1

    def try_once(carry, key):
        mask, budget, done = carry
        k1, k2, k3, k4 = threefry.split(key, 4)
        area = min_patches + (budget - min_patches) * threefry.uniform(k1)
        ar = jnp.exp(threefry.uniform(k2, (), log_lo, log_hi))
        h = jnp.round(jnp.sqrt(area * ar)).astype(jnp.int32)
        w = jnp.round(jnp.sqrt(area / ar)).astype(jnp.int32)
        fits = (w < gw) & (h < gh)
        top = threefry.randint(k3, (), 0, jnp.maximum(gh - h + 1, 1))
        left = threefry.randint(k4, (), 0, jnp.maximum(gw - w + 1, 1))
        rect = (rows >= top) & (rows < top + h) & (cols >= left) & (cols < left + w)
        new = jnp.sum(rect & ~mask)
        accept = fits & ~done & (new > 0) & (new <= budget)
        mask = jnp.where(accept, mask | rect, mask)
        return (mask, budget, done | accept), jnp.where(accept, new, 0)

    def round_body(state):
        mask, count, key, _, r = state
        key, sub = threefry.split(key)
        (mask, _, _), added = jax.lax.scan(try_once, (mask, num_patches - count, False), threefry.split(sub, 10))
        delta = jnp.sum(added)
        return mask, count + delta, key, delta == 0, r + 1

    def cond(state):
        _, count, _, stalled, r = state
        return (count < num_patches) & ~stalled & (r < max_rounds)

    init = (jnp.zeros((gh, gw), bool), jnp.int32(0), threefry.key_data(key), False, 0)
    mask, *_ = jax.lax.while_loop(cond, round_body, init)
    return mask.reshape(-1)


def foreground_weights(h, xp=jnp):
    """Foreground weight of each position of a (..., gh, gw, C) feature map, in [0, 1]: (..., gh*gw).

    Definition (ours; the paper names foreground masking without defining it, the released code
    has it off): the L2 distance of each position's feature to the image's median feature,
    min-max normalised per image. Plain background is close to the median feature of an object
    image; on a texture all positions are about equally far, so the mask degrades gracefully to a
    uniform random mask there.

    xp: jax.numpy (jittable) or numpy: training computes the weights of its whole feature cache
    once on the host with numpy (XLA's CPU sort, which the median needs, is several times slower).
    """
    flat = h.reshape(h.shape[:-3] + (-1, h.shape[-1]))
    d = xp.linalg.norm(flat - xp.median(flat, axis=-2, keepdims=True), axis=-1)
    lo, hi = d.min(axis=-1, keepdims=True), d.max(axis=-1, keepdims=True)
    return (d - lo) / xp.maximum(hi - lo, 1e-12)


def foreground_mask(key, weights: jax.Array, k: int) -> jax.Array:
    g = jax.random.gumbel(key, weights.shape)
    score = jnp.log(weights + 1e-3) + g
    return topk_mask(score, k)


def topk_mask(scores: jax.Array, k: int) -> jax.Array:
    """Positions whose score is >= the k-th largest score (k >= 1)."""
    thresh = jnp.sort(scores)[scores.shape[0] - k]
    return scores >= thresh
