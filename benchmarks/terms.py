"""Why each term of the MaskAD score helps or hurts: per-term separability on a trained workdir.

    python benchmarks/terms.py --config=configs/folder.py --workdir=runs/mtd --config.data.manual_dir=../shared/data/mtd
    python benchmarks/terms.py --config=configs/demo.py --workdir=runs/demo

Scores every test image and the held-out normal (calibration) images of a trained workdir with the
workdir's checkpoint and pools, keeping the per-patch ingredients (scoring.make_score_features_fn
with with_terms=True), and prints, on the 14 x 14 patch grid:
  1. each term's scale (mean on held-out normal patches, on the test set's defect-free patches of
     all images and on its defective patches: more than half of the patch inside a ground-truth
     region) and its separability: patch AUROC (defective vs defect-free patches) and image AUROC
     (the image's largest patch value, per class, then averaged). Terms: the kNN distance (M_po
     before calibration), Rec in absolute units (mean L2 error of the N h branches), the same for
     the reference branch, Rec in reference units (Rec_h / Rec_r), AssDis (the exact 1-D optimum;
     the Sinkhorn value is within 1% of it) in both units;
  2. the paper's Fig. 5 "identity shortcut": the mean error of masked and unmasked positions, for
     defect-free and defective patches, in the h and in the r branches.
Nothing here changes the model; --config overrides (e.g. --config.scoring.num_random=4) apply.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_experimental_ynn_fusion_type=").strip()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from maskad_jax import feature_cache, pipeline  # noqa: E402
from maskad_jax import metrics as metrics_lib  # noqa: E402
from maskad_jax.data import Preprocess, eval_batches  # noqa: E402
from maskad_jax.fit import Pools  # noqa: E402
from maskad_jax.parallel import to_local  # noqa: E402
from maskad_jax.reconstructor import build_reconstructor  # noqa: E402
from maskad_jax.scoring import device_pools, make_score_features_fn  # noqa: E402
from maskad_jax.train import restore_params  # noqa: E402

config_flags.DEFINE_config_file("config", "configs/demo.py", "the config the workdir was trained with")
flags.DEFINE_string("workdir", None, "a trained workdir (checkpoints/ and fit/)", required=True)
FLAGS = flags.FLAGS


def collect(fn, extractor, batches):
    """Per-patch terms of every image of the batches: dict of (N, ...) arrays."""
    out = {}
    for images, pidx, keys, extra in batches:
        h = extractor(jnp.asarray(images))
        res = fn(jnp.asarray(pidx), jnp.asarray(keys), h)
        for k in ("e_h", "e_r", "masks", "mpo"):
            out.setdefault(k, []).append(np.asarray(res[k]))
        for k, v in extra.items():
            out.setdefault(k, []).append(np.asarray(v))
    return {k: np.concatenate(v) for k, v in out.items()}


def terms_of(d, cal_scale):
    e_h, e_r = np.swapaxes(d["e_h"], 1, 2), np.swapaxes(d["e_r"], 1, 2)  # (N, N_masks, n)
    b = len(e_h)
    rec_h, rec_r = e_h.mean(1), e_r.mean(1)
    w1 = np.abs(np.sort(e_h, 1) - np.sort(e_r, 1)).mean(1)
    return {
        "kNN distance": d["mpo"].reshape(b, -1) * cal_scale[:, None],
        "Rec_h (absolute)": rec_h,
        "Rec_r (absolute)": rec_r,
        "AssDis (absolute)": w1,
        "Rec (reference units)": rec_h / rec_r,
        "AssDis (reference units)": w1 / rec_r,
        "Rec + AssDis (reference units)": (rec_h + w1) / rec_r,
    }


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)  # orbax and TFDS info lines would bury the tables
    config = FLAGS.config
    workdir = FLAGS.workdir
    _, train_data, test_data = pipeline.load_data(config)
    extractor = feature_cache.make_extractor(config)
    gh, gw, ch = extractor.feature_shape(config.data.image_size)
    model = build_reconstructor(config, ch, (gh, gw))
    params, _ = restore_params(workdir, config, ch, (gh, gw))
    params = to_local(params)
    pools = Pools.load(os.path.join(workdir, "fit"))
    dev_pools = device_pools(pools)
    feats = jax.jit(make_score_features_fn(config, model, with_terms=True), static_argnums=(6,))
    size = config.data.image_size

    def fn(pidx, keys, h):
        return feats(params, dev_pools, h, h, pidx, keys, size)

    if config.train.target != "same":
        raise SystemExit("this tool assumes train.target = same (h is its own target)")
    bs = config.data.eval_batch_size

    def test_batches():
        for batch in eval_batches(test_data, bs, image_size=size):
            ok = batch["valid"] == 1
            names = [test_data.class_names[c] for c in batch["class_id"]]
            yield (
                batch["image"],
                pools.pool_index(names),
                batch["image_key"],
                {"gt": batch["mask"], "label": batch["label"], "cls": batch["class_id"], "ok": ok},
            )

    def cal_batches():
        pre = Preprocess(train_data, size)
        for k, cls in enumerate(pools.class_names):
            pos = np.asarray(pools.calibration.get(cls, []), int)
            for s in range(0, len(pos), bs):
                els = [pre.map(int(p)) for p in pos[s : s + bs]]
                yield (
                    np.stack([e["image"] for e in els]),
                    np.full(len(els), k, np.int32),
                    np.stack([e["image_key"] for e in els]),
                    {"pool": np.full(len(els), k)},
                )

    test = collect(fn, extractor, test_batches())
    keep = test.pop("ok")
    test = {k: v[keep] for k, v in test.items()}
    cal = collect(fn, extractor, cal_batches())
    cls_pool = pools.pool_index([test_data.class_names[c] for c in test["cls"]])
    t_terms = terms_of(test, np.asarray(pools.cal_scale)[cls_pool])
    c_terms = terms_of(cal, np.asarray(pools.cal_scale)[cal["pool"]])
    b = len(test["label"])
    frac = test["gt"].reshape(b, gh, size // gh, gw, size // gw).mean((2, 4)).reshape(b, -1)
    defect, clean = frac > 0.5, frac == 0
    print(
        f"{b} test images ({int(test['label'].sum())} defective), {len(cal['pool'])} held-out normal images, "
        f"{test['masks'].shape[1]} masks; patches: {int(defect.sum())} defective, {int(clean.sum())} defect-free"
    )
    print(
        "| term | held-out normal patches | test defect-free patches | test defective patches | patch AUROC | "
        "image AUROC |"
    )
    print("|---|---|---|---|---|---|")
    for name, v in t_terms.items():
        sel = defect | clean
        patch = metrics_lib.auroc(v[sel], defect[sel])
        image = np.mean(
            [
                metrics_lib.auroc(v[test["cls"] == c].max(1), test["label"][test["cls"] == c])
                for c in sorted(set(test["cls"].tolist()))
            ]
        )
        print(
            f"| {name} | {c_terms[name].mean():.3f} | {v[clean].mean():.3f} | {v[defect].mean():.3f} | "
            f"{100 * patch:.1f} | {100 * image:.1f} |"
        )
    masked = np.swapaxes(test["masks"], 1, 2)  # (N, n, N_masks)
    print("\nMean per-patch error (absolute units) of masked and unmasked positions (the paper's Fig. 5):")
    print("| patches | h masked | h unmasked | r masked | r unmasked |")
    print("|---|---|---|---|---|")
    for name, sel in (("defect-free", clean), ("defective", defect)):
        m = masked[sel]
        eh, er = test["e_h"][sel], test["e_r"][sel]
        print(f"| {name} | {eh[m].mean():.2f} | {eh[~m].mean():.2f} | {er[m].mean():.2f} | {er[~m].mean():.2f} |")
    print(f"\nPatches never masked in any branch: {100 * (masked.sum(-1) == 0).mean():.1f}%")


if __name__ == "__main__":
    app.run(main)
