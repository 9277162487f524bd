"""Jittable masks: exact counts, BEiT block statistics, top-k ties, foreground weights."""

import jax
import jax.numpy as jnp
import numpy as np

from maskad_jax.engine import masks


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
    picks = np.asarray(
        jax.vmap(lambda k: masks.foreground_mask(k, jnp.asarray(w.ravel()), 4))(
            jax.random.split(jax.random.key(0), 100)
        )
    ).reshape(100, 6, 6)
    assert picks[:, 2:4, 2:4].mean() > 5 * picks[:, 0:2, 0:2].mean()


def test_foreground_weights_of_a_cache_with_numpy_equal_the_jitted_per_image_ones():
    from maskad_jax.training.step import foreground_weights_of_cache

    h = np.random.default_rng(3).normal(size=(5, 4, 6, 7)).astype(np.float32)
    h[1] = 2.0  # a constant map: all distances 0, weights 0 (no division by zero)
    per_image = np.stack([np.asarray(jax.jit(masks.foreground_weights)(jnp.asarray(x))) for x in h])
    np.testing.assert_allclose(foreground_weights_of_cache(h, chunk=2), per_image, atol=1e-6)
    assert per_image.shape == (5, 24) and (per_image[1] == 0).all()


def test_training_mask_from_precomputed_foreground_weights_is_the_same_mask():
    from configs import default
    from maskad_jax.training.step import foreground_weights_of_cache, sample_train_mask

    tc = default.get_config().train
    tc.mask_probs = (0.0, 0.0, 1.0)
    h = np.random.default_rng(4).normal(size=(8, 14, 14, 6)).astype(np.float32)
    w = foreground_weights_of_cache(h)
    keys = jax.random.split(jax.random.key(5), 8)
    inline = jax.vmap(lambda k, x: sample_train_mask(k, x, tc))(keys, jnp.asarray(h))
    given = jax.vmap(lambda k, x, w: sample_train_mask(k, x, tc, w))(keys, jnp.asarray(h), jnp.asarray(w))
    np.testing.assert_array_equal(np.asarray(inline), np.asarray(given))
    assert int(np.asarray(given).sum(-1).min()) >= round(tc.foreground_ratio * 196)
