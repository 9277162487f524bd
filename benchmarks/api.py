"""The Python API's cost per image against the exported scorer's, measured in one process.

    python benchmarks/api.py WORKDIR [--images N] [--repeat R] [--old-predict]

WORKDIR: a trained workdir with an export (run.py --mode=export; made here when absent). For each of
N test images (WORKDIR/samples, or any *.png under WORKDIR), one at a time, after a warm-up call:
  export   serve.py's own path: serve_export.preprocess + score_loaded through scorer.stablehlo (batch 1)
  api      maskad_jax.load(WORKDIR).predict(uint8 array) (batch 1, the map at the image's size)
  api-exp  maskad_jax.load(WORKDIR/export).predict(uint8 array)
and, with --old-predict, the only route from Python before the API: train_and_evaluate(config,
workdir, "predict") on one file (a predictions folder written per call). Prints the median seconds
per image of each and the ratios to `export` (the issue's goal: api <= 1.5 x export).
"""

import argparse
import glob
import os
import statistics
import sys
import tempfile
import time

import numpy as np
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _median_time(fn, items, repeat):
    fn(items[0])  # compile / warm up
    times = []
    for _ in range(repeat):
        for x in items:
            t = time.perf_counter()
            fn(x)
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("workdir")
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--old-predict", action="store_true")
    args = ap.parse_args()

    import maskad_jax
    from maskad_jax.runtime import serve_export

    wd = os.path.abspath(args.workdir)
    det = maskad_jax.load(wd)
    export_dir = os.path.join(wd, "export")
    if not os.path.isfile(os.path.join(export_dir, "manifest.json")):
        det.export()
    files = sorted(glob.glob(os.path.join(wd, "samples", "*.png")) or glob.glob(os.path.join(wd, "**/*.png")))
    files = files[: args.images]
    arrays = [np.asarray(Image.open(f).convert("RGB")) for f in files]

    manifest = serve_export.load_manifest(export_dir)
    run = serve_export.stablehlo_scorer(export_dir)
    pre = manifest["preprocess"]
    size = manifest["input"]["shape"][1]

    def export_one(path):
        return serve_export.score_loaded(
            run, manifest, [serve_export.preprocess(path, size, pre["geometry"], pre["tiles"])]
        )

    exported = maskad_jax.load(export_dir)
    rows = {
        "export (serve.py's path, scorer.stablehlo)": _median_time(export_one, files, args.repeat),
        "api: load(workdir).predict(array)": _median_time(det.predict, arrays, args.repeat),
        "api: load(export).predict(array)": _median_time(exported.predict, arrays, args.repeat),
    }
    if args.old_predict:
        from maskad_jax.app.pipeline import train_and_evaluate

        config = det.config
        with tempfile.TemporaryDirectory() as tmp:

            def old(path):
                config.predict.input = path
                train_and_evaluate(config, wd, "predict")

            rows["before the API: train_and_evaluate(..., 'predict') on one file"] = _median_time(old, files[:2], 1)
            del tmp
    base = rows["export (serve.py's path, scorer.stablehlo)"]
    print(f"{len(files)} images of {wd}, median of {args.repeat} passes, one image per call")
    for name, t in rows.items():
        print(f"  {name:<66} {1000 * t:9.1f} ms/image   {t / base:6.2f} x export")


if __name__ == "__main__":
    main()
