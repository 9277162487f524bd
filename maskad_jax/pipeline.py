"""train_and_evaluate(config, workdir, mode): the whole job, shared by run.py and notebooks.

Modes: train_and_eval (default), train, eval (reuse the checkpoint and pools), predict (score new
images with the checkpoint and pools; see predict.py). A workdir holds config.json, checkpoints/
(orbax), fit/ (pools and calibration), train_log.jsonl, metrics.json, scores.csv, report.html,
heatmaps/ and predictions/.
"""
from __future__ import annotations

import csv
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from maskad_jax import metrics as metrics_lib
from maskad_jax.data import SplitData, eval_batches
from maskad_jax.features import FeatureExtractor
from maskad_jax.fit import Pools, fit_pools
from maskad_jax.reconstructor import count_params
from maskad_jax.scoring import make_score_fn, pools_to_device
from maskad_jax.train import (build_reconstructor, local_batch_sharding, place_for_scoring, restore_params,
                              scoring_sharding, to_local, train)

MODES = ("train_and_eval", "train", "eval", "predict")


def _log(msg):
    print(f"[maskad {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def load_data(config):
    from tfds_builders import prepare
    d = config.data
    builder = prepare(d.name, d.tfds_dir, manual_dir=d.manual_dir or None, config=d.config or None)
    classes = list(d.classes) or None
    return builder, SplitData.load(builder, "train", classes), SplitData.load(builder, "test", classes)


def extract_features(extractor, data: SplitData, config, with_target: bool):
    """Backbone features of a whole split, in order (the feature cache): (h_in, h_tgt or None, image keys).

    With several processes (jax.distributed), each extracts a contiguous share of the split on its
    own devices and the shares are gathered, so every process holds the whole cache after 1/P of
    the work."""
    positions = process_share(len(data))
    h_in, h_tgt, keys = _extract_share(extractor, data, config, with_target, positions, local_batch_sharding(config))
    return gather_rows(len(data), positions, h_in, h_tgt, keys)


# ----------------------------------------------------------------------- several processes
def process_share(n: int) -> np.ndarray:
    """This process's contiguous share of the positions 0..n-1 (all of them with one process; a share
    may be empty when n is smaller than the number of processes)."""
    return np.array_split(np.arange(n), jax.process_count())[jax.process_index()]


def gather_rows(n: int, positions: np.ndarray, *arrays):
    """Every process's rows at `positions` of per-row arrays -> full (n, ...) arrays on every process.

    With one process the arrays are placed at their positions (no copy when they are in order).
    None stays None."""
    positions = np.asarray(positions, np.int64)
    if jax.process_count() == 1:
        if np.array_equal(positions, np.arange(n)):
            return arrays
        return tuple(None if a is None else _place(n, positions, a) for a in arrays)
    from jax.experimental import multihost_utils
    rows = -(-n // jax.process_count())  # the largest share np.array_split makes
    pad = lambda a, v: np.concatenate([a, np.full((rows - len(a),) + a.shape[1:], v, a.dtype)])
    present = [a for a in arrays if a is not None]
    got = multihost_utils.process_allgather((pad(positions, -1),) + tuple(pad(np.asarray(a), 0) for a in present),
                                            tiled=False)
    pos = np.asarray(got[0]).reshape(-1)
    keep = pos >= 0
    full = iter([_place(n, pos[keep], np.asarray(g).reshape((-1,) + g.shape[2:])[keep]) for g in got[1:]])
    return tuple(None if a is None else next(full) for a in arrays)


def _place(n, positions, a):
    out = np.zeros((n,) + a.shape[1:], a.dtype)
    out[positions] = a
    return out


def _is_writer() -> bool:
    """Whether this process writes the workdir's shared files (process 0; the workdir must be
    storage that every process sees, as orbax's checkpoints already require)."""
    return jax.process_index() == 0


def _barrier(name: str):
    """Wait for every process (files written by process 0 are then visible to all). No-op alone."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(name)


def _extract_share(extractor, data: SplitData, config, with_target: bool, positions, shard):
    fn = jax.jit(lambda v, x: (extractor.apply(v, x, normalize=True),
                               extractor.apply(v, x, normalize=False) if with_target else None))
    h_in, h_tgt, keys, n_done, t0 = [], [], [], 0, time.time()
    for batch in eval_batches(data, config.data.eval_batch_size, image_size=config.data.image_size,
                              num_workers=config.data.num_workers, positions=positions):
        a, b = fn(extractor.variables, jax.device_put(batch["image"], shard))
        ok = batch["valid"] == 1
        h_in.append(np.asarray(a)[ok])
        if with_target:
            h_tgt.append(np.asarray(b)[ok])
        keys.append(batch["image_key"][ok])
        n_done += int(ok.sum())
    _log(f"features of {n_done} images{' (both views)' if with_target else ''}: "
         f"{n_done / max(time.time() - t0, 1e-9):.1f} img/s")
    if not n_done:  # an empty share (fewer images than processes)
        empty = np.zeros((0,) + tuple(extractor.feature_shape(config.data.image_size)), np.float32)
        return empty, (empty if with_target else None), np.zeros((0,), np.int32)
    return np.concatenate(h_in), (np.concatenate(h_tgt) if with_target else None), np.concatenate(keys)


def make_extractor(config) -> FeatureExtractor:
    b = config.model.backbone
    return FeatureExtractor.create(b.arch, weights=b.weights, padding=b.padding, strides=tuple(b.strides),
                                   dtype=jnp.dtype(config.model.dtype), seed=config.seed,
                                   depthwise=b.get("depthwise", "auto"))


def make_flow_embedder(config):
    """The flow's own backbone (flow.features = 'backbone'), built like make_extractor's."""
    from maskad_jax.flow_features import FlowEmbedder
    return FlowEmbedder.create(config.flow, dtype=jnp.dtype(config.model.dtype), seed=config.seed,
                               depthwise=config.model.backbone.get("depthwise", "auto"))


def train_and_evaluate(config, workdir: str, mode: str = "train_and_eval") -> dict:
    if mode not in MODES:
        raise ValueError(f"--mode must be one of {MODES}, got {mode!r}")
    workdir = os.path.abspath(os.path.expanduser(workdir))
    os.makedirs(workdir, exist_ok=True)
    if mode == "predict" and jax.process_count() > 1:
        raise ValueError("--mode=predict runs in one process (it writes a file per image); start it without "
                         "jax.distributed")
    name = {"eval": "config.eval.json", "predict": "config.predict.json"}.get(mode, "config.json")
    if _is_writer():
        with open(os.path.join(workdir, name), "w") as f:
            f.write(config.to_json_best_effort(indent=2))
    t_start = time.time()
    if mode == "predict":
        from maskad_jax.predict import predict
        extractor = make_extractor(config)
        grid = extractor.feature_shape(config.data.image_size)[:2]
        model = build_reconstructor(config, extractor.channels, grid)
        params, step = restore_params(workdir, config, extractor.channels, grid)
        _log(f"restored the reconstructor at step {step} from {workdir}")
        pools = Pools.load(os.path.join(workdir, "fit"))
        flow = restore_flow_state(config, workdir, extractor.channels, grid, pools)
        rows = predict(config, workdir, extractor, model, params, pools, log=_log, flow=flow)
        return {"predictions": rows, "total_seconds": time.time() - t_start}
    _, train_data, test_data = load_data(config)
    _log(f"dataset {config.data.name}: {len(train_data)} train, {len(test_data)} test images, classes "
         f"{train_data.present_classes()}")
    extractor = make_extractor(config)
    grid = extractor.feature_shape(config.data.image_size)[:2]
    model = build_reconstructor(config, extractor.channels, grid)
    result = {}
    if mode in ("train", "train_and_eval"):
        h_in, h_tgt, keys = extract_features(extractor, train_data, config,
                                             with_target=config.train.target == "unnormalized")
        t0 = time.time()
        res = train(config, h_in, h_tgt, workdir, log=_log)
        params = res.params
        _log(f"reconstructor: {count_params(params):,} parameters; trained to step {res.steps} "
             f"in {time.time() - t0:.0f}s")
        result["train_seconds"] = time.time() - t0
        class_names = [train_data.class_names[i] for i in train_data.class_ids]
        pools = fit_pools(h_in, h_tgt, class_names, config.fit, config.seed)
        _log(f"fitted {len(pools.class_names)} pool(s) of up to {pools.pool_in.shape[1]} tokens")
        flow, f_train = None, None
        if config.scoring.mpo == "flow":
            flow, f_train = _train_flow_stage(config, workdir, h_in, pools, class_names, train_data)
        pools.cal_scores = calibration_scores(config, model, params, pools, h_in, h_tgt, keys, flow, f_train)
        if _is_writer():
            pools.save(os.path.join(workdir, "fit"))
        _barrier("fit saved")
    if mode in ("eval", "train_and_eval"):
        if mode == "eval":
            params, step = restore_params(workdir, config, extractor.channels, grid)
            _log(f"restored the reconstructor at step {step} from {workdir}")
        pools = Pools.load(os.path.join(workdir, "fit"))
        flow = restore_flow_state(config, workdir, extractor.channels, grid, pools)
        result.update(evaluate(config, workdir, extractor, model, params, pools, test_data, flow))
    result["total_seconds"] = time.time() - t_start
    if "per_class" in result and _is_writer():
        from maskad_jax.report import write_report
        write_report(os.path.join(workdir, "report.html"), config, result, workdir)
    return result


def _train_flow_stage(config, workdir, h_in, pools, class_names, train_data):
    """Train (or resume) the flow M_po, calibrate L_ref on held-out images, save it.

    Returns (FlowState, the flow features of the training images or None when they are h_in)."""
    from maskad_jax.flow import build_flow
    from maskad_jax.flow_fit import FlowState, calibrate_flow, save_flow_reference, train_flow
    fc = config.flow
    t0 = time.time()
    embedder, feats, fpools = None, h_in, pools
    if fc.features == "backbone":
        embedder = make_flow_embedder(config)
        feats, _, _ = extract_features(embedder, train_data, config, with_target=False)
        fit_cfg = config.fit.copy_and_resolve_references()
        fit_cfg.pool_ratio = fc.pool_ratio
        fpools = fit_pools(feats, None, class_names, fit_cfg, config.seed)
        if _is_writer():
            fpools.save(os.path.join(workdir, "fit", "flow_pool"))
        _log(f"flow backbone {fc.backbone.arch}: features {feats.shape[1:]}, pool of up to "
             f"{fpools.pool_in.shape[1]} tokens")
    elif fc.features != "reconstructor":
        raise ValueError(f"flow.features must be reconstructor | backbone, got {fc.features!r}")
    res = train_flow(config, feats, fpools, fpools.pool_index(class_names), workdir, log=_log)
    flow_params = to_local(res.params)
    ref = calibrate_flow(config, flow_params, feats, fpools)
    if _is_writer():
        save_flow_reference(os.path.join(workdir, "fit"), ref, fpools.class_names)
    _log(f"flow M_po: trained to step {res.steps} in {time.time() - t0:.0f}s; L_ref "
         + ", ".join(f"{c} {r:.3f}" for c, r in zip(fpools.class_names, ref)))
    state = FlowState(build_flow(config, feats.shape[-1]), flow_params, ref, embedder,
                      fpools if embedder is not None else None)
    return state, (feats if embedder is not None else None)


def restore_flow_state(config, workdir, channels, grid, pools):
    """The trained flow (flow_fit.FlowState) for scoring.mpo = 'flow', else None."""
    if config.scoring.mpo != "flow":
        return None
    from maskad_jax.flow_fit import FlowState, load_flow_reference, restore_flow
    embedder, fpools = None, None
    if config.flow.features == "backbone":
        embedder = make_flow_embedder(config)
        fpools = Pools.load(os.path.join(workdir, "fit", "flow_pool"))
        channels, grid = embedder.channels, embedder.feature_shape(config.data.image_size)[:2]
    flow, params, step = restore_flow(workdir, config, channels, grid)
    _log(f"restored the flow at step {step} from {workdir}")
    return FlowState(flow, to_local(params), load_flow_reference(os.path.join(workdir, "fit"), pools.class_names),
                     embedder, fpools)


def device_pools(pools, flow=None) -> dict:
    """The pools (and the flow's parameters, L_ref and own pool, if any) as the scoring functions take them."""
    dev = pools_to_device(pools)
    if flow is not None:
        dev["flow"] = {"params": flow.params, "logp_ref": jnp.asarray(flow.logp_ref)}
        if flow.embedder is not None:
            dev["flow"].update(pool=jnp.asarray(flow.pools.pool_in), valid=jnp.asarray(flow.pools.valid),
                               backbone_vars=flow.embedder.variables)
    return dev


def calibration_scores(config, model, params, pools, h_in, h_tgt, keys, flow=None, f_flow=None) -> dict:
    """Image scores of the held-out normal training images, per pool (for predict's threshold).

    f_flow: the flow backbone's features of the training images (flow.features = 'backbone').
    Several processes each score a share of these images and gather the scores."""
    from maskad_jax.scoring import make_score_features_fn
    fn = jax.jit(make_score_features_fn(config, model, flow and flow.module), static_argnums=(6,))
    params, dev_pools = place_for_scoring(config, (params, device_pools(pools, flow)))
    held = [np.asarray(pools.calibration.get(cls, np.zeros(0, int)), np.int64) for cls in pools.class_names]
    pos = np.concatenate(held)  # training-image positions, class by class
    pool = np.concatenate([np.full(len(p), k, np.int32) for k, p in enumerate(held)])
    rows = process_share(len(pos))
    scores = np.zeros((len(rows),), np.float32)
    bs = config.data.eval_batch_size
    for s in range(0, len(rows), bs):
        r = rows[s:s + bs]
        p = pos[r]
        tgt = h_in[p] if h_tgt is None else h_tgt[p]
        out = fn(params, dev_pools, jnp.asarray(h_in[p]), jnp.asarray(tgt), jnp.asarray(pool[r]), jnp.asarray(keys[p]),
                 config.data.image_size, None if f_flow is None else jnp.asarray(f_flow[p]))
        scores[s:s + len(r)] = np.asarray(out["score"])
    (scores,) = gather_rows(len(pos), rows, scores)
    bounds = np.cumsum([0] + [len(p) for p in held])
    return {cls: scores[bounds[k]:bounds[k + 1]].tolist() for k, cls in enumerate(pools.class_names)}


def evaluate(config, workdir, extractor, model, params, pools, data: SplitData, flow=None) -> dict:
    score = make_score_fn(config, extractor, model, flow and flow.module, flow and flow.embedder)
    params, dev_pools = place_for_scoring(config, (params, device_pools(pools, flow)))
    size = config.data.image_size
    if config.scoring.mpo_normalisation == "test_max":
        if flow is not None:
            dev_pools["flow"]["logp_ref"] = jnp.asarray(_test_max_flow_ref(config, extractor, pools, dev_pools, flow,
                                                                            data))
        else:
            dev_pools["cal_scale"] = jnp.asarray(_test_max_scale(config, extractor, pools, dev_pools, data))
        _log("M_po normalised by the max over each class's test set (transductive, as the released code)")
    elif config.scoring.mpo_normalisation != "calibration":
        raise ValueError(f"scoring.mpo_normalisation must be calibration | test_max, "
                         f"got {config.scoring.mpo_normalisation!r}")
    n = len(data)
    share = process_share(n)  # this process's images (all of them with one process)
    maps = np.zeros((len(share), size, size), np.float32)
    masks = np.zeros((len(share), size, size), np.uint8)
    scores = np.zeros((len(share),), np.float32)
    rec_mean = np.zeros((len(share),), np.float32)  # mean per-patch reconstruction error of the image's N branches
    t0 = time.time()
    shard = scoring_sharding(config)
    row = 0
    for batch in eval_batches(data, config.data.eval_batch_size, image_size=size, num_workers=config.data.num_workers,
                              positions=share):
        names = [data.class_names[c] for c in batch["class_id"]]
        out = score(params, extractor.variables, dev_pools, jax.device_put(batch["image"], shard),
                    jax.device_put(pools.pool_index(names), shard), jax.device_put(batch["image_key"], shard))
        ok = batch["valid"] == 1
        r = slice(row, row + int(ok.sum()))  # batches follow `share` in order
        maps[r] = np.asarray(out["map"])[ok]
        scores[r] = np.asarray(out["score"])[ok]
        rec_mean[r] = np.asarray(out["rec"]).mean(axis=(1, 2))[ok]
        masks[r] = batch["mask"][ok]
        row = r.stop
    maps, masks, scores, rec_mean = gather_rows(n, share, maps, masks, scores, rec_mean)
    rate = n / max(time.time() - t0, 1e-9)
    several = f" over {jax.process_count()} processes ({len(share)} on this one)" if jax.process_count() > 1 else ""
    _log(f"scored {n} test images at {rate:.2f} img/s{several} (first batch includes compilation)")
    per_class = {}
    for cid in sorted(set(data.class_ids.tolist())):
        sel = data.class_ids == cid
        per_class[data.class_names[cid]] = metrics_lib.all_metrics(scores[sel], data.labels[sel], maps[sel], masks[sel],
                                                                  protocol=config.eval.protocol, bins=config.eval.bins)
    mean = {k: float(np.nanmean([m[k] for m in per_class.values()])) for k in metrics_lib.METRIC_NAMES}
    report = {"per_class": per_class, "mean": mean, "test_images_per_second": rate, "num_test_images": n,
              "examples": _write_heatmaps(workdir, data, maps, scores, size, write=_is_writer())}
    _log("mean over classes: " + ", ".join(f"{k} {100 * v:.1f}" for k, v in mean.items()))
    if not _is_writer():
        return report
    with open(os.path.join(workdir, "metrics.json"), "w") as f:
        json.dump(report, f, indent=2)
    with open(os.path.join(workdir, "scores.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["file", "class", "defect_type", "label", "score", "rec_mean"])
        for i in range(n):
            w.writerow([data.file_names[i], data.class_names[data.class_ids[i]], data.defect_types[i],
                        int(data.labels[i]), f"{scores[i]:.6g}", f"{rec_mean[i]:.6g}"])
    return report


def _per_pool_test_max(config, extractor, pools, data, image_max) -> np.ndarray:
    """Per pool: the max over its class's test images of image_max(backbone_vars, images, pool_idx) -> (B,).
    -inf for a pool without test images."""
    out = np.full(len(pools.class_names), -np.inf, np.float32)
    shard = scoring_sharding(config)
    fn = jax.jit(image_max)
    for batch in eval_batches(data, config.data.eval_batch_size, image_size=config.data.image_size,
                              num_workers=config.data.num_workers, positions=process_share(len(data))):
        pidx = pools.pool_index([data.class_names[c] for c in batch["class_id"]])
        m = np.asarray(fn(extractor.variables, jax.device_put(batch["image"], shard), jax.device_put(pidx, shard)))
        for k, v, ok in zip(pidx, m, batch["valid"]):
            if ok:
                out[k] = max(out[k], v)
    if jax.process_count() > 1:  # each process saw its share of the test images
        from jax.experimental import multihost_utils
        out = np.asarray(multihost_utils.process_allgather(out, tiled=False)).max(axis=0)
    return out


def _test_max_scale(config, extractor, pools, dev_pools, data) -> np.ndarray:
    """Per pool: the largest nearest-pool distance over all test tokens of its images (code variant)."""
    from maskad_jax.coreset import nearest

    def max_dist(v, x, pidx):
        h = extractor.apply(v, x)
        b, gh, gw, c = h.shape
        d, _ = jax.vmap(nearest)(h.reshape(b, gh * gw, c), dev_pools["pool_in"][pidx], dev_pools["valid"][pidx])
        return jnp.sqrt(d).max(axis=1)

    scale = _per_pool_test_max(config, extractor, pools, data, max_dist)
    return np.where(scale > 0, scale, np.asarray(pools.cal_scale))


def _test_max_flow_ref(config, extractor, pools, dev_pools, flow, data) -> np.ndarray:
    """Per pool: the largest flow log-likelihood over all test positions of its images (code variant)."""
    from maskad_jax.flow_fit import flow_logp_fn
    fs = dev_pools["flow"]
    own = flow.embedder is not None  # the flow backbone's features and pool, else h and the fit's pools

    def max_logp(v, x, pidx):
        h = flow.embedder.apply(fs["backbone_vars"], x) if own else extractor.apply(v, x)
        b, gh, gw, c = h.shape
        pool, valid = (fs["pool"], fs["valid"]) if own else (dev_pools["pool_in"], dev_pools["valid"])
        lp = flow_logp_fn(flow.module, (gh, gw))(flow.params, h.reshape(b, gh * gw, c), pool[pidx], valid[pidx],
                                                  config.flow.cond_dim)
        return lp.max(axis=1)

    ref = _per_pool_test_max(config, extractor, pools, data, max_logp)
    return np.where(np.isfinite(ref), ref, np.asarray(flow.logp_ref))


def _write_heatmaps(workdir, data, maps, scores, size, per_class: int = 3, write: bool = True) -> list:
    """Overlays of the highest- and lowest-scored test images of each class (maps scaled per class).
    write=False lists them without writing (processes other than the writer)."""
    from maskad_jax.data import Preprocess
    from maskad_jax.overlay import overlay, safe_name
    out_dir = os.path.join(workdir, "heatmaps")
    if write:
        os.makedirs(out_dir, exist_ok=True)
    pre = Preprocess(data, size)
    examples = []
    for cid in sorted(set(data.class_ids.tolist())):
        idx = np.nonzero(data.class_ids == cid)[0]
        lo, hi = float(maps[idx].min()), float(maps[idx].max())
        order = idx[np.argsort(-scores[idx])]
        picks = [("highest", i) for i in order[:per_class]] + [("lowest", i) for i in order[::-1][:per_class]]
        for kind, i in picks:
            name = safe_name(data.file_names[i], ".png")
            if write:
                el = pre.map(int(i))
                Image.fromarray(overlay(el["image"], maps[i], lo, hi)).save(os.path.join(out_dir, name))
            examples.append({"class": data.class_names[cid], "kind": kind, "file": data.file_names[i],
                             "score": float(scores[i]), "label": int(data.labels[i]), "png": f"heatmaps/{name}"})
    return examples
