"""Test-time engine: OT against POT and closed forms, k-center and smoothing against plain
implementations, one compiled program, determinism and batch independence."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import ndimage

from configs import default
from maskad_jax import association
from maskad_jax.coreset import greedy_kcenter, nearest
from maskad_jax.smoothing import gaussian_smooth

ot = pytest.importorskip("ot", reason="POT is a test extra")


def test_paper_assdis_equals_pot_sinkhorn():
    rng = np.random.default_rng(0)
    e_h = rng.uniform(0, 3, size=(6, 13))
    e_r = rng.uniform(0, 3, size=(6, 13))
    eps = 0.2
    ours = np.asarray(association.paper_assdis(jnp.asarray(e_h, jnp.float32), jnp.asarray(e_r, jnp.float32), eps,
                                               iterations=2000))
    w = np.full(13, 1 / 13)
    for i in range(6):
        cost = np.abs(e_h[i][:, None] - e_r[i][None, :])
        plan = ot.sinkhorn(w, w, cost, eps, method="sinkhorn_log", numItermax=10000, stopThr=1e-10)
        assert ours[i] == pytest.approx(np.sum(plan * cost), rel=2e-3)


def test_exact_assdis_is_the_epsilon_to_zero_limit():
    rng = np.random.default_rng(1)
    e_h, e_r = rng.uniform(0, 3, size=(5, 13)), rng.uniform(0, 3, size=(5, 13))
    exact = np.asarray(association.exact_assdis(jnp.asarray(e_h), jnp.asarray(e_r)))
    w = np.full(13, 1 / 13)
    for i in range(5):
        emd = ot.emd2(w, w, np.abs(e_h[i][:, None] - e_r[i][None, :]))
        assert exact[i] == pytest.approx(emd, rel=1e-5)
    small = np.asarray(association.paper_assdis(jnp.asarray(e_h, jnp.float32), jnp.asarray(e_r, jnp.float32), 0.005,
                                                iterations=5000))
    np.testing.assert_allclose(small, exact, rtol=0.03)


def _code_sinkhorn_numpy(e_h, e_r, eps=0.1, tol=0.1, max_iter=1000):
    """M:models/Sinkhorn_distance.py transcribed (method-spec 6.6) in float64 numpy."""
    from scipy.special import logsumexp
    cos = (e_h @ e_r.T) / np.maximum(np.linalg.norm(e_h, axis=1)[:, None] * np.linalg.norm(e_r, axis=1)[None], 1e-8)
    c = 1 - cos
    p, q = c.shape
    mu, nu = np.full(p, 1 / p), np.full(q, 1 / q)
    u, v = np.zeros(p), np.zeros(q)
    for _ in range(max_iter):
        u_old = u
        u = eps * (np.log(mu + 1e-8) - logsumexp((-c + u[:, None] + v[None]) / eps, axis=1)) + u
        v = eps * (np.log(nu + 1e-8) - logsumexp(((-c + u[:, None] + v[None]) / eps).T, axis=1)) + v
        if np.abs(u - u_old).sum() < tol:
            break
    plan = np.exp((-c + u[:, None] + v[None]) / eps)
    return (plan * c).sum(1)


def test_code_assdis_follows_the_released_loop():
    rng = np.random.default_rng(2)
    e_h, e_r = rng.uniform(0.5, 3, size=(196, 12)), rng.uniform(0.5, 3, size=(196, 12))
    ours = np.asarray(association.code_assdis(jnp.asarray(e_h, jnp.float32), jnp.asarray(e_r, jnp.float32)))
    np.testing.assert_allclose(ours, _code_sinkhorn_numpy(e_h, e_r), rtol=1e-3, atol=1e-7)


def _kcenter_numpy(x, k, start=0):
    sel = [start]
    d = ((x - x[start]) ** 2).sum(1)
    for _ in range(k - 1):
        nxt = int(np.argmax(d))
        sel.append(nxt)
        d = np.minimum(d, ((x - x[nxt]) ** 2).sum(1))
    return np.asarray(sel)


def test_greedy_kcenter_selects_the_same_indices_as_numpy():
    x = np.random.default_rng(3).normal(size=(500, 16)).astype(np.float32)
    np.testing.assert_array_equal(greedy_kcenter(x, 40, start=7), _kcenter_numpy(x.astype(np.float64), 40, 7))


def test_nearest_is_chunked_exact_search():
    rng = np.random.default_rng(4)
    q, pool = rng.normal(size=(50, 8)).astype(np.float32), rng.normal(size=(1000, 8)).astype(np.float32)
    valid = rng.uniform(size=1000) < 0.7
    d, i = nearest(jnp.asarray(q), jnp.asarray(pool), jnp.asarray(valid), chunk=128)
    full = ((q[:, None] - pool[None]) ** 2).sum(-1)
    full[:, ~valid] = np.inf
    np.testing.assert_array_equal(np.asarray(i), full.argmin(1))
    np.testing.assert_allclose(np.asarray(d), full.min(1), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("shape,sigma", [((224, 224), 4.0), ((224, 224), 7.0), ((37, 50), 2.5)])
def test_gaussian_smoothing_equals_scipy(shape, sigma):
    x = np.random.default_rng(5).uniform(size=(2,) + shape).astype(np.float32)
    ours = np.asarray(gaussian_smooth(jnp.asarray(x), sigma))
    for i in range(2):
        np.testing.assert_allclose(ours[i], ndimage.gaussian_filter(x[i].astype(np.float64), sigma, mode="reflect"),
                                   atol=1e-5)


# --------------------------------------------------------------------------------------- the engine
@pytest.fixture(scope="module")
def engine():
    from maskad_jax.features import FeatureExtractor
    from maskad_jax.fit import fit_pools
    from maskad_jax.scoring import make_score_fn, pools_to_device
    from maskad_jax.train import build_reconstructor
    c = default.get_config()
    c.data.image_size = 64
    r = c.model.reconstructor
    r.embed_dim, r.encoder_depth, r.decoder_depth, r.num_heads = 32, 1, 1, 2
    c.scoring.sinkhorn_iterations = 30
    ex = FeatureExtractor.create("efficientnet-lite0", weights="random")
    model = build_reconstructor(c, ex.channels, (4, 4))
    params = model.init(jax.random.key(0), jnp.zeros((1, 4, 4, ex.channels)), jnp.zeros((1, 16), bool))["params"]
    rng = np.random.default_rng(0)
    train_imgs = jnp.asarray(rng.uniform(size=(6, 64, 64, 3)).astype(np.float32))
    h = np.asarray(ex(train_imgs))
    pools = fit_pools(h, None, ["a"] * 3 + ["b"] * 3, c.fit, seed=0)
    score = make_score_fn(c, ex, model)
    imgs = jnp.asarray(rng.uniform(size=(3, 64, 64, 3)).astype(np.float32))
    return dict(c=c, ex=ex, params=params, pools=pools_to_device(pools), score=score, imgs=imgs, raw_pools=pools)


def _call(e, imgs, pool_idx, ids):
    return e["score"](e["params"], e["ex"].variables, e["pools"], imgs, jnp.asarray(pool_idx, jnp.int32),
                      jnp.asarray(ids, jnp.int32))


def test_one_compiled_program_without_host_callbacks(engine):
    e = engine
    out = _call(e, e["imgs"], [0, 1, 0], [0, 1, 2])
    assert out["map"].shape == (3, 64, 64) and out["score"].shape == (3,)
    n0 = e["score"]._cache_size()
    for ids in ([3, 4, 5], [6, 7, 8]):
        _call(e, e["imgs"], [1, 0, 1], ids)
    assert e["score"]._cache_size() == n0  # new images and classes, no recompilation
    jaxpr = jax.make_jaxpr(e["score"])(e["params"], e["ex"].variables, e["pools"], e["imgs"],
                                       jnp.zeros(3, jnp.int32), jnp.arange(3))
    text = str(jaxpr)
    assert "callback" not in text and "host" not in text
    assert np.isclose(np.asarray(out["score"]), np.asarray(out["map"]).max(axis=(1, 2))).all()


def test_same_seed_same_maps_and_an_image_alone_equals_it_in_a_batch(engine):
    e = engine
    a = _call(e, e["imgs"], [0, 1, 0], [10, 11, 12])
    b = _call(e, e["imgs"], [0, 1, 0], [10, 11, 12])
    np.testing.assert_array_equal(np.asarray(a["map"]), np.asarray(b["map"]))
    alone = _call(e, e["imgs"][1:2], [1], [11])
    np.testing.assert_allclose(np.asarray(alone["map"][0]), np.asarray(a["map"][1]), rtol=1e-4, atol=1e-5)
    other = _call(e, e["imgs"], [0, 1, 0], [20, 21, 22])  # other image ids draw other random masks
    assert not np.allclose(np.asarray(other["map"]), np.asarray(a["map"]))


def test_masks_per_image_follow_the_config(engine):
    from maskad_jax.scoring import make_masks, num_masks
    sc = engine["c"].scoring
    mpo = jnp.arange(196, dtype=jnp.float32)
    m = np.asarray(make_masks(jax.random.key(0), mpo, (14, 14), sc))
    assert m.shape == (num_masks(sc), 196) == (13, 196)
    assert [int(x) for x in m[:4].sum(1)] == [1, 5, 9, 13]  # prototype masks: top-k of M_po
    assert m[0, 195] and m[3, 183:].all()
    assert (m[4:8].sum(1) == 39).all() and (m[8:12].sum(1) <= 29).all()
    assert m[12].sum() == 0  # the zero mask


def test_grouped_branches_give_the_same_maps(engine):
    """branches_per_step > 0 runs the 2N reconstructions in groups inside the program: same numbers."""
    import copy
    from maskad_jax.scoring import _branch_steps, make_score_fn
    from maskad_jax.train import build_reconstructor
    assert [_branch_steps(26, k) for k in (0, 1, 2, 4, 26, 30)] == [1, 26, 13, 13, 1, 1]
    e = engine
    c = copy.deepcopy(e["c"])
    c.scoring.branches_per_step = 4
    grouped = make_score_fn(c, e["ex"], build_reconstructor(c, e["ex"].channels, (4, 4)))
    a = _call(e, e["imgs"], [0, 1, 0], [1, 2, 3])
    b = grouped(e["params"], e["ex"].variables, e["pools"], e["imgs"], jnp.asarray([0, 1, 0], jnp.int32),
                jnp.asarray([1, 2, 3], jnp.int32))
    np.testing.assert_allclose(np.asarray(b["map"]), np.asarray(a["map"]), rtol=1e-4, atol=1e-5)
