"""The PatchCore reimplementation of benchmarks/peers/patchcore.py (issue #36), piece by piece against
independent references: its embedding against PyTorch's AvgPool2d and bilinear interpolate, its image
score against the paper's eq. 7 worked by hand, its metric cross-check against scikit-learn, and the
anomalib probe's message; then the whole command on a tiny generated folder."""

import importlib.util
import json
import subprocess
import sys

import numpy as np
import pytest
from helpers import ROOT
from PIL import Image

_spec = importlib.util.spec_from_file_location("peers_patchcore", ROOT / "benchmarks" / "peers" / "patchcore.py")
patchcore = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(patchcore)


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
