"""Gaussian smoothing of maps as two matrix products, equal to scipy.ndimage.gaussian_filter.

scipy's defaults: mode 'reflect' (d c b a | a b c d | d c b a, numpy's 'symmetric'), kernel radius
int(truncate * sigma + 0.5) with truncate 4. The reflection is folded into an (n, n) matrix per
axis, so a batch of maps is smoothed by two einsums inside the jitted scoring program.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np


def _reflect(i: int, n: int) -> int:
    period = 2 * n
    i = i % period
    return i if i < n else period - 1 - i


@functools.lru_cache(maxsize=None)
def gaussian_matrix(n: int, sigma: float, truncate: float = 4.0) -> np.ndarray:
    radius = int(truncate * sigma + 0.5)
    x = np.arange(-radius, radius + 1)
    w = np.exp(-0.5 * (x / sigma) ** 2)
    w /= w.sum()
    m = np.zeros((n, n), np.float64)
    for i in range(n):
        for t, wt in zip(x, w):
            m[i, _reflect(i + t, n)] += wt
    return m.astype(np.float32)


def gaussian_smooth(maps: jax.Array, sigma: float) -> jax.Array:
    """Smooth (..., H, W) maps; sigma <= 0 returns them unchanged."""
    if sigma <= 0:
        return maps
    h, w = maps.shape[-2:]
    mh, mw = jnp.asarray(gaussian_matrix(h, float(sigma))), jnp.asarray(gaussian_matrix(w, float(sigma)))
    hp = jax.lax.Precision.HIGHEST
    out = jnp.einsum("ih,...hw->...iw", mh, maps, precision=hp)
    return jnp.einsum("jw,...iw->...ij", mw, out, precision=hp)
