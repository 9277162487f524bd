"""Writes the notebooks from the cells below (edit here, then run this script; tests/test_notebook.py
checks that the committed .ipynb files are what it writes):
  colab_tpu.ipynb    a benchmark dataset on a Colab TPU: train, evaluate, heatmaps, the API
  own_images.ipynb   your own images: a folder of good parts -> a detector -> predictions and maps
"""

import json
import os

INSTALL = [
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
]

COLAB = [
    (
        "markdown",
        """# MaskAD in JAX on a Colab TPU

Train one MaskAD model for all classes of a dataset on every TPU core (the same mesh code as on
a CPU or GPU), evaluate it, look at heatmaps, and keep the orbax checkpoints on Drive.

Runtime > Change runtime type > TPU. The cells also run on a CPU (CI executes this notebook with
the `smoke` config).""",
    ),
    *INSTALL,
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


OWN = [
    (
        "markdown",
        """# Your own images: a folder of good parts to a detector

MaskAD learns from normal images only. Give it a folder of photos of good parts (one kind of part;
for several, one sub-folder per kind), and it returns a detector that scores new images: a score, a
decision against a threshold calibrated on your good parts, a map of where it looks wrong, and the
regions over that map's threshold. Runs on a CPU (the CPU-sized model), a GPU or a TPU.""",
    ),
    *INSTALL,
    (
        "markdown",
        """## Your folders

`GOOD`: the good parts (PNG or JPEG, any size; 20 or more, so the threshold rests on enough of them).
`INSPECT`: the images to judge. `WORKDIR`: where the trained model is kept. Left empty, the cell
writes stand-in photos (a brownish textured surface, a few with a red scratch) so the notebook runs
as it is; replace them with yours. On Colab, upload a folder or mount Drive first.""",
    ),
    (
        "code",
        """import json
import numpy as np
from PIL import Image

GOOD = os.environ.get("MASKAD_GOOD", "")          # e.g. /content/drive/MyDrive/brackets/good
INSPECT = os.environ.get("MASKAD_INSPECT", "")    # e.g. /content/drive/MyDrive/brackets/new
WORKDIR = os.environ.get("MASKAD_WORKDIR", "runs/own_images")
CONFIG = os.environ.get("MASKAD_CONFIG", "folder")  # folder: whole image, CPU-sized model ("folder:paper" on a TPU)
OVERRIDES = json.loads(os.environ.get("MASKAD_OVERRIDES", "{}"))  # any config field, e.g. {"train.epochs": 40}


def stand_in(folder, count, scratched, seed):
    \"\"\"count 320 x 240 photos of a textured surface; the first `scratched` with a red scratch.\"\"\"
    rng = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)
    for i in range(count):
        small = rng.normal(0, 1, (6, 8))
        grey = Image.fromarray(np.uint8(np.clip(128 + 25 * small, 0, 255))).resize((320, 240), Image.BICUBIC)
        img = np.asarray(grey, np.float32)[..., None] * np.float32([1.0, 0.85, 0.7])
        img = np.clip(img + rng.normal(0, 3, img.shape[:2] + (1,)), 0, 255).astype(np.uint8)
        if i < scratched:
            y = int(rng.integers(40, 200))
            img[y : y + 6, 60:200] = (220, 40, 40)
        Image.fromarray(img).save(os.path.join(folder, f"{'scratch' if i < scratched else 'good'}_{i:02d}.png"))


if not GOOD:
    GOOD, INSPECT = os.path.join(WORKDIR + "_stand_in", "bracket"), os.path.join(WORKDIR + "_stand_in", "inspect")
    stand_in(GOOD, 24, 0, seed=0)
    stand_in(INSPECT, 4, 2, seed=1)
print(len(os.listdir(GOOD)), "good images in", GOOD)""",
    ),
    (
        "markdown",
        """## Train: the reconstructor learns the good parts, the pools and thresholds are fitted

The folder's name is the class name. Rerunning resumes from the latest checkpoint in `WORKDIR`.""",
    ),
    (
        "code",
        """import maskad_jax
det = maskad_jax.train(CONFIG, workdir=WORKDIR, images=GOOD, overrides=OVERRIDES)
print(det)""",
    ),
    (
        "markdown",
        """## Judge new images

`predict` takes paths, PIL images or uint8 arrays. Each result has the score, the decision, the
threshold (and how many good images it rests on), a map at the image's own size and its regions.""",
    ),
    (
        "code",
        """from IPython.display import display
files = sorted(os.path.join(INSPECT, f) for f in os.listdir(INSPECT))
results = det.predict(files)
for r in results:
    print(
        os.path.basename(r.source), r.class_name, "anomalous" if r.anomalous else "normal",
        f"score {r.score:.4f} (threshold {r.threshold:.4f}, from {r.threshold_images} good images)",
        "map", r.map.shape, "regions", [g["box"] for g in r.regions[:2]],
    )
worst = max(results, key=lambda r: r.score)
saved = worst.save(os.path.join(WORKDIR, "own_images_demo"), "worst")
display(Image.open(saved["overlay"]))""",
    ),
    (
        "markdown",
        """## Take it elsewhere

The workdir loads again in any process (`maskad_jax.load(WORKDIR)`), and an export runs without
this package (`python WORKDIR/export/serve.py IMAGE`, or `serve.py --http`; docs/deploy.md).""",
    ),
    (
        "code",
        """folder = det.export(onnx="no")
exported = maskad_jax.load(folder)
again = exported.predict(files)
agree = all(abs(a.score - b.score) <= 1e-4 * max(1.0, abs(a.score)) for a, b in zip(results, again))
print("export agrees:", agree)""",
    ),
]

NOTEBOOKS = {"colab_tpu.ipynb": (COLAB, "TPU"), "own_images.ipynb": (OWN, None)}


def notebook(cells, accelerator) -> dict:
    """A notebook (nbformat 4) of (kind, source) cells."""
    metadata = {
        "kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"},
        "language_info": {"name": "python"},
    }
    if accelerator:
        metadata = {"accelerator": accelerator, **metadata}
    nb = {"nbformat": 4, "nbformat_minor": 5, "metadata": metadata, "cells": []}
    for i, (kind, src) in enumerate(cells):
        cell = {"cell_type": kind, "metadata": {}, "source": src.splitlines(keepends=True), "id": f"cell-{i}"}
        if kind == "code":
            cell.update(outputs=[], execution_count=None)
        nb["cells"].append(cell)
    return nb


def main(folder=os.path.dirname(os.path.abspath(__file__))):
    for name, (cells, accelerator) in NOTEBOOKS.items():
        out = os.path.join(folder, name)
        with open(out, "w") as f:
            json.dump(notebook(cells, accelerator), f, indent=1)
            f.write("\n")
        print("wrote", out)


if __name__ == "__main__":
    main()
