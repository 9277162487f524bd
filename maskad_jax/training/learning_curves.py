"""Learning curves: evaluation during training, every `train.eval_every` epochs.

At each point it reports, for a fixed subset of the test images (`train.eval_images`, normal and
defective images of every class, chosen by position, the same at every point):
  - the seven metrics of each Table-2 row in `train.eval_rows` (maskad_jax.engine.ablations), scored with
    the current parameters exactly as evaluation scores them;
  - `heldout_normal_loss`: the training loss (masked-feature MSE, training masks from fixed keys)
    on the subset's normal images, which the reconstructor never trains on.
The nominal pools are fitted before training (they depend on the backbone features only), so the
rows that use M_po and the reference branch can be scored from the first point on. With
scoring.mpo = flow the curves use the kNN M_po (the flow is trained after the reconstructor).
Rows that join the terms in held-out normal units (scoring.mpo_fusion = sum) take the terms'
statistics, at each point, from up to `train.eval_images` held-out normal training images
(calibration.calibrate), never from the curve set.
The training loop writes the values to the console, train_log.jsonl ("eval") and TensorBoard
(eval/<row>/<metric>).
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from maskad_jax.common.batching import row_batches, run_batched
from maskad_jax.common.specs import DataSpec, ScoringSpec, TrainSpec
from maskad_jax.engine import metrics as metrics_lib
from maskad_jax.engine.ablations import with_row
from maskad_jax.engine.scoring import device_pools, fine_embedding, make_score_features_fn, needs_term_stats
from maskad_jax.engine.trained_model import TrainedModel
from maskad_jax.training.calibration import calibrate
from maskad_jax.training.feature_cache import FeatureRequest, Features, extract_positions
from maskad_jax.training.step import sample_train_mask


@dataclasses.dataclass
class EvalSet:
    """The features and ground truth of the images the curves are measured on."""

    h_in: np.ndarray  # (N, gh, gw, C)
    h_tgt: np.ndarray  # (N, gh, gw, C): the regression targets (h_in itself unless train.target is unnormalized)
    masks: np.ndarray  # (N, S, S) uint8 ground truth
    labels: np.ndarray  # (N,)
    classes: tuple  # (N,) class name of each image
    keys: np.ndarray  # (N,) image keys (seed the test masks, as in evaluation)
    fine: np.ndarray | None = None  # (N, fh, fw, Cf) fine embeddings (scoring.knn_fine)


def subset_positions(labels: np.ndarray, class_ids: np.ndarray, max_images: int) -> np.ndarray:
    """Up to max_images positions: every class gets an equal share, half normal and half defective
    where it has both, evenly spaced in file order (deterministic)."""
    classes = sorted(set(class_ids.tolist()))
    per_class = max(2, max_images // max(len(classes), 1))
    picked = []
    for c in classes:
        groups = [np.nonzero((class_ids == c) & (labels == y))[0] for y in (0, 1)]
        groups = [g for g in groups if len(g)]
        for g in groups:
            k = min(len(g), max(1, per_class // len(groups)))
            picked.append(g[np.linspace(0, len(g) - 1, k).round().astype(int)])
    return np.unique(np.concatenate(picked))


def build_eval_set(sc: ScoringSpec, d: DataSpec, extractor, data, max_images: int) -> EvalSet:
    """The curves' images: subset_positions of a split, their features, masks and keys."""
    positions = subset_positions(data.labels, data.class_ids, max_images)
    want = FeatureRequest(sc.regress_raw, fine_embedding(sc), "curves' features")
    fields = ("mask", "label", "class_id") + (("fine",) if want.fine else ())
    h_in, h_tgt, keys, extra = extract_positions(extractor, data, d, want, positions, fields)
    classes = tuple(data.class_names[c] for c in extra["class_id"])
    return EvalSet(
        h_in, h_in if h_tgt is None else h_tgt, extra["mask"], extra["label"], classes, keys, extra.get("fine")
    )


def _row_specs(sc: ScoringSpec, rows) -> dict:
    """The scoring spec of each row in train.eval_rows (kNN M_po: the flow is trained after the reconstructor)."""
    out = {}
    for row in tuple(rows):
        spec = with_row(sc, row)
        out[row] = dataclasses.replace(spec, mpo="knn") if spec.mpo == "flow" else spec
    return out


def _row_metrics(fn, params, dev_pools, evalset: EvalSet, pool_idx, d: DataSpec) -> dict:
    """The seven metrics (fractions, mean over classes) of one row's maps and scores of the evaluation set."""
    bs, size = int(d.eval_batch_size), int(d.image_size)

    def run(h_in, h_tgt, pidx, keys, fine):
        res = fn(params, dev_pools, h_in, h_tgt, pidx, keys, size, None, fine)
        return {"map": res["map"], "score": res["score"]}

    res, _ = run_batched(run, row_batches((evalset.h_in, evalset.h_tgt, pool_idx, evalset.keys, evalset.fine), bs))
    maps, scores, classes = res["map"], res["score"], np.asarray(evalset.classes)
    per_class = []
    for c in sorted(set(evalset.classes)):
        sel = classes == c
        per_class.append(metrics_lib.all_metrics(scores[sel], evalset.labels[sel], maps[sel], evalset.masks[sel]))
    return {m: float(np.nanmean([p[m] for p in per_class])) for m in metrics_lib.METRIC_NAMES}


@dataclasses.dataclass(frozen=True)
class CurveInputs:
    """What the curves score: evalset (build_eval_set's images); place(tree), which puts parameters
    and pools where scoring runs (parallel.place_for_scoring); heldout, the training images' features
    (feature_cache.Features), whose rows at the pools' calibration positions give the term statistics
    of rows with scoring.mpo_fusion = sum (None: no such row)."""

    evalset: EvalSet
    place: Callable
    heldout: Features | None = None


def make_learning_curves(tc: TrainSpec, sc: ScoringSpec, d: DataSpec, model, pools, inputs: CurveInputs):
    """f(params) -> ({name: value}, console line): the rows' seven metrics (fractions) and the
    held-out normal loss."""
    evalset, place, heldout = inputs.evalset, inputs.place, inputs.heldout
    rows = _row_specs(sc, tc.eval_rows)
    fns = {row: jax.jit(make_score_features_fn(spec, model), static_argnums=(6,)) for row, spec in rows.items()}
    dev_pools = place(device_pools(pools))
    few = _few_heldout(pools, tc.eval_images)
    pool_idx = pools.pool_index(list(evalset.classes))
    normal = np.nonzero(evalset.labels == 0)[0]
    key = jax.random.fold_in(jax.random.key(tc.seed), 0xE7A1)
    bs = int(d.eval_batch_size)

    @jax.jit
    def normal_loss(params, h, t, idx):
        masks = jax.vmap(lambda i, x: sample_train_mask(jax.random.fold_in(key, i), x, tc))(idx, h)
        pred = model.apply({"params": params}, h, masks, deterministic=True)
        return jnp.sum(jnp.square(pred - t)), pred.size

    def evaluate(params) -> dict:
        params = place(params)
        total, count = 0.0, 0
        index = np.arange(len(evalset.labels), dtype=np.int32)
        sums, _ = run_batched(
            lambda h, t, i: normal_loss(params, h, t, i),
            row_batches((evalset.h_in, evalset.h_tgt, index), bs, rows=normal),
            per_batch=True,
        )
        for ls, n in sums or []:
            total, count = total + float(ls), count + int(n)
        out = {"heldout_normal_loss": total / max(count, 1)}
        for row, fn in fns.items():
            row_pools = dev_pools
            if needs_term_stats(rows[row]):
                if heldout is None:
                    raise ValueError(f"learning-curve row {row!r} needs held-out features for its term statistics")
                cal = calibrate(rows[row], d, TrainedModel(None, model, params, few, None), heldout)
                row_pools = dict(dev_pools, term_stats=place(jnp.asarray(cal["term_stats"])))
            metrics = _row_metrics(fn, params, row_pools, evalset, pool_idx, d)
            out.update({f"{row}/{m}": v for m, v in metrics.items()})
        return out, format_curves(out)

    return evaluate


def _few_heldout(pools, max_images: int):
    """The pools with each class's calibration positions cut to an equal share of max_images."""
    per = max(2, max_images // max(len(pools.class_names), 1))
    return pools.with_nominal(held_out={c: np.asarray(v)[:per] for c, v in pools.held_out.items()})


SHORT = {
    "image_auroc": "I-AUROC",
    "image_ap": "I-AP",
    "image_f1_max": "I-F1",
    "pixel_auroc": "P-AUROC",
    "pixel_ap": "P-AP",
    "pixel_f1_max": "P-F1",
    "aupro": "AUPRO",
}


def format_curves(values: dict) -> str:
    """One console line: the held-out loss, then each row's seven metrics in %."""
    parts = [f"held-out normal loss {values['heldout_normal_loss']:.4f}"]
    rows = []
    for k in values:
        if "/" in k and k.split("/")[0] not in rows:
            rows.append(k.split("/")[0])
    for row in rows:
        parts.append(
            f"{row} "
            + " ".join(
                f"{SHORT[m]} {100 * values[f'{row}/{m}']:.1f}"
                for m in metrics_lib.METRIC_NAMES
                if f"{row}/{m}" in values
            )
        )
    return " | ".join(parts)
