"""The notebooks execute end to end on the CPU with the smoke configs (so they cannot rot): the Colab TPU
notebook on the synthetic demo, "your own images" on its stand-in photos; and they are what
notebooks/make_notebooks.py writes."""

import json
import os
import re

import pytest
from helpers import FAST_COMPILE

pytestmark = pytest.mark.slow  # subprocess runs of run.py: `pytest -m 'not slow'` skips them

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _execute(name, env, monkeypatch):
    """The notebook run in a kernel with env set; its code cells' text output, joined."""
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("XLA_FLAGS", (os.environ.get("XLA_FLAGS", "") + " " + FAST_COMPILE).strip())
    nb = nbformat.read(os.path.join(ROOT, "notebooks", name), as_version=4)
    nbclient.NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": ROOT}}).execute()
    return "".join(
        o.get("text", "") + str(o.get("data", {}).get("text/plain", ""))
        for c in nb.cells
        if c.cell_type == "code"
        for o in c.get("outputs", [])
    )


def test_the_notebooks_are_what_make_notebooks_writes(tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "make_notebooks", os.path.join(ROOT, "notebooks", "make_notebooks.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main(str(tmp_path))
    for name in module.NOTEBOOKS:
        committed = json.load(open(os.path.join(ROOT, "notebooks", name)))
        assert committed == json.load(open(tmp_path / name)), f"{name}: rerun notebooks/make_notebooks.py"


def test_own_images_notebook_trains_on_a_folder_and_judges_new_images(tmp_path, monkeypatch):
    env = {
        "MASKAD_WORKDIR": str(tmp_path / "wd"),
        "MASKAD_CONFIG": "folder:smoke",
        "MASKAD_OVERRIDES": json.dumps({"data.tfds_dir": str(tmp_path / "tfds"), "data.image_size": 96}),
    }
    outputs = _execute("own_images.ipynb", env, monkeypatch)
    assert "24 good images in" in outputs and "Detector(workdir" in outputs
    rows = re.findall(r"^(\w+)_(\d+)\.png bracket (normal|anomalous) score ([0-9.]+)", outputs, re.M)
    assert len(rows) == 4, outputs[-3000:]
    scores = {kind + idx: float(score) for kind, idx, _, score in rows}
    # the two stand-ins with a red scratch score above the two without one
    assert min(scores["scratch00"], scores["scratch01"]) > max(scores["good02"], scores["good03"]), scores
    # the threshold says what it rests on: all 24 good images, cross-fitted (#35), not the 5 held out once
    assert "from 24 good images" in outputs
    assert "export agrees: True" in outputs
    assert os.path.isfile(tmp_path / "wd" / "own_images_demo" / "overlays" / "worst.png")


def test_colab_notebook_executes(tmp_path, monkeypatch):
    env = {
        "MASKAD_WORKDIR": str(tmp_path / "wd"),
        "MASKAD_TFDS_DIR": str(tmp_path / "tfds"),
        "MASKAD_CONFIG": "configs/demo.py:smoke",
    }
    outputs = _execute("colab_tpu.ipynb", env, monkeypatch)
    assert "image_auroc" in outputs
    assert os.path.isfile(tmp_path / "wd" / "metrics.json")
    # the API cell: a detector loaded from the workdir scored arrays, printed per image, saved one overlay
    assert "Detector(workdir" in outputs and ("anomalous" in outputs or "normal" in outputs)
    assert "(64, 64)" in outputs  # each map at its image's size
    assert os.path.isfile(tmp_path / "wd" / "api_demo" / "overlays" / "first.png")
    assert not os.path.exists(tmp_path / "wd" / "predictions")  # the API writes nothing unless asked
