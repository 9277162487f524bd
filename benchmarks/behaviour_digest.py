"""Digests of everything numeric a workdir holds, for comparing two versions bit for bit.

    python benchmarks/behaviour_digest.py WORKDIR > digest.json

Checkpoint arrays (restored with orbax: the reconstructor's and the flow's parameters and optimiser
state), the fit's arrays and records (pools, calibration, contract, updates: format 1 and format 2
files give the same digests for the same numbers), predictions' maps, scores.csv, metrics.json (times
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


def _fit(directory: str) -> dict:
    """A fit's digests, the same for format 1 (pools.npz + pools.json, up to a4eff19) and format 2
    (fit.npz: engine/fit_state.py) when every number in it is the same; read without the package."""
    if os.path.isfile(os.path.join(directory, "fit.npz")):
        with np.load(os.path.join(directory, "fit.npz")) as z:
            arrays = {k: z[k] for k in z.files if k != "meta"}
            meta = json.loads(bytes(z["meta"]).decode())
        record = {
            "class_names": meta["nominal"]["class_names"],
            "held_out": meta["nominal"]["held_out"],
            "cal_scores": meta["calibration"]["scores"],
            "cal_map_max": meta["calibration"]["map_max"],
            "cal_scoring": meta["calibration"]["scoring"],
            "geometry": meta["contract"],
            "val_thresholds": meta["val_thresholds"],
            "added": meta["updates"],
        }
    else:
        with np.load(os.path.join(directory, "pools.npz")) as z:
            arrays = {k: z[k] for k in z.files}
        meta = json.load(open(os.path.join(directory, "pools.json")))
        if meta.get("term_stats") is not None:
            arrays["term_stats"] = np.asarray(meta["term_stats"], np.float32)
        geometry = meta.get("geometry") or {"geometry": "crop", "image_size": None}
        record = {
            "class_names": meta["class_names"],
            "held_out": meta["calibration"],
            "cal_scores": meta.get("cal_scores", {}),
            "cal_map_max": meta.get("cal_map_max", {}),
            "cal_scoring": meta.get("cal_scoring"),
            "geometry": {
                "geometry": geometry["geometry"],
                "image_size": geometry.get("image_size"),
                "aspect": geometry.get("aspect", {}),
            },
            "val_thresholds": meta.get("val_thresholds", {}),
            "added": meta.get("added", []),
        }
    out = {k: _h(np.ascontiguousarray(v).tobytes()) for k, v in sorted(arrays.items())}
    out.update({k: _h(json.dumps(v, sort_keys=True).encode()) for k, v in record.items()})
    return out


def digest(wd: str) -> dict:
    wd = os.path.abspath(wd)
    res = {}
    for ck in sorted(glob.glob(os.path.join(wd, "**", "*checkpoints*", "*"), recursive=True)):
        if os.path.isdir(ck) and os.path.basename(ck).isdigit():
            res[os.path.relpath(ck, wd)] = _checkpoint(ck)
    for f in sorted(glob.glob(os.path.join(wd, "**", "*.npz"), recursive=True)):
        name = os.path.basename(f)
        if name in ("pools.npz", "fit.npz"):  # a fit, in either format: compared part by part
            res[os.path.join(os.path.relpath(os.path.dirname(f), wd), "<fit>")] = _fit(os.path.dirname(f))
            continue
        z = np.load(f, allow_pickle=False)
        res[os.path.relpath(f, wd)] = {k: _h(z[k].tobytes()) for k in sorted(z.files)}
    for f in sorted(glob.glob(os.path.join(wd, "**", "*.npy"), recursive=True)):
        res[os.path.relpath(f, wd)] = _h(np.load(f).tobytes())
    for name in ("scores.csv", "fit/flow.json", "scores.json"):
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
