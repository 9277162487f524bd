"""Training throughput and peak memory on cached features (the reconstructor only).

    python benchmarks/training.py --model small --steps 20       # dim 256, 4 blocks, batch 16
    python benchmarks/training.py --model paper --steps 3        # dim 768, 10 blocks, batch 80 (slow on CPU)
    python benchmarks/training.py --model paper --steps 60 --channels 272 --dtype bfloat16   # on a GPU

--host-cache gathers batches on the host each step (train.device_cache_gb = 0) instead of on the device.

Random features (192 channels = Lite0, 272 = B4; 14 x 14), the default mask mix. Reports images/s
after the first (compiling) step, the process's peak RSS and, on a GPU/TPU, the device memory peak.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from benchmarks.memory_report import memory_report  # noqa: E402
from configs import default  # noqa: E402
from maskad_jax.common.specs import resolve
from maskad_jax.training.train import train  # noqa: E402


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", choices=["small", "paper"], default="small")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--channels", type=int, default=192)
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--attention", choices=["einsum", "jax_xla", "jax_cudnn"], default="einsum")
    p.add_argument("--batch", type=int, default=0, help="global batch (0 = the model's default: 16 or 80)")
    p.add_argument("--host-cache", action="store_true")
    p.add_argument(
        "--log-every", type=int, default=1, help="steps per timed interval (use 10+ on a GPU: each log syncs)"
    )
    a = p.parse_args()
    c = default.get_config()
    r = c.model.reconstructor
    if a.model == "small":
        r.embed_dim, r.encoder_depth, r.decoder_depth, r.num_heads = 256, 2, 2, 8
        c.train.batch_size = 16
    c.model.dtype = a.dtype
    c.model.reconstructor.attention = a.attention
    if a.batch:
        c.train.batch_size = a.batch
    if a.host_cache:
        c.train.device_cache_gb = 0.0
    c.train.log_every = a.log_every  # each log line's img/s is the rate over its interval
    steps = a.steps + a.log_every
    n = min(c.train.batch_size * steps, max(3600, c.train.batch_size))  # at most an MVTec-sized cache
    c.train.epochs = -(-steps // (n // c.train.batch_size))
    h = np.random.default_rng(0).normal(size=(n, 14, 14, a.channels)).astype(np.float32)
    rates = []

    def log(msg):
        if " img/s" in msg:
            rates.append(float(msg.split(" img/s")[0].rsplit(" ", 1)[-1]))

    s = resolve(c)
    res = train(s.train, s.model, s.data.image_size, h, None, None, log=log, max_steps=steps)
    steady = rates[1:]  # the first interval includes compilation
    print(
        f"model={a.model} dtype={a.dtype} attention={a.attention} channels={a.channels} batch={c.train.batch_size} "
        f"cache={'host' if a.host_cache else 'device'} steps={len(steady)}: median {np.median(steady):.1f} images/s "
        f"(first interval with compile: {rates[0]:.2f} img/s); {memory_report()}; last loss {res.losses[-1][1]:.4f}"
    )


if __name__ == "__main__":
    main()
