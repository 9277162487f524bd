"""Evaluation: score a test split, compute the seven metrics, write metrics.json, scores.csv and heatmaps.

`evaluate` scores every image with scoring.make_score_fn (each process its own share with several
processes; parallel.gather_rows collects them), refuses to write anything from non-finite maps or
scores, and writes the results from process 0. `calibrate` scores the held-out normal training
images for predict's thresholds and the terms' statistics. With scoring.mpo_normalisation =
test_max (the released code's transductive choice, eval only) the M_po scale is first taken from
the test set itself.
"""

from __future__ import annotations

import csv
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from maskad_jax import metrics as metrics_lib
from maskad_jax import progress
from maskad_jax.coreset import nearest_in_pools
from maskad_jax.data import Preprocess, SplitData, eval_batches
from maskad_jax.errors import NonFiniteError
from maskad_jax.fit import scoring_signature
from maskad_jax.flow import flow_logp_fn
from maskad_jax.geometry import place, to_original
from maskad_jax.overlay import overlay, unique_names
from maskad_jax.parallel import gather_max, gather_rows, is_writer, place_for_scoring, process_share, scoring_sharding
from maskad_jax.scoring import (
    apply_keep,
    device_pools,
    fuse,
    keep_mask,
    make_score_features_fn,
    make_score_fn,
    needs_term_stats,
)
from maskad_jax.tiling import image_max, stitch_tiles, untiled


def calibrate(config, model, params, pools, h_in, h_tgt, keys, flow=None, f_flow=None, fine=None, boxes=None) -> dict:
    """Score the held-out normal training images of every pool (for predict's thresholds and, with
    scoring.mpo_fusion = sum, the terms' statistics): {"cal_scores": {class: image scores},
    "cal_map_max": {class: pixel-map maxima}, "term_stats": (K, 4) held-out mean and std of P and of
    M_po per pool, or None when the scoring does not standardise them}.

    h_in, h_tgt, keys, f_flow, fine, boxes: the training images' features and content boxes (rows at
    the pools' calibration positions are used; boxes count with data.geometry = pad). Several
    processes each score a share and gather the terms; the statistics and the scores are then
    finished from the gathered terms with the scoring's own fuse and keep stages."""
    sc = config.scoring
    fn = jax.jit(make_score_features_fn(config, model, flow), static_argnums=(6,))
    params, dev_pools = place_for_scoring(config, (params, device_pools(pools, flow)))
    boxes = boxes if config.data.geometry == "pad" else None
    held = [np.asarray(pools.calibration.get(cls, np.zeros(0, int)), np.int64) for cls in pools.class_names]
    pos = np.concatenate(held)  # training-image positions, class by class
    pool = np.concatenate([np.full(len(p), k, np.int32) for k, p in enumerate(held)])
    rows = process_share(len(pos))
    terms = {"patch": [], "mpo_map": [], "score": [], "map_max": []}
    bs, size = config.data.eval_batch_size, config.data.image_size
    with progress.bar(len(rows), "calibration") as pbar:
        for s in range(0, len(rows), bs):
            p, r = pos[rows[s : s + bs]], rows[s : s + bs]
            tgt = h_in[p] if h_tgt is None else h_tgt[p]
            out = fn(
                params,
                dev_pools,
                jnp.asarray(h_in[p]),
                jnp.asarray(tgt),
                jnp.asarray(pool[r]),
                jnp.asarray(keys[p]),
                size,
                None if f_flow is None else jnp.asarray(f_flow[p]),
                None if fine is None else jnp.asarray(fine[p]),
                None if boxes is None else jnp.asarray(boxes[p]),
            )
            for k, v in (("patch", out["patch"]), ("mpo_map", out["mpo_map"]), ("score", out["score"])):
                terms[k].append(np.asarray(v))
            terms["map_max"].append(np.asarray(out["map"]).max(axis=(1, 2)))
            pbar.update(len(r))
    patch, mpo_map, scores, map_max = gather_rows(
        len(pos), rows, *(np.concatenate(v) if v else None for v in terms.values())
    )
    stats = None
    if needs_term_stats(sc):
        stats = term_stats(patch, mpo_map, pool, len(held))
        keep = (None if boxes is None else boxes[pos], dev_pools.get("ignore"), pool)
        scores, map_max = _finish(sc, patch, mpo_map, stats[pool], keep, size, bs)
    bad = ~np.isfinite(scores) | ~np.isfinite(map_max)
    if bad.any() or (stats is not None and not np.all(np.isfinite(stats))):
        raise NonFiniteError(
            f"the scores of {int(bad.sum())} held-out normal training images are not finite, so no "
            f"threshold can be calibrated: training or the fit produced NaNs"
        )
    bounds = np.cumsum([0] + [len(p) for p in held])
    per = lambda v: {cls: v[bounds[k] : bounds[k + 1]].tolist() for k, cls in enumerate(pools.class_names)}  # noqa: E731
    return {"cal_scores": per(scores), "cal_map_max": per(map_max), "term_stats": stats}


def term_stats(patch, mpo_map, pool, k: int) -> np.ndarray:
    """(k, 4): per pool, the mean and standard deviation of P over its held-out images' patches, then
    of M_po over their positions (float64 sums). A pool without held-out images gets (0, 1, 0, 1)."""
    out = np.tile(np.asarray([0.0, 1.0, 0.0, 1.0]), (k, 1))
    for i in range(k):
        sel = pool == i
        if sel.any():
            p, m = patch[sel].astype(np.float64), mpo_map[sel].astype(np.float64)
            out[i] = [p.mean(), max(p.std(), 1e-12), m.mean(), max(m.std(), 1e-12)]
    return out.astype(np.float32)


def _finish(sc, patch, mpo_map, stats, keep, size, bs):
    """Image scores and pixel-map maxima from stored terms: the scoring's fuse and keep stages, batched.
    keep: (boxes (N, 4) or None, ignore masks (K, S, S) or None, pool index (N,))."""
    boxes, ignore, pool = keep

    def finish(p, m, st, bx, pidx):
        score, pixel_map = apply_keep(*fuse(p, m, st, sc, size), keep_mask(bx, ignore, pidx, size))
        return score, pixel_map.max(axis=(1, 2))

    fn = jax.jit(finish)
    out = [
        fn(
            patch[s : s + bs],
            mpo_map[s : s + bs],
            stats[s : s + bs],
            None if boxes is None else boxes[s : s + bs],
            pool[s : s + bs],
        )
        for s in range(0, len(patch), bs)
    ]
    return tuple(np.concatenate([np.asarray(o[i]) for o in out]) if out else np.zeros(0, np.float32) for i in (0, 1))


def evaluate(config, workdir, extractor, model, params, pools, data: SplitData, flow=None) -> dict:
    """Score the split, check the results are finite, compute the metrics, write the files."""
    params, dev_pools = place_for_scoring(config, (params, device_pools(pools, flow)))
    if config.scoring.mpo_normalisation == "test_max":
        _normalise_on_the_test_set(config, extractor, pools, dev_pools, flow, data)
    t0 = time.time()
    maps, masks, scores, rec_mean, uncertified, boxes, originals, masks_image = _score_split(
        config, extractor, model, params, dev_pools, pools, data, flow
    )
    rate = len(data) / max(time.time() - t0, 1e-9)
    frame = eval_frame(config)
    if data.image_of is not None:  # tiles: stitched onto their images, which the metrics are computed on
        maps, masks, scores, rec_mean, uncertified, data = stitch_split(
            config, data, maps, scores, rec_mean, uncertified, boxes, originals
        )
        frame = "image"
    elif frame == "image":  # every map on the whole image at S x S, so geometries compare on the same pixels
        maps, masks = to_image_frame(maps, boxes, originals, config.data.image_size, config.data.geometry), masks_image
    progress.log(f"metrics in the {frame} frame (eval.frame; data.geometry = {config.data.geometry})")
    _refuse_non_finite(data, maps, scores)
    _log_ot_certification(config, uncertified, len(data))
    several = (
        f" over {jax.process_count()} processes ({len(process_share(len(data)))} on this one)"
        if jax.process_count() > 1
        else ""
    )
    progress.log(f"scored {len(data)} test images at {rate:.2f} img/s{several} (first batch includes compilation)")
    per_class = per_class_metrics(config, data, scores, maps, masks)
    mean = {k: float(np.nanmean([m[k] for m in per_class.values()])) for k in metrics_lib.METRIC_NAMES}
    report = {
        "per_class": per_class,
        "mean": mean,
        "test_images_per_second": rate,
        "num_test_images": len(data),
        "metrics_unit": "fraction (the console prints %)",
        "examples": write_heatmaps(
            workdir, data, maps, scores, config.data.image_size, write=is_writer(), geometry=display_geometry(config)
        ),
    }
    progress.log("mean over classes (%): " + ", ".join(f"{k} {100 * v:.1f}" for k, v in mean.items()))
    if is_writer():
        _write_results(workdir, report, data, scores, rec_mean)
        report["report_data"] = report_data(config, data, pools, maps, masks, scores, report["examples"])
    return report


def per_class_metrics(config, data, scores, maps, masks) -> dict:
    """The seven metrics of every class; pixel metrics over the images whose masks are ground truth."""
    per_class = {}
    has_mask = np.ones(len(data), bool) if data.has_mask is None else data.has_mask
    if not has_mask.all():
        progress.log(
            f"{int((~has_mask).sum())} defective test image(s) have no ground-truth mask: they count for the image "
            f"metrics only"
        )
    for cid in sorted(set(data.class_ids.tolist())):
        sel = data.class_ids == cid
        pix = sel & has_mask
        per_class[data.class_names[cid]] = metrics_lib.all_metrics(
            scores[sel], data.labels[sel], maps[pix], masks[pix], protocol=config.eval.protocol, bins=config.eval.bins
        )
        undefined = [k for k, v in per_class[data.class_names[cid]].items() if not np.isfinite(v)]
        if undefined:
            progress.log(
                f"class {data.class_names[cid]}: {', '.join(undefined)} undefined (its test images need both normal "
                f"and defective ones, and masks for the pixel metrics)"
            )
    return per_class


def eval_frame(config) -> str:
    """eval.frame resolved: input (the model's input frame) or image (the whole image)."""
    if config.eval.frame != "auto":
        return config.eval.frame
    return "input" if config.data.geometry == "crop" else "image"


def display_geometry(config) -> str:
    """The geometry that shows an image in the frame the metrics are computed in."""
    return "resize" if eval_frame(config) == "image" else config.data.geometry


def to_image_frame(maps, boxes, originals, size: int, geometry: str) -> np.ndarray:
    """Input-frame maps (N, S, S) on their whole images at S x S (geometry.to_original); the part a
    crop never saw takes the map's minimum (not inspected: never above anything inspected)."""
    out = np.empty_like(maps)
    for i, (amap, box, (w, h)) in enumerate(zip(maps, boxes, originals)):
        p = place(int(w), int(h), size, geometry)
        x0, y0, x1, y1 = (int(v) for v in box)
        out[i] = to_original(amap, p, (size, size), fill=float(amap[y0:y1, x0:x1].min()))
    return out


def report_data(config, data, pools, maps, masks, scores, examples) -> dict:
    """What report.html plots, per class: the image scores by label and defect type, the predict
    threshold (the calibrated quantile of held-out normal scores), image and pixel ROC/PR points;
    and the examples' images, maps and ground truth."""
    out = {"classes": {}, "examples": [], "threshold_quantile": float(config.predict.threshold_quantile)}
    for cid in sorted(set(data.class_ids.tolist())):
        sel = data.class_ids == cid
        name = data.class_names[cid]
        try:  # none shown when there is no calibration, or it was made under another scoring (an ablation row)
            thr = pools.threshold(name, config.predict.threshold_quantile, scoring_signature(config))
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
    pre = Preprocess(data, config.data.image_size, display_geometry(config))
    for ex in examples:
        el = pre.map(ex["index"])
        out["examples"].append(dict(ex, image=el["image"], map=maps[ex["index"]], mask=el["mask"]))
    return out


def stitch_split(config, data, maps, scores, rec_mean, uncertified, boxes, originals):
    """A tiled split's results per image (tiling.py): the tiles' maps stitched onto the whole image at
    S x S (what a crop never saw takes the map's minimum), the image's score the maximum of its
    tiles', its mask read whole; (maps, masks, scores, rec_mean, uncertified, the image-level split)."""
    size, geometry = config.data.image_size, config.data.geometry
    images = untiled(data)
    out = np.zeros((len(images), size, size), np.float32)
    for i in range(len(images)):
        t = np.flatnonzero(data.image_of == i)
        tiles = [to_original(maps[j], place(*originals[j], size, geometry)) for j in t]
        full = stitch_tiles(tiles, data.crops[t], tuple(int(v) for v in images.sizes[i]))
        full = np.where(np.isfinite(full), full, np.nanmin(full))
        out[i] = np.asarray(Image.fromarray(full, "F").resize((size, size), Image.BILINEAR), np.float32)
    masks = np.zeros((len(images), size, size), np.uint8)
    row = 0
    for batch in eval_batches(images, config.data.eval_batch_size, image_size=size, geometry="resize"):
        ok = batch["valid"] == 1
        masks[row : row + int(ok.sum())] = batch["mask"][ok]
        row += int(ok.sum())
    _, score = image_max(scores, data.image_of)
    rec = np.bincount(data.image_of, rec_mean) / np.bincount(data.image_of)
    return out, masks, score.astype(np.float32), rec.astype(np.float32), np.bincount(data.image_of, uncertified), images


def _score_split(config, extractor, model, params, dev_pools, pools, data, flow):
    """This process's share of the split scored and every process's rows gathered: (maps, masks,
    scores, rec_mean, uncertified, content boxes, original sizes, whole-image masks) over the split."""
    score = make_score_fn(config, extractor, model, flow)
    size, n = config.data.image_size, len(data)
    share = process_share(n)  # this process's images (all of them with one process)
    out = {
        "map": np.zeros((len(share), size, size), np.float32),
        "mask": np.zeros((len(share), size, size), np.uint8),
        "score": np.zeros((len(share),), np.float32),
        "rec": np.zeros((len(share),), np.float32),  # the image's mean per-patch Rec (scoring.error_units)
        "ot_uncertified": np.zeros((len(share),), np.int32),  # patches whose AssDis used the exact optimum
        "box": np.zeros((len(share), 4), np.int32),
        "original": np.zeros((len(share), 2), np.int32),
        "mask_image": np.zeros((len(share), size, size), np.uint8),
    }
    pad = config.data.geometry == "pad"
    shard, row = scoring_sharding(config), 0
    with progress.bar(len(share), "scoring") as pbar:
        for batch in eval_batches(
            data,
            config.data.eval_batch_size,
            image_size=size,
            num_workers=config.data.num_workers,
            positions=share,
            geometry=config.data.geometry,
        ):
            names = [data.class_names[c] for c in batch["class_id"]]
            res = score(
                params,
                extractor.variables,
                dev_pools,
                jax.device_put(batch["image"], shard),
                jax.device_put(pools.pool_index(names), shard),
                jax.device_put(batch["image_key"], shard),
                jax.device_put(batch["box"], shard) if pad else None,
            )
            ok = batch["valid"] == 1
            r = slice(row, row + int(ok.sum()))  # batches follow `share` in order
            for k in ("map", "score", "ot_uncertified"):
                out[k][r] = np.asarray(res[k])[ok]
            out["rec"][r] = np.asarray(res["rec"]).mean(axis=(1, 2))[ok]
            for k in ("mask", "box", "original", "mask_image"):
                out[k][r] = batch[k][ok]
            row = r.stop
            pbar.update(int(ok.sum()))
    return gather_rows(n, share, *(out[k] for k in out))


def _refuse_non_finite(data, maps, scores):
    bad = ~np.isfinite(scores) | ~np.isfinite(maps).all(axis=(1, 2))
    if bad.any():
        first = data.file_names[int(np.nonzero(bad)[0][0])]
        raise NonFiniteError(
            f"refusing to write metrics: the anomaly maps of {int(bad.sum())} of {len(bad)} test "
            f"images are not finite (first: {first}); the checkpoint or the fit is damaged, or "
            f"training diverged: retrain (a fresh --workdir) or check the weights"
        )


def _write_results(workdir, report, data, scores, rec_mean):
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


def _log_ot_certification(config, uncertified: np.ndarray, n_images: int):
    """How many patches' Sinkhorn AssDis was not certified within 1% (association.paper_ot): those
    use the exact 1-D optimum instead, so the numbers stay right, but a non-zero count says the
    solver settings (scoring.epsilon, scoring.sinkhorn_iterations) do not suit these errors."""
    sc = config.scoring
    if sc.ot != "paper" or not (sc.use_assdis and sc.use_reference):
        return
    total = int(uncertified.sum())
    if total:
        progress.log(
            f"AssDis: Sinkhorn not certified within 1% on {total} patch(es) of {n_images} images; the exact "
            f"1-D optimum was used there (raise scoring.sinkhorn_iterations to avoid it)"
        )
    else:
        progress.log(f"AssDis: Sinkhorn certified within 1% of the optimum on every patch of {n_images} images")


# ------------------------------------------------------------- the released code's test-set normalisation
def _normalise_on_the_test_set(config, extractor, pools, dev_pools, flow, data):
    """scoring.mpo_normalisation = test_max: M_po's scale from the class's whole test set (in place)."""
    if flow is not None:
        dev_pools["flow"]["logp_ref"] = jnp.asarray(_test_max_flow_ref(config, extractor, pools, dev_pools, flow, data))
    else:
        dev_pools["cal_scale"] = jnp.asarray(_test_max_scale(config, extractor, pools, dev_pools, data))
    progress.log("M_po normalised by the max over each class's test set (transductive, as the released code)")


def _per_pool_test_max(config, extractor, pools, data, image_max) -> np.ndarray:
    """Per pool: the max over its class's test images of image_max(backbone_vars, images, pool_idx) -> (B,).
    -inf for a pool without test images."""
    out = np.full(len(pools.class_names), -np.inf, np.float32)
    shard = scoring_sharding(config)
    fn = jax.jit(image_max)
    for batch in eval_batches(
        data,
        config.data.eval_batch_size,
        image_size=config.data.image_size,
        num_workers=config.data.num_workers,
        positions=process_share(len(data)),
        geometry=config.data.geometry,
    ):
        pidx = pools.pool_index([data.class_names[c] for c in batch["class_id"]])
        m = np.asarray(fn(extractor.variables, jax.device_put(batch["image"], shard), jax.device_put(pidx, shard)))
        for k, v, ok in zip(pidx, m, batch["valid"]):
            if ok:
                out[k] = max(out[k], v)
    return gather_max(out)  # each process saw its share of the test images


def _test_max_scale(config, extractor, pools, dev_pools, data) -> np.ndarray:
    """Per pool: the largest nearest-pool distance over all test tokens of its images (code variant)."""

    def max_dist(v, x, pidx):
        h = extractor.apply(v, x)
        b, gh, gw, c = h.shape
        d, _ = nearest_in_pools(h.reshape(b, gh * gw, c), dev_pools["pool_in"], dev_pools["valid"], pidx)
        return jnp.sqrt(d).max(axis=1)

    scale = _per_pool_test_max(config, extractor, pools, data, max_dist)
    return np.where(scale > 0, scale, np.asarray(pools.cal_scale))


def _test_max_flow_ref(config, extractor, pools, dev_pools, flow, data) -> np.ndarray:
    """Per pool: the largest flow log-likelihood over all test positions of its images (code variant)."""
    fs = dev_pools["flow"]
    own = flow.embedder is not None  # the flow backbone's features and pool, else h and the fit's pools

    def max_logp(v, x, pidx):
        h = flow.embedder.apply(fs["backbone_vars"], x) if own else extractor.apply(v, x)
        b, gh, gw, c = h.shape
        pool, valid = (fs["pool"], fs["valid"]) if own else (dev_pools["pool_in"], dev_pools["valid"])
        lp = flow_logp_fn(flow.module, (gh, gw))(
            flow.params, h.reshape(b, gh * gw, c), pool, valid, pidx, config.flow.cond_dim
        )
        return lp.max(axis=1)

    ref = _per_pool_test_max(config, extractor, pools, data, max_logp)
    return np.where(np.isfinite(ref), ref, np.asarray(flow.logp_ref))


# ------------------------------------------------------------------------------------------ heatmaps
def write_heatmaps(workdir, data, maps, scores, size, per_class: int = 3, write: bool = True, geometry="crop") -> list:
    """Overlays of the highest- and lowest-scored test images of each class (colours scaled from the
    class's lowest to its highest map value). write=False lists them without writing (processes
    other than the writer)."""
    out_dir = os.path.join(workdir, "heatmaps")
    if write:
        os.makedirs(out_dir, exist_ok=True)
    pre = Preprocess(data, size, geometry)
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
