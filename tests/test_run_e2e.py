"""run.py end to end with the smoke config: train_and_eval, eval and predict from the saved checkpoint."""
import csv
import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# these runs train and score a few dozen 64 px images
from conftest import FAST_COMPILE, forced_devices_env, loopback_coordinator


def _run(args, timeout=600):
    env = dict(os.environ, XLA_FLAGS=(os.environ.get("XLA_FLAGS", "") + " " + FAST_COMPILE).strip())
    proc = subprocess.run([sys.executable, "run.py", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
    """One prepared copy of the tiny synthetic dataset for every run in this module (read-only use)."""
    return str(tmp_path_factory.mktemp("tfds"))


def _csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _export_test_images(tfds, folder, count, class_name="disc") -> dict:
    """The first `count` test images of a class written as PNG files: {file: the dataset's file name}."""
    from maskad_jax.data import SplitData
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


def _assert_predict_equals_eval(wd, expected):
    pred = {r["file"]: r for r in _csv(os.path.join(wd, "predictions", "scores.csv"))}
    evals = {r["file"]: r for r in _csv(os.path.join(wd, "scores.csv"))}
    for name, file_name in expected.items():
        assert float(pred[name]["score"]) == float(evals[file_name]["score"])  # same score as eval
    return pred


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory, tfds_dir):
    """One train_and_eval run of the smoke config in one process: (workdir, console, metrics, scores.csv)."""
    wd = str(tmp_path_factory.mktemp("smoke") / "wd")
    out = _run(["--config=configs/demo.py:smoke", f"--workdir={wd}", f"--config.data.tfds_dir={tfds_dir}"])
    return wd, out, json.load(open(os.path.join(wd, "metrics.json"))), _csv(os.path.join(wd, "scores.csv"))


def test_run_py_train_eval_predict(tmp_path, tfds_dir, smoke_run):
    tfds = tfds_dir
    wd, out, _, _ = smoke_run
    common = ["--config=configs/demo.py:smoke", f"--workdir={wd}", f"--config.data.tfds_dir={tfds}"]
    assert "trained to step 6" in out and "mean over classes" in out
    for f in ("config.json", "metrics.json", "scores.csv", "train_log.jsonl", "fit/pools.npz", "report.html"):
        assert os.path.isfile(os.path.join(wd, f)), f
    events = os.listdir(os.path.join(wd, "tensorboard"))
    assert events and b"train/loss" in open(os.path.join(wd, "tensorboard", events[0]), "rb").read()
    first = json.load(open(os.path.join(wd, "metrics.json")))
    assert set(first["per_class"]) == {"weave", "speckle", "disc"}
    assert all(0.0 <= v <= 1.0 for v in first["mean"].values())
    report = open(os.path.join(wd, "report.html")).read()
    assert "image_auroc" in report and "speckle" in report and "<img src=\"heatmaps/" in report
    for ex in first["examples"]:
        assert os.path.isfile(os.path.join(wd, ex["png"]))
    scores_first = open(os.path.join(wd, "scores.csv")).read()

    out = _run(common + ["--mode=eval"])
    assert "restored the reconstructor at step 6" in out and "step 1/" not in out  # no retraining
    assert open(os.path.join(wd, "scores.csv")).read() == scores_first  # the same maps from the checkpoint

    out = _run(common)  # rerunning the training command resumes (here: already finished)
    assert "resumed from step 6" in out

    # predict: some of the test images exported as files, plus mixed sizes/modes and a hostile name
    src = tmp_path / "inputs"
    expected = _export_test_images(tfds, src, 3)
    (src / "sub").mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (80, 100), dtype=np.uint8), "L").save(src / "sub" / "grey.png")
    Image.fromarray(rng.integers(0, 255, (70, 50, 4), dtype=np.uint8), "RGBA").save(src / "sub" / "rgba.png")
    Image.fromarray(rng.integers(0, 65535, (90, 90), dtype=np.uint16)).save(src / "sub" / "deep16.png")
    hostile = 'x <b>&"..\' name.png'
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(src / "sub" / hostile)
    out = _run(common + ["--mode=predict", f"--config.predict.input={src}", "--config.predict.class_name=disc"])
    pred = _assert_predict_equals_eval(wd, expected)
    assert len(pred) == 7 and all(not r["error"] for r in pred.values())
    for r in pred.values():
        assert all(ch.isalnum() or ch in "-_" for ch in r["output_name"])
        for sub, ext in (("maps", ".npy"), ("maps", ".png"), ("overlays", ".png")):
            assert os.path.isfile(os.path.join(wd, "predictions", sub, r["output_name"] + ext))
        assert r["anomalous"] in ("True", "False") and float(r["threshold"]) > 0
    assert set(os.listdir(os.path.join(wd, "predictions"))) == {"maps", "overlays", "scores.csv", "scores.json"}


def test_two_processes_train_and_eval_like_one(tmp_path, tfds_dir, smoke_run):
    """run.py under jax.distributed: two processes on loopback, 2 devices each, one 4-device mesh for
    training; each scores half of the test set on its own devices and the results are gathered. The
    metrics and every image's score equal the one-process run's; process 0 alone writes the files."""
    _, _, one_metrics, one_scores = smoke_run
    wd = str(tmp_path / "wd")
    outs = _run_two_processes(["--config=configs/demo.py:smoke", f"--workdir={wd}",
                               f"--config.data.tfds_dir={tfds_dir}"], one_metrics["num_test_images"])
    assert all("trained to step 6" in out for out in outs)
    _assert_same_results(wd, one_metrics, one_scores)


def _run_two_processes(args, num_test_images):
    """run.py as two processes on loopback (2 forced host devices each); checks that each scored its
    share of the test images. Returns both consoles."""
    coordinator = loopback_coordinator()
    procs = [subprocess.Popen([sys.executable, "run.py", *args, f"--coordinator={coordinator}",
                               "--num_processes=2", f"--process_id={i}"], cwd=ROOT, env=forced_devices_env(2),
                              text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for i in range(2)]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    for i, (p, out) in enumerate(zip(procs, outs)):
        assert p.returncode == 0, out[-4000:]
        share = len(np.array_split(np.arange(num_test_images), 2)[i])
        assert f"over 2 processes ({share} on this one)" in out and "mean over classes" in out
    return outs


def _assert_same_results(wd, one_metrics, one_scores):
    """metrics.json and scores.csv in wd equal a one-process run's (float tolerance)."""
    metrics = json.load(open(os.path.join(wd, "metrics.json")))
    assert metrics["num_test_images"] == one_metrics["num_test_images"]
    for k, v in one_metrics["mean"].items():
        assert metrics["mean"][k] == pytest.approx(v, abs=1e-3), k
    scores = _csv(os.path.join(wd, "scores.csv"))
    assert [r["file"] for r in scores] == [r["file"] for r in one_scores]  # every image once, in order
    np.testing.assert_allclose([float(r["score"]) for r in scores], [float(r["score"]) for r in one_scores],
                               rtol=1e-3)


@pytest.mark.parametrize("args, message", [
    (["--num_processes=2"], "--num_processes and --process_id need --coordinator"),
    (["--coordinator=127.0.0.1:1234", "--num_processes=2"], "needs --num_processes and --process_id"),
    (["--coordinator=127.0.0.1:1234", "--num_processes=2", "--process_id=2"], "must be in 0 .. 1"),
])
def test_run_py_refuses_incomplete_distributed_flags(tmp_path, args, message):
    proc = subprocess.run([sys.executable, "run.py", f"--workdir={tmp_path}", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode != 0 and message in proc.stdout + proc.stderr
    assert not os.listdir(tmp_path)  # refused before any work


def test_run_py_code_variant(tmp_path, tfds_dir):
    """The released code's choices end to end: unnormalised target, 12 masks, the code's OT and
    combination, transductive M_po normalisation."""
    wd = str(tmp_path / "wd")
    out = _run(["--config=configs/demo.py:smoke,code", f"--workdir={wd}", f"--config.data.tfds_dir={tfds_dir}"])
    assert "transductive" in out and "mean over classes" in out
    cfg = json.load(open(os.path.join(wd, "config.json")))
    assert cfg["scoring"]["ot"] == "code" and cfg["train"]["target"] == "unnormalized"
    assert os.path.isfile(os.path.join(wd, "metrics.json"))


@pytest.mark.parametrize("features", ["reconstructor", "backbone"])
def test_flow_mpo_train_and_eval_then_eval_from_checkpoints(tmp_path, tfds_dir, features):
    wd, tfds = str(tmp_path / "wd"), tfds_dir
    common = ["--config=configs/demo.py:smoke", f"--workdir={wd}", f"--config.data.tfds_dir={tfds}",
              "--config.scoring.mpo=flow", f"--config.flow.features={features}"]
    if features == "backbone":  # a second backbone (Lite0 here; the released code's is B6) at strides 8 and 16
        common += ["--config.flow.backbone.arch=efficientnet-lite0", "--config.flow.backbone.weights=packaged",
                   "--config.flow.backbone.padding=static", "--config.flow.pool_ratio=0.1"]
    out = _run(common)
    assert "flow M_po: trained to step" in out and "mean over classes" in out
    extra = ("fit/flow_pool/pools.npz",) if features == "backbone" else ()
    for f in ("flow_log.jsonl", "fit/flow.json", "flow_checkpoints") + extra:
        assert os.path.exists(os.path.join(wd, f)), f
    scores_first = open(os.path.join(wd, "scores.csv")).read()
    out = _run(common + ["--mode=eval"])
    assert "restored the flow at step" in out and "flow step 1/" not in out
    assert open(os.path.join(wd, "scores.csv")).read() == scores_first
    if features == "backbone":  # predict scores single images with the flow (and its own backbone) as eval did
        expected = _export_test_images(tfds, tmp_path / "inputs", 2)
        _run(common + ["--mode=predict", f"--config.predict.input={tmp_path / 'inputs'}",
                       "--config.predict.class_name=disc"])
        _assert_predict_equals_eval(wd, expected)
        # the same as two processes: the flow's backbone features, its pool and L_ref, split and gathered
        wd2 = str(tmp_path / "wd2")
        one_metrics = json.load(open(os.path.join(wd, "metrics.json")))
        outs = _run_two_processes([a.replace(wd, wd2) for a in common], one_metrics["num_test_images"])
        assert all("flow M_po: trained to step" in out for out in outs)
        _assert_same_results(wd2, one_metrics, list(csv.DictReader(io.StringIO(scores_first))))
    if features == "reconstructor":  # the released code's transductive L_ref, from the same checkpoints
        out = _run(common + ["--mode=eval", "--config.scoring.mpo_normalisation=test_max"])
        assert "max over each class's test set" in out and "mean over classes" in out
