"""The localisation options (issue #23): the two-grid kNN M_po, the terms joined in held-out normal
units, the pixel map from M_po; checked on hand-worked cases, against brute force and Flax's own
pooling, and on the engine (one program, an image alone equals it in a batch)."""

import copy
import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import default, variants
from maskad_jax.common.errors import ConfigError
from maskad_jax.common.specs import resolve
from maskad_jax.engine import mpo as mpo_lib
from maskad_jax.engine import scoring
from maskad_jax.engine.fit_state import Calibration, Fit
from maskad_jax.engine.trained_model import TrainedModel
from maskad_jax.models.features import FeatureExtractor, avg_pool3, pooled_embedding
from maskad_jax.training.calibration import calibrate, term_stats
from maskad_jax.training.feature_cache import Features
from maskad_jax.training.fit import fit_pools


def _sc(**kw):
    sc = copy.deepcopy(default.get_config().scoring)
    sc.sigma = 0.0  # no smoothing: the hand-worked values stay exact
    for k, v in kw.items():
        setattr(sc, k, v)
    return sc


PATCH = jnp.asarray([[[1.0, 2.0], [3.0, 4.0]]])
MPO = jnp.asarray([[[2.0, 2.0], [2.0, 6.0]]])
STATS = jnp.asarray([[2.0, 1.0, 2.0, 2.0]])  # P: mean 2, std 1; M_po: mean 2, std 2


def test_fuse_product_is_the_papers_formula():
    score_map, pixel_map = scoring.fuse(PATCH, MPO, STATS, _sc(mpo_fusion="product"), 2)
    np.testing.assert_allclose(np.asarray(score_map[0]), [[2, 4], [6, 24]])
    np.testing.assert_array_equal(np.asarray(pixel_map), np.asarray(score_map))


def test_fuse_sum_adds_the_terms_in_held_out_normal_units():
    """z(P) = [[-1, 0], [1, 2]], z(M) = [[0, 0], [0, 2]]: the sum is [[-1, 0], [1, 4]]."""
    score_map, _ = scoring.fuse(PATCH, MPO, STATS, _sc(mpo_fusion="sum"), 2)
    np.testing.assert_allclose(np.asarray(score_map[0]), [[-1, 0], [1, 4]])


def test_pixel_map_mpo_is_the_mpo_map_and_leaves_the_score_map_alone():
    sc = _sc(mpo_fusion="sum", pixel_map="mpo")
    score_map, pixel_map = scoring.fuse(PATCH, MPO, STATS, sc, 2)
    np.testing.assert_allclose(np.asarray(score_map[0]), [[-1, 0], [1, 4]])
    np.testing.assert_allclose(np.asarray(pixel_map[0]), np.asarray(MPO[0]))
    # one term alone: the map is that term, whatever the fusion
    only_mpo, px = scoring.fuse(None, MPO, STATS, sc, 2)
    np.testing.assert_allclose(np.asarray(only_mpo[0]), np.asarray(MPO[0]))
    np.testing.assert_array_equal(np.asarray(px), np.asarray(only_mpo))
    only_patch, _ = scoring.fuse(PATCH, MPO, STATS, _sc(mpo_fusion="sum", use_mpo=False), 2)
    np.testing.assert_allclose(np.asarray(only_patch[0]), np.asarray(PATCH[0]))


def test_needs_term_stats_only_when_both_terms_are_summed():
    assert scoring.needs_term_stats(_sc(mpo_fusion="sum"))
    assert not scoring.needs_term_stats(_sc(mpo_fusion="product"))
    assert not scoring.needs_term_stats(_sc(mpo_fusion="sum", use_mpo=False))
    assert not scoring.needs_term_stats(_sc(mpo_fusion="sum", use_rec=False, use_assdis=False))


def test_term_stats_by_hand():
    patch = np.asarray([[[1.0, 3.0]], [[5.0, 7.0]], [[10.0, 10.0]]])  # (3 images, 1 x 2 patches)
    mpo = np.asarray([[[2.0]], [[4.0]], [[1.0]]])
    stats = term_stats(patch, mpo, np.asarray([0, 0, 1]), 3)
    np.testing.assert_allclose(stats[0], [4.0, np.sqrt(5.0), 3.0, 1.0])
    np.testing.assert_allclose(stats[1], [10.0, 1e-12, 1.0, 1e-12], atol=1e-12)  # no spread: guarded
    np.testing.assert_allclose(stats[2], [0.0, 1.0, 0.0, 1.0])  # no held-out image: no standardisation


def test_avg_pool_and_embedding_equal_flax_pooling_and_paddings_repeat():
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 8, 8, 3)).astype(np.float32))
    ref = nn.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)), count_include_pad=True)
    np.testing.assert_array_equal(np.asarray(avg_pool3(x)), np.asarray(ref))
    coarse = jnp.asarray(np.random.default_rng(1).normal(size=(2, 4, 4, 5)).astype(np.float32))
    emb = np.asarray(pooled_embedding([x, coarse]))
    assert emb.shape == (2, 8, 8, 8)
    np.testing.assert_array_equal(emb[..., :3], np.asarray(ref))
    pooled_coarse = np.asarray(avg_pool3(coarse))
    np.testing.assert_array_equal(emb[:, 5, 2, 3:], pooled_coarse[:, 2, 1])  # each coarse cell covers 2 x 2
    # bilinear (PatchCore's join): the finest tap as before, the coarse one interpolated with half-pixel
    # centres: fine row 5 sits at coarse 2.25 (5.5 / 2 - 0.5), column 2 at 0.75
    emb = np.asarray(pooled_embedding([x, coarse], join="bilinear"))
    np.testing.assert_array_equal(emb[..., :3], np.asarray(ref))
    p = pooled_coarse
    want = 0.75 * (0.25 * p[:, 2, 0] + 0.75 * p[:, 2, 1]) + 0.25 * (0.25 * p[:, 3, 0] + 0.75 * p[:, 3, 1])
    np.testing.assert_allclose(emb[:, 5, 2, 3:], want, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="fine join 'nearest'"):
        pooled_embedding([x, coarse], join="nearest")


def test_fine_knn_is_the_brute_force_distance_over_the_calibration_scale():
    rng = np.random.default_rng(2)
    pool = rng.normal(size=(2, 7, 4)).astype(np.float32)
    valid = np.ones((2, 7), bool)
    valid[1, 5:] = False
    fine = rng.normal(size=(3, 2, 2, 4)).astype(np.float32)
    pools = {"fine_in": jnp.asarray(pool), "fine_valid": jnp.asarray(valid), "fine_cal_scale": jnp.asarray([2.0, 0.5])}
    pidx = np.asarray([0, 1, 1])
    got = np.asarray(mpo_lib.fine_knn(pools, jnp.asarray(fine), jnp.asarray(pidx)))
    for i, k in enumerate(pidx):
        rows = pool[k][valid[k]]
        d = np.sqrt(((fine[i].reshape(4, 1, 4) - rows[None]) ** 2).sum(-1)).min(1).reshape(2, 2)
        np.testing.assert_allclose(got[i], d / [2.0, 0.5][k], rtol=1e-5, atol=1e-6)


def test_multiscale_mpo_is_the_mean_on_the_fine_grid():
    tokens = jnp.full((1, 2, 2), 3.0)
    fine = jnp.asarray(np.arange(16, dtype=np.float32).reshape(1, 4, 4))
    out = np.asarray(mpo_lib.multiscale_mpo(tokens, fine))
    np.testing.assert_allclose(out, 0.5 * (3.0 + np.arange(16).reshape(1, 4, 4)), rtol=1e-6)


def test_fine_pools_use_the_same_held_out_split_and_round_trip(tmp_path):
    rng = np.random.default_rng(3)
    h = rng.normal(size=(10, 2, 2, 3)).astype(np.float32)
    fine = rng.normal(size=(10, 4, 4, 2)).astype(np.float32)
    cfg = copy.deepcopy(default.get_config().fit)
    names = ["a"] * 5 + ["b"] * 5
    plain = fit_pools(h, None, names, cfg, seed=0)
    pools = fit_pools(h, None, names, cfg, seed=0, fine=fine)
    for f in ("pool_in", "valid", "cal_scale", "src"):  # the token pools do not change
        np.testing.assert_array_equal(getattr(pools, f), getattr(plain, f))
    assert pools.fine_in.shape == (2, int(np.ceil(0.01 * 4 * 16)), 2)
    held = set(np.concatenate(list(pools.held_out.values())).tolist())
    pool_rows = {tuple(r) for r in pools.fine_in.reshape(-1, 2)[pools.fine_valid.reshape(-1)]}
    held_rows = {tuple(r) for i in held for r in fine[i].reshape(-1, 2)}
    assert not pool_rows & held_rows  # no held-out token in the fine pools
    stats = np.asarray([[1, 2, 3, 4], [5, 6, 7, 8]], np.float32)
    cal = Calibration({"a": [1.0], "b": [2.0]}, {"a": [0.5], "b": [0.25]}, stats)
    pools = dataclasses.replace(pools, calibration=cal)
    pools.save(str(tmp_path))
    back = Fit.load(str(tmp_path))
    for f in ("fine_in", "fine_valid", "fine_cal_scale", "term_stats"):
        np.testing.assert_array_equal(getattr(back, f), getattr(pools, f))
    assert back.cal_map_max == pools.cal_map_max
    assert back.threshold("a", 0.5, of="map") == 0.5 and back.threshold("a", 0.5) == 1.0
    assert back.nominal.fine_embedding == {"strides": [8, 16], "join": "repeat"}
    assert plain.nominal.fine_embedding is None


def test_a_run_asking_for_another_fine_embedding_than_the_fits_is_refused(tmp_path):
    from maskad_jax.app.restore import require_fine_pools

    c = default.get_config()
    variants.smoke(c)
    h = np.random.default_rng(4).normal(size=(6, 2, 2, 3)).astype(np.float32)
    fine = np.random.default_rng(5).normal(size=(6, 4, 4, 2)).astype(np.float32)
    c.fit.fine_join = "bilinear"
    pools = fit_pools(h, None, ["a"] * 6, c.fit, seed=0, fine=fine)
    assert pools.nominal.fine_embedding == {"strides": [8, 16], "join": "bilinear"}
    require_fine_pools(resolve(c), pools)  # the fit's own embedding: accepted
    for field, value in (("fine_join", "repeat"), ("fine_strides", (4, 16))):
        other = copy.deepcopy(c)
        other.fit[field] = value
        with pytest.raises(ConfigError, match="fine pools were made with fit.fine_join = 'bilinear'"):
            require_fine_pools(resolve(other), pools)
    old = pools.with_nominal(fine_embedding=None)  # a fit from before the record: the repeat join
    with pytest.raises(ConfigError, match="config asks for 'bilinear'.*pass --config.fit.fine_join=repeat"):
        require_fine_pools(resolve(c), old)
    c.fit.fine_join = "repeat"
    require_fine_pools(resolve(c), old)


# --------------------------------------------------------------------------------------- the engine
@pytest.fixture(scope="module")
def engine():
    from maskad_jax.models.reconstructor import build_reconstructor

    c = default.get_config()
    variants.smoke(c)  # the CPU configs' scoring: two-grid M_po, sum, pixel map from M_po
    assert c.scoring.knn_fine and c.scoring.mpo_fusion == "sum" and c.scoring.pixel_map == "mpo"
    ex = FeatureExtractor.create("efficientnet-lite0", weights="random")
    model = build_reconstructor(resolve(c).model, ex.channels, (4, 4))
    params = model.init(jax.random.key(0), jnp.zeros((1, 4, 4, ex.channels)), jnp.zeros((1, 16), bool))["params"]
    c.fit.calibration_fraction = 0.4  # two held-out images per class
    rng = np.random.default_rng(0)
    train = jnp.asarray(rng.uniform(size=(10, 64, 64, 3)).astype(np.float32))
    fine_spec = scoring.fine_embedding(resolve(c).scoring)
    h, fine = (np.asarray(a) for a in ex.apply_with_fine(ex.variables, train, fine_spec))
    pools = fit_pools(h, None, ["a"] * 5 + ["b"] * 5, c.fit, seed=0, fine=fine)
    keys = np.arange(10, dtype=np.int32)
    cal = calibrate(
        resolve(c).scoring,
        resolve(c).data,
        TrainedModel(ex, model, params, pools, None),
        Features(h, None, keys, fine, None),
    )
    pools = dataclasses.replace(
        pools, calibration=Calibration(cal["cal_scores"], cal["cal_map_max"], cal["term_stats"])
    )
    imgs = jnp.asarray(rng.uniform(size=(3, 64, 64, 3)).astype(np.float32))
    return dict(c=c, ex=ex, model=model, params=params, pools=pools, h=h, fine=fine, keys=keys, cal=cal, imgs=imgs)


def _score(e, imgs, pidx, ids, config=None):
    fn = scoring.make_score_fn(resolve(config or e["c"]).scoring, e["ex"], e["model"])
    return fn(
        e["params"], e["ex"].variables, scoring.device_pools(e["pools"]), imgs, jnp.asarray(pidx), jnp.asarray(ids)
    )


def test_engine_fine_grid_maps_scores_and_batch_independence(engine):
    e = engine
    out = _score(e, e["imgs"], [0, 1, 0], [5, 6, 7])
    assert out["mpo_map"].shape == (3, 8, 8) and out["map"].shape == (3, 64, 64)  # 28 x 28 at 224 px
    alone = _score(e, e["imgs"][1:2], [1], [6])
    np.testing.assert_allclose(np.asarray(alone["map"][0]), np.asarray(out["map"][1]), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(float(alone["score"][0]), float(out["score"][1]), rtol=1e-4)
    # the score is the max of z(P) + z(M_po), not of the pixel map (M_po's own)
    stats = e["pools"].term_stats[[0, 1, 0]]
    want_map, px = scoring.fuse(out["patch"], out["mpo_map"], jnp.asarray(stats), e["c"].scoring, 64)
    np.testing.assert_allclose(np.asarray(out["score"]), np.asarray(want_map).max(axis=(1, 2)), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(out["map"]), np.asarray(px), rtol=1e-5, atol=1e-6)


def test_calibration_uses_only_the_held_out_images(engine):
    """The term statistics and thresholds come from the held-out normal images: changing the features
    of every other training image leaves them unchanged, and they equal the statistics of those
    images' own terms."""
    e = engine
    held = np.concatenate([e["pools"].held_out[c] for c in e["pools"].class_names])
    other = np.setdiff1d(np.arange(10), held)
    h, fine = e["h"].copy(), e["fine"].copy()
    h[other] += 100.0
    fine[other] -= 50.0
    again = calibrate(
        resolve(e["c"]).scoring,
        resolve(e["c"]).data,
        TrainedModel(e["ex"], e["model"], e["params"], e["pools"], None),
        Features(h, None, e["keys"], fine, None),
    )
    np.testing.assert_allclose(again["term_stats"], e["cal"]["term_stats"], rtol=1e-5)
    for c in e["pools"].class_names:
        np.testing.assert_allclose(again["cal_scores"][c], e["cal"]["cal_scores"][c], rtol=1e-5)
    fn = scoring.make_score_features_fn(resolve(e["c"]).scoring, e["model"])
    pidx = np.concatenate([np.full(len(e["pools"].held_out[c]), k) for k, c in enumerate(e["pools"].class_names)])
    out = fn(
        e["params"],
        scoring.device_pools(e["pools"]),
        jnp.asarray(e["h"][held]),
        jnp.asarray(e["h"][held]),
        jnp.asarray(pidx, jnp.int32),
        jnp.asarray(e["keys"][held]),
        64,
        None,
        jnp.asarray(e["fine"][held]),
    )
    p, m = np.asarray(out["patch"]), np.asarray(out["mpo_map"])
    for k in (0, 1):
        sel = pidx == k
        want = [p[sel].mean(), p[sel].std(), m[sel].mean(), m[sel].std()]
        np.testing.assert_allclose(e["cal"]["term_stats"][k], want, rtol=1e-4)
        scores = np.asarray(out["score"])[sel]  # scored with the fitted statistics: the calibration's scores
        np.testing.assert_allclose(e["cal"]["cal_scores"][e["pools"].class_names[k]], scores, rtol=1e-4)


def test_the_papers_scoring_is_unchanged_by_the_fine_pools(engine):
    """With the paper's fusion and map, and knn_fine off, the fine pools and statistics are ignored:
    the map is the product map and the score its max."""
    e = engine
    c = copy.deepcopy(e["c"])
    c.scoring.knn_fine, c.scoring.mpo_fusion, c.scoring.pixel_map = False, "product", "score"
    out = _score(e, e["imgs"], [0, 1, 0], [5, 6, 7], c)
    assert out["mpo_map"].shape == (3, 4, 4)
    np.testing.assert_allclose(np.asarray(out["score"]), np.asarray(out["map"]).max(axis=(1, 2)), rtol=1e-6)


def test_calibration_folds_hold_out_every_image_once_and_fold_0_is_the_fit_that_scores():
    from maskad_jax.training.fit import _held_out, folds

    pos = np.arange(100, 124)  # one class's 24 training positions
    n_folds = folds(24, 0.2)
    assert n_folds == 5  # round(0.2 x 24) = 5 per fold: 5 + 5 + 5 + 5 + 4
    splits = [_held_out(pos, np.random.default_rng([0, 0]), 0.2, fold=j) for j in range(n_folds)]
    held = np.concatenate([h for h, _ in splits])
    assert sorted(held.tolist()) == pos.tolist()  # every image held out exactly once
    for h, rest in splits:
        assert sorted(np.r_[h, rest].tolist()) == pos.tolist() and not set(h) & set(rest)
    perm = pos[np.random.default_rng([0, 0]).permutation(24)]  # fold 0: the permutation's first 5, as before
    assert splits[0][0].tolist() == perm[:5].tolist() and splits[0][1].tolist() == perm[5:].tolist()
    # with tiles: whole images (both tiles of each) at a time
    image_of = np.repeat(np.arange(6), 2)
    tiles = [_held_out(np.arange(12), np.random.default_rng(1), 0.2, image_of, fold=j) for j in range(folds(6, 0.2))]
    assert sorted(np.concatenate([h for h, _ in tiles]).tolist()) == list(range(12))
    assert all(len(set(image_of[h]) & set(image_of[r])) == 0 for h, r in tiles)


def test_cross_fitted_calibration_scores_every_image_against_pools_fitted_without_it(engine):
    from maskad_jax.training.calibration import cross_fitted
    from maskad_jax.training.fit import cross_fits

    e = engine
    c = e["c"]
    names = ["a"] * 5 + ["b"] * 5
    fits = cross_fits(e["h"], None, names, resolve(c).fit, e["fine"])
    assert len(fits) == 2  # 5 images a class, 2 held out per fold: folds of 2, 2 and 1
    for fit in fits:  # no fold's pool holds a token of the images it scores
        for k, cls in enumerate(fit.class_names):
            assert not set(fit.held_out[cls].tolist()) & set(fit.src[k][fit.valid[k]].tolist())
    tm = TrainedModel(e["ex"], e["model"], e["params"], e["pools"], None)
    feats = Features(e["h"], None, e["keys"], e["fine"], None)
    cal = cross_fitted(resolve(c).scoring, resolve(c).data, tm, feats, (fits, None))
    assert {k: len(v) for k, v in cal["cal_scores"].items()} == {"a": 5, "b": 5}  # every image
    # fold 0 first: the deployed fit's held-out scores and term statistics, as calibrate gives them
    for cls in ("a", "b"):
        np.testing.assert_allclose(cal["cal_scores"][cls][:2], e["cal"]["cal_scores"][cls], rtol=1e-5)
    np.testing.assert_allclose(cal["term_stats"], e["cal"]["term_stats"], rtol=1e-6)
