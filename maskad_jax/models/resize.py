"""Bilinear resizing with align_corners=True, as torch's `interpolate(..., align_corners=True)`.

Output pixel j of an axis samples the input at position j * (in - 1) / (out - 1), mixing its two
neighbours linearly, with no anti-aliasing when shrinking. `jax.image.resize` differs (half-pixel
centres and anti-aliased downsampling), so MFCN-style feature alignment and the score-map
upsampling use this instead. The resize is two small interpolation matrices applied with einsum,
which XLA fuses and runs as matmuls on any backend.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np


@functools.lru_cache(maxsize=None)
def interpolation_matrix(in_size: int, out_size: int) -> np.ndarray:
    """(out_size, in_size) matrix whose rows hold the two align-corners bilinear weights."""
    m = np.zeros((out_size, in_size), np.float64)
    if out_size == 1 or in_size == 1:
        m[:, 0] = 1.0
        return m.astype(np.float32)
    pos = np.arange(out_size) * (in_size - 1) / (out_size - 1)
    lo = np.minimum(np.floor(pos).astype(int), in_size - 1)
    hi = np.minimum(lo + 1, in_size - 1)
    w = pos - lo
    rows = np.arange(out_size)
    np.add.at(m, (rows, lo), 1.0 - w)
    np.add.at(m, (rows, hi), w)
    return m.astype(np.float32)


def resize_align_corners(x: jax.Array, size: tuple[int, int]) -> jax.Array:
    """Resize (..., H, W, C) to (..., size[0], size[1], C)."""
    h, w = x.shape[-3], x.shape[-2]
    if (h, w) == tuple(size):
        return x
    rh = jnp.asarray(interpolation_matrix(h, size[0]), x.dtype)
    rw = jnp.asarray(interpolation_matrix(w, size[1]), x.dtype)
    hp = jax.lax.Precision.HIGHEST
    x = jnp.einsum("oh,...hwc->...owc", rh, x, precision=hp)
    return jnp.einsum("pw,...owc->...opc", rw, x, precision=hp)


def resize_map_align_corners(x: jax.Array, size: tuple[int, int]) -> jax.Array:
    """Resize (..., H, W) maps (no channel axis)."""
    return resize_align_corners(x[..., None], size)[..., 0]
