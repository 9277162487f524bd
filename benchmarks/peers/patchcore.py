"""maskad-jax beside PatchCore on the same folder, in one table (issue #36).

    python benchmarks/peers/patchcore.py --data ../shared/data/rope [--out runs/peers/rope]
        [--maskad-config folder] [--set data.image_size=224 ...] [--anomalib-python V/bin/python]

Both sides read the same images through this package's data path (data/splits: the same decoding,
input size and geometry: those of the maskad-jax config, `folder` by default, so resize to 224), are
scored by this package's metric code (engine/metrics, docs/metrics.md), and run one after the other
in their own process, so fit time, scoring speed and peak memory (the process's VmHWM) are measured
in the same run on the same machine.

The PatchCore side. When `--anomalib-python` names an interpreter where `from anomalib.models import
Patchcore` works (benchmarks/peers/requirements.txt), anomalib's own PatchCore runs there
(anomalib_side.py: anomalib's PatchcoreModel with its defaults, timm's tf_efficientnet_lite0 carrying
the packaged Lite0 weights, on the images this script prepares through maskad-jax's data path), its
scores go through this package's metric code and its own metric classes, and the table gets its row
above the other two. Otherwise the probe's exact error is printed. Either way the table has a row of
this file's **PatchCore reimplementation** (Roth et al., "Towards Total Recall in Industrial Anomaly
Detection", CVPR 2022), with anomalib 2.x's defaults:
- features: the backbone's stride-8 and stride-16 stages (anomalib's layer2 and layer3 of a
  WideResNet-50), here EfficientNet-Lite0 with the packaged ImageNet weights (the same backbone and
  weights as maskad-jax's CPU configs); each stage 3 x 3 average pooled (stride 1, zero padding
  counted: AvgPool2d(3, 1, 1)), the stride-16 map resized bilinearly (half-pixel centres,
  align_corners=False) onto the stride-8 grid, the two concatenated;
- memory bank: per class, greedy k-center coreset of 10% of the training tokens (coreset_sampling
  _ratio 0.1), distances measured in a 128-dimensional Gaussian random projection (the paper's
  Johnson-Lindenstrauss step; anomalib uses a sparse random projection);
- patch score: the L2 distance to the nearest bank token; image score: the largest patch score s*
  reweighted as in the paper's eq. 7 with the b = 9 nearest bank neighbours of that patch's nearest
  bank token m* (num_neighbors 9): s = (1 - softmax(-d)_0) s* (anomalib's form: the weight is 1
  minus the softmax over those neighbours' distances to the test patch, at m* itself);
- anomaly map: the patch scores resized bilinearly to the input size, then a Gaussian blur with
  sigma 4 (engine/smoothing, truncated at 4 sigma: anomalib's kernel of 33 px).
No anomalib code is copied: the steps above are written from the paper and anomalib's documentation.

The maskad-jax side: `maskad_jax.train(config, workdir, overrides)` on the same folder (the
shipped config, CPU-sized unless told otherwise), then --mode=eval's scores and maps, timed apart.
Both score sets also go through scikit-learn (image AUROC, image AP, pixel AUROC where defined),
when installed, to show our metric code agrees.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import platform
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, ROOT)

METRICS = ("image_auroc", "image_ap", "image_f1_max", "pixel_auroc", "pixel_ap", "pixel_f1_max", "aupro")
PROBE = "from anomalib.models import Patchcore"


def _peak_mb() -> float:
    """This process's peak resident memory (VmHWM) in MB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _config(args):
    from maskad_jax.app.api import load_config
    from maskad_jax.app.detector import apply_overrides

    cfg = load_config(args.maskad_config)
    over = {"data.tfds_dir": os.path.join(args.out, "tfds")}
    if args.data:  # else the config's own dataset (the demo's synthetic classes)
        over["data.manual_dir"] = os.path.abspath(args.data)
    for item in args.set or []:
        key, _, value = item.partition("=")
        try:
            over[key] = ast.literal_eval(value)  # numbers, tuples, booleans
        except (ValueError, SyntaxError):
            over[key] = value  # a plain string
    return apply_overrides(cfg, over)


# ------------------------------------------------------------------------------------------- PatchCore
def patchcore_embedding(taps):
    """(B, H8, W8, C8 + C16): the stride-8 and stride-16 taps 3 x 3 average pooled, the coarser one
    resized bilinearly (half-pixel centres) onto the finer grid, concatenated."""
    import jax
    import jax.numpy as jnp

    from maskad_jax.models.features import avg_pool3

    fine, coarse = (avg_pool3(t.astype(jnp.float32)) for t in taps)
    b, h, w, _ = fine.shape
    up = jax.image.resize(coarse, (b, h, w, coarse.shape[-1]), "bilinear", antialias=False)
    return jnp.concatenate([fine, up], axis=-1)


def reweighted_score(patch_dist, patch_nn, embedding, bank, neighbours: int = 9):
    """The paper's eq. 7 for one image: patch_dist (P,) L2 distances of its patches to the bank,
    patch_nn (P,) their nearest bank rows, embedding (P, C), bank (M, C). The largest patch distance
    s*, weighted by 1 - softmax over the distances from that test patch to the `neighbours` bank rows
    nearest m* (m* itself first)."""
    import numpy as np

    i = int(np.argmax(patch_dist))
    m_star = bank[patch_nn[i]]
    to_m = np.linalg.norm(bank - m_star, axis=1)
    support = np.argsort(to_m, kind="stable")[: min(neighbours, len(bank))]
    d = np.linalg.norm(bank[support] - embedding[i], axis=1)
    e = np.exp(d - d.max())
    return float((1.0 - e[0] / e.sum()) * patch_dist[i])


def _patchcore(args) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from maskad_jax.app.pipeline import load_data
    from maskad_jax.common.specs import resolve
    from maskad_jax.engine.coreset import greedy_kcenter, nearest
    from maskad_jax.engine.smoothing import gaussian_smooth
    from maskad_jax.models.features import FeatureExtractor

    s = resolve(_config(args))
    d = s.data
    _, train, test = load_data(d)
    ex = FeatureExtractor.create(args.backbone, weights="packaged", strides=(8, 16))
    embed = jax.jit(lambda v, x: patchcore_embedding(ex.module.apply(v, ex.normalize(x))))

    def features(split):
        return collect_split(split, d, "emb", lambda x: embed(ex.variables, jnp.asarray(x)))

    t0 = time.time()
    tr = features(train)
    banks = {}
    for cid in sorted(set(tr["class_id"].tolist())):
        tokens = tr["emb"][tr["class_id"] == cid].reshape(-1, tr["emb"].shape[-1])
        k = int(np.ceil(args.coreset_ratio * len(tokens)))
        banks[cid] = tokens[greedy_kcenter(tokens, k, projection_dim=128, seed=0)]
    fit_seconds = time.time() - t0

    t0 = time.time()
    te = features(test)
    n, gh, gw, c = te["emb"].shape
    near = jax.jit(lambda q, bank: nearest(q, bank))
    scores, maps = np.zeros(n, np.float32), np.zeros((n, gh, gw), np.float32)
    names = [test.class_names[i] for i in te["class_id"]]
    for i in range(n):
        bank_cid = train.class_names.index(names[i])
        bank = banks[bank_cid]
        q = te["emb"][i].reshape(-1, c)
        sq, idx = near(jnp.asarray(q), jnp.asarray(bank))
        dist = np.sqrt(np.maximum(np.asarray(sq), 0.0))
        maps[i] = dist.reshape(gh, gw)
        scores[i] = reweighted_score(dist, np.asarray(idx), q, bank)
    size = d.image_size
    up = jax.image.resize(jnp.asarray(maps), (n, size, size), "bilinear", antialias=False)
    full = np.asarray(gaussian_smooth(up, 4.0))
    score_seconds = time.time() - t0
    bank_sizes = {train.class_names[k]: int(len(v)) for k, v in banks.items()}
    return _rows("PatchCore (reimplementation, Lite0)", te, names, scores, full) | {
        "fit_seconds": fit_seconds,
        "images_per_second": n / score_seconds,
        "memory_bank": bank_sizes,
    }


# --------------------------------------------------------------------------------------------- anomalib
def _export(args) -> None:
    """inputs.npz for anomalib_side.py: each split's images through this package's data path (the
    config's geometry and size), normalised as the backbone expects, NCHW float32; class indices,
    labels and masks; and this package's stride-8 and stride-16 taps of two test images (the check
    that anomalib's backbone got the same weights)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from maskad_jax.app.pipeline import load_data
    from maskad_jax.common.specs import resolve
    from maskad_jax.models.features import FeatureExtractor

    d = resolve(_config(args)).data
    _, train, test = load_data(d)
    ex = FeatureExtractor.create(args.backbone, weights="packaged", strides=(8, 16))
    nchw = lambda a: np.ascontiguousarray(np.moveaxis(np.asarray(a, np.float32), -1, 1))  # noqa: E731

    def split(data):
        out = collect_split(data, d, "x", lambda x: nchw(ex.normalize(jnp.asarray(x))))
        return out | {"cls": np.asarray([data.class_names[c] for c in out["class_id"]])}

    tr, te = split(train), split(test)
    classes = sorted(set(tr["cls"].tolist()))
    taps = jax.jit(ex.module.apply)(ex.variables, jnp.moveaxis(jnp.asarray(te["x"][:2]), 1, -1))
    np.savez(
        os.path.join(args.out, "inputs.npz"),
        class_names=np.asarray(classes),
        train_x=tr["x"],
        train_cls=np.asarray([classes.index(c) for c in tr["cls"]]),
        test_x=te["x"],
        test_cls=np.asarray([classes.index(c) for c in te["cls"]]),
        test_label=te["label"],
        test_mask=(te["mask"] > 0).astype(np.uint8),
        check_x=te["x"][:2],
        check_tap8=nchw(taps[0]),
        check_tap16=nchw(taps[1]),
    )


def _anomalib(args) -> dict:
    """anomalib's PatchCore (anomalib_side.py under --anomalib-python) on inputs.npz, scored by this
    package's metric code, with anomalib's own metric values beside."""
    import numpy as np

    inputs = os.path.join(args.out, "inputs.npz")
    _run_side(args, "export")
    side = os.path.join(HERE, "anomalib_side.py")
    proc = subprocess.run([args.anomalib_python, side, inputs, args.out], capture_output=True, text=True)
    with open(os.path.join(args.out, "anomalib.log"), "w") as f:
        f.write(proc.stdout + proc.stderr)
    if proc.returncode:
        raise SystemExit(
            f"the anomalib side failed (status {proc.returncode}): see {args.out}/anomalib.log\n{proc.stderr[-2000:]}"
        )
    with open(os.path.join(args.out, "anomalib.json")) as f:
        res = json.load(f)
    got, data = np.load(os.path.join(args.out, "anomalib.npz")), np.load(inputs)
    classes = [str(c) for c in data["class_names"]]
    te = {"label": data["test_label"], "mask": data["test_mask"]}
    names = [classes[k] for k in data["test_cls"]]
    row = _rows(f"PatchCore (anomalib {res['anomalib']}, Lite0)", te, names, got["scores"], got["maps"])
    row["agreement"] = metric_agreement(row["per_class"], res["anomalib_metrics"])
    keep = ("anomalib_metrics", "fit_seconds", "images_per_second", "memory_bank", "weights_check", "peak_mb", "torch")
    return row | {k: res[k] for k in keep}


def metric_agreement(ours: dict, theirs: dict) -> dict:
    """Per metric both define (image and pixel AUROC and F1-max, AUPRO): the largest |ours - anomalib's|
    over the classes, in points (%). AP is left out: anomalib's AUPR integrates the PR curve with
    trapezoids, a different quantity from average precision (docs/metrics.md)."""
    shared = ("image_auroc", "image_f1_max", "pixel_auroc", "pixel_f1_max", "aupro")
    out = {}
    for m in shared:
        diffs = [abs(ours[c][m] - theirs[c][m]) for c in ours if m in theirs.get(c, {})]
        if diffs:
            out[m] = 100 * max(diffs)
    return out


# ------------------------------------------------------------------------------------------- maskad-jax
def _maskad(args) -> dict:
    import numpy as np

    import maskad_jax
    from maskad_jax.app.pipeline import load_data, train_and_evaluate
    from maskad_jax.common.specs import resolve

    cfg = _config(args)
    wd = os.path.join(args.out, "maskad")
    t0 = time.time()
    train_and_evaluate(cfg, wd, "train")
    fit_seconds = time.time() - t0
    t0 = time.time()
    det = maskad_jax.load(wd)
    result = det.evaluate()  # --mode=eval: the test split's scores and maps (metrics.json)
    score_seconds = time.time() - t0
    s = resolve(cfg)
    _, _, test = load_data(s.data)
    rows = {r["file"]: r for r in _read_scores(os.path.join(wd, "scores.csv"))}
    scores = np.asarray([float(rows[f]["score"]) for f in test.file_names], np.float32)
    names = [test.class_names[i] for i in test.class_ids]
    out = {"name": "maskad-jax", "per_class": result["per_class"], "mean": result["mean"]}
    out["sklearn"] = _sklearn_check(scores, np.asarray(test.labels), None, None, names)
    return out | {
        "fit_seconds": fit_seconds,
        "images_per_second": len(test) / score_seconds,
        "eval_images_per_second": result.get("test_images_per_second"),
    }


def _read_scores(path):
    import csv

    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# ----------------------------------------------------------------------------------------------- shared
def collect_split(data, d, key: str, fn) -> dict:
    """One split through this package's data path (d: its DataSpec's size and geometry), batch by batch:
    {key: fn(images) of the valid rows, "mask", "label", "class_id": those rows' own, where present}."""
    import numpy as np

    from maskad_jax.data.splits import eval_batches

    out = {key: [], "mask": [], "label": [], "class_id": []}
    for b in eval_batches(data, d.eval_batch_size, image_size=d.image_size, geometry=d.geometry):
        keep = np.asarray(b["valid"], bool) if "valid" in b else np.ones(len(b["image"]), bool)
        out[key].append(np.asarray(fn(b["image"]))[keep])
        for k in ("mask", "label", "class_id"):
            if k in b:
                out[k].append(np.asarray(b[k])[keep])
    return {k: np.concatenate(v) for k, v in out.items() if v}


def _rows(name, te, names, scores, maps) -> dict:
    """Per class and mean: the seven metrics by this package's code (eval.protocol exact)."""
    import numpy as np

    from maskad_jax.engine import metrics as metrics_lib

    per_class = {}
    names_arr = np.asarray(names)
    for cls in sorted(set(names)):
        sel = names_arr == cls
        per_class[cls] = metrics_lib.all_metrics(scores[sel], te["label"][sel], maps[sel], te["mask"][sel])
    mean = {m: float(np.nanmean([p[m] for p in per_class.values()])) for m in METRICS}
    check = _sklearn_check(scores, te["label"], maps, te["mask"], names)
    return {"name": name, "per_class": per_class, "mean": mean, "sklearn": check}


def _sklearn_check(scores, labels, maps, masks, names) -> dict | None:
    """scikit-learn's image AUROC and AP (and pixel AUROC) per class, or None without scikit-learn."""
    try:
        from sklearn.metrics import average_precision_score, roc_auc_score
    except ImportError:
        return None
    import numpy as np

    out, names_arr = {}, np.asarray(names)
    for cls in sorted(set(names)):
        sel = names_arr == cls
        y = np.asarray(labels)[sel]
        if 0 < y.sum() < len(y):
            row = {"image_auroc": roc_auc_score(y, scores[sel]), "image_ap": average_precision_score(y, scores[sel])}
            if maps is not None and masks[sel].any() and not masks[sel].all():
                row["pixel_auroc"] = roc_auc_score(masks[sel].ravel() > 0, maps[sel].ravel())
            out[cls] = row
    return out


def _side(args) -> None:
    """One side in this process; its result and peak memory as JSON on stdout's last line."""
    if args.side == "export":
        _export(args)
        print("RESULT {}")
        return
    res = _patchcore(args) if args.side == "patchcore" else _maskad(args)
    res["peak_mb"] = _peak_mb()
    print("RESULT " + json.dumps(res, default=float))


def _run_side(args, side: str) -> dict:
    argv = [sys.executable, os.path.abspath(__file__), "--side", side, "--out", args.out]
    argv += ["--data", args.data] if args.data else []
    argv += ["--maskad-config", args.maskad_config, "--backbone", args.backbone]
    argv += ["--coreset-ratio", str(args.coreset_ratio)]
    for item in args.set or []:
        argv += ["--set", item]
    proc = subprocess.run(argv, capture_output=True, text=True)
    with open(os.path.join(args.out, f"{side}.log"), "w") as f:
        f.write(proc.stdout + proc.stderr)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode or not lines:
        raise SystemExit(
            f"the {side} side failed (status {proc.returncode}): see {args.out}/{side}.log\n{proc.stderr[-2000:]}"
        )
    return json.loads(lines[-1][len("RESULT ") :])


def anomalib_probe(python: str | None) -> str:
    """'' when anomalib's PatchCore imports under `python`, else the exact reason it cannot be used."""
    if not python:
        return "no --anomalib-python given (anomalib is kept out of this package's environment)"
    proc = subprocess.run([python, "-c", PROBE], capture_output=True, text=True)
    if proc.returncode == 0:
        return ""
    last = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()][-1:]
    return f"`{python} -c '{PROBE}'` failed: {last[0] if last else 'status ' + str(proc.returncode)}"


def anomalib_note(row: dict) -> str:
    """What the anomalib row's extra fields say, in one paragraph under the table."""
    agree = ", ".join(f"{m} {v:.2f}" for m, v in row["agreement"].items())
    return (
        f"anomalib's own metric classes on its scores differ from this package's metric code by at most "
        f"(points, worst class): {agree}. anomalib's backbone features match maskad-jax's Lite0 taps to "
        f"{row['weights_check']:.1e} of their largest magnitude (the same weights). anomalib's fit time "
        f"excludes decoding the images (given decoded); torch {row['torch']}."
    )


def table(rows: list, note: str) -> str:
    """The markdown table: one row per side, the seven metrics (%), fit s, images/s, peak MB."""
    head = "| method | " + " | ".join(METRICS) + " | fit s | img/s | peak MB |"
    out = [head, "|" + "---|" * (len(METRICS) + 4)]
    for r in rows:
        vals = " | ".join(f"{100 * r['mean'][m]:.1f}" for m in METRICS)
        out.append(
            f"| {r['name']} | {vals} | {r['fit_seconds']:.0f} | {r['images_per_second']:.2f} | {r['peak_mb']:.0f} |"
        )
    return "\n".join(out) + ("\n\n" + note if note else "")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--data",
        help="a folder in MVTec layout (<class>/train/good, <class>/test/...); default: the config's own dataset",
    )
    p.add_argument("--out", default=None, help="working folder (default runs/peers/<data folder or config name>)")
    p.add_argument("--maskad-config", default="folder", help="maskad-jax config name with variants (default folder)")
    p.add_argument("--set", action="append", help="a config override KEY=VALUE for both sides (repeatable)")
    p.add_argument("--backbone", default="efficientnet-lite0", help="PatchCore's backbone (packaged weights)")
    p.add_argument("--coreset-ratio", type=float, default=0.1, help="PatchCore's coreset ratio (anomalib: 0.1)")
    p.add_argument("--anomalib-python", default=None, help="an interpreter with anomalib installed (requirements.txt)")
    p.add_argument("--side", choices=("patchcore", "maskad", "export"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    name = os.path.basename(os.path.normpath(args.data)) if args.data else args.maskad_config.replace(":", "-")
    args.out = os.path.abspath(args.out or os.path.join("runs", "peers", name))
    os.makedirs(args.out, exist_ok=True)
    if args.side:
        _side(args)
        return 0
    why = anomalib_probe(args.anomalib_python)
    rows = [] if why else [_anomalib(args)]
    rows += [_run_side(args, "patchcore"), _run_side(args, "maskad")]
    if why:
        note = f"anomalib not used: {why}; the PatchCore row is this script's reimplementation (its docstring)."
    else:
        note = anomalib_note(rows[0])
    cpu = platform.processor() or platform.machine()
    text = table(rows, note + f" Machine: {_cpu_model() or cpu}, {os.cpu_count()} cores.")
    print(text)
    with open(os.path.join(args.out, "peers.json"), "w") as f:
        json.dump({"rows": rows, "note": note}, f, indent=2, default=float)
    with open(os.path.join(args.out, "table.md"), "w") as f:
        f.write(text + "\n")
    return 0


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "")
    except OSError:
        return ""


if __name__ == "__main__":
    sys.exit(main())
