"""benchmarks/paired.py: the paired bootstrap of an image-AUROC difference, on cases worked by hand
(rank-identical scorings differ by exactly 0 in every draw; a perfect scoring against a constant one by
exactly 0.5), its point values against scikit-learn, and the command on two CSVs."""

import csv
import importlib.util
import subprocess
import sys

import numpy as np
import pytest
from helpers import ROOT

spec = importlib.util.spec_from_file_location("bench_paired", ROOT / "benchmarks" / "paired.py")
paired = importlib.util.module_from_spec(spec)
spec.loader.exec_module(paired)


def _write(path, rows):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["file", "class", "defect_type", "label", "score", "rec_mean"])
        for name, cls, label, score in rows:
            w.writerow([name, cls, "good" if label == 0 else "cut", label, score, 0])


def test_hand_worked_intervals():
    labels = np.array([0] * 6 + [1] * 5)
    rng = np.random.default_rng(0)
    a = rng.normal(size=11) + labels
    r = paired.paired_interval(a, np.exp(a), labels, resamples=300)  # the same ranks: no difference in any draw
    assert r["diff"] == 0 and r["low"] == 0 and r["high"] == 0 and (r["good"], r["bad"]) == (6, 5)
    r = paired.paired_interval(labels + 0.1 * a, np.zeros(11), labels, resamples=300)  # perfect vs all ties
    assert (r["a"], r["b"]) == (1.0, 0.5) and r["low"] == pytest.approx(0.5) and r["high"] == pytest.approx(0.5)


def test_point_values_equal_scikit_learn_and_the_interval_holds_them():
    metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(1)
    labels = np.array([0] * 20 + [1] * 30)
    a, b = rng.normal(size=50) + labels, rng.normal(size=50) + 0.5 * labels
    r = paired.paired_interval(a, b, labels)
    assert r["a"] == pytest.approx(metrics.roc_auc_score(labels, a))
    assert r["b"] == pytest.approx(metrics.roc_auc_score(labels, b))
    assert r["low"] < r["diff"] < r["high"]


def test_command_pairs_by_file_and_refuses_other_images(tmp_path):
    rows = [(f"x/{i}.png", "x", int(i >= 4), float(i)) for i in range(8)]
    rows += [(f"y/{i}.png", "y", 0, float(i)) for i in range(3)]  # one label only: no AUROC, left out
    _write(tmp_path / "a.csv", rows)
    _write(tmp_path / "b.csv", [(n, c, y, -s) for n, c, y, s in reversed(rows)])  # reversed ranks
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "paired.py"), str(tmp_path / "a.csv"), str(tmp_path / "b.csv")],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "x | 100.0 | 0.0 | +100.0 | [+100.0, +100.0] | 4 / 4" in out and "\ny |" not in out
    _write(tmp_path / "c.csv", rows[:-1])
    with pytest.raises(SystemExit, match=r"score different images \(1 in one only, e.g. \['y/2.png'\]\)"):
        paired.compare(str(tmp_path / "a.csv"), str(tmp_path / "c.csv"))
