"""Metrics against scikit-learn, an independent brute-force AUPRO, hand-worked cases and ADer's definitions."""

import numpy as np
import pytest

from maskad_jax.engine import metrics as M

sk = pytest.importorskip("sklearn.metrics")


@pytest.mark.parametrize("seed,ties", [(0, False), (1, True), (2, True)])
def test_image_metrics_equal_sklearn(seed, ties):
    rng = np.random.default_rng(seed)
    y = rng.uniform(size=300) < 0.3
    s = rng.normal(size=300) + y
    if ties:
        s = np.round(s, 1)
    assert abs(M.auroc(s, y) - sk.roc_auc_score(y, s)) < 1e-9
    assert abs(M.average_precision(s, y) - sk.average_precision_score(y, s)) < 1e-9
    p, r, _ = sk.precision_recall_curve(y, s)
    with np.errstate(invalid="ignore"):
        f1 = np.nanmax(2 * p * r / (p + r))
    assert abs(M.f1_max(s, y) - f1) < 1e-9


def test_pixel_metrics_equal_sklearn_on_maps():
    rng = np.random.default_rng(3)
    masks = np.zeros((5, 32, 32), bool)
    masks[1, 4:12, 5:9] = True
    masks[3, 20:30, 20:25] = True
    maps = rng.normal(size=masks.shape) + 1.5 * masks
    assert abs(M.auroc(maps, masks) - sk.roc_auc_score(masks.ravel(), maps.ravel())) < 1e-9
    assert abs(M.average_precision(maps, masks) - sk.average_precision_score(masks.ravel(), maps.ravel())) < 1e-9


def _aupro_brute_force(maps, masks, limit=0.3):
    """Straightforward: every distinct threshold, PRO and FPR counted directly, then the same integral."""
    from scipy import ndimage

    regions = []
    for i in range(masks.shape[0]):
        lab, n = ndimage.label(masks[i], structure=np.ones((3, 3)))
        regions += [(i, lab == k) for k in range(1, n + 1)]
    normal = ~masks.astype(bool)
    pts = [(0.0, 0.0)]
    for t in np.unique(maps)[::-1]:
        pro = np.mean([(maps[i][r] >= t).mean() for i, r in regions])
        fpr = ((maps >= t) & normal).sum() / normal.sum()
        pts.append((fpr, pro))
    x, y = np.array(pts).T
    keep = x <= limit
    xs, ys = list(x[keep]), list(y[keep])
    if xs[-1] < limit and keep.sum() < len(x):
        j = keep.sum()
        ys.append(y[j - 1] + (y[j] - y[j - 1]) * (limit - x[j - 1]) / (x[j] - x[j - 1]))
        xs.append(limit)
    return np.trapezoid(ys, xs) / limit


def test_aupro_matches_brute_force():
    rng = np.random.default_rng(4)
    masks = np.zeros((3, 16, 16), bool)
    masks[0, 2:6, 2:6] = True
    masks[0, 10:12, 10:15] = True
    masks[2, 5:9, 3:4] = True
    maps = np.round(rng.normal(size=masks.shape) + 2 * masks, 1)
    assert abs(M.aupro(maps, masks) - _aupro_brute_force(maps, masks)) < 1e-9


def test_aupro_hand_worked_cases():
    masks = np.zeros((1, 10, 10), bool)
    masks[0, 1:3, 1:3] = True  # region A
    masks[0, 6:9, 6:9] = True  # region B
    perfect = masks.astype(float)
    assert M.aupro(perfect, masks) == pytest.approx(1.0)
    half = np.zeros((1, 10, 10))
    half[0, 1:3, 1:3] = 1.0  # finds A, misses B (scored like the background)
    # Curve (FPR, PRO): (0, 0) -> (0, 0.5) -> (1, 1); at FPR 0.3: 0.65; area 0.3 (0.5 + 0.65) / 2 / 0.3 = 0.575.
    assert M.aupro(half, masks) == pytest.approx(0.575)
    const = np.zeros((1, 10, 10))
    assert M.aupro(const, masks) == pytest.approx(0.15)  # the diagonal: 0.3 * 0.3 / 2 / 0.3
    assert M.auroc(np.zeros(10), np.arange(10) < 3) == pytest.approx(0.5)
    assert M.average_precision(np.zeros(10), np.arange(10) < 3) == pytest.approx(0.3)


def test_ader_protocol_follows_its_definition():
    masks = np.zeros((2, 8, 8), bool)
    masks[0, 2:5, 2:5] = True
    maps = np.zeros((2, 8, 8))
    maps[0, 2:5, 2:5] = 1.0
    assert M.pixel_f1_max_ader(maps, masks) == pytest.approx(1.0, abs=1e-7)
    # ADer's F1 uses 21 thresholds of the min-max normalised map: one very low normal pixel squeezes
    # defects (1.0) and normals (0.0) into the top 5% of the range (0.968 vs 1.0), which no threshold
    # separates; the exact F1-max still does.
    maps2 = maps.copy()
    maps2[1, 0, 0] = -30.0
    exact = M.f1_max(maps2, masks)
    ader = M.pixel_f1_max_ader(maps2, masks)
    assert exact == pytest.approx(1.0) and ader < 0.2
    # ADer's AUPRO (100 threshold steps, FPR rescaled to [0, 1]) approximates the exact one on a smooth case.
    rng = np.random.default_rng(0)
    noisy = rng.normal(size=masks.shape) + 2.0 * masks
    assert abs(M.aupro_ader(noisy, masks) - M.aupro(noisy, masks)) < 0.05


def _ader_cal_pro_score(masks, amaps, max_step=100, expect_fpr=0.3):
    """zhangzjn/ADer util/metric.py cal_pro_score (itself cflow-ad's), transcribed: skimage regions,
    sklearn's auc over the kept FPRs in threshold order."""
    from skimage import measure
    from sklearn.metrics import auc

    binary_amaps = np.zeros_like(amaps, dtype=bool)
    min_th, max_th = amaps.min(), amaps.max()
    delta = (max_th - min_th) / max_step
    pros, fprs = [], []
    for th in np.arange(min_th, max_th, delta):
        binary_amaps[amaps <= th], binary_amaps[amaps > th] = 0, 1
        pro = []
        for binary_amap, mask in zip(binary_amaps, masks):
            for region in measure.regionprops(measure.label(mask)):
                tp_pixels = binary_amap[region.coords[:, 0], region.coords[:, 1]].sum()
                pro.append(tp_pixels / region.area)
        inverse_masks = 1 - masks
        fp_pixels = np.logical_and(inverse_masks, binary_amaps).sum()
        pros.append(np.array(pro).mean())
        fprs.append(fp_pixels / inverse_masks.sum())
    pros, fprs = np.array(pros), np.array(fprs)
    idxes = fprs < expect_fpr
    fprs = fprs[idxes]
    fprs = (fprs - fprs.min()) / (fprs.max() - fprs.min())
    return auc(fprs, pros[idxes])


def test_ader_aupro_equals_adars_algorithm_with_tied_fprs():
    """Quantised maps make many thresholds share an FPR: the area then depends on integrating in
    threshold order (ADer), not on an order re-sorted by FPR."""
    pytest.importorskip("skimage")
    pytest.importorskip("sklearn")
    masks = np.zeros((1, 6, 6), np.uint8)
    masks[0, 1:4, 1:4] = 1
    maps = np.zeros((1, 6, 6))
    maps[0][masks[0] == 1] = np.linspace(0.2, 1.0, 9)
    maps[0, 5, 5], maps[0, 0, 5] = 0.5, 0.1  # two normal pixels: FPR takes three values
    assert M.aupro_ader(maps, masks) == pytest.approx(_ader_cal_pro_score(masks, maps), abs=1e-12)
    rng = np.random.default_rng(3)
    for _ in range(5):
        m = np.zeros((3, 32, 32), np.uint8)
        for i in range(3):
            y, x = rng.integers(0, 24, 2)
            m[i, y : y + rng.integers(2, 8), x : x + rng.integers(2, 8)] = 1
        a = np.round(rng.normal(size=m.shape) + 1.5 * m, 1)  # ties
        for steps in (100, 200):
            assert M.aupro_ader(a, m, max_step=steps) == pytest.approx(_ader_cal_pro_score(m, a, steps), abs=1e-12)


def test_all_metrics_nan_for_undefined():
    out = M.all_metrics(np.zeros(3), np.zeros(3), np.zeros((3, 4, 4)), np.zeros((3, 4, 4)))
    assert all(np.isnan(v) for v in out.values())


def test_binned_protocol_is_close_to_exact_and_streams():
    rng = np.random.default_rng(7)
    masks = np.zeros((6, 40, 40), bool)
    masks[0, 5:15, 5:12] = True
    masks[2, 20:35, 10:14] = True
    masks[2, 2:5, 30:38] = True
    masks[5, 10:30, 10:30] = True
    maps = rng.normal(size=masks.shape) + 1.2 * masks
    exact = M.all_metrics(maps.max(axis=(1, 2)), masks.any(axis=(1, 2)), maps, masks)
    binned = M.all_metrics(maps.max(axis=(1, 2)), masks.any(axis=(1, 2)), maps, masks, protocol="binned")
    for k in M.METRIC_NAMES:
        assert abs(exact[k] - binned[k]) < 1e-4, k
    # On maps with few distinct values (all in distinct bins) binned equals exact.
    q = np.round(maps, 1)
    acc = M.BinnedPixelMetrics(q.min(), q.max() + 1e-9, bins=1 << 12)
    for i in range(len(q)):
        acc.add(q[i : i + 1], masks[i : i + 1])
    r = acc.results()
    assert r["pixel_auroc"] == pytest.approx(M.auroc(q, masks), abs=1e-12)
    assert r["pixel_ap"] == pytest.approx(M.average_precision(q, masks), abs=1e-12)
    assert r["aupro"] == pytest.approx(M.aupro(q, masks), abs=1e-12)
