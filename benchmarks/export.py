"""Throughput of the exported scorers beside --mode=eval's program, same images, one run.

    python run.py --config=configs/demo.py --workdir=runs/demo --mode=export --config.export.onnx_batch=16
    python benchmarks/export.py --config=configs/demo.py --workdir=runs/demo --repeats 3

All score the same batches of the demo's test images: (a) the program eval runs
(scoring.make_score_fn under jit, float images, the class given), (b) the exported StableHLO
through jax.export.deserialize(...).call (uint8 images, keys; it also picks the class and applies
the threshold), (c) scorer.onnx through onnxruntime's CPU provider, when the export has one (in
batches of its fixed size: export with export.onnx_batch = data.eval_batch_size to compare like
with like). Reports images/s of each (best of --repeats after a warm-up) and the ratios to (a), and
the largest map difference to (a).
"""

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_experimental_ynn_fusion_type=").strip()

import jax  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from maskad_jax.app import pipeline
from maskad_jax.common.parallel import to_local  # noqa: E402
from maskad_jax.common.specs import resolve
from maskad_jax.data.splits import eval_batches  # noqa: E402
from maskad_jax.engine.fit_state import Fit  # noqa: E402
from maskad_jax.engine.scoring import device_pools, make_score_fn  # noqa: E402
from maskad_jax.models.reconstructor import build_reconstructor  # noqa: E402
from maskad_jax.runtime import serve_export  # noqa: E402
from maskad_jax.training import feature_cache
from maskad_jax.training.train import restore_params  # noqa: E402

config_flags.DEFINE_config_file("config", "configs/demo.py", "the config the workdir was trained with")
flags.DEFINE_string("workdir", None, "a trained and exported workdir (checkpoints/, fit/, export/)", required=True)
flags.DEFINE_integer("repeats", 3, "timed passes over the images (best is reported)")
flags.DEFINE_integer("images", 64, "how many test images")
FLAGS = flags.FLAGS


def best_rate(fn, batches, repeats):
    fn(*batches[0])  # compile
    best = 0.0
    for _ in range(repeats):
        t = time.perf_counter()
        for args in batches:
            jax.block_until_ready(fn(*args))
        best = max(best, sum(len(a[0]) for a in batches) / (time.perf_counter() - t))
    return best


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)  # orbax and TFDS info lines would bury the result
    config, workdir = FLAGS.config, FLAGS.workdir
    s = resolve(config)
    _, _, test_data = pipeline.load_data(s.data)
    extractor = feature_cache.make_extractor(s.model, s.train.seed)
    gh, gw, ch = extractor.feature_shape(config.data.image_size)
    model = build_reconstructor(s.model, ch, (gh, gw))
    params = to_local(restore_params(workdir, s.train, s.model, s.data.image_size, ch, (gh, gw))[0])
    pools = Fit.load(os.path.join(workdir, "fit"))
    dev_pools = device_pools(pools)
    score = make_score_fn(s.scoring, extractor, model)
    with open(os.path.join(workdir, "export", "scorer.stablehlo"), "rb") as f:
        exported = jax.export.deserialize(bytearray(f.read()))
    bs = config.data.eval_batch_size
    eval_args, export_args = [], []
    for batch in eval_batches(test_data, bs, image_size=config.data.image_size):
        if len(eval_args) * bs >= FLAGS.images:
            break
        pidx = pools.pool_index([test_data.class_names[c] for c in batch["class_id"]])
        eval_args.append((batch["image"], pidx, batch["image_key"]))
        u8 = np.round(batch["image"] * 255).astype(np.uint8)
        export_args.append((u8, batch["image_key"]))

    def run_eval(images, pidx, keys):
        return score(params, extractor.variables, dev_pools, images, pidx, keys)["map"]

    def run_export(images, keys):
        return exported.call(images, keys)["map"]

    runners = {"exported StableHLO (call)": run_export}
    onnx_run = onnx_runner(os.path.join(workdir, "export"))
    if onnx_run is not None:
        runners["exported ONNX (onnxruntime)"] = onnx_run
    n = sum(len(a[0]) for a in eval_args)
    print(f"{n} test images, batch {bs}, devices {jax.devices()}")
    r_eval = best_rate(run_eval, eval_args, FLAGS.repeats)
    print(f"eval program (jit):          {r_eval:.2f} images/s")
    for name, run in runners.items():
        diff = max(
            float(np.abs(np.asarray(run_eval(*a)) - np.asarray(run(*b))).max()) for a, b in zip(eval_args, export_args)
        )
        rate = best_rate(run, export_args, FLAGS.repeats)
        print(f"{name:28s} {rate:.2f} images/s  ratio to eval {rate / r_eval:.2f}  largest |map difference| {diff:.3g}")


def onnx_runner(folder):
    """f(images, keys) -> maps through scorer.onnx (serve.py's runner, in batches of its fixed size), or
    None when the export has no scorer.onnx."""
    manifest = serve_export.load_manifest(folder)
    if not (manifest.get("onnx") or {}).get("file"):
        print(f"no scorer.onnx in {folder}: {manifest.get('onnx')}")
        return None
    run = serve_export.onnx_scorer(folder, int(manifest["onnx"]["batch"]))
    return lambda images, keys: run(images, keys)["map"]


if __name__ == "__main__":
    app.run(main)
