"""The few jax.random draws the test masks need, written with plain integer lax ops.

Bit for bit the same as jax.random (default threefry2x32 keys, `jax_threefry_partitionable` on, the
default since JAX 0.5; tests/test_threefry.py compares every function with jax.random over many keys
and shapes). Why a second spelling of the same numbers: jax.random's draws are the primitives
random_seed / random_fold_in / random_split / random_bits, which exporters such as jax2onnx cannot
reproduce (jax2onnx has no rule for random_split and lowers random_bits to ONNX RandomUniform, which
ignores the key). Written with add / xor / shift on uint32, the draw converts like any other integer
arithmetic, so an exported program draws an image's masks exactly as eval and predict do.

Keys are raw uint32 arrays of shape (2,), as jax.random.key_data gives; a typed key
(jax.random.key) is accepted and unwrapped. The algorithm is Threefry-2x32 with 20 rounds
(Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC 2011) with JAX's conventions for
seeding, splitting (the key hashed with a 64-bit counter split into two words) and folding in.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))
_PARITY = np.uint32(0x1BD11BDA)


def _u32(x):
    return lax.convert_element_type(x, np.uint32)


def key_data(key) -> jax.Array:
    """The raw (2,) uint32 words of a key (typed keys unwrapped)."""
    key = jnp.asarray(key)
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        return jax.random.key_data(key)
    if key.shape[-1:] != (2,) or key.dtype != np.uint32:
        raise TypeError(f"a threefry key is uint32 of shape (..., 2); got {key.dtype} {key.shape}")
    return key


def _rotl(x, d):
    return lax.shift_left(x, d) | lax.shift_right_logical(x, np.uint32(32) - d)


def hash2x32(k1, k2, x1, x2):
    """Threefry-2x32 of the counter words (x1, x2) under the key words (k1, k2); broadcasts.

    Five blocks of four rounds, each followed by a key injection, as a five-step loop (unrolled,
    the 20 rounds would be ~100 operations per draw in an exported graph)."""
    ks = (k1, k2, k1 ^ k2 ^ _PARITY)
    x1, x2 = x1 + ks[0], x2 + ks[1]

    def block(state):
        x1, x2, ks, rots, count = state
        for j in range(4):
            x1 = x1 + x2
            x2 = _rotl(x2, rots[0][j]) ^ x1
        count = count + np.uint32(1)  # the block number, 1..5
        x1 = x1 + ks[0]
        x2 = x2 + ks[1] + count
        return x1, x2, (ks[1], ks[2], ks[0]), (rots[1], rots[0]), count

    # a while loop, not fori_loop: jax2onnx turns a fixed-length fori_loop into a scan whose integer
    # outputs it casts to int32 (jax2onnx 0.17.1, plugins/jax/lax/scan.py), which breaks uint32 words
    rots = tuple(jnp.asarray(r, np.uint32) for r in _ROTATIONS)
    init = (x1, x2, (ks[1], ks[2], ks[0]), rots, jnp.zeros((), np.uint32))
    x1, x2, *_ = lax.while_loop(lambda s: s[4] < np.uint32(5), block, init)
    return x1, x2


def key(seed) -> jax.Array:
    """jax.random.key_data(jax.random.key(seed)) for a 32-bit integer seed: the words (0, seed)."""
    if isinstance(seed, (int, np.integer)):  # a constant: built in numpy (no int -> uint cast in the graph)
        if not -(2**31) <= int(seed) < 2**32:
            raise ValueError(f"seed {seed} is not a 32-bit integer")
        return jnp.asarray(np.array([0, int(seed) & 0xFFFFFFFF], np.uint32))
    seed = jnp.asarray(seed)
    if seed.dtype not in (np.int32, np.uint32):
        raise TypeError(f"seed must be a 32-bit integer, got {seed.dtype}")
    return jnp.stack([jnp.zeros((), np.uint32), _u32(seed)])


def _counters(shape):
    """The (hi, lo) words of a 64-bit row-major counter over shape (hi is 0 below 2**32 entries)."""
    size = int(np.prod(shape, dtype=np.int64))
    if size >= 2**32:
        raise ValueError(f"{shape}: more than 2**32 draws from one key")
    lo = lax.iota(np.uint32, size).reshape(shape)
    return jnp.zeros(shape, np.uint32), lo


def fold_in(key, data) -> jax.Array:
    """jax.random.fold_in: the key hashed with the counter (0, data)."""
    k = key_data(key)
    a, b = hash2x32(k[0], k[1], jnp.zeros((), np.uint32), _u32(jnp.asarray(data)))
    return jnp.stack([a, b])


def split(key, num: int = 2) -> jax.Array:
    """jax.random.split: (num, 2) keys, key i being the hash of the counter i."""
    k = key_data(key)
    hi, lo = _counters((num,))
    a, b = hash2x32(k[0], k[1], hi, lo)
    return jnp.stack([a, b], axis=1)


def bits(key, shape=()) -> jax.Array:
    """jax.random.bits (uint32): the two hash words of each counter, xor-ed."""
    k = key_data(key)
    hi, lo = _counters(tuple(shape))
    a, b = hash2x32(k[0], k[1], hi, lo)
    return a ^ b


def uniform(key, shape=(), minval=0.0, maxval=1.0) -> jax.Array:
    """jax.random.uniform (float32): 23 random bits as a fraction in [0, 1), scaled to [minval, maxval)."""
    minval = jnp.asarray(minval, np.float32)
    maxval = jnp.asarray(maxval, np.float32)
    # jax.random sets the 23 bits as the mantissa of a float in [1, 2) and subtracts 1: that is
    # exactly mantissa * 2**-23 (both steps are exact in float32), written without a bitcast
    # (ONNX has BitCast only from opset 26 on).
    mantissa = lax.shift_right_logical(bits(key, shape), np.uint32(32 - 23))
    floats = lax.convert_element_type(mantissa, np.float32) * np.float32(2.0**-23)
    return lax.max(minval, floats * (maxval - minval) + minval)


def randint(key, shape, minval, maxval) -> jax.Array:
    """jax.random.randint (int32) for int32 bounds: two words per draw folded modulo the span."""
    minval = jnp.asarray(minval, np.int32)
    maxval = jnp.asarray(maxval, np.int32)
    k1, k2 = split(key)
    higher, lower = bits(k1, shape), bits(k2, shape)
    span = _u32(maxval - minval)
    span = jnp.where(maxval <= minval, np.uint32(1), span)
    multiplier = lax.rem(np.uint32(2**16), span)
    multiplier = lax.rem(multiplier * multiplier, span)
    offset = lax.rem(lax.rem(higher, span) * multiplier + lax.rem(lower, span), span)
    return minval + lax.convert_element_type(offset, np.int32)
