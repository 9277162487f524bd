"""Evaluation: score a test split, compute the seven metrics, write metrics.json, scores.csv and heatmaps.

`evaluate` scores every image with scoring.make_score_fn (each process its own share with several
processes; parallel.gather_rows collects them), refuses to write anything from non-finite maps or
scores, and writes the results from process 0 (eval_outputs.py). With scoring.mpo_normalisation =
test_max (the released code's transductive choice, eval only) the M_po scale is first taken from
the test set itself (test_max.py). The held-out images' calibration is training/calibration.py.
"""

from __future__ import annotations

import dataclasses
import time

import jax
import numpy as np
from PIL import Image

from maskad_jax.app.eval_outputs import (
    ScoredSplit,
    display_geometry,
    eval_frame,
    report_data,
    to_image_frame,
    write_heatmaps,
    write_results,
)
from maskad_jax.app.test_max import normalise_on_the_test_set
from maskad_jax.app.trained import Trained
from maskad_jax.common import progress
from maskad_jax.common.batching import run_batched, split_batches
from maskad_jax.common.errors import NonFiniteError
from maskad_jax.common.parallel import (
    gather_rows,
    is_writer,
    place_for_scoring,
    process_share,
    scoring_sharding,
)
from maskad_jax.common.specs import DataSpec, EvalSpec, PredictSpec, ScoringSpec
from maskad_jax.data.geometry import place, to_original
from maskad_jax.data.splits import Preprocess, SplitData, eval_batches
from maskad_jax.data.tiling import image_max, stitch_tiles, untiled
from maskad_jax.engine import metrics as metrics_lib
from maskad_jax.engine.scoring import (
    device_pools,
    make_score_fn,
)
from maskad_jax.engine.thresholds import false_alarms
from maskad_jax.engine.trained_model import TrainedModel


def evaluate(t: Trained, data: SplitData) -> dict:
    """Score the split with the trained model t, check the results are finite, compute the metrics
    and the false alarms at the decision thresholds (t.specs.predict's threshold settings), write the
    files into t.workdir."""
    sc, d, ev = t.specs.scoring, t.specs.data, t.specs.eval
    placed = place_for_scoring(sc.devices, (t.params, device_pools(t.pools, t.mpo)))
    if sc.mpo_normalisation == "test_max":
        normalise_on_the_test_set(sc, d, t, placed[1], data)
    t0 = time.time()
    split = _score_split(sc, d, t, placed, data)
    rate = len(data) / max(time.time() - t0, 1e-9)
    frame = eval_frame(ev)
    if data.image_of is not None:  # tiles: stitched onto their images, which the metrics are computed on
        split, data = stitch_split(d, data, split)
        frame = "image"
    elif frame == "image":  # every map on the whole image at S x S, so geometries compare on the same pixels
        maps = to_image_frame(split.maps, split.boxes, split.originals, d.image_size, d.geometry)
        split = dataclasses.replace(split, maps=maps, masks=split.masks_image)
    progress.log(f"metrics in the {frame} frame (eval.frame; data.geometry = {d.geometry})")
    _refuse_non_finite(data, split.maps, split.scores)
    _log_ot_certification(sc, split.uncertified, len(data))
    several = _processes_note(len(data))
    progress.log(f"scored {len(data)} test images at {rate:.2f} img/s{several} (first batch includes compilation)")
    per_class = per_class_metrics(ev, data, split.scores, split.maps, split.masks)
    mean = {k: float(np.nanmean([m[k] for m in per_class.values()])) for k in metrics_lib.METRIC_NAMES}
    shown = Preprocess(data, d.image_size, display_geometry(ev))
    report = {
        "per_class": per_class,
        "mean": mean,
        "test_images_per_second": rate,
        "num_test_images": len(data),
        "metrics_unit": "fraction (the console prints %)",
        "false_alarms": _false_alarms(t.specs.predict, sc, t.pools, data, split.scores),
        "examples": write_heatmaps(t.workdir, data, split, shown, write=is_writer()),
    }
    progress.log("mean over classes (%): " + ", ".join(f"{k} {100 * v:.1f}" for k, v in mean.items()))
    if is_writer():
        write_results(t.workdir, report, data, split.scores, split.rec_mean)
        report["report_data"] = report_data(t, data, split, report["examples"])
    return report


def _processes_note(n: int) -> str:
    """The log's note under jax.distributed (' over 2 processes (17 on this one)'); '' in one process."""
    if jax.process_count() == 1:
        return ""
    return f" over {jax.process_count()} processes ({len(process_share(n))} on this one)"


def _false_alarms(pc: PredictSpec, sc: ScoringSpec, pools, data, scores) -> dict:
    """thresholds.false_alarms on the split, and one line of them: per class, the good test images
    flagged at the decision threshold, and the rate the threshold targets."""
    rows = false_alarms(pc, sc, pools, scores, data.labels, [data.class_names[c] for c in data.class_ids])
    parts = []
    for cls, r in rows.items():
        if r["rate"] is None:
            parts.append(f"{cls} n/a" + ("" if r["threshold"] is not None else " (no threshold for this scoring)"))
            continue
        target = "" if r["target"] is None else f" (targets {100 * r['target']:.1f}%)"
        parts.append(f"{cls} {r['false_alarms']}/{r['good_images']} = {100 * r['rate']:.1f}%{target}")
    progress.log("false alarms on the good test images at the decision thresholds: " + "; ".join(parts))
    return rows


def per_class_metrics(ev: EvalSpec, data, scores, maps, masks) -> dict:
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
            scores[sel], data.labels[sel], maps[pix], masks[pix], protocol=ev.protocol, bins=ev.bins
        )
        undefined = [k for k, v in per_class[data.class_names[cid]].items() if not np.isfinite(v)]
        if undefined:
            progress.log(
                f"class {data.class_names[cid]}: {', '.join(undefined)} undefined (its test images need both normal "
                f"and defective ones, and masks for the pixel metrics)"
            )
    return per_class


def stitch_split(d: DataSpec, data, split: ScoredSplit) -> tuple:
    """A tiled split's results per image (tiling.py): the tiles' maps stitched onto the whole image at
    S x S (what a crop never saw takes the map's minimum), the image's score the maximum of its
    tiles', its mask read whole; (the ScoredSplit per image, the image-level split)."""
    maps, scores, originals = split.maps, split.scores, split.originals
    size, geometry = d.image_size, d.geometry
    images = untiled(data)
    out = np.zeros((len(images), size, size), np.float32)
    for i in range(len(images)):
        t = np.flatnonzero(data.image_of == i)
        tiles = [to_original(maps[j], place(*originals[j], size, geometry)) for j in t]
        full = stitch_tiles(tiles, data.crops[t], tuple(int(v) for v in images.sizes[i]))
        full = np.where(np.isfinite(full), full, np.nanmin(full))
        out[i] = np.asarray(Image.fromarray(full, "F").resize((size, size), Image.BILINEAR), np.float32)
    batches = eval_batches(images, d.eval_batch_size, image_size=size, geometry="resize")
    _, kept = run_batched(None, split_batches(batches, lambda b: (), ("mask",)), total=len(images))
    masks = kept.get("mask", np.zeros((0, size, size), np.uint8))
    _, score = image_max(scores, data.image_of)
    rec = np.bincount(data.image_of, split.rec_mean) / np.bincount(data.image_of)
    uncertified = np.bincount(data.image_of, split.uncertified)
    whole = dataclasses.replace(split, maps=out, masks=masks, scores=score.astype(np.float32))
    return dataclasses.replace(whole, rec_mean=rec.astype(np.float32), uncertified=uncertified), images


def _score_split(sc: ScoringSpec, d: DataSpec, tm: TrainedModel, placed: tuple, data) -> ScoredSplit:
    """This process's share of the split scored and every process's rows gathered. placed: the
    trained model's (params, pools) placed for scoring (parallel.place_for_scoring)."""
    (params, dev_pools), extractor, pools = placed, tm.extractor, tm.pools
    score = make_score_fn(sc, extractor, tm.model, tm.mpo)
    size, n = d.image_size, len(data)
    share = process_share(n)  # this process's images (all of them with one process)
    pad = d.geometry == "pad"
    shard = scoring_sharding(sc.devices, d.eval_batch_size)

    def inputs(batch):
        pidx = pools.pool_index([data.class_names[c] for c in batch["class_id"]])
        return batch["image"], pidx, batch["image_key"], batch["box"] if pad else None

    def run(images, pidx, keys, boxes):
        res = score(params, extractor.variables, dev_pools, images, pidx, keys, boxes)
        # rec: the image's mean per-patch Rec (scoring.error_units); ot_uncertified: patches whose
        # AssDis used the exact optimum
        return {k: res[k] for k in ("map", "score", "rec", "ot_uncertified")}

    batches = eval_batches(
        data, d.eval_batch_size, image_size=size, num_workers=d.num_workers, positions=share, geometry=d.geometry
    )
    host = ("mask", "box", "original", "mask_image")
    with progress.bar(len(share), "scoring") as pbar:
        res, kept = run_batched(
            run,
            split_batches(batches, inputs, host),
            place=lambda a: jax.device_put(a, shard),
            total=len(share),
            bar=pbar,
        )
    if res is None:  # an empty share (fewer images than processes)
        res = {"map": np.zeros((0, size, size), np.float32), "score": np.zeros(0, np.float32)}
        res.update(rec=np.zeros((0, 1, 1), np.float32), ot_uncertified=np.zeros(0, np.int32))
        kept = {"mask": np.zeros((0, size, size), np.uint8), "box": np.zeros((0, 4), np.int32)}
        kept.update(original=np.zeros((0, 2), np.int32), mask_image=np.zeros((0, size, size), np.uint8))
    rec = res["rec"].mean(axis=(1, 2))
    parts = (res["map"], kept["mask"], res["score"], rec, res["ot_uncertified"], kept["box"], kept["original"])
    return ScoredSplit(*gather_rows(n, share, *parts, kept["mask_image"]))


def _refuse_non_finite(data, maps, scores):
    bad = ~np.isfinite(scores) | ~np.isfinite(maps).all(axis=(1, 2))
    if bad.any():
        first = data.file_names[int(np.nonzero(bad)[0][0])]
        raise NonFiniteError(
            f"refusing to write metrics: the anomaly maps of {int(bad.sum())} of {len(bad)} test "
            f"images are not finite (first: {first}); the checkpoint or the fit is damaged, or "
            f"training diverged: retrain (a fresh --workdir) or check the weights"
        )


def _log_ot_certification(sc: ScoringSpec, uncertified: np.ndarray, n_images: int):
    """How many patches' Sinkhorn AssDis was not certified within 1% (association.paper_ot): those
    use the exact 1-D optimum instead, so the numbers stay right, but a non-zero count says the
    solver settings (scoring.epsilon, scoring.sinkhorn_iterations) do not suit these errors."""
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
