"""The conditional flow: inverse, log-determinant, positional encoding, and parity with FrEIA's AllInOneBlock."""

import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import torch_or_skip

from maskad_jax.common.specs import resolve
from maskad_jax.models.flow import ConditionalFlow, flow_loss, log_likelihood, positional_encoding_2d


def _flow_and_vars(channels=7, cond=4, blocks=3, clamp_form="current", seed=0, scale=0.3):
    flow = ConditionalFlow(channels=channels, cond_dim=cond, blocks=blocks, clamp_form=clamp_form, seed=seed)
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.normal(size=(5, channels)).astype(np.float32))
    c = jnp.asarray(rng.normal(size=(5, cond)).astype(np.float32))
    params = flow.init(jax.random.key(seed), x, c)["params"]
    # Move every parameter off its initial value (the global scale and offset off the identity).
    params = jax.tree_util.tree_map(lambda p: p + scale * jnp.asarray(rng.normal(size=p.shape), p.dtype), params)
    return flow, params, x, c


@pytest.mark.parametrize("clamp_form", ["current", "legacy"])
def test_inverse_reproduces_the_input(clamp_form):
    flow, params, x, c = _flow_and_vars(channels=272, cond=128, blocks=8, clamp_form=clamp_form, scale=0.05)
    z, _ = flow.apply({"params": params}, x, c)
    back = flow.apply({"params": params}, z, c, method=flow.inverse)
    assert float(jnp.max(jnp.abs(z - x))) > 0.1  # the flow does something
    np.testing.assert_allclose(np.asarray(back), np.asarray(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("clamp_form", ["current", "legacy"])
def test_logdet_equals_the_autodiff_jacobian_logdet(clamp_form):
    flow, params, x, c = _flow_and_vars(channels=6, cond=4, blocks=3, clamp_form=clamp_form, seed=1)
    _, logdet = flow.apply({"params": params}, x, c)
    for i in range(x.shape[0]):
        jac = jax.jacfwd(lambda v: flow.apply({"params": params}, v[None], c[i : i + 1])[0][0])(x[i])
        sign, ref = np.linalg.slogdet(np.asarray(jac, np.float64))
        assert sign != 0
        np.testing.assert_allclose(float(logdet[i]), ref, rtol=1e-4, atol=1e-4)


def test_positional_encoding_hand_worked_entries():
    pe = positional_encoding_2d(8, 3, 5)  # half = 4: frequencies exp(-k ln(1e4)/4) for k = 0, 2
    assert pe.shape == (15, 8)
    f1 = math.exp(-2 * math.log(1e4) / 4)  # = 0.01
    x, y = 3, 2
    row = pe[y * 5 + x]
    np.testing.assert_allclose(
        row,
        [
            math.sin(x),
            math.cos(x),
            math.sin(x * f1),
            math.cos(x * f1),
            math.sin(y),
            math.cos(y),
            math.sin(y * f1),
            math.cos(y * f1),
        ],
        atol=1e-6,
    )
    with pytest.raises(ValueError, match="multiple of 4"):
        positional_encoding_2d(6, 2, 2)


def test_log_likelihood_of_a_standard_normal_sample():
    # With the identity map (z = x, logdet 0) log p is the standard normal log-density per dimension.
    z = jnp.asarray([[0.0, 0.0], [1.0, -2.0]])
    lp = log_likelihood(z, jnp.zeros(2))
    np.testing.assert_allclose(
        np.asarray(lp), [-0.5 * math.log(2 * math.pi), (-0.5 * 5 - math.log(2 * math.pi)) / 2], rtol=1e-6
    )
    np.testing.assert_allclose(
        float(flow_loss(z, jnp.zeros(2))), float(np.mean(np.log1p(np.exp(-np.asarray(lp))))), rtol=1e-6
    )


def test_matches_freia_allinoneblock():
    torch = torch_or_skip()
    Ff = pytest.importorskip("FrEIA.framework")
    Fm = pytest.importorskip("FrEIA.modules")
    channels, cond, blocks = 10, 8, 3
    # FrEIA 0.2 (the PyPI release) has the legacy clamp: clamp * tanh(a).
    flow, params, x, c = _flow_and_vars(channels, cond, blocks, clamp_form="legacy", seed=2)
    hidden = int(round(2.0 * (channels - channels // 2 + cond)))

    def subnet(c_in, c_out):
        return torch.nn.Sequential(torch.nn.Linear(c_in, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, c_out))

    inn = Ff.SequenceINN(channels)
    for _ in range(blocks):
        inn.append(
            Fm.AllInOneBlock,
            cond=0,
            cond_shape=(cond,),
            subnet_constructor=subnet,
            affine_clamping=1.9,
            global_affine_type="SOFTPLUS",
            permute_soft=True,
        )
    bound = flow.bind({"params": params})
    with torch.no_grad():
        for i, blk in enumerate(inn.module_list):
            p = params[f"layers_{i}"]
            blk.subnet[0].weight.copy_(torch.tensor(np.asarray(p["fc1"]["kernel"]).T))
            blk.subnet[0].bias.copy_(torch.tensor(np.asarray(p["fc1"]["bias"])))
            blk.subnet[2].weight.copy_(torch.tensor(np.asarray(p["fc2"]["kernel"]).T))
            blk.subnet[2].bias.copy_(torch.tensor(np.asarray(p["fc2"]["bias"])))
            blk.global_scale.copy_(torch.tensor(np.asarray(p["global_scale"]))[None])
            blk.global_offset.copy_(torch.tensor(np.asarray(p["global_offset"]))[None])
            w = np.asarray(bound.layers[i].w_perm)
            blk.w_perm.copy_(torch.tensor(w))
            blk.w_perm_inv.copy_(torch.tensor(w.T))
        zt, jt = inn(torch.tensor(np.asarray(x)), c=[torch.tensor(np.asarray(c))])
    z, logdet = flow.apply({"params": params}, x, c)
    np.testing.assert_allclose(np.asarray(z), zt.numpy(), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.asarray(logdet), jt.numpy(), rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------ training, residuals, scoring
def _flow_config(**flow):
    from configs import default

    c = default.get_config()
    r = c.model.reconstructor
    r.embed_dim, r.encoder_depth, r.decoder_depth, r.num_heads = 32, 1, 1, 2
    c.fit.pool_ratio, c.fit.projection_dim = 0.25, 0
    c.flow.blocks, c.flow.cond_dim, c.flow.epochs, c.flow.batch_size = 2, 8, 6, 4
    c.flow.warmup_epochs, c.flow.log_every, c.flow.checkpoint_every, c.flow.lr = 1, 1000, 5, 3e-3
    for k, v in flow.items():
        setattr(c.flow, k, v)
    return c


def _structured(n=24, seed=0):
    """Features with a per-position mean and small noise: what a flow of residuals can learn."""
    rng = np.random.default_rng(seed)
    base = rng.normal(size=(1, 4, 4, 6))
    return (base + 0.1 * rng.normal(size=(n, 4, 4, 6))).astype(np.float32)


def _fitted(c, h):
    from maskad_jax.training.fit import fit_pools

    return fit_pools(h, None, ["a"] * len(h), c.fit, c.seed)


def test_training_residuals_leave_the_image_out():
    from maskad_jax.training.flow_fit import residuals_fn

    tokens = jnp.asarray([[[0.0, 0.0], [5.0, 5.0]]])  # one image, two tokens
    pool = jnp.asarray([[0.0, 0.0], [1.0, 0.0], [5.0, 5.0], [4.0, 5.0]])
    src = jnp.asarray([7, 3, 7, 3])  # pool tokens 0 and 2 come from image 7 itself
    r = residuals_fn(tokens, pool, jnp.ones(4, bool), src, jnp.asarray([7]))
    np.testing.assert_allclose(np.asarray(r[0]), [[-1.0, 0.0], [1.0, 0.0]])
    r_test = residuals_fn(tokens, pool, jnp.ones(4, bool), src, jnp.asarray([-2]))  # a test image: any token
    np.testing.assert_allclose(np.asarray(r_test[0]), 0.0)


def test_flow_training_loss_falls_and_resumes_to_the_same_parameters(tmp_path):
    from maskad_jax.training.flow_fit import restore_flow, train_flow
    from maskad_jax.training.loop import LoopOptions

    c, h = _flow_config(), _structured()
    pools = _fitted(c, h)
    pidx = np.zeros(len(h), np.int32)
    full = train_flow(resolve(c).flow, h, pools, pidx, str(tmp_path / "full"), LoopOptions(log=lambda *_: None))
    assert full.steps == 36
    losses = [loss for _, loss in full.losses]
    assert np.mean(losses[-6:]) < np.mean(losses[:6]) - 0.02
    part = train_flow(
        resolve(c).flow, h, pools, pidx, str(tmp_path / "resumed"), LoopOptions(log=lambda *_: None, max_steps=5)
    )
    assert part.steps == 5
    said = []
    rest = train_flow(resolve(c).flow, h, pools, pidx, str(tmp_path / "resumed"), LoopOptions(log=said.append))
    assert any("resumed flow from step 5" in m for m in said)
    for a, b in zip(jax.tree_util.tree_leaves(full.params), jax.tree_util.tree_leaves(rest.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
    assert os.path.isfile(tmp_path / "full" / "flow_log.jsonl")
    _, restored, step = restore_flow(str(tmp_path / "full"), resolve(c).flow, h.shape[-1], (4, 4))
    assert step == 36
    for a, b in zip(jax.tree_util.tree_leaves(full.params), jax.tree_util.tree_leaves(restored)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(Exception, match="another model config"):
        restore_flow(str(tmp_path / "full"), resolve(_flow_config(blocks=3)).flow, h.shape[-1], (4, 4))


def test_flow_mpo_ranks_an_injected_defect_first():
    from maskad_jax.engine.mpo import FlowMpo
    from maskad_jax.engine.scoring import device_pools, make_score_features_fn
    from maskad_jax.models.flow import build_flow
    from maskad_jax.models.reconstructor import build_reconstructor
    from maskad_jax.training.flow_fit import calibrate_flow, train_flow
    from maskad_jax.training.loop import LoopOptions

    c, h = _flow_config(epochs=15), _structured()
    c.scoring.mpo = "flow"
    pools = _fitted(c, h)
    res = train_flow(resolve(c).flow, h, pools, np.zeros(len(h), np.int32), None, LoopOptions(log=lambda *_: None))
    ref = calibrate_flow(resolve(c).flow, res.params, h, pools)
    assert np.isfinite(ref).all()
    flow = FlowMpo(build_flow(resolve(c).flow, 6), res.params, ref, c.flow.cond_dim)
    model = build_reconstructor(resolve(c).model, 6, (4, 4))
    params = model.init(jax.random.key(0), jnp.zeros((1, 4, 4, 6)), jnp.zeros((1, 16), bool))["params"]
    test = _structured(n=2, seed=5)
    test[1, 2, 3] += 2.0  # one defective position in the second image
    fn = jax.jit(make_score_features_fn(resolve(c).scoring, model, flow), static_argnums=(6,))
    out = fn(
        params,
        device_pools(pools, flow),
        jnp.asarray(test),
        jnp.asarray(test),
        jnp.zeros(2, jnp.int32),
        jnp.arange(2),
        16,
    )
    mpo = np.asarray(out["mpo"])
    assert ((mpo >= 0) & (mpo < 1)).all()
    assert np.unravel_index(np.argmax(mpo[1]), (4, 4)) == (2, 3)
    assert mpo[1, 2, 3] > mpo[0].max()
    with pytest.raises(ValueError, match="needs the trained flow"):
        make_score_features_fn(resolve(c).scoring, model, None)


def test_flow_embedder_pools_and_repeats_the_taps_like_the_released_code():
    from configs import default
    from maskad_jax.models.flow_features import FlowEmbedder

    c = default.get_config().flow
    c.backbone.arch, c.backbone.weights, c.backbone.padding = "efficientnet-lite0", "random", "static"
    emb = FlowEmbedder.create(c)
    x = jnp.asarray(np.random.default_rng(0).uniform(size=(2, 64, 64, 3)).astype(np.float32))
    out = np.asarray(jax.jit(emb.apply)(emb.variables, x))
    assert out.shape == (2, 8, 8, emb.channels) == (2,) + emb.feature_shape(64)
    taps = [
        np.asarray(t, np.float64)
        for t in jax.jit(emb.extractor.module.apply)(emb.variables, emb.extractor.normalize(x))
    ]

    def avg3(t):  # 3x3 mean with zero padding counted (PyTorch AvgPool2d's default)
        p = np.pad(t, ((0, 0), (1, 1), (1, 1), (0, 0)))
        return sum(p[:, i : i + t.shape[1], j : j + t.shape[2]] for i in range(3) for j in range(3)) / 9.0

    fine, coarse = avg3(taps[0]), avg3(taps[1])
    ref = np.concatenate([fine, coarse.repeat(2, axis=1).repeat(2, axis=2)], axis=-1)
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-5)
