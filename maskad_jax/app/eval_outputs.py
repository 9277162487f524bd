"""What evaluation writes: metrics.json, scores.csv, heatmaps and the report's data, in the frame the
metrics were computed in (eval.frame)."""

from __future__ import annotations

import csv
import dataclasses
import json
import os

import numpy as np
from PIL import Image

from maskad_jax.app.overlay import overlay, unique_names
from maskad_jax.app.trained import Trained
from maskad_jax.common.specs import EvalSpec
from maskad_jax.data.geometry import place, to_original
from maskad_jax.data.splits import Preprocess
from maskad_jax.engine import metrics as metrics_lib
from maskad_jax.engine.fit_state import scoring_signature


@dataclasses.dataclass(frozen=True)
class ScoredSplit:
    """A test split scored, one row per image (or tile) in order: maps (N, S, S), masks (N, S, S) the
    ground truth in the same frame, scores (N,), rec_mean (N,) the mean per-patch Rec, uncertified
    (N,) the patches whose AssDis used the exact optimum, boxes (N, 4) the content boxes, originals
    (N, 2) the images' (width, height), masks_image (N, S, S) the ground truth on the whole image."""

    maps: np.ndarray
    masks: np.ndarray
    scores: np.ndarray
    rec_mean: np.ndarray
    uncertified: np.ndarray
    boxes: np.ndarray
    originals: np.ndarray
    masks_image: np.ndarray


def eval_frame(ev: EvalSpec) -> str:
    """eval.frame resolved: input (the model's input frame) or image (the whole image)."""
    return ev.resolved_frame


def display_geometry(ev: EvalSpec) -> str:
    """The geometry that shows an image in the frame the metrics are computed in."""
    return "resize" if eval_frame(ev) == "image" else ev.geometry


def to_image_frame(maps, boxes, originals, size: int, geometry: str) -> np.ndarray:
    """Input-frame maps (N, S, S) on their whole images at S x S (geometry.to_original); the part a
    crop never saw takes the map's minimum (not inspected: never above anything inspected)."""
    out = np.empty_like(maps)
    for i, (amap, box, (w, h)) in enumerate(zip(maps, boxes, originals)):
        p = place(int(w), int(h), size, geometry)
        x0, y0, x1, y1 = (int(v) for v in box)
        out[i] = to_original(amap, p, (size, size), fill=float(amap[y0:y1, x0:x1].min()))
    return out


def report_data(t: Trained, data, split: ScoredSplit, examples: list) -> dict:
    """What report.html plots, per class: the image scores by label and defect type, the predict
    threshold (the calibrated quantile of held-out normal scores), image and pixel ROC/PR points;
    and the examples' images, maps and ground truth. t: the trained model and its specs."""
    sc, ev, pools = t.specs.scoring, t.specs.eval, t.pools
    quantile, size = t.specs.predict.threshold_quantile, t.specs.data.image_size
    maps, masks, scores = split.maps, split.masks, split.scores
    out = {"classes": {}, "examples": [], "threshold_quantile": float(quantile)}
    for cid in sorted(set(data.class_ids.tolist())):
        sel = data.class_ids == cid
        name = data.class_names[cid]
        try:  # none shown when there is no calibration, or it was made under another scoring (an ablation row)
            thr = pools.threshold(name, quantile, scoring_signature(sc))
        except ValueError:
            thr = None
        labels = data.labels[sel]
        both = 0 < labels.sum() < len(labels)
        pixels_both = bool(masks[sel].any()) and not bool(masks[sel].all())
        out["classes"][name] = {
            "scores": scores[sel],
            "labels": labels,
            "defects": [data.defect_types[i] for i in np.nonzero(sel)[0]],
            "threshold": thr,
            "image_curves": metrics_lib.curve_points(scores[sel], labels) if both else None,
            "pixel_curves": metrics_lib.curve_points(maps[sel], masks[sel]) if pixels_both else None,
        }
    pre = Preprocess(data, size, display_geometry(ev))
    for ex in examples:
        el = pre.map(ex["index"])
        out["examples"].append(dict(ex, image=el["image"], map=maps[ex["index"]], mask=el["mask"]))
    return out


def write_results(workdir, report, data, scores, rec_mean):
    with open(os.path.join(workdir, "metrics.json"), "w") as f:
        json.dump(report, f, indent=2)
    with open(os.path.join(workdir, "scores.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["file", "class", "defect_type", "label", "score", "rec_mean"])
        for i in range(len(data)):
            w.writerow(
                [
                    data.file_names[i],
                    data.class_names[data.class_ids[i]],
                    data.defect_types[i],
                    int(data.labels[i]),
                    f"{scores[i]:.6g}",
                    f"{rec_mean[i]:.6g}",
                ]
            )


# ------------------------------------------------------------------------------------------ heatmaps
def write_heatmaps(workdir, data, split: ScoredSplit, pre: Preprocess, write: bool = True, per_class: int = 3) -> list:
    """Overlays of the highest- and lowest-scored test images of each class (colours scaled from the
    class's lowest to its highest map value), shown through `pre` (data.splits.Preprocess: the split
    at the size and geometry of the metrics' frame). write=False lists them without writing
    (processes other than the writer)."""
    maps, scores = split.maps, split.scores
    out_dir = os.path.join(workdir, "heatmaps")
    if write:
        os.makedirs(out_dir, exist_ok=True)
    picks = []
    for cid in sorted(set(data.class_ids.tolist())):
        idx = np.nonzero(data.class_ids == cid)[0]
        order = idx[np.argsort(-scores[idx])]
        picks += [("highest", cid, i) for i in order[:per_class]] + [
            ("lowest", cid, i) for i in order[::-1][:per_class]
        ]
    names = unique_names([data.file_names[i] for _, _, i in picks], ".png")
    examples = []
    for (kind, cid, i), name in zip(picks, names):
        idx = data.class_ids == cid
        lo, hi = float(maps[idx].min()), float(maps[idx].max())
        if write:
            el = pre.map(int(i))
            Image.fromarray(overlay(el["image"], maps[i], lo, hi)).save(os.path.join(out_dir, name))
        examples.append(
            {
                "class": data.class_names[cid],
                "kind": kind,
                "file": data.file_names[i],
                "score": float(scores[i]),
                "label": int(data.labels[i]),
                "png": f"heatmaps/{name}",
                "index": int(i),
                "scale": [lo, hi],
            }
        )
    return examples
