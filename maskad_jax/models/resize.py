"""Bilinear resizing with align_corners=True, as torch's `interpolate(..., align_corners=True)`, and
with half-pixel centres (align_corners=False, PatchCore's feature alignment: resize_half_pixel).

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
    if out_size == 1 or in_size == 1:
        m = np.zeros((out_size, in_size), np.float32)
        m[:, 0] = 1.0
        return m
    return _linear_weights(np.arange(out_size) * (in_size - 1) / (out_size - 1), in_size)


@functools.lru_cache(maxsize=None)
def half_pixel_matrix(in_size: int, out_size: int) -> np.ndarray:
    """(out_size, in_size) bilinear weights with half-pixel centres: output j samples the input at
    (j + 0.5) * in / out - 0.5, clamped to the edge samples (torch's interpolate(mode="bilinear",
    align_corners=False), no anti-aliasing)."""
    return _linear_weights(np.clip((np.arange(out_size) + 0.5) * (in_size / out_size) - 0.5, 0, in_size - 1), in_size)


def _linear_weights(pos: np.ndarray, in_size: int) -> np.ndarray:
    """(len(pos), in_size) float32: each row mixes the two input samples around its position (in [0, in_size - 1])."""
    lo = np.minimum(np.floor(pos).astype(int), in_size - 1)
    hi = np.minimum(lo + 1, in_size - 1)
    w = pos - lo
    m = np.zeros((len(pos), in_size), np.float64)
    rows = np.arange(len(pos))
    np.add.at(m, (rows, lo), 1.0 - w)
    np.add.at(m, (rows, hi), w)
    return m.astype(np.float32)


def _apply(x: jax.Array, rh: np.ndarray, rw: np.ndarray) -> jax.Array:
    hp = jax.lax.Precision.HIGHEST
    x = jnp.einsum("oh,...hwc->...owc", jnp.asarray(rh, x.dtype), x, precision=hp)
    return jnp.einsum("pw,...owc->...opc", jnp.asarray(rw, x.dtype), x, precision=hp)


def resize_half_pixel(x: jax.Array, size: tuple[int, int]) -> jax.Array:
    """Resize (..., H, W, C) to (..., size[0], size[1], C) with half-pixel centres."""
    h, w = x.shape[-3], x.shape[-2]
    if (h, w) == tuple(size):
        return x
    return _apply(x, half_pixel_matrix(h, size[0]), half_pixel_matrix(w, size[1]))


def resize_align_corners(x: jax.Array, size: tuple[int, int]) -> jax.Array:
    """Resize (..., H, W, C) to (..., size[0], size[1], C)."""
    h, w = x.shape[-3], x.shape[-2]
    if (h, w) == tuple(size):
        return x
    return _apply(x, interpolation_matrix(h, size[0]), interpolation_matrix(w, size[1]))


def resize_map_align_corners(x: jax.Array, size: tuple[int, int]) -> jax.Array:
    """Resize (..., H, W) maps (no channel axis)."""
    return resize_align_corners(x[..., None], size)[..., 0]
