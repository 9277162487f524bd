"""The Colab TPU notebook executes end to end on the CPU with the smoke config (so it cannot rot)."""

import os

import pytest
from helpers import FAST_COMPILE

pytestmark = pytest.mark.slow  # subprocess runs of run.py: `pytest -m 'not slow'` skips them

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_colab_notebook_executes(tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    monkeypatch.setenv("MASKAD_WORKDIR", str(tmp_path / "wd"))
    monkeypatch.setenv("MASKAD_TFDS_DIR", str(tmp_path / "tfds"))
    monkeypatch.setenv("MASKAD_CONFIG", "configs/demo.py:smoke")
    monkeypatch.setenv("XLA_FLAGS", (os.environ.get("XLA_FLAGS", "") + " " + FAST_COMPILE).strip())
    nb = nbformat.read(os.path.join(ROOT, "notebooks", "colab_tpu.ipynb"), as_version=4)
    nbclient.NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": ROOT}}).execute()
    outputs = "".join(
        o.get("text", "") + str(o.get("data", {}).get("text/plain", ""))
        for c in nb.cells
        if c.cell_type == "code"
        for o in c.get("outputs", [])
    )
    assert "image_auroc" in outputs
    assert os.path.isfile(tmp_path / "wd" / "metrics.json")
    # the API cell: a detector loaded from the workdir scored arrays, printed per image, saved one overlay
    assert "Detector(workdir" in outputs and ("anomalous" in outputs or "normal" in outputs)
    assert "(64, 64)" in outputs  # each map at its image's size
    assert os.path.isfile(tmp_path / "wd" / "api_demo" / "overlays" / "first.png")
    assert not os.path.exists(tmp_path / "wd" / "predictions")  # the API writes nothing unless asked
