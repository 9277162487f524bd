"""What a cold process pays before its first answer (#34): importing the package, importing predict,
and loading a trained model to score one image, for one checkout against another, in one run.

    python benchmarks/import_cost.py WORKDIR [--tree OTHER_CHECKOUT ...] [--repeats 5]

WORKDIR: a trained workdir whose config.json and fit both checkouts can read (a smoke demo run), with
an export in WORKDIR/export (--mode=export). For each checkout (this one first, then each --tree, put
first on PYTHONPATH) every command runs --repeats times in a fresh interpreter; printed: the first
run's and the median wall time (later runs may find a persistent compilation cache) and which heavy
modules the process loaded (ott, tensorflow_datasets, matplotlib, grain, tensorflow). The commands:
  import maskad_jax               the package
  import maskad_jax.app.predict   what a notebook or service scoring images imports
  run.py --mode=predict           one image, cold: the checkout's own predict on WORKDIR
  API load(export) + predict      one image through maskad_jax.load (checkouts that have it)
  export/serve.py                 one image through the export's runtime (no maskad_jax at all)
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

HEAVY = ("ott", "tensorflow_datasets", "matplotlib", "grain", "tensorflow")

_PROBE = "import sys, json; {code}; print('MODULES', json.dumps({{m: m in sys.modules for m in {heavy!r}}}))"


def _time(cmd, env, cwd):
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=600)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    mods = next((ln[8:] for ln in proc.stdout.splitlines() if ln.startswith("MODULES ")), None)
    return wall, (json.loads(mods) if mods else None)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("workdir")
    ap.add_argument("--tree", action="append", default=[])
    ap.add_argument("--repeats", type=int, default=5)
    a = ap.parse_args()
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    sample = sorted(os.listdir(os.path.join(a.workdir, "samples")))[0]
    image = os.path.join(a.workdir, "samples", sample)
    export = os.path.join(a.workdir, "export")
    for tree in [here, *a.tree]:
        tree = os.path.abspath(tree)
        env = dict(os.environ, PYTHONPATH=tree)
        has_api = (
            "def load(" in open(os.path.join(tree, "maskad_jax", "app", "api.py")).read()
            if os.path.isfile(os.path.join(tree, "maskad_jax", "app", "api.py"))
            else False
        )
        out = tempfile.mkdtemp()
        commands = {
            "import maskad_jax": [sys.executable, "-c", _PROBE.format(code="import maskad_jax", heavy=HEAVY)],
            "import maskad_jax.app.predict": [
                sys.executable,
                "-c",
                _PROBE.format(code="import maskad_jax.app.predict", heavy=HEAVY),
            ],
            "run.py --mode=predict (1 image)": [
                sys.executable,
                os.path.join(tree, "run.py"),
                "--config=configs/demo.py:smoke",
                f"--workdir={a.workdir}",
                "--mode=predict",
                f"--config.predict.input={image}",
                f"--config.data.tfds_dir={out}",
            ],
            "export/serve.py (1 image)": [sys.executable, os.path.join(export, "serve.py"), image],
        }
        if has_api:
            code = (
                "import numpy as np, maskad_jax as m; from PIL import Image; "
                f"d = m.load({export!r}); r = d.predict(Image.open({image!r}))"
            )
            commands["API load(export) + predict (1 image)"] = [
                sys.executable,
                "-c",
                _PROBE.format(code=code, heavy=HEAVY),
            ]
        print(f"checkout {tree}")
        for name, cmd in commands.items():
            runs = [_time(cmd, env, tree) for _ in range(a.repeats)]
            walls = [w for w, _ in runs]
            mods = runs[-1][1]
            loaded = (
                ""
                if mods is None
                else "  loads: "
                + (", ".join(m for m, v in mods.items() if v) or "none of")
                + (" " + "/".join(HEAVY) if not any(mods.values()) else "")
            )
            print(f"  {name:38s} first {walls[0]:6.2f} s, median {statistics.median(walls):6.2f} s{loaded}")


if __name__ == "__main__":
    main()
