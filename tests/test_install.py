"""Installed like a library (#34): the wheel built from this checkout goes into a fresh virtual environment
that already has a JAX (as Colab's runtimes do), through the Colab notebook's own install cell, which
must keep that JAX; then, from a directory outside the clone, the `maskad-jax` command trains and
evaluates the smoke demo by its config's name, the public API loads the result and scores an array,
the [onnx] extra (one command) gives a working ONNX converter (the installed package's, checked against
JAX in onnxruntime; the whole program's ONNX export is test_run_e2e.py's), and `pip check` is clean.
The wheel's metadata has ranges, no pins, and the accelerator extras. Needs PyPI (or pip's cache)."""

import glob
import importlib.metadata as md
import json
import os
import subprocess
import sys
import zipfile

import pytest
from helpers import FAST_COMPILE, ROOT

pytestmark = [pytest.mark.slow, pytest.mark.install]

UNPINNED = ("jax", "jaxlib", "numpy", "pillow", "flax", "optax", "orbax-checkpoint", "grain")


def _sh(cmd, cwd, env=None, timeout=900):
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env=env, timeout=timeout)
    assert proc.returncode == 0, f"{cmd}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout + proc.stderr


def _install_cell():
    nb = json.load(open(ROOT / "notebooks" / "colab_tpu.ipynb"))
    cells = ["".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code"]
    (cell,) = [c for c in cells if "def install_keeping_jax" in c]
    return cell


def test_the_wheel_installs_beside_an_existing_jax_and_works_outside_the_clone(tmp_path):
    dist = tmp_path / "dist"
    _sh([sys.executable, "-m", "build", "--sdist", "--wheel", "--outdir", str(dist)], ROOT)
    (wheel,) = glob.glob(str(dist / "*.whl"))
    assert glob.glob(str(dist / "*.tar.gz"))
    with zipfile.ZipFile(wheel) as z:
        meta = z.read(next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))).decode()
        names = z.namelist()
    requires = [ln.split(":", 1)[1].strip() for ln in meta.splitlines() if ln.startswith("Requires-Dist:")]
    base = {
        r.split(";")[0].split("[")[0].split(">")[0].split("<")[0].split("=")[0].strip().lower(): r for r in requires
    }
    for name in UNPINNED:
        assert name in base and "==" not in base[name].split(";")[0], base.get(name)
    extras = {ln.split(":", 1)[1].strip() for ln in meta.splitlines() if ln.startswith("Provides-Extra:")}
    assert {"cuda12", "tpu", "onnx"} <= extras
    assert "maskad_jax/configs/demo.py" in names and "maskad_jax/runtime/serve_page.html" in names

    venv = tmp_path / "venv"
    _sh([sys.executable, "-m", "venv", str(venv)], tmp_path)
    py, bindir = str(venv / "bin" / "python"), venv / "bin"
    jax_version = md.version("jax")
    _sh([py, "-m", "pip", "install", "-q", f"jax=={jax_version}", f"jaxlib=={jax_version}"], tmp_path)
    jax_files = sorted(glob.glob(str(venv / "lib" / "python*" / "site-packages" / "jax-*.dist-info")))
    stamp = os.stat(jax_files[0]).st_mtime_ns
    # the notebook's install cell, as on Colab: it must keep the JAX it finds
    env = dict(os.environ, MASKAD_INSTALL=wheel, PYTHONPATH="")
    out = _sh([py, "-c", _install_cell()], tmp_path, env=env)
    assert f"JAX found: jax {jax_version}, jaxlib {jax_version}" in out and f"JAX now: {jax_version}" in out
    assert glob.glob(str(venv / "lib" / "python*" / "site-packages" / "jax-*.dist-info")) == jax_files
    assert os.stat(jax_files[0]).st_mtime_ns == stamp  # not reinstalled
    assert "No broken requirements" in _sh([py, "-m", "pip", "check"], tmp_path)

    outside = tmp_path / "elsewhere"
    outside.mkdir()
    env = dict(os.environ, PYTHONPATH="", XLA_FLAGS=FAST_COMPILE)
    work, tfds = outside / "run", outside / "tfds"
    _sh(
        [str(bindir / "maskad-jax"), "--config=demo:smoke", f"--workdir={work}", f"--config.data.tfds_dir={tfds}"],
        outside,
        env,
    )
    assert json.load(open(work / "metrics.json"))["mean"]["image_auroc"] >= 0
    code = (
        "import numpy as np, maskad_jax as m; d = m.load('run'); "
        "r = d.predict(np.full((40, 60, 3), 120, np.uint8)); "
        "print('API', r.score, r.anomalous, r.map.shape, m.__file__)"
    )
    out = _sh([py, "-c", code], outside, env)
    line = next(ln for ln in out.splitlines() if ln.startswith("API"))
    assert "(40, 60)" in line and str(venv) in line  # the installed package, not the clone

    # [onnx] in one command: the converter and its orbax range resolve together, and the installed package's
    # converter turns a JAX function into ONNX that onnxruntime runs to JAX's numbers (the whole scoring
    # program's export, 100 s of jax2onnx on 2 cores, is checked against predict in test_run_e2e.py)
    _sh([py, "-m", "pip", "install", "-q", f"{wheel}[onnx]"], tmp_path)
    assert "No broken requirements" in _sh([py, "-m", "pip", "check"], tmp_path)
    code = (
        "import jax, jax.numpy as jnp, numpy as np, onnxruntime as ort; "
        "from maskad_jax.app import export_onnx; from maskad_jax.configs import demo; "
        "from maskad_jax.common.specs import resolve; "
        "assert export_onnx.skip_reason(resolve(demo.get_config('smoke')).export) is None; "
        "f = lambda x: (jnp.tanh(x @ x.T).sum(-1), jnp.argmax(x, -1)); "
        "args = (jax.ShapeDtypeStruct((3, 5), jnp.float32),); "
        "blob = export_onnx.convert(f, args, ['x'], ['s', 'i']); "
        "x = np.random.default_rng(0).random((3, 5), np.float32); "
        "got = ort.InferenceSession(blob, providers=['CPUExecutionProvider']).run(None, {'x': x}); "
        "want = jax.jit(f)(x); "
        "np.testing.assert_allclose(got[0], want[0], rtol=1e-5); np.testing.assert_array_equal(got[1], want[1]); "
        "print('ONNX OK', export_onnx.__file__)"
    )
    out = _sh([py, "-c", code], outside, env)
    assert "ONNX OK" in out and str(venv) in out
