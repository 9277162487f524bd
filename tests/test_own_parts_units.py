"""The pieces of #25 against hand-worked cases and peers: geometry placements, the region labeller
(scipy), F1-optimal and per-class thresholds, the normalised score, k-center continued from a pool,
and the ignore-mask loader's refusals."""

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from configs import demo
from maskad_jax.common.errors import ConfigError, DataError
from maskad_jax.common.specs import resolve
from maskad_jax.data.geometry import place, to_input, to_original
from maskad_jax.data.ignore_masks import load_ignore_masks
from maskad_jax.data.tiling import image_level
from maskad_jax.engine.coreset import extend_kcenter
from maskad_jax.engine.fit_state import Calibration, Fit, NominalPools, scoring_signature
from maskad_jax.engine.thresholds import class_threshold, f1_threshold, fixed_thresholds, normalised
from maskad_jax.runtime.serve_export import regions_over, stitch_tiles, tile_boxes
from maskad_jax.training.fit import _held_out


def test_crop_of_a_450_by_200_image_sees_the_middle_44_percent():
    # shorter side 200 -> 224: 504 x 224; the centre 224 starts at (504 - 224) / 2 = 140, i.e. 125 px of 450
    p = place(450, 200, 224, "crop")
    assert p.box == (0, 0, 224, 224) and p.region == pytest.approx((125.0, 0.0, 325.0, 200.0))
    assert p.seen_fraction == pytest.approx(200 * 200 / (450 * 200))
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (200, 450, 3), np.uint8))
    ref = img.resize((504, 224), Image.LANCZOS).crop((140, 0, 364, 224))  # torchvision's Resize + CenterCrop
    assert np.array_equal(np.asarray(to_input(img, 224, "crop")), np.asarray(ref))


def test_pad_letterboxes_and_maps_come_back_to_the_original_grid():
    p = place(640, 480, 224, "pad")  # longer side 640 -> 224: 224 x 168, centred 28 px down
    assert p.box == (0, 28, 224, 196) and p.seen_fraction == 1.0
    canvas = np.asarray(to_input(Image.new("RGB", (640, 480), (255, 0, 0)), 224, "pad"))
    assert (canvas[28:196] == (255, 0, 0)).all() and (canvas[:28] == (124, 116, 104)).all()
    amap = np.zeros((224, 224), np.float32)
    amap[28:196] = 3.0  # content only; the padding's values must not reach the original
    amap[:28] = amap[196:] = 99.0
    back = to_original(amap, p)
    assert back.shape == (480, 640) and np.allclose(back, 3.0)


def test_crop_maps_are_nan_where_the_crop_did_not_look():
    back = to_original(np.ones((224, 224), np.float32), place(450, 200, 224, "crop"))
    assert back.shape == (200, 450)
    assert np.isnan(back[:, :125]).all() and np.isnan(back[:, 325:]).all() and (back[:, 125:325] == 1).all()


def test_regions_match_scipy_labels_and_boxes():
    rng = np.random.default_rng(1)
    for _ in range(100):
        m = rng.random((rng.integers(1, 25), rng.integers(1, 25)))
        m[rng.random(m.shape) < 0.05] = np.nan
        thr = rng.random()
        found = regions_over(m, thr)
        lab, n = ndimage.label(m >= thr, structure=np.ones((3, 3)))
        assert len(found) == n
        ref = {}
        for k, sl in enumerate(ndimage.find_objects(lab), 1):
            ref[(sl[1].start, sl[0].start, sl[1].stop, sl[0].stop)] = (int((lab == k).sum()), float(m[lab == k].max()))
        assert {tuple(r["box"]): (r["area"], r["peak"]) for r in found} == ref
        assert [r["peak"] for r in found] == sorted((r["peak"] for r in found), reverse=True)


def test_f1_threshold_hand_worked():
    # >= 0.9: F1 2/3; >= 0.8: 1/2; >= 0.7: TP 2, FP 1 -> 0.8; >= 0.3: 2/3; >= 0.2: 4/7
    thr, f1 = f1_threshold([0.9, 0.8, 0.7, 0.3, 0.2], [1, 0, 1, 0, 0])
    assert (thr, f1) == (0.7, pytest.approx(0.8))
    assert f1_threshold([0.5, 0.5, 0.1], [1, 0, 0]) == (0.5, pytest.approx(2 / 3))  # tied scores: one threshold
    with pytest.raises(ValueError):
        f1_threshold([0.1, 0.2], [0, 0])


def test_predict_threshold_forms():
    names = ("screw", "nut")
    assert fixed_thresholds(-1.0, names) == {}
    assert fixed_thresholds(0.5, names) == {"screw": 0.5, "nut": 0.5}
    assert fixed_thresholds({"nut": 2}, names) == {"nut": 2.0}
    assert fixed_thresholds("screw=0.5, nut=0.7", names) == {"screw": 0.5, "nut": 0.7}
    for bad in ("screw", "screw=x", {"nut": "high"}, True, float("nan"), [1]):
        with pytest.raises(ConfigError):
            fixed_thresholds(bad, names)
    with pytest.raises(ConfigError, match="bolt"):
        fixed_thresholds({"bolt": 1.0}, names)


def _pools(config):
    nominal = NominalPools(
        np.zeros((2, 3, 4), np.float32),
        np.zeros((2, 3, 4), np.float32),
        np.ones((2, 3), bool),
        np.ones((2,), np.float32),
        ("screw", "nut"),
        {"screw": np.array([0]), "nut": np.array([1])},
    )
    scores = {"screw": [1.0, 2.0, 3.0, 4.0, 5.0], "nut": [10.0, 20.0, 30.0]}
    return Fit(
        nominal,
        Calibration(scores, scoring=scoring_signature(resolve(config).scoring)),
        val_thresholds={"screw": {"threshold": 4.5, "f1": 0.9, "good": 3, "defective": 2}},
    )


def test_threshold_rules_per_class():
    c = demo.get_config("smoke")
    c.scoring.pixel_map = "score"
    pools = _pools(c)
    c.predict.threshold_quantile = 0.5
    c.predict.threshold_rule = "auto"  # F1 where validation images exist, the quantile elsewhere
    assert [class_threshold(resolve(c).predict, resolve(c).scoring, pools, k) for k in pools.class_names] == [4.5, 20.0]
    c.predict.threshold_rule = "quantile"
    assert [class_threshold(resolve(c).predict, resolve(c).scoring, pools, k) for k in pools.class_names] == [3.0, 20.0]
    c.predict.threshold_rule = "f1"
    assert class_threshold(resolve(c).predict, resolve(c).scoring, pools, "screw") == 4.5
    with pytest.raises(ConfigError, match="data.validation"):
        class_threshold(resolve(c).predict, resolve(c).scoring, pools, "nut")
    c.predict.threshold = {"nut": 7.0}  # a per-class number wins over every rule
    assert [class_threshold(resolve(c).predict, resolve(c).scoring, pools, k) for k in pools.class_names] == [4.5, 7.0]


def test_normalised_score():
    assert normalised(3.0, 5.0, 1.0) == 0.5  # (3 - 1) / (5 - 1)
    assert normalised(5.0, 5.0, 1.0) == 1.0
    assert normalised(3.0, 1.0, 2.0) is None  # a threshold below the median normal score


def test_extend_kcenter_picks_what_the_pool_covers_least():
    old = np.array([[0.0]])
    new = np.array([[1.0], [5.0], [10.0], [9.0]])
    # farthest from {0}: 10; then from {0, 10}: 5 (distance 5) before 1 (1) and 9 (1)
    assert list(extend_kcenter(old, new, 2)) == [2, 1]
    assert len(extend_kcenter(old, new, 0)) == 0


def test_ignore_masks_load_in_class_order_and_refuse_bad_folders(tmp_path):
    m = np.zeros((480, 640), np.uint8)
    m[:, :320] = 255
    Image.fromarray(m).save(tmp_path / "nut.png")
    out = load_ignore_masks(str(tmp_path), ("screw", "nut"), 64, "resize")
    assert out.shape == (2, 64, 64) and not out[0].any() and out[1][:, :32].all() and not out[1][:, 32:].any()
    assert load_ignore_masks("", ("screw",), 64, "resize") is None
    with pytest.raises(DataError, match="nut.png"):
        load_ignore_masks(str(tmp_path), ("screw",), 64, "resize")
    Image.fromarray(np.full((10, 10), 255, np.uint8)).save(tmp_path / "screw.png")
    with pytest.raises(DataError, match="every pixel"):
        load_ignore_masks(str(tmp_path), ("screw", "nut"), 64, "resize")
    with pytest.raises(DataError, match="no such folder"):
        load_ignore_masks(str(tmp_path / "missing"), ("screw",), 64, "resize")


def test_tile_boxes_cover_the_image_with_the_asked_overlap():
    # 2 x 2 at 25%: a tile is 640 / (2 - 0.25) = 365.7 px wide, the second starts 0.75 of it in (274)
    assert tile_boxes(640, 480, 2, 2, 0.25) == [
        (0, 0, 366, 275),
        (274, 0, 640, 275),
        (0, 205, 366, 480),
        (274, 205, 640, 480),
    ]
    assert tile_boxes(100, 50, 1, 1, 0.2) == [(0, 0, 100, 50)]
    for w, h, r, c, o in ((2000, 500, 2, 5, 0.125), (513, 97, 3, 4, 0.0)):
        cover = np.zeros((h, w), int)
        for x0, y0, x1, y1 in tile_boxes(w, h, r, c, o):
            cover[y0:y1, x0:x1] += 1
        assert cover.min() >= 1  # every pixel in some tile


def test_stitching_takes_the_max_where_tiles_overlap():
    crops = [(0, 0, 6, 4), (4, 0, 10, 4)]
    a, b = np.full((4, 6), 1.0, np.float32), np.full((4, 6), 2.0, np.float32)
    a[0, 0] = np.nan  # not inspected by its only tile
    out = stitch_tiles([a, b], crops, (10, 4))
    assert np.isnan(out[0, 0]) and (out[:, 4:] == 2).all() and (out[1:, :4] == 1).all()


def test_tiles_are_held_out_by_image_and_calibrated_by_their_image_maximum():
    image_of = np.repeat(np.arange(10), 4)  # 10 images of 4 tiles
    cal, fit = _held_out(np.arange(40), np.random.default_rng(0), 0.2, image_of)
    assert len(np.unique(image_of[cal])) == 2 and not set(image_of[cal]) & set(image_of[fit])
    assert len(cal) == 8 and len(cal) + len(fit) == 40
    cal_res = {
        "cal_scores": {"a": [1.0, 5.0, 2.0, 3.0]},
        "cal_map_max": {"a": [0.1, 0.5, 0.2, 0.3]},
        "term_stats": None,
    }
    out = image_level(cal_res, {"a": np.array([8, 9, 2, 3])}, np.array([0, 0, 1, 1, 2, 2, 3, 3, 4, 4]))
    assert sorted(out["cal_scores"]["a"]) == [3.0, 5.0]  # image 4: max(1, 5); image 1: max(2, 3)


def test_crop_and_resize_are_the_same_on_square_images():
    """Why docs/results.md compares the geometries on rope only: on a square image (mtd, the demo) the
    centre crop of the resized image is all of it, bit for bit."""
    img = Image.fromarray(np.random.default_rng(2).integers(0, 255, (256, 256, 3), np.uint8))
    assert np.array_equal(np.asarray(to_input(img, 224, "crop")), np.asarray(to_input(img, 224, "resize")))
    assert place(256, 256, 224, "crop").seen_fraction == 1.0
