"""run.py end to end with the smoke config: train_and_eval, eval and predict from the saved checkpoint."""

import json
import os
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest
from helpers import FAST_COMPILE
from PIL import Image
from run_helpers import (
    assert_predict_equals_eval,
    assert_same_results,
    export_test_images,
    latest_predictions,
    read_csv,
    run_py,
    run_two_processes,
)

from maskad_jax.app.overlay import unique_names

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# these runs train and score a few dozen 64 px images

pytestmark = pytest.mark.slow  # subprocess runs of run.py: `pytest -m 'not slow'` skips them


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
    """One prepared copy of the tiny synthetic dataset for every run in this module (read-only use)."""
    return str(tmp_path_factory.mktemp("tfds"))


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory, tfds_dir):
    """One train_and_eval run of the smoke config in one process, with learning curves every epoch:
    (workdir, console, metrics, scores.csv)."""
    wd = str(tmp_path_factory.mktemp("smoke") / "wd")
    out = run_py(
        [
            "--config=configs/demo.py:smoke",
            f"--workdir={wd}",
            f"--config.data.tfds_dir={tfds_dir}",
            "--config.train.eval_every=1",
            "--config.train.eval_rows=('default','mpo_only')",
        ]
    )
    return wd, out, json.load(open(os.path.join(wd, "metrics.json"))), read_csv(os.path.join(wd, "scores.csv"))


def test_run_py_train_eval_predict(tmp_path, tfds_dir, smoke_run):
    tfds = tfds_dir
    wd, out, _, _ = smoke_run
    common = ["--config=configs/demo.py:smoke", f"--workdir={wd}", f"--config.data.tfds_dir={tfds}"]
    assert "trained to step 6" in out and "mean over classes" in out
    for f in ("config.json", "metrics.json", "scores.csv", "train_log.jsonl", "fit/fit.npz", "report.html"):
        assert os.path.isfile(os.path.join(wd, f)), f
    events = os.listdir(os.path.join(wd, "tensorboard"))
    assert events and b"train/loss" in open(os.path.join(wd, "tensorboard", events[0]), "rb").read()
    first = json.load(open(os.path.join(wd, "metrics.json")))
    assert set(first["per_class"]) == {"weave", "speckle", "disc"}
    assert all(0.0 <= v <= 1.0 for v in first["mean"].values())
    report = open(os.path.join(wd, "report.html")).read()
    assert "image_auroc" in report and "speckle" in report and 'src="data:image/png;base64,' in report
    assert "heatmaps/" not in report  # self-contained: the heatmap files stay for the notebook, not for the report
    for ex in first["examples"]:
        assert os.path.isfile(os.path.join(wd, ex["png"]))
    scores_first = open(os.path.join(wd, "scores.csv")).read()

    # run.py's default persistent compilation cache (~/.cache/maskad_jax/xla with a size cap, which
    # needs the filelock package), on a fresh cache folder: eval fills it, the next command loads from it
    cache_env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
    cache_env.update(XDG_CACHE_HOME=str(tmp_path / "cache"), JAX_LOG_COMPILES="1")
    out = run_py(common + ["--mode=eval"], env=cache_env)
    assert "restored the reconstructor at step 6" in out and "step 1/" not in out  # no retraining
    assert open(os.path.join(wd, "scores.csv")).read() == scores_first  # the same maps from the checkpoint
    assert os.listdir(tmp_path / "cache" / "maskad_jax" / "xla")
    assert "Persistent compilation cache hit" not in out

    out2 = run_py(common, env=cache_env)  # rerunning the training command resumes (here: already finished)
    assert "resumed from step 6" in out2
    assert "Persistent compilation cache hit" in out2
    for o in (out, out2):
        assert "filelock" not in o and "Error reading persistent compilation cache" not in o

    # predict: some of the test images exported as files, plus mixed sizes/modes and a hostile name
    src = tmp_path / "inputs"
    expected = export_test_images(tfds, src, 3)
    (src / "sub").mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (80, 100), dtype=np.uint8), "L").save(src / "sub" / "grey.png")
    Image.fromarray(rng.integers(0, 255, (70, 50, 4), dtype=np.uint8), "RGBA").save(src / "sub" / "rgba.png")
    Image.fromarray(rng.integers(0, 65535, (90, 90), dtype=np.uint16)).save(src / "sub" / "deep16.png")
    hostile = "x <b>&\"..' name.png"
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(src / "sub" / hostile)
    out = run_py(common + ["--mode=predict", f"--config.predict.input={src}", "--config.predict.class_name=disc"])
    pred = assert_predict_equals_eval(wd, expected)
    assert len(pred) == 7 and all(not r["error"] for r in pred.values())
    first = latest_predictions(wd)
    for r in pred.values():
        assert all(ch.isalnum() or ch in "-_" for ch in r["output_name"])
        for sub, ext in (("maps", ".npy"), ("maps", ".png"), ("overlays", ".png")):
            assert os.path.isfile(os.path.join(first, sub, r["output_name"] + ext))
        assert r["anomalous"] in ("True", "False") and float(r["threshold"]) > 0
    assert set(os.listdir(first)) == {"maps", "overlays", "scores.csv", "scores.json"}
    # a second predict run, on the sample images the demo wrote into the workdir (the README's predict
    # line), gets its own folder; the first run's files stay as they were
    before = sorted(os.listdir(os.path.join(first, "maps")))
    samples = sorted(os.listdir(os.path.join(wd, "samples")))
    assert len(samples) == 6  # a normal and a defective test image of each of the 3 classes
    run_py(common + ["--mode=predict", f"--config.predict.input={os.path.join(wd, 'samples')}"])
    second = latest_predictions(wd)
    assert second != first and sorted(os.listdir(os.path.join(first, "maps"))) == before
    evals = {r["file"]: r for r in read_csv(os.path.join(wd, "scores.csv"))}
    names = dict(zip(unique_names(list(evals), ".png"), evals))
    for r in read_csv(os.path.join(second, "scores.csv")):
        assert float(r["score"]) == float(evals[names[r["file"]]]["score"])  # the class found by itself, same score
        assert r["class"] == evals[names[r["file"]]]["class"]
    # the calibrated thresholds are refused under another scoring (their scores have another scale):
    # exit 2 naming the field, before any work (no new predictions folder)
    proc = subprocess.run(
        [
            sys.executable,
            "run.py",
            *common,
            "--mode=predict",
            f"--config.predict.input={src}",
            "--config.scoring.sigma=1.5",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2 and "1.5 now" in proc.stderr and "scoring.sigma" in proc.stderr, proc.stderr[-2000:]
    assert latest_predictions(wd) == second


def test_predict_that_scores_nothing_or_is_interrupted_leaves_no_folder(tmp_path, tfds_dir, smoke_run):
    """A folder whose only image is a zero-byte file: exit 2 naming the skip, no predictions folder,
    latest.txt unchanged (before: exit 0, "predicted 1 images: 0 anomalous"). Ctrl-C while predict
    runs: one line, exit 130, no partial folder, latest.txt unchanged."""
    wd = smoke_run[0]
    common = [
        "--config=configs/demo.py:smoke",
        f"--workdir={wd}",
        f"--config.data.tfds_dir={tfds_dir}",
        "--mode=predict",
    ]
    preds = os.path.join(wd, "predictions")
    before = sorted(os.listdir(preds)) if os.path.isdir(preds) else []
    latest = open(os.path.join(preds, "latest.txt")).read() if before else None
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "zero.png").write_bytes(b"")
    proc = subprocess.run(
        [sys.executable, "run.py", *common, f"--config.predict.input={tmp_path / 'empty'}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2 and "predict scored none of the 1 image(s)" in proc.stderr, proc.stderr[-2000:]
    assert "skipped zero.png" in proc.stdout
    after = sorted(os.listdir(preds)) if os.path.isdir(preds) else []
    assert after == before and (latest is None or open(os.path.join(preds, "latest.txt")).read() == latest)

    many = tmp_path / "many"
    export_test_images(tfds_dir, many, 8)
    # 8 x 25 = 200 images in batches of 4: the run is still scoring when the interrupt comes, even when
    # the compiled programs come from the cache and this process waits for a busy CPU (32 were too few)
    for k in range(24):
        for f in list(many.glob("disc_?.png")):
            shutil.copy(f, many / f"copy{k}_{f.name}")
    proc = subprocess.Popen(
        [sys.executable, "-u", "run.py", *common, f"--config.predict.input={many}", "--config.data.eval_batch_size=4"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=dict(os.environ, XLA_FLAGS=(os.environ.get("XLA_FLAGS", "") + " " + FAST_COMPILE).strip()),
        # a shell without job control starts background jobs with SIGINT ignored, and children inherit
        # that: give the run the default disposition, so Python turns SIGINT into KeyboardInterrupt
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    for line in proc.stdout:  # interrupt once the model is restored and scoring starts
        if "restored the reconstructor" in line:
            break
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 130 and "interrupted: --mode=predict stopped" in err and "Traceback" not in err, err
    after = sorted(os.listdir(preds)) if os.path.isdir(preds) else []
    assert after == before and (latest is None or open(os.path.join(preds, "latest.txt")).read() == latest)


def test_learning_curves_are_logged_and_match_the_final_evaluation(smoke_run):
    """train.eval_every=1 on the smoke config (2 epochs of 3 steps): after each epoch the seven metrics
    of the rows asked for (the config's own scoring, "default", and M_po alone) and the held-out
    normal loss reach the console, train_log.jsonl and TensorBoard. The tiny test set (24 images) is
    smaller than train.eval_images, so the last point scores the whole test set with the final
    parameters: its default row must equal metrics.json, which the evaluation computed separately."""
    wd, out, metrics, _ = smoke_run
    assert out.count("eval at step") == 2 and "eval at step 6 (epoch 2): held-out normal loss" in out
    evals = [r for r in map(json.loads, open(os.path.join(wd, "train_log.jsonl"))) if "eval" in r]
    assert [r["step"] for r in evals] == [3, 6] and [r["epoch"] for r in evals] == [1, 2]
    names = ("image_auroc", "image_ap", "image_f1_max", "pixel_auroc", "pixel_ap", "pixel_f1_max", "aupro")
    for r in evals:
        assert set(r["eval"]) == {"heldout_normal_loss"} | {
            f"{row}/{m}" for m in names for row in ("default", "mpo_only")
        }
        assert r["eval"]["heldout_normal_loss"] > 0
    for m in names:
        assert evals[-1]["eval"][f"default/{m}"] == pytest.approx(metrics["mean"][m], abs=1e-6), m
    assert evals[0]["eval"]["mpo_only/image_auroc"] == evals[1]["eval"]["mpo_only/image_auroc"]  # no training in it
    events = os.listdir(os.path.join(wd, "tensorboard"))
    # any of the event files: a resumed run (test_run_py_train_eval_predict reruns the command) adds its own
    assert any(b"eval/default/aupro" in open(os.path.join(wd, "tensorboard", e), "rb").read() for e in events)


def test_two_processes_train_and_eval_like_one(tmp_path, tfds_dir, smoke_run):
    """run.py under jax.distributed: two processes on loopback, 2 devices each, one 4-device mesh for
    training; each scores half of the test set on its own devices and the results are gathered. The
    metrics and every image's score equal the one-process run's; process 0 alone writes the files."""
    _, _, one_metrics, one_scores = smoke_run
    wd = str(tmp_path / "wd")
    outs = run_two_processes(
        ["--config=configs/demo.py:smoke", f"--workdir={wd}", f"--config.data.tfds_dir={tfds_dir}"],
        one_metrics["num_test_images"],
    )
    assert all("trained to step 6" in out for out in outs)
    assert_same_results(wd, one_metrics, one_scores)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--num_processes=2"], "--num_processes and --process_id need --coordinator"),
        (["--coordinator=127.0.0.1:1234", "--num_processes=2"], "needs --num_processes and --process_id"),
        (["--coordinator=127.0.0.1:1234", "--num_processes=2", "--process_id=2"], "must be in 0 .. 1"),
    ],
)
def test_run_py_refuses_incomplete_distributed_flags(tmp_path, args, message):
    proc = subprocess.run(
        [sys.executable, "run.py", f"--workdir={tmp_path}", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0 and message in proc.stdout + proc.stderr
    assert not os.listdir(tmp_path)  # refused before any work


def _serve(export_dir, args, blocked=("maskad_jax",)):
    """The exported scorer's serve.py in a fresh process where importing the `blocked` modules fails."""
    code = (
        f"import runpy, sys; sys.modules.update(dict.fromkeys({list(blocked)!r})); sys.argv = sys.argv[1:]; "
        "runpy.run_path(sys.argv[0], run_name='__main__')"
    )
    return subprocess.run(
        [sys.executable, "-c", code, os.path.join(export_dir, "serve.py"), *args],
        cwd=str(export_dir),
        capture_output=True,
        text=True,
        timeout=300,
    )


def _export_and_predict(wd, tfds_dir, onnx: bool):
    """--mode=export (with ONNX in batches of 4, required, or without) and --mode=predict on the
    samples: (export folder, samples folder, predict's rows by file)."""
    common = ["--config=configs/demo.py:smoke", f"--workdir={wd}", f"--config.data.tfds_dir={tfds_dir}"]
    # ONNX required (an error if jax2onnx is missing), in batches of 4: the 6 samples need a padded batch
    extra = ["--config.export.onnx=yes", "--config.export.onnx_batch=4"] if onnx else ["--config.export.onnx=no"]
    run_py(common + ["--mode=export", *extra])
    export_dir = os.path.join(wd, "export")
    manifest = json.load(open(os.path.join(export_dir, "manifest.json")))
    assert manifest["input"]["shape"] == ["batch", 64, 64, 3] and sorted(manifest["classes"]) == [
        "disc",
        "speckle",
        "weave",
    ]
    files = {"scorer.stablehlo", "serve.py", "serve_http.py", "serve_page.html"} | ({"scorer.onnx"} if onnx else set())
    assert set(manifest["files"]) == files and manifest["platforms"] == ["cpu", "cuda", "tpu"]
    samples = os.path.join(wd, "samples")
    run_py(common + ["--mode=predict", f"--config.predict.input={samples}"])
    return export_dir, samples, {r["file"]: r for r in read_csv(os.path.join(latest_predictions(wd), "scores.csv"))}


def _assert_serve_equals_predict(export_dir, samples, wd, pred, out, name, blocked):
    """serve.py (the modules in `blocked` unimportable) on the samples: predict's classes, scores,
    thresholds, decisions, normalised scores, regions, and maps within 1e-4 of the largest value."""
    proc = _serve(export_dir, [samples, "--out", str(out)], blocked)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [ln.split("\t") for ln in proc.stdout.strip().splitlines()]
    assert len(lines) == len(pred) == 6
    worst = 0.0
    for path, cls, score, thr, decision, normalised, regions in lines:
        row = pred[os.path.basename(path)]
        assert cls == row["class"] and decision == ("anomalous" if row["anomalous"] == "True" else "normal")
        assert float(score) == pytest.approx(float(row["score"]), rel=1e-4)
        assert float(thr) == pytest.approx(float(row["threshold"]), rel=1e-6)
        ours = np.load(out / (os.path.basename(path) + ".npy"))  # named after the input
        ref = np.load(os.path.join(latest_predictions(wd), "maps", row["output_name"] + ".npy"))
        assert np.array_equal(np.isnan(ours), np.isnan(ref))  # both at the image's size, NaN where unseen
        worst = max(worst, float(np.nanmax(np.abs(ours - ref)) / np.nanmax(np.abs(ref))))
        assert int(regions) == int(row["regions"])  # the same regions by the same rule
        if row["normalised_score"]:
            assert float(normalised) == pytest.approx(float(row["normalised_score"]), rel=1e-3, abs=1e-3)
    print(f"exported {name} vs predict: max |map difference| / max |map| = {worst:.2e}")
    assert worst <= 1e-4


def test_export_scores_like_predict_without_the_package_and_refuses_a_changed_artifact(tmp_path, tfds_dir, smoke_run):
    """StableHLO through jax without maskad_jax: predict's numbers; a changed or truncated scorer refused."""
    wd = smoke_run[0]
    export_dir, samples, pred = _export_and_predict(wd, tfds_dir, onnx=False)
    _assert_serve_equals_predict(export_dir, samples, wd, pred, tmp_path / "out", "StableHLO", ("maskad_jax",))
    changed = tmp_path / "changed"
    shutil.copytree(export_dir, changed)
    blob = bytearray((changed / "scorer.stablehlo").read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    (changed / "scorer.stablehlo").write_bytes(bytes(blob))
    proc = _serve(changed, [samples])
    assert proc.returncode == 2 and "scorer.stablehlo: its SHA-256 differs" in proc.stderr
    (changed / "scorer.stablehlo").write_bytes(bytes(blob[:1000]))
    proc = _serve(changed, [samples])
    assert proc.returncode == 2 and "changed or truncated" in proc.stderr


@pytest.mark.onnx
def test_onnx_export_scores_like_predict_without_jax_and_refuses_a_changed_model(tmp_path, tfds_dir, smoke_run):
    """The whole scoring program through jax2onnx (about 100 s on 2 cores: the `onnx` marker, its own CI
    step): onnxruntime without jax or maskad_jax gives predict's numbers; a changed scorer.onnx is refused."""
    wd = str(tmp_path / "wd")
    shutil.copytree(smoke_run[0], wd)  # its own copy: the other export test writes the same workdir's export
    export_dir, samples, pred = _export_and_predict(wd, tfds_dir, onnx=True)
    blocked = ("maskad_jax", "jax", "jaxlib")  # auto picks ONNX when jax is missing
    _assert_serve_equals_predict(export_dir, samples, wd, pred, tmp_path / "out", "ONNX", blocked)
    changed = tmp_path / "changed"
    shutil.copytree(export_dir, changed)
    blob = bytearray((changed / "scorer.onnx").read_bytes())
    blob[-5] ^= 0x01
    (changed / "scorer.onnx").write_bytes(bytes(blob))
    proc = _serve(changed, ["--runtime", "onnx", samples])
    assert proc.returncode == 2 and "scorer.onnx: its SHA-256 differs" in proc.stderr
