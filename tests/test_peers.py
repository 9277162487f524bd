"""The PatchCore reimplementation of benchmarks/peers/patchcore.py (issue #36), piece by piece against
independent references: its embedding against PyTorch's AvgPool2d and bilinear interpolate, its image
score against the paper's eq. 7 worked by hand, its metric cross-check against scikit-learn, and the
anomalib probe's message; the anomalib side's renaming of the packaged Lite0 weights to timm's names
(through this package's own timm-name converter); then the whole command on a tiny generated folder."""

import importlib.util
import json
import subprocess
import sys

import numpy as np
import pytest
from helpers import ROOT
from PIL import Image


def _module(name, file):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / "peers" / file)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


patchcore = _module("peers_patchcore", "patchcore.py")
anomalib_side = _module("peers_anomalib_side", "anomalib_side.py")  # numpy only at import


def test_embedding_equals_torch_avgpool_and_bilinear_interpolate():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    fine = rng.normal(size=(2, 8, 8, 5)).astype(np.float32)
    coarse = rng.normal(size=(2, 4, 4, 3)).astype(np.float32)
    got = np.asarray(patchcore.patchcore_embedding([fine, coarse]))
    pool = torch.nn.AvgPool2d(3, 1, 1)
    f = pool(torch.from_numpy(fine).permute(0, 3, 1, 2))
    c = pool(torch.from_numpy(coarse).permute(0, 3, 1, 2))
    c = torch.nn.functional.interpolate(c, size=(8, 8), mode="bilinear", align_corners=False)
    want = torch.cat([f, c], dim=1).permute(0, 2, 3, 1).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_image_score_is_the_papers_reweighted_maximum_worked_by_hand():
    # bank: m0 = (0, 0), m1 = (1, 0), m2 = (10, 0); the test patch (0, 2) is nearest m0 (distance 2)
    bank = np.asarray([[0.0, 0.0], [1.0, 0.0], [10.0, 0.0]])
    emb = np.asarray([[0.0, 0.5], [0.0, 2.0]])  # two patches; the second has the largest distance
    dist = np.asarray([0.5, 2.0])
    nn = np.asarray([0, 0])
    # b = 2 neighbours of m* = m0 in the bank: m0 itself and m1; distances from the patch: 2 and sqrt(5)
    d0, d1 = 2.0, np.sqrt(5.0)
    weight = 1.0 - np.exp(d0) / (np.exp(d0) + np.exp(d1))
    assert patchcore.reweighted_score(dist, nn, emb, bank, neighbours=2) == pytest.approx(weight * 2.0, rel=1e-12)
    # with b = 1 the softmax is over m* alone: weight 0 (anomalib's form, kept as is)
    assert patchcore.reweighted_score(dist, nn, emb, bank, neighbours=1) == 0.0


def test_sklearn_check_agrees_with_the_package_metrics():
    pytest.importorskip("sklearn")
    from maskad_jax.engine import metrics

    rng = np.random.default_rng(3)
    labels = np.r_[np.zeros(20, int), np.ones(15, int)]
    scores = rng.normal(size=35) + labels
    check = patchcore._sklearn_check(scores, labels, None, None, ["a"] * 35)["a"]
    assert check["image_auroc"] == pytest.approx(metrics.auroc(scores, labels), abs=1e-12)
    assert check["image_ap"] == pytest.approx(metrics.average_precision(scores, labels), abs=1e-12)


def test_anomalib_probe_names_the_failing_command_and_its_error():
    assert "no --anomalib-python" in patchcore.anomalib_probe(None)
    why = patchcore.anomalib_probe(sys.executable)  # this environment has no anomalib, by design
    assert why.startswith(f"`{sys.executable} -c 'from anomalib.models import Patchcore'` failed: ")
    assert "ModuleNotFoundError" in why


def _folder(root, rng):
    """One class, MVTec layout: 12 good training images (a smooth gradient with noise), 3 good test
    images and 3 with a bright square, their masks."""
    cls = root / "plate"
    for sub in ("train/good", "test/good", "test/spot", "ground_truth/spot"):
        (cls / sub).mkdir(parents=True)
    base = np.linspace(60, 120, 64)[None, :, None] * np.ones((64, 1, 3))

    def image(spot):
        x = base + rng.normal(0, 3, size=base.shape)
        mask = np.zeros((64, 64), np.uint8)
        if spot:
            y0, x0 = rng.integers(8, 40, size=2)
            x[y0 : y0 + 14, x0 : x0 + 14] = 250
            mask[y0 : y0 + 14, x0 : x0 + 14] = 255
        return Image.fromarray(np.clip(x, 0, 255).astype(np.uint8)), Image.fromarray(mask)

    for i in range(12):
        image(False)[0].save(cls / "train" / "good" / f"{i}.png")
    for i in range(3):
        image(False)[0].save(cls / "test" / "good" / f"{i}.png")
        im, mask = image(True)
        im.save(cls / "test" / "spot" / f"{i}.png")
        mask.save(cls / "ground_truth" / "spot" / f"{i}_mask.png")


@pytest.mark.slow
def test_the_command_prints_both_rows_on_a_tiny_folder(tmp_path):
    _folder(tmp_path / "data", np.random.default_rng(0))
    out = tmp_path / "out"
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "peers" / "patchcore.py"),
            "--data",
            str(tmp_path / "data"),
            "--out",
            str(out),
            "--maskad-config",
            "folder:smoke",
            "--set",
            "data.image_size=64",
        ],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "| PatchCore (reimplementation, Lite0) |" in proc.stdout and "| maskad-jax |" in proc.stdout
    assert "anomalib not used: no --anomalib-python given" in proc.stdout
    rows = json.loads((out / "peers.json").read_text())["rows"]
    pc = rows[0]
    # a bright 14 px square on a smooth plate: PatchCore ranks every defective image above every good one
    assert pc["mean"]["image_auroc"] == 1.0 and pc["mean"]["pixel_auroc"] > 0.9
    assert pc["memory_bank"]["plate"] == int(np.ceil(0.1 * 12 * 8 * 8))  # 10% of 12 images' 8 x 8 tokens at 64 px
    for r in rows:  # our metric code and scikit-learn agree on each side's scores
        assert r["sklearn"]["plate"]["image_auroc"] == pytest.approx(r["per_class"]["plate"]["image_auroc"], abs=1e-9)
        assert r["peak_mb"] > 0 and r["fit_seconds"] > 0 and r["images_per_second"] > 0


def test_lite0_weights_renamed_for_timm_convert_to_the_same_network():
    """anomalib builds timm's tf_efficientnet_lite0; anomalib_side renames the packaged (lukemelas)
    weights to timm's names. This package's converter reads both namings independently
    (models/weights: _lukemelas_target, _timm_target), so the renamed dict must give the very same
    Flax variables as the original (the head aside: a features_only model has none)."""
    from flax import traverse_util

    from maskad_jax.models import weights as w

    packaged = w.read_state_dict(w.packaged_lite0_path())
    renamed = anomalib_side.lite0_state_dict(packaged, None)
    assert w.detect_naming(renamed) == "timm"
    a, _ = w.convert_state_dict(packaged, "efficientnet-lite0", require_head=False)
    b, report = w.convert_state_dict(renamed, "efficientnet-lite0", require_head=False)
    assert all("head" in m or "/fc/" in m for m in report["missing"])
    fa, fb = traverse_util.flatten_dict(a), traverse_util.flatten_dict(b)
    body = {k for k in fa if not any("head" in p or p == "fc" for p in k)}
    assert body and body == set(fb)
    for k in body:
        np.testing.assert_array_equal(np.asarray(fa[k]), np.asarray(fb[k]))
    # the stride-8 and stride-16 feature modules anomalib taps end with 40 and 112 channels
    assert renamed["blocks.2.1.conv_pwl.weight"].shape[0] == 40
    assert renamed["blocks.4.2.conv_pwl.weight"].shape[0] == 112


def test_lite0_renaming_names_what_it_cannot_fill():
    packaged = {"_conv_stem.weight": np.zeros((32, 3, 3, 3))}
    with pytest.raises(KeyError, match=r"blocks\.0\.0\.conv_dw\.weight"):
        anomalib_side.lite0_state_dict(packaged, ["conv_stem.weight", "blocks.0.0.conv_dw.weight"])


def test_metric_agreement_is_the_worst_class_difference_in_points():
    ours = {"a": {"image_auroc": 0.90, "image_f1_max": 0.8, "aupro": 0.7}, "b": {"image_auroc": 0.50, "aupro": 0.6}}
    theirs = {"a": {"image_auroc": 0.9004, "image_f1_max": 0.8, "aupro": 0.69}, "b": {"image_auroc": 0.5010}}
    got = patchcore.metric_agreement(ours, theirs)
    assert set(got) == {"image_auroc", "image_f1_max", "aupro"}  # pixel metrics: neither side has them
    assert got["image_auroc"] == pytest.approx(0.10)
    assert got["image_f1_max"] == pytest.approx(0.0)
    assert got["aupro"] == pytest.approx(1.0)  # class a only: anomalib gave b no AUPRO
