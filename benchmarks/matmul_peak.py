"""The machine's float32 matmul rate: XLA (jitted) beside numpy, on the reconstructor's shapes.

    python benchmarks/matmul_peak.py
    XLA_FLAGS=--xla_cpu_use_xnnpack=true python benchmarks/matmul_peak.py     # an XLA CPU option

The reference for "GFLOP/s achieved against the machine's peak" in RESULTS.md. Shapes: the paper
config's MLP and qkv matmuls over 12,608 tokens (64 sequences of 197 tokens: 8 images x 8 of the
26 branches), and a square 4096 one. Best of 5 calls after one warm-up call.
"""

import time

import jax
import jax.numpy as jnp
import numpy as np

SHAPES = [(12608, 768, 3072), (12608, 3072, 768), (12608, 768, 2304), (4096, 4096, 4096)]


def best_seconds(fn, repeats=5):
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main():
    rng = np.random.default_rng(0)
    f = jax.jit(lambda x, y: x @ y)
    print(f"{'m x k x n':>20s} {'XLA GFLOP/s':>12s} {'numpy GFLOP/s':>14s} {'XLA / numpy':>12s}")
    for m, k, n in SHAPES:
        a, w = rng.random((m, k), np.float32), rng.random((k, n), np.float32)
        ja, jw = jnp.asarray(a), jnp.asarray(w)
        gflop = 2 * m * k * n / 1e9
        xla = gflop / best_seconds(lambda: f(ja, jw).block_until_ready())
        ref = gflop / best_seconds(lambda: a @ w)
        print(f"{f'{m} x {k} x {n}':>20s} {xla:12.0f} {ref:14.0f} {xla / ref:12.2f}")


if __name__ == "__main__":
    main()
