"""The public API (maskad_jax.load / train, Detector.predict): a trained model as one object.

One smoke model is trained through maskad_jax.train; its Detector must give --mode=predict's numbers
on the same files (run.py with no --config: the workdir's config read back), take paths, PIL images
and arrays alike, load the export folder too, and work from a directory outside the clone."""

import glob
import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from helpers import FAST_COMPILE, ROOT
from PIL import Image

pytestmark = pytest.mark.slow  # trains a model and runs run.py


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    import maskad_jax

    tfds = str(tmp_path_factory.mktemp("tfds"))
    wd = str(tmp_path_factory.mktemp("api") / "wd")
    det = maskad_jax.train("demo:smoke", workdir=wd, overrides={"data.tfds_dir": tfds})
    samples = sorted(glob.glob(os.path.join(wd, "samples", "*.png")))
    assert len(samples) >= 4
    return det, wd, samples


# the same XLA flags for run.py and the API's process (run.py adds none when they are named): the programs,
# and so their float rounding, are then the same
ENV_FLAGS = f"--xla_force_host_platform_device_count=2 --xla_cpu_experimental_ynn_fusion_type= {FAST_COMPILE}"


def _env():
    return dict(os.environ, XLA_FLAGS=ENV_FLAGS, PYTHONPATH="")


def _run_py(args, cwd=ROOT):
    return subprocess.run(
        [sys.executable, str(ROOT / "run.py"), *args], cwd=cwd, capture_output=True, text=True, timeout=600, env=_env()
    )


API_SCRIPT = """
import hashlib, json, sys
import numpy as np
import maskad_jax as m
d = m.load(sys.argv[1])
rows = []
for r in d.predict(sys.argv[2:]):
    digest = hashlib.sha256(np.ascontiguousarray(r.map).tobytes()).hexdigest()
    rows.append(dict(r.row(), map_sha=digest, shape=r.map.shape))
print(json.dumps({"rows": rows, "module": m.__file__}))
"""


def test_predict_equals_predict_mode_run_without_a_config(trained, tmp_path):
    """From a directory outside the clone, with no --config: run.py --mode=predict and the API in a new
    process give the same numbers and maps, bit for bit."""
    det, wd, samples = trained
    proc = _run_py(
        [f"--workdir={wd}", "--mode=predict", f"--config.predict.input={os.path.dirname(samples[0])}"], tmp_path
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "the workdir's training config" in proc.stderr
    run = os.path.join(wd, "predictions", open(os.path.join(wd, "predictions", "latest.txt")).read().strip())
    rows = {r["file"]: r for r in json.load(open(os.path.join(run, "scores.json")))}
    api = subprocess.run(
        [sys.executable, "-c", API_SCRIPT, wd, *samples], cwd=tmp_path, capture_output=True, text=True, env=_env()
    )
    assert api.returncode == 0, api.stderr[-2000:]
    out = json.loads(api.stdout.strip().splitlines()[-1])
    assert not out["module"].startswith(str(tmp_path))
    assert len(out["rows"]) == len(samples)
    for path, r in zip(samples, out["rows"]):
        row = rows[os.path.basename(path)]
        for key in ("class", "score", "normalised_score", "threshold", "anomalous", "regions", "inspected_fraction"):
            assert r[key] == row[key], key
        saved = np.load(os.path.join(run, "maps", row["output_name"] + ".npy"))
        assert r["map_sha"] == hashlib.sha256(np.ascontiguousarray(saved).tobytes()).hexdigest()
        assert tuple(r["shape"]) == saved.shape == (Image.open(path).size[1], Image.open(path).size[0])
    # in this process (other XLA flags): the same decisions, the numbers to float rounding
    for path, r in zip(samples, det.predict(samples)):
        row = rows[os.path.basename(path)]
        assert r.class_name == row["class"] and r.anomalous == row["anomalous"]
        np.testing.assert_allclose(r.score, row["score"], rtol=1e-4, atol=1e-5)
    # nothing written by the API until asked
    assert sorted(os.listdir(os.path.join(wd, "predictions"))) == sorted([os.path.basename(run), "latest.txt"])
    result = det.predict(samples[0])
    paths = result.save(str(tmp_path / "saved"), "first")
    np.testing.assert_array_equal(np.load(paths["map"]), result.map)
    assert Image.open(paths["overlay"]).size == Image.open(samples[0]).size


def test_paths_pil_images_and_arrays_score_alike(trained, tmp_path):
    det, _, samples = trained
    path = samples[1]
    rgb = np.asarray(Image.open(path).convert("RGB"))
    by_path, by_pil, by_array = det.predict(path), det.predict(Image.open(path)), det.predict(rgb)
    assert by_path.score == by_pil.score == by_array.score
    np.testing.assert_array_equal(by_path.map, by_array.map)
    assert by_array.source == "<array>" and by_path.source == path
    # grey: a (H, W) array and the same pixels as an "L" PNG file
    grey = np.asarray(Image.open(path).convert("L"))
    Image.fromarray(grey, "L").save(tmp_path / "grey.png")
    assert det.predict(grey).score == det.predict(str(tmp_path / "grey.png")).score
    # a list: one result per image, in order; a single image alone agrees to float rounding (batch 1 vs 4)
    batch = det.predict([rgb, path, Image.open(samples[2]), samples[3]])
    assert [type(r).__name__ for r in batch] == ["Prediction"] * 4
    assert batch[0].score == batch[1].score
    np.testing.assert_allclose(batch[3].score, det.predict(samples[3]).score, rtol=1e-5)
    # one rule for the decision and the regions (docs/metrics.md): regions exactly when anomalous
    everything = det.predict(samples)
    assert any(r.anomalous for r in everything) and any(not r.anomalous for r in everything)
    for r in everything:
        assert bool(r.regions) == r.anomalous and (r.region_level is None) == (not r.anomalous), r


def test_bad_inputs_are_refused_naming_them(trained, tmp_path):
    import maskad_jax
    from maskad_jax.common.errors import ImageInputError, MissingInputError

    det, _, samples = trained
    with pytest.raises(ImageInputError, match="dtype float64; give uint8"):
        det.predict(np.zeros((64, 64, 3)))
    with pytest.raises(ImageInputError, match="shape"):
        det.predict(np.zeros((4, 64, 64, 3), np.uint8))
    with pytest.raises(ImageInputError, match="nothing.png"):
        det.predict([samples[0], str(tmp_path / "nothing.png")])
    with pytest.raises(ImageInputError, match="aspect ratio"):
        det.predict(np.zeros((2, 200), np.uint8))
    with pytest.raises(MissingInputError, match="no config.json"):
        maskad_jax.load(str(tmp_path))
    with pytest.raises(MissingInputError, match="no such folder"):
        maskad_jax.load(str(tmp_path / "absent"))


def test_an_export_loads_as_a_detector_and_agrees(trained):
    import maskad_jax

    det, _, samples = trained
    folder = det.export(onnx="no")  # the StableHLO program; ONNX has its own test (test_run_e2e.py)
    exported = maskad_jax.load(folder)
    assert exported.classes == det.classes and exported.thresholds == pytest.approx(det.thresholds)
    ours, theirs = det.predict(samples), exported.predict(samples)
    for a, b in zip(ours, theirs):  # the fused program of the export agrees to float rounding
        assert a.class_name == b.class_name and a.anomalous == b.anomalous
        np.testing.assert_allclose(b.score, a.score, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(b.map, a.map, rtol=1e-4, atol=1e-4)
    with pytest.raises(Exception, match="is an export"):
        exported.export()


def test_a_model_changing_override_is_refused_without_a_config(trained, tmp_path):
    _, wd, samples = trained
    proc = _run_py(
        [
            f"--workdir={wd}",
            "--mode=predict",
            f"--config.predict.input={samples[0]}",
            "--config.model.reconstructor.embed_dim=8",
        ],
        tmp_path,
    )
    assert proc.returncode == 2 and "another model config" in proc.stderr, proc.stderr[-2000:]


def test_a_workdir_config_written_before_a_field_existed_reads_back_with_its_default(tmp_path, capsys):
    """A workdir trained by an earlier version has no entry for fields added since (serve.max_pixels came
    with #33): reading it back gives them their defaults and says which; its own values are kept."""
    from maskad_jax.app.detector import workdir_config
    from maskad_jax.configs.default import get_config

    saved = get_config().to_dict()
    del saved["serve"]["max_pixels"]
    del saved["serve"]["max_queue"]
    saved["train"]["epochs"] = 3
    (tmp_path / "config.json").write_text(json.dumps(saved))
    config = workdir_config(str(tmp_path))
    assert config.serve.max_pixels == get_config().serve.max_pixels and config.train.epochs == 3
    out = capsys.readouterr().out
    assert "predates 2 config field(s)" in out and "serve.max_pixels" in out and "serve.max_queue" in out
