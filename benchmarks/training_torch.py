"""The same training step in PyTorch eager: a reference for benchmarks/training.py on this machine.

    python benchmarks/training_torch.py --model small --steps 10          # dim 256, 2 + 2 blocks, batch 16
    python benchmarks/training_torch.py --model small --threads 2 --batch 32

One step = the reconstructor's forward on a masked batch of cached 14 x 14 x C features (half the
positions masked), the mean squared error against the features, backward, global-norm clipping at
3.0 and AdamW: what `benchmarks/training.py` times in JAX, minus the mask sampling and stochastic
depth (both cheap). The ViT is the BEiT block of benchmarks/authors_structure_torch.py (q/v biases,
shared relative position bias, layer scale, exact GELU), written for timing only. Reports the
median images/s after two warm-up steps. Needs torch (the test extra).
"""

import argparse
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from authors_structure_torch import SIZES, ViT  # noqa: E402


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", choices=sorted(SIZES), default="small")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--channels", type=int, default=192)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    dim, depth, heads = SIZES[a.model]
    model = ViT(a.channels, dim, depth, heads)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05)
    h = torch.randn(a.batch, 196, a.channels)
    mask = torch.rand(a.batch, 196) < 0.5
    times = []
    for _ in range(a.steps + 2):
        t = time.perf_counter()
        loss = ((model(h, mask) - h) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 3.0)
        opt.step()
        times.append(time.perf_counter() - t)
    step = float(np.median(times[2:]))
    print(
        f"torch {torch.__version__} eager, model={a.model} batch={a.batch} threads={a.threads}: "
        f"{1000 * step:.0f} ms/step, {a.batch / step:.1f} images/s (loss {loss.item():.4f})"
    )


if __name__ == "__main__":
    main()
