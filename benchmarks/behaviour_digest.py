"""Digests of everything numeric a workdir holds, for comparing two versions bit for bit.

    python benchmarks/behaviour_digest.py WORKDIR > digest.json

Checkpoint arrays (restored with orbax: the reconstructor's and the flow's parameters and optimiser
state), the fit's arrays (pools, calibration), predictions' maps, scores.csv, metrics.json (times
left out), the fit's JSON records and train_log.jsonl (times and rates left out). Two workdirs made by
the same commands give identical digests exactly when every one of those numbers is identical.
Used by benchmarks/behaviour_check.sh (the restructuring of issue #26 was checked with it).
"""

import glob
import hashlib
import json
import os
import re
import sys

import numpy as np


def _h(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()[:16]


def _checkpoint(path: str) -> dict:
    import jax
    import orbax.checkpoint as ocp

    out = {}
    for item in sorted(os.listdir(path)):
        p = os.path.join(path, item)
        if not os.path.isdir(p) or item == "meta":
            continue
        tree = ocp.PyTreeCheckpointer().restore(p)
        leaves = jax.tree_util.tree_leaves_with_path(tree)
        out[item] = _h(b"".join(jax.tree_util.keystr(k).encode() + np.asarray(v).tobytes() for k, v in leaves))
    return out


def _untimed(d: dict) -> dict:
    return {k: v for k, v in d.items() if not any(t in k for t in ("sec", "time", "per_s", "wall"))}


def digest(wd: str) -> dict:
    wd = os.path.abspath(wd)
    res = {}
    for ck in sorted(glob.glob(os.path.join(wd, "**", "*checkpoints*", "*"), recursive=True)):
        if os.path.isdir(ck) and os.path.basename(ck).isdigit():
            res[os.path.relpath(ck, wd)] = _checkpoint(ck)
    for f in sorted(glob.glob(os.path.join(wd, "**", "*.npz"), recursive=True)):
        z = np.load(f, allow_pickle=False)
        res[os.path.relpath(f, wd)] = {k: _h(z[k].tobytes()) for k in sorted(z.files)}
    for f in sorted(glob.glob(os.path.join(wd, "**", "*.npy"), recursive=True)):
        res[os.path.relpath(f, wd)] = _h(np.load(f).tobytes())
    for name in ("scores.csv", "fit/pools.json", "fit/flow.json", "scores.json"):
        for f in sorted(glob.glob(os.path.join(wd, "**", name), recursive=True)):
            res[os.path.relpath(f, wd)] = _h(open(f, "rb").read())
    for f in sorted(glob.glob(os.path.join(wd, "**", "metrics.json"), recursive=True)):
        res[os.path.relpath(f, wd)] = _h(json.dumps(_untimed(json.load(open(f))), sort_keys=True).encode())
    for f in sorted(glob.glob(os.path.join(wd, "**", "*_log.jsonl"), recursive=True)):
        rows = [_untimed(json.loads(line)) for line in open(f)]
        res[os.path.relpath(f, wd)] = _h(json.dumps(rows, sort_keys=True).encode())
    return {re.sub(r"predictions/\d{8}-\d{6}", "predictions/TS", k): v for k, v in res.items()}


if __name__ == "__main__":
    json.dump(digest(sys.argv[1]), sys.stdout, indent=1, sort_keys=True)
    print()
