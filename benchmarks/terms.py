"""Why each term of the MaskAD score helps or hurts: per-term separability on a trained workdir,
on the patch grid and on the pixels.

    python benchmarks/terms.py --config=configs/folder.py --workdir=runs/mtd --config.data.manual_dir=../shared/data/mtd
    python benchmarks/terms.py --config=configs/demo.py --workdir=runs/demo --cache=/tmp/demo_terms.npz

Scores every test image and the held-out normal (calibration) images of a trained workdir with the
workdir's checkpoint and pools, keeping the ingredients (scoring.make_score_features_fn with
with_terms=True, and the two kNN grids apart when scoring.knn_fine is on), then prints:
  1. patches: each term's scale (mean on held-out normal patches, on the test set's defect-free
     patches and on its defective ones: more than half of the patch inside a ground-truth region)
     and its separability: patch AUROC and image AUROC (largest patch value, per class, averaged);
  2. the paper's Fig. 5 "identity shortcut": the mean error of masked and unmasked positions;
  3. pixels: the seven metrics (docs/metrics.md), per class and their mean, of each term's map and
     of the combinations (upsampled and smoothed as scoring does; the image score is the map's max);
  4. where each combination's false positives are: the normal pixels above the level at which it
     finds half of the defective pixels, split into the image border (outer 1/14 of the side), the
     surroundings of a defect (within one patch of a ground-truth region), image edges (the top 10%
     of the smoothed grey-level gradient) and patches never masked by a test mask;
  5. positions: how each term's held-out normal level varies over the grid (the spread of the
     per-position means over the spread of all values; 0 = the same everywhere).
--cache keeps the collected arrays, so later runs (another section, another combination) skip
the model. Nothing here changes the model; --config overrides apply.
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
from scipy import ndimage  # noqa: E402

from maskad_jax.app import pipeline
from maskad_jax.common.parallel import to_local  # noqa: E402
from maskad_jax.common.specs import resolve
from maskad_jax.data.splits import Preprocess, eval_batches  # noqa: E402
from maskad_jax.engine import metrics as metrics_lib  # noqa: E402
from maskad_jax.engine import mpo as mpo_lib  # noqa: E402
from maskad_jax.engine import scoring  # noqa: E402
from maskad_jax.engine.fit_state import Fit  # noqa: E402
from maskad_jax.engine.smoothing import gaussian_matrix  # noqa: E402
from maskad_jax.models.reconstructor import build_reconstructor  # noqa: E402
from maskad_jax.models.resize import interpolation_matrix  # noqa: E402
from maskad_jax.training import feature_cache
from maskad_jax.training.train import restore_params  # noqa: E402

config_flags.DEFINE_config_file("config", "configs/demo.py", "the config the workdir was trained with")
flags.DEFINE_string("workdir", None, "a trained workdir (checkpoints/ and fit/)", required=True)
flags.DEFINE_string("cache", "", "an .npz to keep the collected terms in (read when it exists)")
FLAGS = flags.FLAGS
KEYS = ("e_h", "e_r", "masks", "mpo", "knn_fine")


def collect(config, workdir) -> dict:
    """The ingredients of every test image ("t_*") and held-out normal image ("c_*")."""
    s = resolve(config)
    _, train_data, test_data = pipeline.load_data(s.data)
    extractor = feature_cache.make_extractor(s.model, s.train.seed)
    gh, gw, ch = extractor.feature_shape(config.data.image_size)
    model = build_reconstructor(s.model, ch, (gh, gw))
    params = to_local(restore_params(workdir, s.train, s.model, s.data.image_size, ch, (gh, gw))[0])
    pools = Fit.load(os.path.join(workdir, "fit"))
    dev = scoring.device_pools(pools)
    feats = jax.jit(scoring.make_score_features_fn(s.scoring, model, with_terms=True), static_argnums=(6,))
    fine_spec = scoring.fine_embedding(s.scoring)
    size, bs = config.data.image_size, config.data.eval_batch_size
    if config.train.target != "same":
        raise SystemExit("this tool assumes train.target = same (h is its own target)")

    @jax.jit
    def run_on(params, dev, variables, images, pidx, keys):  # arguments, not constants baked into the program
        h, fine = extractor.apply_with_fine(variables, images, fine_spec) if fine_spec else (None, None)
        h = extractor.apply(variables, images) if h is None else h
        out = feats(params, dev, h, h, pidx, keys, size, None, fine)
        out["knn_fine"] = mpo_lib.fine_knn(dev, fine, pidx) if fine_spec else jnp.zeros((len(images), 1, 1))
        return {k: out[k] for k in KEYS}

    def run(images, pidx, keys):
        return run_on(params, dev, extractor.variables, images, pidx, keys)

    out = {}

    def add(prefix, images, pidx, keys, extra):
        res = run(jnp.asarray(images), jnp.asarray(pidx, jnp.int32), jnp.asarray(keys))
        for k, v in list(res.items()) + list(extra.items()):
            out.setdefault(prefix + k, []).append(np.asarray(v))

    geometry = s.data.geometry  # the images as the workdir's pools and reconstructor saw them
    if s.data.tiles:
        raise SystemExit("this tool does not take tiled workdirs (data.tiles)")
    for batch in eval_batches(test_data, bs, image_size=size, geometry=geometry):
        ok = batch["valid"] == 1
        names = [test_data.class_names[c] for c in batch["class_id"]]
        extra = {"gt": batch["mask"], "label": batch["label"], "cls": batch["class_id"], "ok": ok}
        extra["grey"] = batch["image"].mean(-1).astype(np.float16)
        add("t_", batch["image"], pools.pool_index(names), batch["image_key"], extra)
    pre = Preprocess(train_data, size, geometry)
    for k, cls in enumerate(pools.class_names):
        pos = np.asarray(pools.held_out.get(cls, []), int)
        for s in range(0, len(pos), bs):
            els = [pre.map(int(p)) for p in pos[s : s + bs]]
            images = np.stack([e["image"] for e in els])
            add(
                "c_",
                images,
                np.full(len(els), k),
                np.stack([e["image_key"] for e in els]),
                {"pool": np.full(len(els), k)},
            )
    d = {k: np.concatenate(v) for k, v in out.items()}
    keep = d.pop("t_ok")
    d = {k: (v[keep] if k.startswith("t_") else v) for k, v in d.items()}
    d["cal_scale"], d["size"] = np.asarray(pools.cal_scale), np.asarray(size)
    d["class_names"], d["pool_of_test"] = (
        np.asarray(test_data.class_names),
        pools.pool_index([test_data.class_names[c] for c in d["t_cls"]]),
    )
    return d


def patch_terms(d, p):
    """Per-image term maps on their grids: {name: (B, g, g)}."""
    e_h, e_r = np.swapaxes(d[p + "e_h"], 1, 2), np.swapaxes(d[p + "e_r"], 1, 2)  # (B, N_masks, n)
    b, g = len(e_h), d[p + "mpo"].shape[-1]
    rec_h, rec_r = e_h.mean(1), e_r.mean(1)
    w1 = np.abs(np.sort(e_h, 1) - np.sort(e_r, 1)).mean(1)
    t = {
        "kNN (token grid)": d[p + "mpo"],
        "Rec_h (absolute)": rec_h.reshape(b, g, g),
        "Rec_r (absolute)": rec_r.reshape(b, g, g),
        "AssDis (absolute)": w1.reshape(b, g, g),
        "Rec (reference units)": (rec_h / rec_r).reshape(b, g, g),
        "AssDis (reference units)": (w1 / rec_r).reshape(b, g, g),
    }
    if d[p + "knn_fine"].shape[-1] > 1:
        t["kNN (fine grid)"] = d[p + "knn_fine"]
    return t


def _up(x, size):
    a, b = interpolation_matrix(x.shape[-2], size), interpolation_matrix(x.shape[-1], size)
    return a @ x @ b.T


def _smooth(x, sigma):
    g = gaussian_matrix(x.shape[-1], sigma)
    return g @ x @ g.T


def mpo_grid(t):
    """M_po on its grid, as engine/mpo.multiscale_mpo forms it (the token grid's alone without the fine)."""
    if "kNN (fine grid)" not in t:
        return t["kNN (token grid)"]
    fine = t["kNN (fine grid)"]
    return 0.5 * (_up(t["kNN (token grid)"], fine.shape[-1]) + fine)


def pixel_maps(d, sigma, size) -> dict:
    """Each term's and combination's map at the image size, as scoring builds them (upsampled,
    smoothed); z(Rec) + z(M_po) standardises each term on its grid by its class's held-out normal
    mean and std (calibration.term_stats), as scoring.mpo_fusion = sum does."""
    t, c = patch_terms(d, "t_"), patch_terms(d, "c_")
    mpo, c_mpo = mpo_grid(t), mpo_grid(c)
    rec, c_rec = t["Rec (reference units)"], c["Rec (reference units)"]
    z_rec, z_mpo = np.zeros_like(rec), np.zeros_like(mpo)
    for k in np.unique(d["pool_of_test"]):
        s, h = d["pool_of_test"] == k, d["c_pool"] == k
        z_rec[s] = (rec[s] - c_rec[h].mean()) / c_rec[h].std()
        z_mpo[s] = (mpo[s] - c_mpo[h].mean()) / c_mpo[h].std()
    up = lambda x: _up(x, size)  # noqa: E731
    singles = ("kNN (token grid)", "kNN (fine grid)", "Rec (reference units)", "AssDis (absolute)")
    maps = {k: up(t[k]) for k in singles if k in t}
    maps["M_po (two grids)" if "kNN (fine grid)" in t else "M_po"] = up(mpo)
    maps["Rec x M_po"] = up(rec) * up(mpo)
    paper = up(t["Rec_h (absolute)"]) + up(t["AssDis (absolute)"])
    maps["(Rec_h + AssDis) x M_po, absolute (paper)"] = paper * up(mpo)
    maps["z(Rec) + z(M_po)"] = up(z_rec) + up(z_mpo)
    return {k: _smooth(v.astype(np.float32), sigma) for k, v in maps.items()}


def print_patch_tables(d):
    t_terms, c_terms = patch_terms(d, "t_"), patch_terms(d, "c_")
    b, g, size = len(d["t_label"]), d["t_mpo"].shape[-1], int(d["size"])
    frac = d["t_gt"].reshape(b, g, size // g, g, size // g).mean((2, 4)).reshape(b, -1)
    defect, clean = frac > 0.5, frac == 0
    print(f"{b} test images ({int(d['t_label'].sum())} defective), {len(d['c_pool'])} held-out normal images")
    print("\n1. Patches: scale and separability")
    print("| term | held-out normal patches | test defect-free | test defective | patch AUROC | image AUROC |")
    print("|---|---|---|---|---|---|")
    for name, v in t_terms.items():
        if v.shape[-1] != g:
            continue
        v = v.reshape(b, -1)
        sel = defect | clean
        image = np.mean(
            [metrics_lib.auroc(v[d["t_cls"] == c].max(1), d["t_label"][d["t_cls"] == c]) for c in _classes(d)]
        )
        print(
            f"| {name} | {c_terms[name].mean():.3f} | {v[clean].mean():.3f} | {v[defect].mean():.3f} | "
            f"{100 * metrics_lib.auroc(v[sel], defect[sel]):.1f} | {100 * image:.1f} |"
        )
    masked = np.swapaxes(d["t_masks"], 1, 2)  # (B, n, N_masks)
    print("\n2. Mean per-patch error (absolute units) of masked and unmasked positions (the paper's Fig. 5)")
    print("| patches | h masked | h unmasked | r masked | r unmasked |\n|---|---|---|---|---|")
    for name, sel in (("defect-free", clean), ("defective", defect)):
        m, eh, er = masked[sel], d["t_e_h"][sel], d["t_e_r"][sel]
        print(f"| {name} | {eh[m].mean():.2f} | {eh[~m].mean():.2f} | {er[m].mean():.2f} | {er[~m].mean():.2f} |")
    print(f"\nPatches never masked in any branch: {100 * (masked.sum(-1) == 0).mean():.1f}%")


def _classes(d):
    return sorted(set(d["t_cls"].tolist()))


def print_pixel_tables(d, maps):
    names = list(d["class_names"])
    print("\n3. Pixels: the seven metrics (%) of each map: per class, then the mean")
    print("| map | class | I-AUROC | I-AP | I-F1max | P-AUROC | P-AP | P-F1max | AUPRO |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, m in maps.items():
        per = []
        for c in _classes(d):
            s = d["t_cls"] == c
            per.append(metrics_lib.all_metrics(m[s].max(axis=(1, 2)), d["t_label"][s], m[s], d["t_gt"][s]))
            print(
                f"| {name} | {names[c]} | "
                + " | ".join(f"{100 * per[-1][k]:.1f}" for k in metrics_lib.METRIC_NAMES)
                + " |"
            )
        if len(per) > 1:
            print(
                f"| {name} | mean | "
                + " | ".join(f"{100 * np.mean([q[k] for q in per]):.1f}" for k in metrics_lib.METRIC_NAMES)
                + " |"
            )


def print_false_positive_table(d, maps):
    """Section 4: where the normal pixels ranked above half of the defective ones are."""
    b, size, g = len(d["t_label"]), int(d["size"]), d["t_mpo"].shape[-1]
    gt = d["t_gt"].astype(bool)
    band = max(1, size // g)
    border = np.zeros((size, size), bool)
    border[:band], border[-band:], border[:, :band], border[:, -band:] = True, True, True, True
    near = ndimage.binary_dilation(gt, structure=np.ones((1, 2 * band + 1, 2 * band + 1), bool)) & ~gt
    grad = np.stack([ndimage.gaussian_gradient_magnitude(x.astype(np.float32), 2.0) for x in d["t_grey"]])
    edges = grad >= np.quantile(grad, 0.9)
    never = (d["t_masks"].sum(1) == 0).reshape(b, g, g).repeat(size // g, 1).repeat(size // g, 2)
    print("\n4. False positives: normal pixels above the level that finds half of the defective pixels")
    print("| map | normal pixels above it (% of normal) | border | around a defect | edges | never-masked patches |")
    print("|---|---|---|---|---|---|")
    parts = {"border": border[None], "around a defect": near, "edges": edges, "never-masked patches": never}
    for name, m in maps.items():
        fp = np.zeros_like(gt)
        for c in _classes(d):
            s = d["t_cls"] == c
            if gt[s].any():
                fp[s] = (m[s] >= np.median(m[s][gt[s]])) & ~gt[s]
        n = max(int(fp.sum()), 1)
        shares = " | ".join(f"{100 * (fp & np.broadcast_to(v, fp.shape)).sum() / n:.0f}%" for v in parts.values())
        print(f"| {name} | {100 * fp.sum() / (~gt).sum():.2f} | {shares} |")
    base = " | ".join(f"{100 * (np.broadcast_to(v, gt.shape) & ~gt).sum() / (~gt).sum():.0f}%" for v in parts.values())
    print(f"| (share of all normal pixels) | | {base} |")


def print_position_table(d):
    print("\n5. Held-out normal level over positions: std of the per-position means / std of all values")
    names = list(d["class_names"])
    terms = patch_terms(d, "c_")
    print("| term | " + " | ".join(names[c] for c in _classes(d)) + " |\n|---|" + "---|" * len(_classes(d)))
    for name, v in terms.items():
        row = []
        for c in _classes(d):
            pool = d["pool_of_test"][d["t_cls"] == c][0]
            x = v[d["c_pool"] == pool]
            row.append(f"{x.mean(0).std() / max(x.std(), 1e-12):.2f}" if len(x) > 1 else "-")
        print(f"| {name} | " + " | ".join(row) + " |")


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)  # orbax and TFDS info lines would bury the tables
    config = FLAGS.config
    if FLAGS.cache and os.path.exists(FLAGS.cache):
        d = dict(np.load(FLAGS.cache))
    else:
        d = collect(config, FLAGS.workdir)
        if FLAGS.cache:
            np.savez(FLAGS.cache, **d)
    print_patch_tables(d)
    size, sigma = int(d["size"]), float(config.scoring.sigma)
    maps = pixel_maps(d, sigma, size)
    print_pixel_tables(d, maps)
    print_false_positive_table(d, maps)
    print_position_table(d)


if __name__ == "__main__":
    app.run(main)
