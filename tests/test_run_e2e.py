"""run.py end to end with the smoke config: train_and_eval, then eval from the saved checkpoint."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(args, timeout=600):
    proc = subprocess.run([sys.executable, "run.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout + proc.stderr


@pytest.mark.parametrize("target", ["same", "unnormalized"])
def test_run_py_train_then_eval(tmp_path, target):
    wd, tfds = str(tmp_path / "wd"), str(tmp_path / "tfds")
    common = ["--config=configs/demo.py:smoke", f"--workdir={wd}", f"--config.data.tfds_dir={tfds}",
              f"--config.train.target={target}"]
    out = _run(common)
    assert "trained to step 6" in out and "mean over classes" in out
    for f in ("config.json", "metrics.json", "scores.csv", "train_log.jsonl", "fit/pools.npz"):
        assert os.path.isfile(os.path.join(wd, f)), f
    assert os.listdir(os.path.join(wd, "heatmaps"))
    first = json.load(open(os.path.join(wd, "metrics.json")))
    assert set(first["per_class"]) == {"weave", "speckle", "disc"}
    assert all(0.0 <= v <= 1.0 for v in first["mean"].values())
    scores_first = open(os.path.join(wd, "scores.csv")).read()

    out = _run(common + ["--mode=eval"])
    assert "restored the reconstructor at step 6" in out and "step 1/" not in out  # no retraining
    assert open(os.path.join(wd, "scores.csv")).read() == scores_first  # same maps from the checkpoint

    out = _run(common)  # rerunning the training command resumes (here: already finished)
    assert "resumed from step 6" in out
