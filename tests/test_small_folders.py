"""Folders too small to calibrate, and config problems that used to be found late (#33 items 6, 9, 10):
each is refused (or warned about) before any work, with one line, and leaves no config.json."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from helpers import FAST_COMPILE, ROOT
from PIL import Image

pytestmark = pytest.mark.slow  # subprocess runs of run.py


def _run(*args):
    env = dict(os.environ, XLA_FLAGS=(os.environ.get("XLA_FLAGS", "") + " " + FAST_COMPILE).strip())
    return subprocess.run(
        [sys.executable, "run.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=600, env=env
    )


def _folder(path, n, size=(64, 48), seed=0):
    rng = np.random.default_rng(seed)
    path.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.fromarray(rng.integers(90, 160, (size[1], size[0], 3), np.uint8)).save(path / f"g{i}.png")
    return path


def _args(data, work, tfds, *more):
    return (
        "--config=configs/folder.py:smoke",
        f"--config.data.manual_dir={data}",
        f"--workdir={work}",
        f"--config.data.tfds_dir={tfds}",
        *more,
    )


def _refused(proc, words, work):
    assert proc.returncode == 2 and words in proc.stderr, proc.stderr[-1500:]
    assert len(proc.stderr.strip().splitlines()) <= 2
    assert not os.path.exists(os.path.join(work, "config.json"))  # refused before any work or file


def test_one_good_image_is_refused_before_training(tmp_path):
    data = _folder(tmp_path / "part", 1)
    work = tmp_path / "run"
    _refused(_run(*_args(data, work, tmp_path / "tfds")), "at least 2 are needed", work)


def test_late_checks_come_before_any_work(tmp_path):
    data = _folder(tmp_path / "part", 3)
    tfds, work = tmp_path / "tfds", tmp_path / "run"
    proc = _run(*_args(data, work, tfds, "--config.train.batch_size=8"))
    _refused(proc, "train.batch_size 8 exceeds the 3 training images", work)
    masks = tmp_path / "masks"
    masks.mkdir()
    Image.new("L", (48, 64), 0).save(masks / "part.png")  # portrait, the images are landscape: stretched before
    proc = _run(*_args(data, work, tfds, "--config.train.batch_size=2", f"--config.data.ignore_masks={masks}"))
    _refused(proc, "would stretch it", work)
    proc = _run(*_args(data, work, tfds, "--config.train.batch_size=2", f"--config.data.validation={data}"))
    _refused(proc, "training images' folder", work)
    for bad, words in (("-5", "another negative number is ambiguous"), ("'part=1,part=100'", "more than once")):
        proc = _run(*_args(data, work, tfds, "--config.train.batch_size=2", f"--config.predict.threshold={bad}"))
        _refused(proc, words, work)


def test_two_images_train_with_a_warning_and_say_what_the_threshold_rests_on(tmp_path):
    data = _folder(tmp_path / "part", 2)
    tfds, work = tmp_path / "tfds", tmp_path / "run"
    proc = _run(*_args(data, work, tfds, "--config.train.batch_size=2"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout + proc.stderr
    # cross-fitted calibration (fit.calibration_folds = 0): each image held out once, scored by the
    # pool of the other one
    assert "threshold will rest on 2 good image(s) of its 2" in out
    assert "calibration cross-fitted over 2 fold(s)" in out and "images scored part 2" in out
    assert "from 2 image(s)" in out  # the thresholds' line after calibration
    proc = _run(*_args(data, work, tfds, "--mode=predict", f"--config.predict.input={data}"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    run = (work / "predictions" / (work / "predictions" / "latest.txt").read_text().strip()) / "scores.json"
    assert {r["threshold_images"] for r in json.loads(run.read_text())} == {2}
    proc = _run(*_args(data, work, tfds, "--mode=update", f"--config.new_images.input={tmp_path / 'absent'}"))
    assert proc.returncode == 2 and "new_images.input" in proc.stderr and "predict.input" not in proc.stderr
