"""The masked reconstructor against a plain numpy transcription of the spec's formulas."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import erf

from maskad_jax.models.reconstructor import MaskedReconstructor, count_params, patch_errors, relative_position_index


def _ln(x, scale, bias, eps=1e-6):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * scale + bias


def _gelu(x):
    return 0.5 * x * (1 + erf(x / math.sqrt(2)))


def _softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _numpy_forward(p, h, mask, grid, heads):
    """docs/method.md §4, written out in numpy (eval mode: no stochastic depth)."""
    b, gh, gw, c = h.shape
    x = h.reshape(b, gh * gw, c) @ p["input_proj"]["kernel"] + p["input_proj"]["bias"]
    w = mask.astype(np.float64)[..., None]
    x = x * (1 - w) + p["mask_token"] * w
    x = np.concatenate([np.broadcast_to(p["cls_token"], (b, 1, x.shape[-1])), x], 1)
    # BEiT relative position index, built here independently of the module's helper.
    n = gh * gw
    idx = np.zeros((n + 1, n + 1), int)
    for a in range(n):
        for bb in range(n):
            ha, wa, hb, wb = a // gw, a % gw, bb // gw, bb % gw
            idx[a + 1, bb + 1] = (ha - hb + gh - 1) * (2 * gw - 1) + (wa - wb + gw - 1)
    nd = (2 * gh - 1) * (2 * gw - 1) + 3
    idx[0, :], idx[:, 0], idx[0, 0] = nd - 3, nd - 2, nd - 1
    bias = p["rel_pos_bias"]["table"][idx].transpose(2, 0, 1)
    blocks = sorted([k for k in p if k.startswith("encoder_")], key=lambda k: int(k.split("_")[1])) + sorted(
        [k for k in p if k.startswith("decoder_")], key=lambda k: int(k.split("_")[1])
    )
    d = x.shape[-1]
    hd = d // heads
    for name in blocks:
        bp = p[name]
        y = _ln(x, bp["norm1"]["scale"], bp["norm1"]["bias"])
        qkv = y @ bp["attn"]["qkv"]["kernel"]
        q = qkv[..., :d] + bp["attn"]["q_bias"]
        k = qkv[..., d : 2 * d]
        v = qkv[..., 2 * d :] + bp["attn"]["v_bias"]
        split = lambda t: t.reshape(b, -1, heads, hd).transpose(0, 2, 1, 3)
        q, k, v = split(q) * hd**-0.5, split(k), split(v)
        a = _softmax(q @ k.transpose(0, 1, 3, 2) + bias)
        o = (a @ v).transpose(0, 2, 1, 3).reshape(b, -1, d)
        o = o @ bp["attn"]["proj"]["kernel"] + bp["attn"]["proj"]["bias"]
        x = x + bp["gamma_1"] * o
        y = _ln(x, bp["norm2"]["scale"], bp["norm2"]["bias"])
        y = _gelu(y @ bp["fc1"]["kernel"] + bp["fc1"]["bias"]) @ bp["fc2"]["kernel"] + bp["fc2"]["bias"]
        x = x + bp["gamma_2"] * y
    out = x[:, 1:] @ p["output_proj"]["kernel"] + p["output_proj"]["bias"]
    return out.reshape(b, gh, gw, c)


def _model(**kw):
    args = dict(in_channels=12, grid=(4, 5), embed_dim=32, encoder_depth=2, decoder_depth=1, num_heads=4)
    args.update(kw)
    return MaskedReconstructor(**args)


@pytest.mark.parametrize("attention", ["einsum", "jax_xla"])
def test_forward_matches_numpy_reference_of_the_spec(attention):
    model = _model(attention=attention)
    rng = np.random.default_rng(0)
    h = rng.normal(size=(3, 4, 5, 12)).astype(np.float32)
    mask = rng.uniform(size=(3, 20)) < 0.5
    params = model.init(jax.random.key(0), h, mask)["params"]
    # Perturb the zero/constant-initialised parameters so that every term is exercised.
    params = jax.tree_util.tree_map(
        lambda x: np.asarray(x) + 0.05 * rng.normal(size=x.shape).astype(np.float32), params
    )
    ours = np.asarray(model.apply({"params": params}, h, mask, deterministic=True))
    ref = _numpy_forward(
        jax.tree_util.tree_map(lambda x: np.asarray(x, np.float64), params), h.astype(np.float64), mask, (4, 5), 4
    )
    np.testing.assert_allclose(ours, ref, atol=2e-4, rtol=1e-4)


def test_relative_position_index_hand_worked_entries():
    idx = relative_position_index((14, 14))
    assert idx.shape == (197, 197)
    assert idx[0, 0] == 731 and idx[0, 5] == 729 and idx[5, 0] == 730
    assert idx[1, 1] == 13 * 27 + 13  # same patch: zero offset
    assert idx[1, 2] == 13 * 27 + 12  # key one column to the right of the query: w_a - w_b = -1
    assert idx[1 + 14, 1] == 14 * 27 + 13  # query one row below the key


def test_initialisation_follows_the_spec():
    model = _model(embed_dim=64, encoder_depth=2, decoder_depth=2)
    p = model.init(jax.random.key(1), jnp.zeros((1, 4, 5, 12)), jnp.zeros((1, 20), bool))["params"]
    k = np.asarray(p["encoder_0"]["fc1"]["kernel"])
    assert np.abs(k).max() <= 0.02 + 1e-7 and 0.010 < k.std() < 0.014  # N(0, .02) cut at 1 std: std ~ 0.0108
    for i, name in enumerate(["encoder_0", "encoder_1", "decoder_0", "decoder_1"], start=1):
        proj = np.asarray(p[name]["attn"]["proj"]["kernel"])
        assert np.abs(proj).max() <= 0.02 / math.sqrt(2 * i) + 1e-7
        np.testing.assert_allclose(p[name]["gamma_1"], 0.1)
        assert not np.any(p[name]["attn"]["q_bias"])
    assert not np.any(p["rel_pos_bias"]["table"])


def test_eval_mode_is_deterministic_and_train_mode_drops_paths():
    model = _model(drop_path=0.5, encoder_depth=3, decoder_depth=3, layer_scale_init=1.0)
    h = jnp.asarray(np.random.default_rng(0).normal(size=(8, 4, 5, 12)).astype(np.float32))
    m = jnp.zeros((8, 20), bool)
    v = model.init(jax.random.key(0), h, m)
    a = model.apply(v, h, m, deterministic=True)
    b = model.apply(v, h, m, deterministic=True)
    np.testing.assert_array_equal(a, b)
    c = model.apply(v, h, m, deterministic=False, rngs={"dropout": jax.random.key(3)})
    assert float(jnp.abs(a - c).max()) > 0.05 * float(jnp.abs(a).max())


def test_paper_config_parameter_count():
    """The released code's config (dim 768, 10 blocks, C = 272) has about 71.3 M parameters."""
    model = MaskedReconstructor(in_channels=272)
    shapes = jax.eval_shape(
        lambda: model.init(jax.random.key(0), jnp.zeros((1, 14, 14, 272)), jnp.zeros((1, 196), bool))
    )
    n = count_params(shapes["params"])
    print(f"paper-config reconstructor parameters: {n:,}")
    assert n == 71_315_552


def test_patch_errors_are_l2_norms():
    a = jnp.zeros((1, 2, 2, 3))
    b = jnp.asarray(np.arange(12, dtype=np.float32).reshape(1, 2, 2, 3))
    np.testing.assert_allclose(patch_errors(a, b), [[np.sqrt(5), np.sqrt(50), np.sqrt(149), np.sqrt(302)]], rtol=1e-6)
    np.testing.assert_allclose(patch_errors(a, b, squared=True), [[5, 50, 149, 302]], rtol=1e-6)
