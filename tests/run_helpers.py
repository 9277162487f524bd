"""run.py in a subprocess for the end-to-end tests (test_run_e2e.py, test_run_variants.py): the run,
its CSV files, test images written as files, and two-process runs on loopback."""

import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from helpers import FAST_COMPILE, forced_devices_env, loopback_coordinator
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_py(args, timeout=600, env=None):
    env = dict(env or os.environ, XLA_FLAGS=(os.environ.get("XLA_FLAGS", "") + " " + FAST_COMPILE).strip())
    proc = subprocess.run(
        [sys.executable, "run.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout + proc.stderr


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def export_test_images(tfds, folder, count, class_name="disc") -> dict:
    """The first `count` test images of a class written as PNG files: {file: the dataset's file name}."""
    from maskad_jax.data.splits import SplitData
    from tfds_builders import prepare

    data = SplitData.load(prepare("synthetic", tfds, config="tiny"), "test", [class_name])
    folder.mkdir(parents=True)
    expected = {}
    for pos in range(count):
        rec = data.source[int(data.indices[pos])]
        name = f"{class_name}_{pos}.png"
        Image.fromarray(np.asarray(rec["image"])).save(folder / name)
        expected[name] = data.file_names[pos]
    return expected


def latest_predictions(wd):
    """The newest predict run's folder (each run writes its own, named in predictions/latest.txt)."""
    return os.path.join(wd, "predictions", open(os.path.join(wd, "predictions", "latest.txt")).read().strip())


def assert_predict_equals_eval(wd, expected):
    pred = {r["file"]: r for r in read_csv(os.path.join(latest_predictions(wd), "scores.csv"))}
    evals = {r["file"]: r for r in read_csv(os.path.join(wd, "scores.csv"))}
    for name, file_name in expected.items():
        assert float(pred[name]["score"]) == float(evals[file_name]["score"])  # same score as eval
    return pred


def run_two_processes(args, num_test_images):
    """run.py as two processes on loopback (2 forced host devices each); checks that each scored its
    share of the test images. Returns both consoles."""
    coordinator = loopback_coordinator()
    procs = [
        subprocess.Popen(
            [sys.executable, "run.py", *args, f"--coordinator={coordinator}", "--num_processes=2", f"--process_id={i}"],
            cwd=ROOT,
            env=forced_devices_env(2),
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        for i in range(2)
    ]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    for i, (p, out) in enumerate(zip(procs, outs)):
        assert p.returncode == 0, out[-4000:]
        share = len(np.array_split(np.arange(num_test_images), 2)[i])
        assert f"over 2 processes ({share} on this one)" in out and "mean over classes" in out
    return outs


def assert_same_results(wd, one_metrics, one_scores):
    """metrics.json and scores.csv in wd equal a one-process run's (float tolerance)."""
    metrics = json.load(open(os.path.join(wd, "metrics.json")))
    assert metrics["num_test_images"] == one_metrics["num_test_images"]
    for k, v in one_metrics["mean"].items():
        assert metrics["mean"][k] == pytest.approx(v, abs=1e-3), k
    scores = read_csv(os.path.join(wd, "scores.csv"))
    assert [r["file"] for r in scores] == [r["file"] for r in one_scores]  # every image once, in order
    np.testing.assert_allclose([float(r["score"]) for r in scores], [float(r["score"]) for r in one_scores], rtol=1e-3)
