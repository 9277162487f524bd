"""Predict on new images: `--mode=predict --config.predict.input=PATH` (an image or a folder, recursive).

Writes into a new folder <workdir>/predictions/<date-time>/ per run (named in predictions/latest.txt,
so one run's files never mix with another's): scores.json and scores.csv (per image: file, class,
score, normalised score (1.0 = the threshold: thresholds.py), threshold, decision, and, for an
anomalous image only, its regions: the map's areas at or above the map's threshold, or the area
around the map's peak when the map stays under it (serve_export.decided_regions): box, area in
pixels of the original image, peak, by),
maps/<name>.npy (the anomaly map at the image's original size and aspect; NaN where the geometry did
not look: crop's sides), maps/<name>.png (scaled by the map's threshold: 255 = twice it) and
overlays/<name>.png (the heatmap over the original image, its regions outlined in white, the part not
inspected darkened). The map's threshold is the score's when the pixel map is the score's own map,
else the same quantile of the held-out images' map maxima (scoring.pixel_map). Names are flattened
from the input's relative paths to letters, digits, '-' and '_', so nothing can be written outside
the workdir.

Images reach the model under the geometry it was trained with (data.geometry; the fit records it).
Class: `predict.class_name`, or (empty) the pool whose tokens lie nearest to the image's on average.
Threshold: thresholds.py (predict.threshold, predict.threshold_rule; never from test labels).
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import time

import numpy as np

from maskad_jax.app.detector import as_rgb
from maskad_jax.app.overlay import unique_names
from maskad_jax.common import progress
from maskad_jax.common.errors import DataError, ImageInputError, MissingInputError

EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


def collect_inputs(path: str, log=print, field: str = "predict.input") -> tuple[str, list[str], list[str]]:
    """(root, sorted relative paths of the images at path (a file or a folder, recursively), the
    subfolders that could not be read, each logged). field: the config field that named path."""
    path = os.path.abspath(os.path.expanduser(path))
    if os.path.isfile(path):
        return os.path.dirname(path), [os.path.basename(path)], []
    if not os.path.isdir(path):
        raise MissingInputError(f"{field} {path!r} is neither an image file nor a folder")
    if not os.access(path, os.R_OK | os.X_OK):
        raise MissingInputError(f"{field} {path}: the folder cannot be read (permission denied)")
    rels, unreadable = [], []

    def report(err):
        unreadable.append(err.filename)
        log(f"cannot read folder {err.filename} ({err.strerror}): its images are not scored")

    for d, _, files in os.walk(path, onerror=report):
        rels += [os.path.relpath(os.path.join(d, f), path) for f in files if f.lower().endswith(EXTENSIONS)]
    if not rels:
        why = f" ({len(unreadable)} subfolder(s) could not be read)" if unreadable else ""
        raise MissingInputError(f"no images ({', '.join(EXTENSIONS)}) under {path}{why}")
    return path, sorted(rels), unreadable


def predict(detector, pc_input: str, workdir: str, rule: str, log=print) -> list[dict]:
    """Score the images at pc_input (predict.input) with the detector (detector.py, loaded from this
    workdir: the same numbers as the Python API); results in a new folder of <workdir>/predictions
    (output_folder). rule: where the thresholds come from (thresholds.threshold_rule), for the log."""
    root, rels, unreadable = collect_inputs(pc_input, log)
    final, out_dir = output_folder(workdir)
    try:
        rows = _predict_into(detector, out_dir, root, rels, log)
        scored = sum(1 for r in rows if r.get("score") is not None)
        skipped = len(rows) - scored
        if not scored:
            raise DataError(
                f"predict scored none of the {len(rels)} image(s) under {root}: every one was skipped (the log "
                f"says why){'; ' + str(len(unreadable)) + ' folder(s) could not be read' if unreadable else ''}"
            )
        _write_tables(out_dir, rows)
        os.rename(out_dir, final)
        point_latest(workdir, os.path.basename(final))
    except BaseException:  # an interrupted or failed run leaves no half-written folder behind
        shutil.rmtree(out_dir, ignore_errors=True)
        raise
    flagged = sum(1 for r in rows if r.get("anomalous"))
    note = crop_note(r["inspected_fraction"] for r in rows if r.get("score") is not None)
    if note:
        log(note)
    log(
        f"predicted {scored} images from {root}: {flagged} anomalous ({rule}); {skipped} skipped"
        + (f", {len(unreadable)} folder(s) unreadable" if unreadable else "")
        + f"; results in {final}"
    )
    return rows


def _predict_into(detector, out_dir, root, rels, log) -> list[dict]:
    """Score the images in the detector's batches, writing maps and overlays into out_dir (Prediction.save);
    a row per image (an image that cannot be read: a row with its error, and a log line)."""
    names = dict(zip(rels, unique_names(rels, "")))  # flat, unique file names for the outputs
    rows = []
    with progress.bar(len(rels), "predict") as pbar:
        for chunk in detector._chunks(len(rels)):
            ok, rgbs, frames = [], [], []
            for rel in (rels[i] for i in chunk):
                try:
                    img, n = as_rgb(os.path.join(root, rel), rel)
                except ImageInputError as e:
                    log(f"skipped {e}")
                    rows.append(
                        {"file": rel, "class": "", "score": None, "threshold": None, "anomalous": None, "error": str(e)}
                    )
                    continue
                if n > 1:
                    log(f"{rel}: {n} frames: the first is scored")
                ok.append(rel)
                rgbs.append(img)
                frames.append(n)
            for rel, pred in zip(ok, detector.score_decoded(rgbs, ok, frames) if ok else []):
                pred.save(out_dir, names[rel])
                row = dict(pred.row(), output_name=names[rel])
                if pred.note:
                    row["note"] = pred.note
                rows.append(row)
            pbar.update(len(chunk))
    return rows


def crop_note(seen) -> str:
    """ "" when every image was seen whole, else how much of them the geometry inspected (seen: the
    images' inspected fractions of their area)."""
    seen = list(seen)
    if not seen or min(seen) > 0.999:
        return ""
    return (
        f"data.geometry = crop inspected {100 * float(np.mean(seen)):.0f}% of the images' area on average "
        f"(least {100 * min(seen):.0f}%): the rest is NaN in the maps; resize or pad inspects every pixel"
    )


def output_folder(workdir: str) -> tuple[str, str]:
    """(<workdir>/predictions/<date-time>[-N], the same + ".partial"): the run writes into the second,
    created here, and renames it to the first when it is complete (a run never mixes with an earlier
    one's files, and an interrupted one leaves nothing that looks finished)."""
    base = os.path.join(workdir, "predictions")
    if os.path.lexists(base) and not os.path.isdir(base):
        raise DataError(f"{base} is not a folder: move it away so predict can write its results there")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    name, k = stamp, 1
    while os.path.lexists(os.path.join(base, name)) or os.path.lexists(os.path.join(base, name + ".partial")):
        k += 1
        name = f"{stamp}-{k}"
    out = os.path.join(base, name)
    for sub in ("maps", "overlays"):
        os.makedirs(os.path.join(out + ".partial", sub))
    return out, out + ".partial"


def point_latest(workdir: str, name: str) -> None:
    """<workdir>/predictions/latest.txt names the newest complete run: written beside and renamed over
    it, so a link there is replaced, never written through."""
    base = os.path.join(workdir, "predictions")
    latest = os.path.join(base, "latest.txt")
    if os.path.isdir(latest) and not os.path.islink(latest):
        raise DataError(f"{latest} is a folder: remove it; predict names its newest run in that file")
    tmp = os.path.join(base, f".latest.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        f.write(name + "\n")
    os.replace(tmp, latest)


def _write_tables(out_dir, rows):
    """scores.json (every field, the regions listed) and scores.csv (a line per image: the regions
    counted, the largest peak's box given)."""
    with open(os.path.join(out_dir, "scores.json"), "w") as f:
        json.dump(rows, f, indent=2)
    num = lambda v: "" if v is None else f"{v:.6g}"  # noqa: E731
    with open(os.path.join(out_dir, "scores.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(
            [
                "file",
                "class",
                "score",
                "normalised_score",
                "threshold",
                "anomalous",
                "regions",
                "top_region_box",
                "top_region_area",
                "output_name",
                "error",
                "note",
            ]
        )
        for r in rows:
            top = (r.get("regions") or [None])[0]
            w.writerow(
                [
                    r["file"],
                    r["class"],
                    num(r["score"]),
                    num(r.get("normalised_score")),
                    num(r["threshold"]),
                    r["anomalous"],
                    "" if r.get("regions") is None else len(r["regions"]),
                    "" if top is None else " ".join(str(v) for v in top["box"]),
                    "" if top is None else top["area"],
                    r.get("output_name", ""),
                    r.get("error", ""),
                    r.get("note", ""),
                ]
            )
