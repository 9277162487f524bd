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
    latest = (tmp_path / "wd" / "predictions" / "latest.txt").read_text().strip()  # each predict run: its own folder
    assert os.path.isfile(tmp_path / "wd" / "predictions" / latest / "scores.csv")
