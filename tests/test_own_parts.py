"""A user's own parts, end to end (#25): a folder of good 640 x 480 photos only, trained with the folder
config's whole-image geometry, labelled validation images and an ignore mask; predict on new 640 x 480
and 2000 x 500 images whose only defect sits near the left edge (a centre crop removes it); per-class
thresholds; --mode=update with new good images; the refusals, each one line with exit status 2."""

import hashlib
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from helpers import FAST_COMPILE
from PIL import Image

from maskad_jax.data.geometry import place
from maskad_jax.engine.fit_state import read_meta

ROOT = pathlib.Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow  # subprocess runs of run.py

DEFECT = (12, 200, 72, 260)  # (x0, y0, x1, y1) in a 640 x 480 image: inside the left 80 px a centre crop drops
STRIP_DEFECT = (30, 200, 130, 300)  # in a 2000 x 500 image: a centre crop keeps only x in [750, 1250)


def _texture(rng, w, h):
    """A smooth brownish surface: blurred noise, the same look at any size."""
    small = rng.normal(0, 1, (max(2, h // 40), max(2, w // 40), 1))
    img = Image.fromarray(np.uint8(np.clip(128 + 25 * small, 0, 255)[..., 0]), "L").resize((w, h), Image.BICUBIC)
    base = np.asarray(img, np.float32)[..., None] * np.float32([1.0, 0.85, 0.7])
    return np.clip(base + rng.normal(0, 3, (h, w, 1)), 0, 255).astype(np.uint8)


def _defective(rng, w, h, box):
    arr = _texture(rng, w, h)
    x0, y0, x1, y1 = box
    arr[y0:y1, x0:x1] = (230, 30, 30)
    return arr


def _save(arr, path):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


def _run(*args, ok=True):
    env = dict(os.environ, XLA_FLAGS=(os.environ.get("XLA_FLAGS", "") + " " + FAST_COMPILE).strip())
    proc = subprocess.run(
        [sys.executable, "run.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=600, env=env
    )
    if ok:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def _digests(folder):
    out = {}
    for d, _, files in os.walk(folder):
        for f in files:
            p = os.path.join(d, f)
            out[os.path.relpath(p, folder)] = hashlib.sha256(open(p, "rb").read()).hexdigest()
    return out


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    """The folders a user would have: good photos, labelled validation images, an ignore mask, new
    images to inspect, new good ones to add later, and images of another shape."""
    base = tmp_path_factory.mktemp("parts")
    rng = np.random.default_rng(0)
    for i in range(16):
        _save(_texture(rng, 640, 480), base / "bracket" / f"g{i:02d}.png")
    for i in range(3):
        _save(_texture(rng, 640, 480), base / "validation" / "good" / f"v{i}.png")
        _save(
            _defective(rng, 640, 480, (300 + 20 * i, 100, 360 + 20 * i, 160)),
            base / "validation" / "scratch" / f"b{i}.png",
        )
    ignore = np.zeros((480, 640), np.uint8)
    ignore[380:470, 500:630] = 255  # a fixture in the bottom-right corner
    _save(ignore, base / "ignore" / "bracket.png")
    _save(_defective(rng, 640, 480, DEFECT), base / "inspect" / "edge_640x480.png")
    _save(_defective(rng, 2000, 500, STRIP_DEFECT), base / "inspect" / "edge_2000x500.png")
    fixture = _texture(rng, 640, 480)
    fixture[390:460, 520:620] = (20, 220, 20)  # a green fixture, inside the ignore region only
    _save(fixture, base / "inspect" / "fixture_640x480.png")
    for i in range(2):
        _save(_texture(rng, 640, 480), base / "new_good" / f"n{i}.png")
    _save(_texture(rng, 2000, 500), base / "strip" / "s.png")
    return base


def _common(parts, work):
    return [
        "--config=configs/folder.py:smoke",
        f"--config.data.manual_dir={parts / 'bracket'}",  # a plain folder of photos: one class, "bracket",
        f"--config.data.tfds_dir={work / 'tfds'}",
        f"--workdir={work / 'run'}",
        "--config.data.image_size=96",
    ]


@pytest.fixture(scope="module")
def trained(parts, tmp_path_factory):
    work = tmp_path_factory.mktemp("work")
    out = _run(
        *_common(parts, work),
        f"--config.data.validation={parts / 'validation'}",
        f"--config.data.ignore_masks={parts / 'ignore'}",
    )
    return work, out.stdout + out.stderr


def _predict(parts, work, *extra):
    _run(*_common(parts, work), "--mode=predict", f"--config.predict.input={parts / 'inspect'}", *extra)
    run = work / "run" / "predictions"
    latest = (run / "latest.txt").read_text().strip()
    rows = json.loads((run / latest / "scores.json").read_text())
    return run / latest, {r["file"]: r for r in rows}


def test_good_photos_only_train_fit_and_calibrate(trained):
    work, log = trained
    assert "no test images" in log and "no metrics" in log
    fit = read_meta(str(work / "run" / "fit"))
    assert fit["nominal"]["class_names"] == ["bracket"] and fit["contract"]["geometry"] == "resize"
    val = fit["val_thresholds"]["bracket"]
    assert (val["good"], val["defective"]) == (3, 3) and 0 < val["f1"] <= 1
    # cross-fitted calibration: all 16 good photos scored (3 held out of the scoring pools, the others by
    # the pools of the other folds), so the quantile threshold rests on 16 scores
    assert len(fit["nominal"]["held_out"]["bracket"]) == 3 and len(fit["calibration"]["scores"]["bracket"]) == 16
    assert "calibration cross-fitted over 6 fold(s)" in log and "images scored bracket 16" in log


@pytest.fixture(scope="module")
def predicted(parts, trained):
    """One predict run on the inspect folder with the quantile rule: (its folder, rows by file)."""
    return _predict(parts, trained[0], "--config.predict.threshold_rule=quantile")


def test_predict_maps_have_the_original_size_and_find_the_edge_defect(trained, predicted):
    work, _ = trained
    folder, rows = predicted
    for name, shape in (("edge_640x480.png", (480, 640)), ("edge_2000x500.png", (500, 2000))):
        amap = np.load(folder / "maps" / (rows[name]["output_name"] + ".npy"))
        assert amap.shape == shape and np.isfinite(amap).all()  # resize: every pixel inspected
        assert Image.open(folder / "overlays" / (rows[name]["output_name"] + ".png")).size == shape[::-1]
    for name, (x0, y0, x1, y1) in (("edge_640x480.png", DEFECT), ("edge_2000x500.png", STRIP_DEFECT)):
        amap = np.load(folder / "maps" / (rows[name]["output_name"] + ".npy"))
        y, x = np.unravel_index(np.argmax(amap), amap.shape)
        assert x0 - 40 <= x <= x1 + 40 and y0 - 40 <= y <= y1 + 40, (name, x, y)
        top = rows[name]["regions"][0]  # the highest-peaked region holds the defect
        bx0, by0, bx1, by1 = top["box"]
        assert bx0 <= (x0 + x1) // 2 < bx1 and by0 <= (y0 + y1) // 2 < by1, (name, top)
        assert top["peak"] == pytest.approx(float(amap.max()), rel=1e-5)
    # the 640 x 480 image has the training photos' shape: its region is the defect, not the part
    top = rows["edge_640x480.png"]["regions"][0]
    assert top["area"] < 0.1 * 640 * 480
    # the strip does not: squashed otherwise than the training photos, it gets a note saying so
    assert "shape" in rows["edge_2000x500.png"].get("note", "") and "note" not in rows["edge_640x480.png"]
    x1 = DEFECT[2]
    # a centre crop would not have looked there at all
    assert place(640, 480, 96, "crop").region[0] > x1
    r = rows["edge_640x480.png"]
    assert r["normalised_score"] == pytest.approx(
        (r["score"] - np.median(read_meta(str(work / "run" / "fit"))["calibration"]["scores"]["bracket"]))
        / (r["threshold"] - np.median(read_meta(str(work / "run" / "fit"))["calibration"]["scores"]["bracket"]))
    )


def test_the_ignore_region_is_zero_and_never_raises_an_alarm(predicted):
    folder, rows = predicted
    amap = np.load(folder / "maps" / (rows["fixture_640x480.png"]["output_name"] + ".npy"))
    assert np.all(amap[395:465, 510:620] == 0)  # inside the ignore mask (away from its bilinear border)
    assert amap[:300].max() > 0


def test_thresholds_follow_each_rule(parts, trained, predicted):
    work, _ = trained
    fit = read_meta(str(work / "run" / "fit"))
    q = float(np.quantile(fit["calibration"]["scores"]["bracket"], 0.99))  # the default quantile
    assert predicted[1]["edge_640x480.png"]["threshold"] == pytest.approx(q)
    _, rows = _predict(parts, work)  # auto: the class has validation images, so F1
    assert rows["edge_640x480.png"]["threshold"] == pytest.approx(fit["val_thresholds"]["bracket"]["threshold"])
    _, rows = _predict(parts, work, "--config.predict.threshold=bracket=123.5")
    assert rows["edge_640x480.png"]["threshold"] == 123.5 and not rows["edge_640x480.png"]["anomalous"]
    _refused_predict(parts, work, "--config.predict.threshold=screw=1", "screw")


def test_update_grows_the_pool_and_keeps_the_reconstructor(parts, trained):
    work, _ = trained
    run = work / "run"
    before_ckpt = _digests(run / "checkpoints")
    before = read_meta(str(run / "fit"))
    with np.load(run / "fit" / "fit.npz") as z:
        valid_before = int(z["valid"].sum())
    refused = _run(*_common(parts, work), "--mode=update", f"--config.new_images.input={parts / 'strip'}", ok=False)
    assert refused.returncode == 2 and "another shape" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1
    _run(
        *_common(parts, work),
        "--mode=update",
        f"--config.new_images.input={parts / 'new_good'}",
        f"--config.data.validation={parts / 'validation'}",
    )
    after = read_meta(str(run / "fit"))
    with np.load(run / "fit" / "fit.npz") as z:
        assert int(z["valid"].sum()) > valid_before
    assert _digests(run / "checkpoints") == before_ckpt  # the reconstructor bitwise untouched
    assert after["calibration"]["scores"]["bracket"] != before["calibration"]["scores"]["bracket"]
    assert (
        after["nominal"]["held_out"] == before["nominal"]["held_out"]
    )  # the same held-out images, scored against the new pool
    # the updated class rests on fold 0's held-out images only (the other folds' pools lack the new ones)
    assert len(after["calibration"]["scores"]["bracket"]) == 3
    (record,) = after["updates"]
    assert sorted(record["files"]) == ["n0.png", "n1.png"] and record["class"] == "bracket"
    again = _run(*_common(parts, work), "--mode=update", f"--config.new_images.input={parts / 'new_good'}", ok=False)
    assert again.returncode == 2 and "already added" in again.stderr
    wrong = _run(
        *_common(parts, work),
        "--mode=update",
        f"--config.new_images.input={parts / 'new_good'}",
        "--config.new_images.class_name=bolt",
        ok=False,
    )
    assert wrong.returncode == 2 and "bolt" in wrong.stderr
    _run(*_common(parts, work), "--mode=export", "--config.export.onnx=no")
    manifest = json.loads((run / "export" / "manifest.json").read_text())
    assert manifest["updates"][0]["files"] == record["files"] and manifest["preprocess"]["geometry"] == "resize"
    assert manifest["ignore_regions"] == ["bracket"]


def _refused_predict(parts, work, flag, word):
    """predict with `flag` exits 2 with one line naming `word`."""
    proc = _run(*_common(parts, work), "--mode=predict", f"--config.predict.input={parts / 'inspect'}", flag, ok=False)
    assert proc.returncode == 2 and word in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_another_geometry_than_the_fit_is_refused_in_one_line(parts, trained):
    _refused_predict(parts, trained[0], "--config.data.geometry=crop", "geometry")


DOT = (300, 140, 324, 164)  # 24 px: under one token of the 512 px image squashed to the input (512 / 14 = 37 px)


@pytest.fixture(scope="module")
def tiled_run(tmp_path_factory):
    """512 x 512 parts in MVTec layout (a test split with masks), trained with 3 x 3 tiles."""
    base = tmp_path_factory.mktemp("tiles")
    rng = np.random.default_rng(1)
    part = base / "data" / "plate"
    for i in range(10):
        _save(_texture(rng, 512, 512), part / "train" / "good" / f"{i:02d}.png")
    for i in range(2):
        _save(_texture(rng, 512, 512), part / "test" / "good" / f"{i}.png")
        box = (DOT[0] - 60 * i, DOT[1], DOT[2] - 60 * i, DOT[3])
        _save(_defective(rng, 512, 512, box), part / "test" / "dot" / f"{i}.png")
        mask = np.zeros((512, 512), np.uint8)
        mask[box[1] : box[3], box[0] : box[2]] = 255
        _save(mask, part / "ground_truth" / "dot" / f"{i}_mask.png")
    args = [
        "--config=configs/folder.py:smoke",
        f"--config.data.manual_dir={base / 'data'}",
        f"--config.data.tfds_dir={base / 'tfds'}",
        f"--workdir={base / 'run'}",
        "--config.data.image_size=96",
        "--config.data.tiles=(3, 3)",
    ]
    out = _run(*args)
    return base, args, out.stdout + out.stderr


def test_tiles_find_a_defect_smaller_than_a_token_of_the_whole_image(tiled_run):
    base, args, log = tiled_run
    metrics = json.loads((base / "run" / "metrics.json").read_text())
    assert "metrics in the image frame" in log and np.isfinite(metrics["mean"]["pixel_auroc"])
    assert metrics["num_test_images"] == 4  # images, not tiles
    _run(*args, "--mode=predict", f"--config.predict.input={base / 'data' / 'plate' / 'test' / 'dot'}")
    latest = (base / "run" / "predictions" / "latest.txt").read_text().strip()
    folder = base / "run" / "predictions" / latest
    rows = {r["file"]: r for r in json.loads((folder / "scores.json").read_text())}
    for i in range(2):
        amap = np.load(folder / "maps" / (rows[f"{i}.png"]["output_name"] + ".npy"))
        assert amap.shape == (512, 512) and np.isfinite(amap).all()
        y, x = np.unravel_index(np.argmax(amap), amap.shape)
        cx, cy = (DOT[0] + DOT[2]) // 2 - 60 * i, (DOT[1] + DOT[3]) // 2
        assert abs(x - cx) <= 40 and abs(y - cy) <= 40, (i, x, y)
    # the exported scorer with serve.py cuts and stitches the same tiles: the same scores and maps
    _run(*args, "--mode=export", "--config.export.onnx=no")
    out_dir = base / "served"
    proc = subprocess.run(
        [
            sys.executable,
            str(base / "run" / "export" / "serve.py"),
            str(base / "data" / "plate" / "test" / "dot"),
            "--out",
            str(out_dir),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    served = {os.path.basename(r["file"]): r for r in json.loads((out_dir / "scores.json").read_text())}
    for name, r in rows.items():
        assert served[name]["score"] == pytest.approx(r["score"], rel=1e-4, abs=1e-5)
        a = np.load(folder / "maps" / (r["output_name"] + ".npy"))
        b = np.load(out_dir / served[name]["map"])
        assert np.abs(a - b).max() <= 1e-4 * max(1.0, np.abs(a).max())
