"""The seven anomaly-detection metrics, exact (see docs/metrics.md for the definitions).

All curve metrics sort the scores once and treat tied scores as one threshold, as scikit-learn
does: AUROC (trapezoidal ROC area), AP (sum over thresholds of (R_n - R_{n-1}) P_n), F1-max (max of
2PR/(P+R) over the precision-recall curve's thresholds). AUPRO integrates the exact PRO-vs-FPR
step curve up to FPR 0.3 (trapezoids, the end point interpolated) and divides by 0.3; regions are
the 8-connected components of each ground-truth mask; PRO at a threshold is the mean over all
regions of the fraction of the region's pixels at or above it; FPR is over all defect-free pixels.

The "ader" variants reproduce the published protocol's approximations (zhangzjn/ADer): pixel
F1-max over 21 thresholds of min-max normalised maps, AUPRO over `max_step` equal threshold steps.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage


def _curve(scores, labels):
    """Cumulative TP and FP counts at each distinct threshold, from the highest score down."""
    scores = np.asarray(scores, np.float64).ravel()
    labels = np.asarray(labels).ravel().astype(bool)
    order = np.argsort(-scores, kind="mergesort")
    s, y = scores[order], labels[order]
    last = np.r_[np.nonzero(np.diff(s))[0], len(s) - 1]  # last index of each tie group
    tp = np.cumsum(y)[last]
    fp = np.cumsum(~y)[last]
    return tp, fp


def _check(labels):
    labels = np.asarray(labels).ravel().astype(bool)
    if labels.all() or not labels.any():
        raise ValueError("metric undefined: the labels need both classes")
    return labels


def _auroc_from(tp, fp) -> float:
    return float(np.trapezoid(np.r_[0, tp] / tp[-1], np.r_[0, fp] / fp[-1]))


def _ap_from(tp, fp) -> float:
    return float(np.sum(np.diff(np.r_[0, tp] / tp[-1]) * (tp / (tp + fp))))


def _f1_max_from(tp, fp) -> float:
    precision, recall = tp / (tp + fp), tp / tp[-1]
    with np.errstate(invalid="ignore", divide="ignore"):
        return float(np.nanmax(2 * precision * recall / (precision + recall)))


def auroc(scores, labels) -> float:
    return _auroc_from(*_curve(scores, _check(labels)))


def average_precision(scores, labels) -> float:
    return _ap_from(*_curve(scores, _check(labels)))


def f1_max(scores, labels) -> float:
    return _f1_max_from(*_curve(scores, _check(labels)))


def curve_metrics(scores, labels) -> dict:
    """AUROC, AP and F1-max from one sort of the scores."""
    tp, fp = _curve(scores, _check(labels))
    return {"auroc": _auroc_from(tp, fp), "ap": _ap_from(tp, fp), "f1_max": _f1_max_from(tp, fp)}


def curve_points(scores, labels, max_points: int = 200) -> dict:
    """ROC (fpr, tpr) and precision-recall (recall, precision) points for plotting, at most
    max_points of each, always keeping both ends (the same curves the metrics integrate)."""
    tp, fp = _curve(scores, _check(labels))
    keep = np.unique(np.linspace(0, len(tp) - 1, min(max_points, len(tp))).round().astype(int))
    tp, fp = tp[keep], fp[keep]
    return {
        "fpr": np.r_[0.0, fp / fp[-1]],
        "tpr": np.r_[0.0, tp / tp[-1]],
        "recall": tp / tp[-1],
        "precision": tp / np.maximum(tp + fp, 1),
    }


_EIGHT = np.ones((3, 3), int)


def regions(masks) -> tuple[np.ndarray, int]:
    """Labelled 8-connected ground-truth regions across all maps: (labels (same shape), count)."""
    masks = np.asarray(masks).astype(bool)
    out = np.zeros(masks.shape, np.int64)
    total = 0
    for i in range(masks.shape[0]):
        lab, n = ndimage.label(masks[i], structure=_EIGHT)
        out[i] = np.where(lab > 0, lab + total, 0)
        total += n
    return out, total


def aupro(maps, masks, fpr_limit: float = 0.3) -> float:
    maps = np.asarray(maps, np.float64)
    lab, n_regions = regions(masks)
    if n_regions == 0:
        raise ValueError("AUPRO undefined: no ground-truth region")
    normal = lab == 0
    n_normal = int(normal.sum())
    if n_normal == 0:
        raise ValueError("AUPRO undefined: no defect-free pixel")
    sizes = np.bincount(lab.ravel(), minlength=n_regions + 1).astype(np.float64)
    # Each region pixel adds 1 / (|R| * n_regions) to PRO when the threshold passes it; each normal
    # pixel adds 1 / n_normal to FPR.
    w_pro = np.where(normal, 0.0, 1.0 / (sizes[lab] * n_regions)).ravel()
    w_fpr = normal.ravel() / n_normal
    s = maps.ravel()
    order = np.argsort(-s, kind="mergesort")
    s = s[order]
    last = np.r_[np.nonzero(np.diff(s))[0], len(s) - 1]
    pro = np.r_[0.0, np.cumsum(w_pro[order])[last]]
    fpr = np.r_[0.0, np.cumsum(w_fpr[order])[last]]
    return _integrate_pro(fpr, pro, fpr_limit)


def pixel_f1_max_ader(maps, masks, steps: int = 21) -> float:
    """ADer's mF1_max_px: min-max normalise, thresholds 0, 0.05, ..., 1, F1 = 2PR/(P+R+1e-8)."""
    maps = np.asarray(maps, np.float64)
    gt = np.asarray(masks).astype(bool)
    norm = (maps - maps.min()) / max(maps.max() - maps.min(), 1e-12)
    best = 0.0
    for th in np.linspace(0, 1, steps):
        pred = norm > th
        tp = np.sum(pred & gt)
        p = tp / max(pred.sum(), 1e-12)
        r = tp / max(gt.sum(), 1e-12)
        best = max(best, 2 * p * r / (p + r + 1e-8))
    return float(best)


def aupro_ader(maps, masks, max_step: int = 100, fpr_limit: float = 0.3) -> float:
    """ADer's cal_pro_score (after cflow-ad): thresholds np.arange(min, max, (max - min) / max_step);
    keep those with FPR < limit; rescale the kept FPRs to [0, 1] by their min and max; integrate PRO
    over FPR with the trapezoidal rule in threshold order (FPR falls as the threshold rises), as
    sklearn.metrics.auc does for a decreasing x. NaN where ADer's would be (fewer than two kept
    thresholds or one FPR value)."""
    maps = np.asarray(maps, np.float64)
    lab, n_regions = regions(masks)
    normal = lab == 0
    lo, hi = maps.min(), maps.max()
    pros, fprs = [], []
    for th in np.arange(lo, hi, (hi - lo) / max_step) if hi > lo else []:
        pred = maps > th
        per = [pred[lab == k].mean() for k in range(1, n_regions + 1)]
        pros.append(np.mean(per))
        fprs.append((pred & normal).sum() / normal.sum())
    pros, fprs = np.asarray(pros), np.asarray(fprs)
    keep = fprs < fpr_limit
    f, p = fprs[keep], pros[keep]
    if len(f) < 2 or f.max() == f.min():
        return float("nan")
    f = (f - f.min()) / (f.max() - f.min())
    return float(-np.trapezoid(p, f))  # f is non-increasing in threshold order


def _curves_from_counts(pos, neg):
    """Cumulative TP/FP from the highest bin down, keeping only bins that hold pixels (tie groups)."""
    keep = (pos + neg) > 0
    tp = np.cumsum(pos[::-1])[keep[::-1]]
    fp = np.cumsum(neg[::-1])[keep[::-1]]
    return tp.astype(np.float64), fp.astype(np.float64)


class BinnedPixelMetrics:
    """Pixel AUROC, AP, F1-max and AUPRO from per-bin counts, in memory independent of the pixel count.

    Scores are put into `bins` equal bins over [lo, hi]; each bin is one threshold (a tie group),
    so the results are the exact metrics of the quantised maps. With 2**16 bins the difference to
    the exact metrics is below 1e-4 on the tests' cases (docs/metrics.md). Feed maps with add() in
    any number of chunks, then call results().
    """

    def __init__(self, lo: float, hi: float, bins: int = 1 << 16):
        self.lo, self.hi, self.bins = float(lo), float(hi), int(bins)
        self.pos = np.zeros(self.bins, np.int64)
        self.neg = np.zeros(self.bins, np.int64)
        self.pro = np.zeros(self.bins, np.float64)  # sum over region pixels of 1/|R|
        self.n_regions = 0

    def _index(self, maps):
        scale = self.bins / max(self.hi - self.lo, 1e-30)
        return np.clip(((np.asarray(maps, np.float64) - self.lo) * scale).astype(np.int64), 0, self.bins - 1)

    def add(self, maps, masks):
        masks = np.asarray(masks).astype(bool)
        idx = self._index(maps)
        self.pos += np.bincount(idx[masks], minlength=self.bins)
        self.neg += np.bincount(idx[~masks], minlength=self.bins)
        lab, n = regions(masks)
        if n:
            sizes = np.bincount(lab.ravel())
            sel = lab > 0
            self.pro += np.bincount(idx[sel], weights=1.0 / sizes[lab[sel]], minlength=self.bins)
            self.n_regions += n

    def results(self, fpr_limit: float = 0.3) -> dict:
        out = {}
        if self.pos.sum() and self.neg.sum():
            tp, fp = _curves_from_counts(self.pos, self.neg)
            out.update(pixel_auroc=_auroc_from(tp, fp), pixel_ap=_ap_from(tp, fp), pixel_f1_max=_f1_max_from(tp, fp))
        else:
            out.update(pixel_auroc=float("nan"), pixel_ap=float("nan"), pixel_f1_max=float("nan"))
        if self.n_regions and self.neg.sum():
            keep = (self.pos + self.neg) > 0
            pro = np.r_[0.0, np.cumsum(self.pro[::-1])[keep[::-1]] / self.n_regions]
            fpr = np.r_[0.0, np.cumsum(self.neg[::-1])[keep[::-1]] / self.neg.sum()]
            out["aupro"] = _integrate_pro(fpr, pro, fpr_limit)
        else:
            out["aupro"] = float("nan")
        return out


def _integrate_pro(fpr, pro, fpr_limit):
    keep = fpr <= fpr_limit
    x, y = fpr[keep], pro[keep]
    if x[-1] < fpr_limit and keep.sum() < len(fpr):
        j = int(keep.sum())
        x0, x1, y0, y1 = fpr[j - 1], fpr[j], pro[j - 1], pro[j]
        y_lim = y0 + (y1 - y0) * (fpr_limit - x0) / (x1 - x0) if x1 > x0 else y1
        x, y = np.r_[x, fpr_limit], np.r_[y, y_lim]
    return float(np.trapezoid(y, x) / fpr_limit)


METRIC_NAMES = ("image_auroc", "image_ap", "image_f1_max", "pixel_auroc", "pixel_ap", "pixel_f1_max", "aupro")


def all_metrics(image_scores, image_labels, maps, masks, protocol: str = "exact", bins: int = 1 << 16) -> dict:
    """The seven metrics of one class (values in [0, 1]); undefined ones are NaN.

    protocol: "exact" (sorting every pixel), "binned" (pixel metrics from per-bin counts, bounded
    memory, fed image by image), or "ader" (the published protocol's approximations).
    """
    if protocol not in ("exact", "binned", "ader"):
        raise ValueError(f"eval.protocol must be exact | binned | ader, got {protocol!r}")
    out = {}

    def safe(name, fn, *args):
        try:
            out[name] = fn(*args)
        except ValueError:
            out[name] = float("nan")

    def curves(prefix, scores, labels):
        try:
            vals = curve_metrics(scores, labels)
        except ValueError:
            vals = dict.fromkeys(("auroc", "ap", "f1_max"), float("nan"))
        out.update({f"{prefix}_{k}": v for k, v in vals.items()})

    curves("image", image_scores, image_labels)
    if len(maps) == 0:  # no image with a ground-truth mask
        out.update(dict.fromkeys(("pixel_auroc", "pixel_ap", "pixel_f1_max", "aupro"), float("nan")))
        return out
    if protocol == "binned":
        acc = BinnedPixelMetrics(float(np.min(maps)), float(np.max(maps)), bins)
        for i in range(len(maps)):
            acc.add(maps[i : i + 1], masks[i : i + 1])
        out.update(acc.results())
        return out
    curves("pixel", maps, masks)
    if protocol == "ader":
        safe("pixel_f1_max", pixel_f1_max_ader, maps, masks)
        safe("aupro", aupro_ader, maps, masks)
    else:
        safe("aupro", aupro, maps, masks)
    return out
