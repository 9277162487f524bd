"""run.py end to end with the smoke config's variants: the released code's choices and the flow M_po
(on the reconstructor's features and on a second backbone), trained, evaluated and restored."""

import csv
import io
import json
import os

import pytest
from run_helpers import (
    assert_predict_equals_eval,
    assert_same_results,
    export_test_images,
    run_py,
    run_two_processes,
)

pytestmark = pytest.mark.slow  # subprocess runs of run.py: `pytest -m 'not slow'` skips them


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
    """One prepared copy of the tiny synthetic dataset for every run in this module (read-only use)."""
    return str(tmp_path_factory.mktemp("tfds"))


def test_run_py_code_variant(tmp_path, tfds_dir):
    """The released code's choices end to end: unnormalised target, 12 masks, the code's OT and
    combination, transductive M_po normalisation."""
    wd = str(tmp_path / "wd")
    out = run_py(["--config=configs/demo.py:smoke,code", f"--workdir={wd}", f"--config.data.tfds_dir={tfds_dir}"])
    assert "transductive" in out and "mean over classes" in out
    cfg = json.load(open(os.path.join(wd, "config.json")))
    assert cfg["scoring"]["ot"] == "code" and cfg["train"]["target"] == "unnormalized"
    assert os.path.isfile(os.path.join(wd, "metrics.json"))


@pytest.mark.parametrize("features", ["reconstructor", "backbone"])
def test_flow_mpo_train_and_eval_then_eval_from_checkpoints(tmp_path, tfds_dir, features):
    wd, tfds = str(tmp_path / "wd"), tfds_dir
    common = [
        "--config=configs/demo.py:smoke",
        f"--workdir={wd}",
        f"--config.data.tfds_dir={tfds}",
        "--config.scoring.mpo=flow",
        f"--config.flow.features={features}",
    ]
    if features == "backbone":  # a second backbone (Lite0 here; the released code's is B6) at strides 8 and 16
        common += [
            "--config.flow.backbone.arch=efficientnet-lite0",
            "--config.flow.backbone.weights=packaged",
            "--config.flow.backbone.padding=static",
            "--config.flow.pool_ratio=0.1",
        ]
    out = run_py(common)
    assert "flow M_po: trained to step" in out and "mean over classes" in out
    extra = ("fit/flow_pool/fit.npz",) if features == "backbone" else ()
    for f in ("flow_log.jsonl", "fit/flow.json", "flow_checkpoints") + extra:
        assert os.path.exists(os.path.join(wd, f)), f
    scores_first = open(os.path.join(wd, "scores.csv")).read()
    out = run_py(common + ["--mode=eval"])
    assert "restored the flow at step" in out and "flow step 1/" not in out
    assert open(os.path.join(wd, "scores.csv")).read() == scores_first
    if features == "backbone":  # predict scores single images with the flow (and its own backbone) as eval did
        expected = export_test_images(tfds, tmp_path / "inputs", 2)
        run_py(
            common
            + ["--mode=predict", f"--config.predict.input={tmp_path / 'inputs'}", "--config.predict.class_name=disc"]
        )
        assert_predict_equals_eval(wd, expected)
        # the same as two processes: the flow's backbone features, its pool and L_ref, split and gathered
        wd2 = str(tmp_path / "wd2")
        one_metrics = json.load(open(os.path.join(wd, "metrics.json")))
        outs = run_two_processes([a.replace(wd, wd2) for a in common], one_metrics["num_test_images"])
        assert all("flow M_po: trained to step" in out for out in outs)
        assert_same_results(wd2, one_metrics, list(csv.DictReader(io.StringIO(scores_first))))
    if features == "reconstructor":  # the released code's transductive L_ref, from the same checkpoints
        out = run_py(common + ["--mode=eval", "--config.scoring.mpo_normalisation=test_max"])
        assert "max over each class's test set" in out and "mean over classes" in out
