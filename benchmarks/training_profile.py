"""Where a training step's time goes on a CPU: one forward + backward of the reconstructor, traced.

    python benchmarks/training_profile.py                                            # small config, batch 16
    XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type= python benchmarks/training_profile.py   # as run.py sets it

Traces `--calls` jitted value-and-grad calls with jax.profiler, dumps the optimised HLO to name
each traced kernel's source operation, and prints per-call milliseconds by kind (dense-layer
matmuls, attention matmuls, everything else) and the slowest source operations. Kernels that the
trace does not show (XLA's Eigen matmul calls) are counted as "untraced": the difference between
the call's wall time and the traced kernels. One device, random features, half the positions masked.
"""

import argparse
import collections
import glob
import gzip
import json
import os
import re
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--calls", type=int, default=3)
    p.add_argument("--top", type=int, default=15)
    a = p.parse_args()
    dump = tempfile.mkdtemp(prefix="maskad_profile_")
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_dump_to={dump}/hlo --xla_dump_hlo_as_text"
    import jax
    import jax.numpy as jnp
    import numpy as np

    from maskad_jax.models.reconstructor import MaskedReconstructor

    model = MaskedReconstructor(in_channels=192, embed_dim=256, encoder_depth=2, decoder_depth=2, num_heads=a.heads)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(a.batch, 14, 14, 192)).astype(np.float32))
    m = jnp.asarray(rng.random((a.batch, 196)) < 0.5)
    params = model.init(jax.random.key(0), x[:1], m[:1])["params"]

    def step_loss(p, x, m):
        pred = model.apply({"params": p}, x, m, deterministic=False, rngs={"dropout": jax.random.key(1)})
        return jnp.mean(jnp.square(pred - x))

    g = jax.jit(jax.value_and_grad(step_loss))
    jax.block_until_ready(g(params, x, m))
    jax.profiler.start_trace(f"{dump}/trace")
    t = time.perf_counter()
    for _ in range(a.calls):
        jax.block_until_ready(g(params, x, m))
    wall = (time.perf_counter() - t) / a.calls * 1000
    jax.profiler.stop_trace()

    names = {}  # kernel name -> source operation, from the optimised HLO
    for f in glob.glob(f"{dump}/hlo/*jit_step_loss*cpu_after_optimizations.txt"):
        for line in open(f):
            hit = re.match(r"\s*(?:ROOT )?%([\w.\-]+) = .*?op_name=\"([^\"]+)\"", line)
            if hit:
                names[hit.group(1)] = hit.group(2).split("/", 1)[-1]
    events = json.load(gzip.open(sorted(glob.glob(f"{dump}/trace/**/*.trace.json.gz", recursive=True))[-1]))
    per_op, unnamed = collections.Counter(), 0.0
    wrappers = ("ThunkExecutor", "$", "SlinkyThreadPool", "PjRt", "PjitFunction", "end:")
    for e in events["traceEvents"]:
        if e.get("ph") != "X" or e["name"].startswith(wrappers):
            continue
        ms = e.get("dur", 0) / 1000 / a.calls
        if e["name"] in names:
            per_op[re.sub(r"(encoder|decoder)_\d+", "block", names[e["name"]])] += ms
        else:
            unnamed += ms
    kinds = collections.Counter()
    for op, ms in per_op.items():
        attention_dot = "bhqd,bhkd" in op or "bhqk,bhkd" in op
        kinds["attention matmuls" if attention_dot else "dense matmuls" if "dot_general" in op else "other"] += ms
    kinds["kernels without a source name (XLA's split reductions)"] = unnamed
    kinds["untraced (Eigen matmul calls, overhead)"] = max(wall - sum(per_op.values()) - unnamed, 0.0)
    print(f"batch {a.batch}, heads {a.heads}, XLA_FLAGS={os.environ['XLA_FLAGS'].split(' --xla_dump_to')[0]!r}")
    print(f"forward + backward: {wall:.0f} ms per call ({a.batch / wall * 1000:.1f} images/s)")
    for k, ms in kinds.most_common():
        print(f"  {ms:7.1f} ms  {k}")
    print("slowest source operations (ms per call):")
    for op, ms in per_op.most_common(a.top):
        print(f"  {ms:7.1f}  {op[:110]}")


if __name__ == "__main__":
    main()
