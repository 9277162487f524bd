"""Test-time engine: OT against POT and closed forms, k-center and smoothing against plain
implementations, one compiled program, determinism and batch independence."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import ndimage

from configs import default
from maskad_jax.common.specs import resolve
from maskad_jax.engine import association
from maskad_jax.engine.coreset import greedy_kcenter, nearest, nearest_in_pools
from maskad_jax.engine.smoothing import gaussian_smooth

ot = pytest.importorskip("ot", reason="POT is a test extra")


def _error_samples(rng, n_problems, n, mean, std):
    """Per-patch error samples like a trained model's: h's and r's N errors, r's sometimes shifted."""
    e_h = np.abs(rng.normal(mean, std, (n_problems, n)))
    shrink = rng.choice([0.0, 0.1, 0.5], size=(n_problems, 1))
    e_r = np.abs(rng.normal(mean, std, (n_problems, n)) * (1 - shrink))
    return e_h.astype(np.float32), e_r.astype(np.float32)


@pytest.mark.parametrize("n", [7, 13])
@pytest.mark.parametrize("mean,std", [(2.0, 0.5), (19.0, 8.0), (60.0, 20.0)])
def test_paper_ot_is_within_one_percent_of_the_exact_optimum_and_never_below(n, mean, std):
    """At the shipped defaults and the error scales a trained model produces (the issue's 2 +- 0.5 to
    60 +- 20): within 1% of the exact 1-D optimum (POT's network-simplex emd2 and the sorted
    closed form), relative to max(optimum, mean error), and never below it."""
    c = default.get_config().scoring
    e_h, e_r = _error_samples(np.random.default_rng(n + int(mean)), 400, n, mean, std)
    res = jax.jit(lambda a, b: association.paper_ot(a, b, c.epsilon, c.sinkhorn_iterations))(e_h, e_r)
    cost = np.asarray(res.cost, np.float64)
    w = np.full(n, 1.0 / n)
    exact = np.asarray([ot.emd2(w, w, np.abs(a[:, None].astype(np.float64) - b[None, :])) for a, b in zip(e_h, e_r)])
    np.testing.assert_allclose(np.asarray(association.exact_assdis(e_h, e_r)), exact, rtol=1e-5, atol=1e-6)
    scale = np.maximum(exact, 0.5 * (e_h.mean(1) + e_r.mean(1)))
    assert np.all(np.abs(cost - exact) <= 0.01 * scale)
    assert np.all(cost >= exact - 1e-6 * scale)  # a feasible plan's cost; float32 rounding only
    assert np.mean(res.certified) >= 0.99  # the Sinkhorn plan itself, not the fallback, in all but a few


def test_paper_ot_plan_is_pots_entropic_plan_when_run_to_convergence():
    """The same entropic problem (epsilon = 0.02 x the mean cost) solved by POT's log-domain Sinkhorn
    and by ours run to a tight threshold: the same transport cost. POT stops at a marginal error of
    1e-7 (within 5e-5 relative of its cost at 1e-12, which takes 20x longer)."""
    e_h, e_r = _error_samples(np.random.default_rng(4), 6, 13, 19.0, 8.0)
    ours = np.asarray(
        association.paper_ot(jnp.asarray(e_h), jnp.asarray(e_r), 0.02, iterations=20000, threshold=1e-7, rtol=1.0).cost
    )
    w = np.full(13, 1 / 13)
    for i in range(6):
        cost = np.abs(e_h[i][:, None].astype(np.float64) - e_r[i][None, :])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # POT warns when numItermax ends it before stopThr
            plan = ot.sinkhorn(w, w, cost, 0.02 * cost.mean(), method="sinkhorn_log", numItermax=5000, stopThr=1e-7)
        assert ours[i] == pytest.approx(np.sum(plan * cost), rel=1e-3)


def test_unconverged_patches_are_reported_and_get_the_exact_optimum():
    """With too few iterations the duality gap is not within tolerance: such patches are counted
    as uncertified and their AssDis is the exact optimum, never the unconverged plan's cost."""
    e_h, e_r = _error_samples(np.random.default_rng(5), 200, 13, 19.0, 8.0)
    res = association.paper_ot(jnp.asarray(e_h), jnp.asarray(e_r), 0.001, iterations=10, threshold=1e-9, rtol=1e-4)
    exact = np.asarray(association.exact_assdis(e_h, e_r))
    bad = ~np.asarray(res.certified)
    assert bad.sum() > 0
    np.testing.assert_allclose(np.asarray(res.cost)[bad], exact[bad], rtol=1e-6)
    assert np.all(np.asarray(res.gap)[bad] > 0)


def test_w1_potentials_are_feasible_and_optimal():
    """Hand-checkable: x = (0, 2), y = (1, 5): W1 = (|0-1| + |2-5|) / 2 = 2."""
    f, g = association.w1_potentials(jnp.asarray([0.0, 2.0]), jnp.asarray([1.0, 5.0]))
    assert float(jnp.mean(f) + jnp.mean(g)) == pytest.approx(2.0)
    rng = np.random.default_rng(6)
    for _ in range(20):
        x, y = rng.normal(size=9), rng.normal(size=9)
        f, g = association.w1_potentials(jnp.asarray(x), jnp.asarray(y))
        assert np.all(np.asarray(f)[:, None] + np.asarray(g)[None, :] <= np.abs(x[:, None] - y[None]) + 1e-5)
        assert float(jnp.mean(f) + jnp.mean(g)) == pytest.approx(float(association.exact_assdis(x, y)), abs=1e-5)


def test_rounding_gives_a_plan_with_exact_marginals():
    rng = np.random.default_rng(7)
    plan = rng.uniform(size=(8, 8)) / 50
    a = np.full(8, 1 / 8)
    out = np.asarray(association.round_to_marginals(jnp.asarray(plan), jnp.asarray(a), jnp.asarray(a)))
    assert np.all(out >= 0)
    np.testing.assert_allclose(out.sum(1), a, atol=1e-7)
    np.testing.assert_allclose(out.sum(0), a, atol=1e-7)


def _code_sinkhorn_numpy(e_h, e_r, eps=0.1, tol=0.1, max_iter=1000):
    """The released code's models/Sinkhorn_distance.py transcribed (docs/method.md §6.6) in float64 numpy."""
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
        np.testing.assert_allclose(
            ours[i], ndimage.gaussian_filter(x[i].astype(np.float64), sigma, mode="reflect"), atol=1e-5
        )


# --------------------------------------------------------------------------------------- the engine
@pytest.fixture(scope="module")
def engine():
    from maskad_jax.engine.scoring import device_pools, make_score_fn
    from maskad_jax.models.features import FeatureExtractor
    from maskad_jax.models.reconstructor import build_reconstructor
    from maskad_jax.training.fit import fit_pools

    c = default.get_config()
    c.data.image_size = 64
    r = c.model.reconstructor
    r.embed_dim, r.encoder_depth, r.decoder_depth, r.num_heads = 32, 1, 1, 2
    c.scoring.sinkhorn_iterations = 30
    ex = FeatureExtractor.create("efficientnet-lite0", weights="random")
    model = build_reconstructor(resolve(c).model, ex.channels, (4, 4))
    params = model.init(jax.random.key(0), jnp.zeros((1, 4, 4, ex.channels)), jnp.zeros((1, 16), bool))["params"]
    rng = np.random.default_rng(0)
    train_imgs = jnp.asarray(rng.uniform(size=(6, 64, 64, 3)).astype(np.float32))
    h = np.asarray(ex(train_imgs))
    pools = fit_pools(h, None, ["a"] * 3 + ["b"] * 3, c.fit, seed=0)
    score = make_score_fn(resolve(c).scoring, ex, model)
    imgs = jnp.asarray(rng.uniform(size=(3, 64, 64, 3)).astype(np.float32))
    return dict(c=c, ex=ex, params=params, pools=device_pools(pools), score=score, imgs=imgs, raw_pools=pools)


def _call(e, imgs, pool_idx, ids):
    return e["score"](
        e["params"], e["ex"].variables, e["pools"], imgs, jnp.asarray(pool_idx, jnp.int32), jnp.asarray(ids, jnp.int32)
    )


def test_one_compiled_program_without_host_callbacks(engine):
    e = engine
    out = _call(e, e["imgs"], [0, 1, 0], [0, 1, 2])
    assert out["map"].shape == (3, 64, 64) and out["score"].shape == (3,)
    n0 = e["score"]._cache_size()
    for ids in ([3, 4, 5], [6, 7, 8]):
        _call(e, e["imgs"], [1, 0, 1], ids)
    assert e["score"]._cache_size() == n0  # new images and classes, no recompilation
    jaxpr = jax.make_jaxpr(e["score"])(
        e["params"], e["ex"].variables, e["pools"], e["imgs"], jnp.zeros(3, jnp.int32), jnp.arange(3)
    )
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
    from maskad_jax.engine.scoring import make_masks, num_masks

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

    from maskad_jax.engine.scoring import _branch_steps, make_score_fn
    from maskad_jax.models.reconstructor import build_reconstructor

    assert [_branch_steps(26, k) for k in (0, 1, 2, 4, 26, 30)] == [1, 26, 13, 13, 1, 1]
    e = engine
    c = copy.deepcopy(e["c"])
    c.scoring.branches_per_step = 4
    grouped = make_score_fn(
        resolve(c).scoring, e["ex"], build_reconstructor(resolve(c).model, e["ex"].channels, (4, 4))
    )
    a = _call(e, e["imgs"], [0, 1, 0], [1, 2, 3])
    b = grouped(
        e["params"],
        e["ex"].variables,
        e["pools"],
        e["imgs"],
        jnp.asarray([0, 1, 0], jnp.int32),
        jnp.asarray([1, 2, 3], jnp.int32),
    )
    np.testing.assert_allclose(np.asarray(b["map"]), np.asarray(a["map"]), rtol=1e-4, atol=1e-5)


def test_nearest_in_one_pool_is_right_for_every_batch_size_under_jit():
    """With one pool, gathering it per image led XLA's CPU compiler (jaxlib 0.10.2, YNNPACK fusion) to
    a wrong distance for batches of 2 or more (every distance off, by up to half the pool's norm);
    nearest_in_pools passes a single pool unbatched. Checked against float64 numpy, with 1 and 3 pools."""
    rng = np.random.default_rng(0)
    for k in (1, 3):
        q = rng.normal(size=(2, 144, 152)).astype(np.float32)
        pools = rng.normal(size=(k, 104, 152)).astype(np.float32)
        valid = np.ones((k, 104), bool)
        valid[:, -3:] = False
        idx = np.asarray([k - 1, 0], np.int32)
        for batch in (slice(0, 1), slice(0, 2)):
            d, i = jax.jit(nearest_in_pools)(q[batch], pools, valid, idx[batch])
            for b in range(d.shape[0]):
                full = ((q[b][:, None].astype(np.float64) - pools[idx[b], :101][None]) ** 2).sum(-1)
                np.testing.assert_allclose(np.asarray(d)[b], full.min(-1), rtol=1e-4, atol=1e-3)
                assert np.array_equal(np.asarray(i)[b], full.argmin(-1))
