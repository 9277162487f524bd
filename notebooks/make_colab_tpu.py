"""Writes notebooks/colab_tpu.ipynb from the cells below (edit here, then run this script)."""

import json
import os

CELLS = [
    (
        "markdown",
        """# MaskAD in JAX on a Colab TPU

Train one MaskAD model for all classes of a dataset on every TPU core (the same mesh code as on
a CPU or GPU), evaluate it, look at heatmaps, and keep the orbax checkpoints on Drive.

Runtime > Change runtime type > TPU. The cells also run on a CPU (CI executes this notebook with
the `smoke` config).""",
    ),
    (
        "markdown",
        """## Install (keeps the runtime's JAX)

Colab's TPU and GPU runtimes come with a JAX built for their accelerator. This cell installs
maskad-jax and its other requirements with that JAX held at its version (a pip constraint), so
nothing replaces it; it prints the JAX it found. Outside Colab the notebook runs inside a checkout
(`MASKAD_INSTALL` names a wheel, folder or git URL to install instead).""",
    ),
    (
        "code",
        """import importlib.metadata as md, os, subprocess, sys, tempfile
IN_COLAB = "COLAB_RELEASE_TAG" in os.environ
# on Colab: the git URL of your maskad-jax copy, or upload it to /content/maskad-jax
REPO = os.environ.get("MASKAD_REPO", "")
TARGET = os.environ.get("MASKAD_INSTALL", "")  # a wheel, a folder or a git URL to install


def install_keeping_jax(target):
    \"\"\"pip install target with the installed jax and jaxlib held at their versions (none: the tested ones).\"\"\"
    found = {}
    for name in ("jax", "jaxlib"):
        try:
            found[name] = md.version(name)
        except md.PackageNotFoundError:
            pass
    print("JAX found:", ", ".join(f"{k} {v}" for k, v in found.items()) or "none: installing maskad-jax's")
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as f:
        f.write("".join(f"{k}=={v}\\n" for k, v in found.items()))
    done = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "-c", f.name, target])
    if done.returncode:
        raise SystemExit(f"maskad-jax does not install beside {found}: its JAX range is in setup.cfg (tested: 0.10)")
    print("JAX now:", md.version("jax"), "| maskad-jax", md.version("maskad-jax"))


if IN_COLAB and not TARGET:  # get the code; elsewhere the notebook runs inside a checkout
    if not os.path.isdir("maskad-jax"):
        if not REPO:
            raise SystemExit(
                "set MASKAD_REPO to the git URL of maskad-jax, or upload the repository to /content/maskad-jax"
            )
        subprocess.run(["git", "clone", REPO, "maskad-jax"], check=True)
    os.chdir("maskad-jax")
    TARGET = "."
if TARGET:
    install_keeping_jax(TARGET)
elif os.path.basename(os.getcwd()) == "notebooks":
    os.chdir("..")""",
    ),
    (
        "markdown",
        """## Where the data and the outputs live

`CONFIG` picks a config and variant (`mvtec`, `folder:cpu`, or a file such as `configs/folder.py`);
`MANUAL_DIR` points at the dataset (a Drive folder or a mounted bucket); `WORKDIR` keeps the
checkpoints, metrics and heatmaps (put it on Drive to keep them). On Colab, mount Drive first:
`from google.colab import drive; drive.mount('/content/drive')`.""",
    ),
    (
        "code",
        """CONFIG = os.environ.get("MASKAD_CONFIG", "demo:smoke")  # a config name or file, with :variants
MANUAL_DIR = os.environ.get("MASKAD_MANUAL_DIR", "")          # e.g. /content/drive/MyDrive/mvtec_ad
WORKDIR = os.environ.get("MASKAD_WORKDIR", "runs/colab")     # e.g. /content/drive/MyDrive/maskad_runs/mvtec
TFDS_DIR = os.environ.get("MASKAD_TFDS_DIR", "~/tensorflow_datasets")

import maskad_jax
config = maskad_jax.config(CONFIG)
config.data.tfds_dir = TFDS_DIR
if MANUAL_DIR:
    config.data.manual_dir = MANUAL_DIR
import jax
print(jax.devices())
print(config.data.name, config.model.backbone.arch, config.model.reconstructor.embed_dim)""",
    ),
    ("markdown", "## Train, fit and evaluate (rerunning resumes from the latest checkpoint)"),
    (
        "code",
        """from maskad_jax.app.pipeline import train_and_evaluate
result = train_and_evaluate(config, WORKDIR, "train_and_eval")
{k: round(100 * v, 1) for k, v in result["mean"].items()}""",
    ),
    ("markdown", "## Heatmaps: the highest- and lowest-scored test images of each class"),
    (
        "code",
        """from IPython.display import display
from PIL import Image
for ex in result["examples"][:6]:
    print(ex["class"], ex["kind"], ex["file"], round(ex["score"], 4))
    display(Image.open(os.path.join(WORKDIR, ex["png"])))""",
    ),
    ("markdown", "## The trained model as one object: load the workdir, score arrays, see maps and regions"),
    (
        "code",
        """import glob
import numpy as np
import maskad_jax
det = maskad_jax.load(WORKDIR)  # the orbax checkpoint and the fit; no config, no dataset
print(det)
again = det.evaluate()          # --mode=eval on the test split, from the checkpoint
assert again["mean"] == result["mean"]
files = sorted(glob.glob(os.path.join(WORKDIR, "heatmaps", "**", "*.png"), recursive=True))[:4]
arrays = [np.asarray(Image.open(f).convert("RGB")) for f in files]  # any uint8 images, here the overlays
results = det.predict(arrays)
for r in results:
    print(r.class_name, round(r.score, 4), "anomalous" if r.anomalous else "normal", r.map.shape, r.regions[:1])
saved = results[0].save(os.path.join(WORKDIR, "api_demo"), "first")
display(Image.open(saved["overlay"]))""",
    ),
]


def main():
    nb = {
        "nbformat": 4,
        "nbformat_minor": 5,
        "metadata": {
            "accelerator": "TPU",
            "kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"},
            "language_info": {"name": "python"},
        },
        "cells": [],
    }
    for i, (kind, src) in enumerate(CELLS):
        cell = {"cell_type": kind, "metadata": {}, "source": src.splitlines(keepends=True), "id": f"cell-{i}"}
        if kind == "code":
            cell.update(outputs=[], execution_count=None)
        nb["cells"].append(cell)
    out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "colab_tpu.ipynb")
    with open(out, "w") as f:
        json.dump(nb, f, indent=1)
        f.write("\n")
    print("wrote", out)


if __name__ == "__main__":
    main()
