"""Input-pipeline throughput: 900x900 PNGs decoded and preprocessed (224 crop), 0 and 2 grain workers.

    python benchmarks/pipeline.py [--images 96] [--batch 16]

Makes a temporary MVTec-layout folder of random-texture 900x900 RGB PNGs, builds it with the
folder builder, then times full passes of the evaluation pipeline (decode, shorter side to 224
with LANCZOS, centre crop, masks) after one warm-up batch.
"""

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
from absl import flags  # noqa: E402
from PIL import Image  # noqa: E402


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--images", type=int, default=96)
    p.add_argument("--batch", type=int, default=16)
    a = p.parse_args()
    flags.FLAGS.mark_as_parsed()  # grain's worker processes read absl flags
    from maskad_jax.data.splits import SplitData, eval_batches
    from tfds_builders import prepare

    with tempfile.TemporaryDirectory() as tmp:
        rng = np.random.default_rng(0)
        base = rng.integers(0, 255, (900, 900, 3), dtype=np.uint8)
        folder = os.path.join(tmp, "data", "part", "train", "good")
        os.makedirs(folder)
        for i in range(a.images):
            img = np.roll(base, 37 * i, axis=1)  # different images, realistic PNG sizes
            Image.fromarray(img).save(os.path.join(folder, f"{i:03d}.png"))
        os.makedirs(os.path.join(tmp, "data", "part", "test", "good"))
        Image.fromarray(base).save(os.path.join(tmp, "data", "part", "test", "good", "000.png"))
        builder = prepare("folder", os.path.join(tmp, "tfds"), manual_dir=os.path.join(tmp, "data"))
        data = SplitData.load(builder, "train")
        for workers in (0, 2):
            it = eval_batches(data, a.batch, image_size=224, num_workers=workers)
            next(it)
            t, n = time.perf_counter(), 0
            for b in it:
                n += int(b["valid"].sum())
            rate = n / (time.perf_counter() - t)
            print(f"pipeline, 900x900 PNG -> 224: {workers} workers: {rate:.1f} images/s ({n} images)", flush=True)


if __name__ == "__main__":
    main()
