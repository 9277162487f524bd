"""Jittable masks: exact counts, BEiT block statistics, top-k ties, foreground weights."""
import jax
import jax.numpy as jnp
import numpy as np

from maskad_jax import masks


def test_random_mask_has_exactly_k_ones_and_is_seeded():
    f = jax.jit(jax.vmap(lambda k: masks.random_mask(k, 196, 150)))
    m = np.asarray(f(jax.random.split(jax.random.key(0), 64)))
    assert (m.sum(1) == 150).all()
    np.testing.assert_array_equal(m, np.asarray(f(jax.random.split(jax.random.key(0), 64))))
    assert not (m[0] == m[1]).all()


def test_block_mask_is_a_union_of_rectangles_within_budget():
    from scipy import ndimage
    f = jax.jit(jax.vmap(lambda k: masks.block_mask(k, (14, 14), 70)))
    m = np.asarray(f(jax.random.split(jax.random.key(1), 200))).reshape(200, 14, 14)
    counts = m.sum((1, 2))
    assert counts.max() <= 70 and (counts == 70).mean() > 0.8  # BEiT's loop usually hits the target exactly
    # Blocks: far fewer connected pieces than a random mask of the same size.
    rnd = np.asarray(jax.vmap(lambda k: masks.random_mask(k, 196, 70))(jax.random.split(jax.random.key(2), 50)))
    pieces_block = np.mean([ndimage.label(mm)[1] for mm in m[:50]])
    pieces_random = np.mean([ndimage.label(mm.reshape(14, 14))[1] for mm in rnd])
    assert pieces_block < 0.3 * pieces_random


def test_topk_mask_counts_ties():
    s = jnp.asarray([0.1, 0.9, 0.5, 0.9, 0.2])
    np.testing.assert_array_equal(masks.topk_mask(s, 1), [0, 1, 0, 1, 0])  # tie at the threshold adds a patch
    np.testing.assert_array_equal(masks.topk_mask(s, 3), [0, 1, 1, 1, 0])


def test_foreground_weights_pick_out_an_object():
    h = np.zeros((6, 6, 4), np.float32)
    h[2:4, 2:4] = 5.0  # an "object" on a flat background
    w = np.asarray(masks.foreground_weights(jnp.asarray(h))).reshape(6, 6)
    assert w[2:4, 2:4].min() == 1.0 and w[0, 0] == 0.0
    picks = np.asarray(jax.vmap(lambda k: masks.foreground_mask(k, jnp.asarray(w.ravel()), 4))(
        jax.random.split(jax.random.key(0), 100))).reshape(100, 6, 6)
    assert picks[:, 2:4, 2:4].mean() > 5 * picks[:, 0:2, 0:2].mean()
