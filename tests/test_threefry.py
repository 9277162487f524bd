"""maskad_jax.engine.threefry against jax.random itself (the peer): the same bits for every function."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from maskad_jax.engine import threefry

SEEDS = [0, 1, 7, 2**31 - 1, -1, -12345]

# jitted once per shape (the hash is a lax loop: compiled per call when run op by op)
fold_in = jax.jit(threefry.fold_in)
split = jax.jit(threefry.split, static_argnums=1)
bits = jax.jit(threefry.bits, static_argnums=1)
uniform = jax.jit(threefry.uniform, static_argnums=1)
randint = jax.jit(threefry.randint, static_argnums=1)


def typed_and_raw(seed):
    return jax.random.key(seed), threefry.key(jnp.int32(seed))


@pytest.mark.parametrize("seed", SEEDS)
def test_key_fold_in_and_split_match_jax_random(seed):
    typed, raw = typed_and_raw(seed)
    np.testing.assert_array_equal(threefry.key(seed), jax.random.key_data(typed))
    for data in (0, 1, 0x5C0E, 2**31 - 1, -3):
        np.testing.assert_array_equal(
            fold_in(raw, jnp.int32(data)), jax.random.key_data(jax.random.fold_in(typed, jnp.int32(data)))
        )
    for num in (1, 2, 3, 10, 257):
        np.testing.assert_array_equal(split(raw, num), jax.random.key_data(jax.random.split(typed, num)))


@pytest.mark.parametrize("seed", SEEDS)
def test_bits_uniform_and_randint_match_jax_random(seed):
    typed, raw = typed_and_raw(seed)
    for shape in ((), (1,), (5,), (64,), (3, 7), (1000,)):
        np.testing.assert_array_equal(bits(raw, shape), jax.random.bits(typed, shape))
        np.testing.assert_array_equal(uniform(raw, shape), jax.random.uniform(typed, shape))
        # scaled: compared inside jit, where XLA may fuse the multiply-add in both alike (op by op, an
        # unfused multiply and add can round 1 ulp away from the fused one)
        np.testing.assert_array_equal(
            uniform(raw, shape, -1.2039728, 1.2039728),
            jax.jit(lambda k: jax.random.uniform(k, shape, minval=-1.2039728, maxval=1.2039728))(typed),
        )
    for lo, hi in ((0, 1), (0, 2), (0, 13), (3, 17), (0, 100_000), (5, 5), (9, 2), (-40, 40)):
        np.testing.assert_array_equal(randint(raw, (), lo, hi), jax.random.randint(typed, (), lo, hi))
        np.testing.assert_array_equal(randint(raw, (11,), lo, hi), jax.random.randint(typed, (11,), lo, hi))


def test_same_bits_under_jit_and_vmap_with_traced_data():
    """As the scorer uses it: keys folded from traced image ids inside jit and vmap."""
    ids = jnp.arange(-5, 300, 7, dtype=jnp.int32)

    @jax.jit
    def ours(ids):
        keys = jax.vmap(lambda i: threefry.fold_in(threefry.fold_in(threefry.key(jnp.int32(3)), 0x5C0E), i))(ids)
        return jax.vmap(lambda k: (threefry.uniform(k, (49,)), threefry.randint(k, (), 0, jnp.int32(6))))(keys)

    @jax.jit
    def theirs(ids):
        keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.fold_in(jax.random.key(3), 0x5C0E), i))(ids)
        return jax.vmap(lambda k: (jax.random.uniform(k, (49,)), jax.random.randint(k, (), 0, 6)))(keys)

    for a, b in zip(ours(ids), theirs(ids)):
        np.testing.assert_array_equal(a, b)


def test_typed_keys_are_accepted_and_bad_keys_named():
    typed = jax.random.key(11)
    np.testing.assert_array_equal(threefry.split(typed, 4), jax.random.key_data(jax.random.split(typed, 4)))
    with pytest.raises(TypeError, match="uint32 of shape"):
        threefry.split(jnp.zeros((3,), jnp.int32))


def test_no_random_primitive_in_the_traced_draw():
    """The point of the module: the draw traces to plain integer ops an exporter can convert."""
    jaxpr = jax.make_jaxpr(lambda i: threefry.uniform(threefry.split(threefry.fold_in(threefry.key(0), i))[1], (8,)))(
        jnp.int32(4)
    )
    names = {e.primitive.name for e in jaxpr.jaxpr.eqns}
    assert not {n for n in names if n.startswith("random_") or n == "threefry2x32"}, names
