"""Is one scoring's image AUROC really above another's on the same test images? A paired bootstrap.

    python benchmarks/paired.py A/scores.csv B/scores.csv [--resamples 2000] [--seed 0]

A and B are two --mode=eval outputs (scores.csv: file, class, label, score) over the same test images,
e.g. a workdir scored as shipped and again with `ablation=mpo_only`. Per class: each one's image AUROC
(engine/metrics.auroc), their difference A - B, and a 95% percentile interval of that difference over
`resamples` bootstrap draws of the class's test images, good and defective images drawn separately
(each draw keeps the class's counts) and the same draw scoring both, so the interval reflects how much
a test set of this size can move the difference. An interval that holds 0 means these test images
cannot tell the two apart. Files in one CSV and not the other are refused by name.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from maskad_jax.engine.metrics import auroc  # noqa: E402


def read_scores(path: str) -> dict:
    """{file: (class, label, score)} of a scores.csv; rows without a score (skipped images) refused."""
    out = {}
    with open(path, newline="") as f:
        for i, row in enumerate(csv.DictReader(f), start=2):
            try:
                out[row["file"]] = (row["class"], int(row["label"]), float(row["score"]))
            except (KeyError, TypeError, ValueError) as e:
                raise SystemExit(f"{path} line {i}: needs file, class, label and a numeric score ({e!r})") from None
    return out


def paired_interval(a, b, labels, resamples: int = 2000, seed: int = 0) -> dict:
    """AUROC of scores a and b on labels, a - b, and its 95% stratified paired-bootstrap interval."""
    a, b, labels = np.asarray(a, float), np.asarray(b, float), np.asarray(labels, int)
    pos, neg = np.nonzero(labels == 1)[0], np.nonzero(labels == 0)[0]
    rng = np.random.default_rng(seed)
    diffs = np.empty(resamples)
    for r in range(resamples):
        idx = np.concatenate([rng.choice(pos, len(pos)), rng.choice(neg, len(neg))])
        diffs[r] = auroc(a[idx], labels[idx]) - auroc(b[idx], labels[idx])
    lo, hi = np.percentile(diffs, [2.5, 97.5])
    ra, rb = auroc(a, labels), auroc(b, labels)
    return {"a": ra, "b": rb, "diff": ra - rb, "low": float(lo), "high": float(hi), "good": len(neg), "bad": len(pos)}


def compare(path_a: str, path_b: str, resamples: int = 2000, seed: int = 0) -> dict:
    """{class: paired_interval(...)} over the files both CSVs score."""
    a, b = read_scores(path_a), read_scores(path_b)
    only = sorted(set(a) ^ set(b))
    if only:
        raise SystemExit(
            f"{path_a} and {path_b} score different images ({len(only)} in one only, e.g. {only[:3]}): "
            f"compare two evaluations of the same test set"
        )
    out = {}
    for cls in sorted({v[0] for v in a.values()}):
        files = sorted(k for k in a if a[k][0] == cls)
        labels = [a[k][1] for k in files]
        if len(set(labels)) < 2:
            continue  # AUROC needs good and defective images
        out[cls] = paired_interval([a[k][2] for k in files], [b[k][2] for k in files], labels, resamples, seed)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("a", help="scores.csv of the first scoring")
    p.add_argument("b", help="scores.csv of the second scoring, over the same test images")
    p.add_argument("--resamples", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    print("class | I-AUROC A | I-AUROC B | A - B | 95% interval | good / defective")
    for cls, r in compare(args.a, args.b, args.resamples, args.seed).items():
        print(
            f"{cls} | {100 * r['a']:.1f} | {100 * r['b']:.1f} | {100 * r['diff']:+.1f} | "
            f"[{100 * r['low']:+.1f}, {100 * r['high']:+.1f}] | {r['good']} / {r['bad']}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
