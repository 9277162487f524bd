"""Training throughput and peak memory on cached features (the reconstructor only).

    python benchmarks/training.py --model small --steps 20       # dim 256, 4 blocks, batch 16
    python benchmarks/training.py --model paper --steps 3        # dim 768, 10 blocks, batch 80 (slow on CPU)

Random Lite0-sized features (192 channels, 14 x 14), the default mask mix. Reports images/s after
the first (compiling) step and the process's peak RSS.
"""
import argparse
import os
import resource
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from configs import default  # noqa: E402
from maskad_jax.train import train  # noqa: E402


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", choices=["small", "paper"], default="small")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--channels", type=int, default=192)
    a = p.parse_args()
    c = default.get_config()
    r = c.model.reconstructor
    if a.model == "small":
        r.embed_dim, r.encoder_depth, r.decoder_depth, r.num_heads = 256, 2, 2, 8
        c.train.batch_size = 16
    c.train.log_every = 1  # one log line per step: its img/s is that step's rate
    c.train.epochs = 1
    n = c.train.batch_size * (a.steps + 1)
    h = np.random.default_rng(0).normal(size=(n, 14, 14, a.channels)).astype(np.float32)
    rates = []

    def log(msg):
        if " img/s" in msg:
            rates.append(float(msg.split(" img/s")[0].rsplit(" ", 1)[-1]))

    res = train(c, h, None, None, log=log)
    steady = rates[1:]  # the first step includes compilation
    print(f"model={a.model} batch={c.train.batch_size} steps={len(steady)}: median {np.median(steady):.1f} images/s "
          f"(first step with compile: {rates[0]:.2f} img/s); peak RSS "
          f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB; last loss {res.losses[-1][1]:.4f}")


if __name__ == "__main__":
    main()
