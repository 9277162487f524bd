"""Time and peak memory of the seven metrics for one class.

    python benchmarks/metrics.py                       # MVTec-sized (100 images) exact; Real-IAD-sized (4000) binned
    python benchmarks/metrics.py --images 4000 --protocol exact

Each configuration runs in its own process so that its peak RSS is its own. Synthetic maps:
Gaussian noise plus a raised rectangle on each defective image's mask (30% defective).
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def worker(n, size, protocol):
    import numpy as np

    from maskad_jax.engine.metrics import all_metrics

    rng = np.random.default_rng(0)
    maps = rng.normal(size=(n, size, size)).astype(np.float32)
    masks = np.zeros((n, size, size), np.uint8)
    for i in range(0, n, 3):
        y, x = rng.integers(0, size - 40, 2)
        masks[i, y : y + 30, x : x + 25] = 1
    maps += 1.5 * masks
    scores = maps.max(axis=(1, 2))
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t = time.perf_counter()
    out = all_metrics(scores, masks.any(axis=(1, 2)), maps, masks, protocol=protocol)
    dt = time.perf_counter() - t
    return {
        "seconds": dt,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "rss_before_mib": base,
        "aupro": out["aupro"],
    }


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--worker", action="store_true")
    p.add_argument("--images", type=int)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--protocol")
    a = p.parse_args()
    if a.worker:
        print(json.dumps(worker(a.images, a.size, a.protocol)))
        return
    runs = [(a.images, a.protocol)] if a.images else [(100, "exact"), (100, "binned"), (4000, "binned")]
    for n, protocol in runs:
        cmd = [sys.executable, __file__, "--worker", "--images", str(n), "--size", str(a.size), "--protocol", protocol]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode:
            print(f"{n} images, {protocol}: failed ({proc.stderr.strip().splitlines()[-1:]})")
            continue
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        print(
            f"{n} images of {a.size}x{a.size}, {protocol}: {r['seconds']:.2f} s for all seven metrics; peak RSS "
            f"{r['peak_rss_mib']:.0f} MiB (maps and masks alone: {r['rss_before_mib']:.0f} MiB)",
            flush=True,
        )


if __name__ == "__main__":
    main()
