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
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from PIL import Image

from maskad_jax import metrics as metrics_lib
from maskad_jax.data import SplitData, eval_batches
from maskad_jax.features import FeatureExtractor
from maskad_jax.fit import Pools, fit_pools
from maskad_jax.reconstructor import count_params
from maskad_jax.scoring import make_score_fn, pools_to_device
from maskad_jax.train import (batch_sharding, build_reconstructor, place_for_scoring, restore_params, scoring_sharding,
                              train)

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
    pi, pc = jax.process_index(), jax.process_count()
    if pc == 1:
        return _extract_share(extractor, data, config, with_target, None, batch_sharding(config))
    from jax.experimental import multihost_utils
    if len(data) < pc:
        raise ValueError(f"{len(data)} images cannot be shared among {pc} processes")
    shares = np.array_split(np.arange(len(data)), pc)
    local = NamedSharding(Mesh(np.asarray(jax.local_devices()), ("data",)), P("data"))
    if config.data.eval_batch_size % jax.local_device_count():
        raise ValueError(f"data.eval_batch_size {config.data.eval_batch_size} must be a multiple of the "
                         f"{jax.local_device_count()} local devices")
    h_in, h_tgt, keys = _extract_share(extractor, data, config, with_target, shares[pi], local)
    rows = max(len(s) for s in shares)
    pad = lambda a: None if a is None else np.concatenate([a, np.zeros((rows - len(a),) + a.shape[1:], a.dtype)])
    gathered = multihost_utils.process_allgather((pad(h_in), pad(h_tgt), pad(keys)), tiled=False)
    join = lambda g: None if g is None else np.concatenate([np.asarray(g)[p, :len(s)] for p, s in enumerate(shares)])
    return join(gathered[0]), join(gathered[1]), join(gathered[2])


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
    name = {"eval": "config.eval.json", "predict": "config.predict.json"}.get(mode, "config.json")
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
        pools.save(os.path.join(workdir, "fit"))
    if mode in ("eval", "train_and_eval"):
        if mode == "eval":
            params, step = restore_params(workdir, config, extractor.channels, grid)
            _log(f"restored the reconstructor at step {step} from {workdir}")
        pools = Pools.load(os.path.join(workdir, "fit"))
        flow = restore_flow_state(config, workdir, extractor.channels, grid, pools)
        result.update(evaluate(config, workdir, extractor, model, params, pools, test_data, flow))
    result["total_seconds"] = time.time() - t_start
    if "per_class" in result:
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
        fpools.save(os.path.join(workdir, "fit", "flow_pool"))
        _log(f"flow backbone {fc.backbone.arch}: features {feats.shape[1:]}, pool of up to "
             f"{fpools.pool_in.shape[1]} tokens")
    elif fc.features != "reconstructor":
        raise ValueError(f"flow.features must be reconstructor | backbone, got {fc.features!r}")
    res = train_flow(config, feats, fpools, fpools.pool_index(class_names), workdir, log=_log)
    ref = calibrate_flow(config, res.params, feats, fpools)
    save_flow_reference(os.path.join(workdir, "fit"), ref, fpools.class_names)
    _log(f"flow M_po: trained to step {res.steps} in {time.time() - t0:.0f}s; L_ref "
         + ", ".join(f"{c} {r:.3f}" for c, r in zip(fpools.class_names, ref)))
    state = FlowState(build_flow(config, feats.shape[-1]), res.params, ref, embedder,
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
    return FlowState(flow, params, load_flow_reference(os.path.join(workdir, "fit"), pools.class_names),
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

    f_flow: the flow backbone's features of the training images (flow.features = 'backbone')."""
    from maskad_jax.scoring import make_score_features_fn
    fn = jax.jit(make_score_features_fn(config, model, flow and flow.module), static_argnums=(6,))
    params, dev_pools = place_for_scoring(config, (params, device_pools(pools, flow)))
    out = {}
    for k, cls in enumerate(pools.class_names):
        pos = pools.calibration.get(cls, np.zeros(0, int))
        scores = []
        for s in range(0, len(pos), config.data.eval_batch_size):
            p = pos[s:s + config.data.eval_batch_size]
            tgt = h_in[p] if h_tgt is None else h_tgt[p]
            r = fn(params, dev_pools, jnp.asarray(h_in[p]), jnp.asarray(tgt), jnp.full(len(p), k, jnp.int32),
                   jnp.asarray(keys[p]), config.data.image_size, None if f_flow is None else jnp.asarray(f_flow[p]))
            scores += np.asarray(r["score"]).tolist()
        out[cls] = scores
    return out


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
    maps = np.zeros((n, size, size), np.float32)
    masks = np.zeros((n, size, size), np.uint8)
    scores = np.zeros((n,), np.float32)
    rec_mean = np.zeros((n,), np.float32)  # mean per-patch reconstruction error of the image's N branches
    t0 = time.time()
    shard = scoring_sharding(config)
    for batch in eval_batches(data, config.data.eval_batch_size, image_size=size, num_workers=config.data.num_workers):
        names = [data.class_names[c] for c in batch["class_id"]]
        out = score(params, extractor.variables, dev_pools, jax.device_put(batch["image"], shard),
                    jax.device_put(pools.pool_index(names), shard), jax.device_put(batch["image_key"], shard))
        ok = batch["valid"] == 1
        pos = batch["index"][ok]
        maps[pos] = np.asarray(out["map"])[ok]
        scores[pos] = np.asarray(out["score"])[ok]
        rec_mean[pos] = np.asarray(out["rec"]).mean(axis=(1, 2))[ok]
        masks[pos] = batch["mask"][ok]
    rate = n / max(time.time() - t0, 1e-9)
    _log(f"scored {n} test images at {rate:.2f} img/s (first batch includes compilation)")
    per_class = {}
    for cid in sorted(set(data.class_ids.tolist())):
        sel = data.class_ids == cid
        per_class[data.class_names[cid]] = metrics_lib.all_metrics(scores[sel], data.labels[sel], maps[sel], masks[sel],
                                                                  protocol=config.eval.protocol, bins=config.eval.bins)
    mean = {k: float(np.nanmean([m[k] for m in per_class.values()])) for k in metrics_lib.METRIC_NAMES}
    report = {"per_class": per_class, "mean": mean, "test_images_per_second": rate, "num_test_images": n,
              "examples": _write_heatmaps(workdir, data, maps, scores, size)}
    with open(os.path.join(workdir, "metrics.json"), "w") as f:
        json.dump(report, f, indent=2)
    with open(os.path.join(workdir, "scores.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["file", "class", "defect_type", "label", "score", "rec_mean"])
        for i in range(n):
            w.writerow([data.file_names[i], data.class_names[data.class_ids[i]], data.defect_types[i],
                        int(data.labels[i]), f"{scores[i]:.6g}", f"{rec_mean[i]:.6g}"])
    _log("mean over classes: " + ", ".join(f"{k} {100 * v:.1f}" for k, v in mean.items()))
    return report


def _per_pool_test_max(config, extractor, pools, data, image_max) -> np.ndarray:
    """Per pool: the max over its class's test images of image_max(backbone_vars, images, pool_idx) -> (B,).
    -inf for a pool without test images."""
    out = np.full(len(pools.class_names), -np.inf, np.float32)
    shard = scoring_sharding(config)
    fn = jax.jit(image_max)
    for batch in eval_batches(data, config.data.eval_batch_size, image_size=config.data.image_size,
                              num_workers=config.data.num_workers):
        pidx = pools.pool_index([data.class_names[c] for c in batch["class_id"]])
        m = np.asarray(fn(extractor.variables, jax.device_put(batch["image"], shard), jax.device_put(pidx, shard)))
        for k, v, ok in zip(pidx, m, batch["valid"]):
            if ok:
                out[k] = max(out[k], v)
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


def _write_heatmaps(workdir, data, maps, scores, size, per_class: int = 3) -> list:
    """Overlays of the highest- and lowest-scored test images of each class (maps scaled per class)."""
    from maskad_jax.data import Preprocess
    from maskad_jax.overlay import overlay, safe_name
    out_dir = os.path.join(workdir, "heatmaps")
    os.makedirs(out_dir, exist_ok=True)
    pre = Preprocess(data, size)
    examples = []
    for cid in sorted(set(data.class_ids.tolist())):
        idx = np.nonzero(data.class_ids == cid)[0]
        lo, hi = float(maps[idx].min()), float(maps[idx].max())
        order = idx[np.argsort(-scores[idx])]
        picks = [("highest", i) for i in order[:per_class]] + [("lowest", i) for i in order[::-1][:per_class]]
        for kind, i in picks:
            el = pre.map(int(i))
            name = safe_name(data.file_names[i], ".png")
            Image.fromarray(overlay(el["image"], maps[i], lo, hi)).save(os.path.join(out_dir, name))
            examples.append({"class": data.class_names[cid], "kind": kind, "file": data.file_names[i],
                             "score": float(scores[i]), "label": int(data.labels[i]), "png": f"heatmaps/{name}"})
    return examples
