"""The Colab TPU notebook executes end to end on the CPU with the smoke config (so it cannot rot)."""
import os

import pytest
from conftest import FAST_COMPILE

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
    outputs = "".join(o.get("text", "") + str(o.get("data", {}).get("text/plain", ""))
                      for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "image_auroc" in outputs
    assert os.path.isfile(tmp_path / "wd" / "metrics.json")
    assert os.path.isfile(tmp_path / "wd" / "predictions" / "scores.csv")
