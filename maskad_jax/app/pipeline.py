"""train_and_evaluate(config, workdir, mode): the whole job, shared by run.py and notebooks.

Modes: train_and_eval (default), train, eval (reuse the checkpoint and pools), predict (score new
images with the checkpoint and pools; predict.py), export (the scoring program as one artifact;
export.py). The stages, in order:
  validate the config (config_check) -> lock the workdir -> data -> backbone features of the
  training images (feature_cache) -> nominal pools (fit) -> train the reconstructor (train, with
  learning curves) -> M_po (training/mpo.py: the flow trained when scoring.mpo = flow) -> calibration
  scores -> save the fit -> evaluate the test split (evaluate) -> report.html.
A workdir holds config.json, checkpoints/ (orbax), fit/ (pools and calibration), train_log.jsonl,
tensorboard/, metrics.json, scores.csv, report.html, heatmaps/ and predictions/.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import time
from collections import Counter

import jax
import numpy as np

from maskad_jax.app import config_check, restore
from maskad_jax.app import workdir as workdir_lib
from maskad_jax.app.detector import Detector
from maskad_jax.app.evaluate import evaluate
from maskad_jax.app.export import export
from maskad_jax.app.predict import crop_note, predict
from maskad_jax.app.report import write_report
from maskad_jax.app.samples import export_samples
from maskad_jax.app.trained import Trained
from maskad_jax.app.update import add_images, aspect_ranges
from maskad_jax.app.validation import validation_images, validation_thresholds
from maskad_jax.common import progress, specs
from maskad_jax.common.errors import ConfigError, DataError, MissingInputError, UserError
from maskad_jax.common.parallel import barrier, is_writer, place_for_scoring, to_local
from maskad_jax.common.specs import DataSpec, ServeSpec, Specs
from maskad_jax.data.geometry import place
from maskad_jax.data.ignore_masks import load_ignore_masks
from maskad_jax.data.splits import SplitData
from maskad_jax.data.tiling import image_level, tiled, tiles_on, untiled
from maskad_jax.engine import fit_state
from maskad_jax.engine.fit_state import Calibration, Fit, InputContract, scoring_signature
from maskad_jax.engine.mpo import NearestNeighbourMpo
from maskad_jax.engine.scoring import fine_embedding, fine_on, needs_term_stats
from maskad_jax.engine.thresholds import (
    MIN_THRESHOLD_IMAGES,
    class_threshold,
    fixed_thresholds,
    threshold_images,
    threshold_rule,
)
from maskad_jax.engine.trained_model import TrainedModel
from maskad_jax.models.reconstructor import count_params
from maskad_jax.runtime import serve_export
from maskad_jax.training import feature_cache
from maskad_jax.training.calibration import calibrate, cross_fitted
from maskad_jax.training.feature_cache import FeatureRequest
from maskad_jax.training.fit import cross_fits, fit_pools, held_count, rescaled
from maskad_jax.training.learning_curves import CurveInputs, build_eval_set, make_learning_curves
from maskad_jax.training.mpo import FlowJob, restore_mpo, train_mpo
from maskad_jax.training.train import restore_params, train
from tfds_builders import prepare

MODES = config_check.MODES


def load_data(d: DataSpec):
    """(builder, training split, test split or None when the dataset has no test images) of data.name,
    prepared once into data.tfds_dir."""
    builder = prepare(d.name, d.tfds_dir, manual_dir=d.manual_dir or None, config=d.config or None)
    classes = list(d.classes) or None
    train = SplitData.load(builder, "train", classes)
    test = SplitData.load(builder, "test", classes, required=False)
    if tiles_on(d.tiles):  # every image as rows x cols tiles (tiling.py)
        rows, cols = d.tiles
        return builder, tiled(train, rows, cols, d.tile_overlap), tiled(test, rows, cols, d.tile_overlap)
    return builder, train, test


def train_and_evaluate(config, workdir: str, mode: str = "train_and_eval") -> dict:
    """The job of one mode. The config is checked (every field, before any work or file) and resolved
    once into typed specs (common/specs.py); everything below takes those specs, one at a time."""
    config_check.validate(config, mode)
    s = specs.resolve(config)
    workdir = os.path.abspath(os.path.expanduser(workdir))
    if mode in ("predict", "export", "update") and jax.process_count() > 1:
        raise ConfigError(
            f"--mode={mode} runs in one process (it writes files of its own); start it without jax.distributed"
        )
    if mode == "serve":  # reads the export only: no lock, so predict and export stay possible meanwhile
        return {"serve": serve_workdir(s.serve, workdir)}
    if mode in ("eval", "predict", "export", "update"):
        workdir_lib.require_trained(workdir)  # refused before anything is written
    with workdir_lib.locked(workdir, mode):
        t_start = time.time()
        if mode in ("predict", "export"):
            result = _predict_or_export(s, workdir, mode)
        elif mode == "update":
            result = _update(s, workdir)
        else:
            result = _train_and_eval(s, workdir, mode)
        result["total_seconds"] = time.time() - t_start
        if "per_class" in result and is_writer():
            run = dict(data=s.data, model=s.model, train=s.train, scoring=s.scoring, protocol=s.eval.protocol)
            write_report(os.path.join(workdir, "report.html"), dict(run, config_json=s.config_json), result, workdir)
    return result


def serve_workdir(sv: ServeSpec, workdir) -> int:
    """--mode=serve: export/serve.py --http over <workdir>/export with the serve.* settings."""
    folder = os.path.join(workdir, "export")
    if not os.path.isfile(os.path.join(folder, "manifest.json")):
        raise MissingInputError(f"no export in {folder}: run --mode=export first (the service serves the export)")
    argv = ["--export", folder, "--http", str(sv.port), "--host", sv.host, "--runtime", sv.runtime]
    argv += ["--max-batch", str(sv.max_batch), "--max-wait-ms", str(sv.max_wait_ms)]
    argv += ["--max-bytes", str(sv.max_bytes), "--max-images", str(sv.max_images)]
    for flag in ("max_pixels", "max_request_pixels", "max_inflight_pixels", "max_request_bytes", "max_queue"):
        argv += ["--" + flag.replace("_", "-"), str(getattr(sv, flag))]
    argv += ["--display-size", str(sv.display_size)]
    argv += ["--token-file", sv.token_file] if sv.token_file else []
    status = serve_export.main(argv)
    if status:
        raise DataError(f"the service over {folder} could not start (the line above says why)")
    return status


def _write_config(s: Specs, workdir, mode):
    """config.json (config.eval.json, config.predict.json), once the data and the models are in hand,
    so a run refused for its input leaves no file behind."""
    if is_writer():
        name = "config.json" if mode.startswith("train") else f"config.{mode}.json"
        with open(os.path.join(workdir, name), "w") as f:
            f.write(s.config_json)


def _predict_or_export(s: Specs, workdir, mode) -> dict:
    t = restore.restore(s, workdir, mode)
    _write_config(s, workdir, mode)
    if mode == "export":
        return {"export": export(t)}
    run, contract = restore.program(t)
    det = Detector(run, contract, workdir, trained=t)
    return {"predictions": predict(det, s.predict.input, workdir, threshold_rule(s.predict, t.pools), log=progress.log)}


def _train_and_eval(s: Specs, workdir, mode) -> dict:
    _, train_data, test_data = load_data(s.data)
    progress.log(
        f"dataset {s.data.name}: {len(train_data)} train, {len(test_data) if test_data else 'no'} test "
        f"{'tiles' if tiles_on(s.data.tiles) else 'images'}, classes {train_data.present_classes()}"
    )
    note = crop_note(
        place(int(w), int(h), s.data.image_size, s.data.geometry).seen_fraction
        for w, h in (train_data.sizes if train_data.sizes is not None else [])
        if w and h
    )
    if note:
        progress.log(note.replace("the rest is NaN in the maps", "the rest is never inspected"))
    if test_data is None and mode == "eval":
        raise DataError("--mode=eval: the dataset has no test images to evaluate (add <class>/test/... folders)")
    contract = _check_training_data(s, train_data) if mode in ("train", "train_and_eval") else None
    extractor, model, channels, grid = restore.models(s)
    _write_config(s, workdir, mode)
    result = {}
    if mode in ("train", "train_and_eval"):
        params, step, result["train_seconds"] = _train_stage(
            s, workdir, (extractor, model), train_data, test_data, contract
        )
    if test_data is None and mode == "train_and_eval":
        progress.log(
            "no test images: trained, fitted and calibrated (--mode=predict is ready, with thresholds from held-out "
            "good images); nothing to evaluate, so no metrics (add <class>/test/good and <class>/test/<defect>)"
        )
        return result
    if mode in ("eval", "train_and_eval"):
        if mode == "eval":
            params, step = restore_params(workdir, s.train, s.model, s.data.image_size, channels, grid)
            progress.log(f"restored the reconstructor at step {step} from {workdir}")
        pools = Fit.load(os.path.join(workdir, "fit"))
        mpo = restore_mpo(restore.mpo_specs(s), workdir, channels, grid, pools)
        restore.require_fine_pools(s, pools)
        pools.require_geometry(s.data)
        t = Trained(extractor, model, params, pools, mpo, specs=s, workdir=workdir, step=step)
        if needs_term_stats(s.scoring) and not pools.calibrated_for(s.scoring):
            t = t.with_pools(_recalibrate(s, t, train_data))
        result.update(evaluate(t, test_data))
        if s.data.name == "synthetic" and is_writer():  # images to try --mode=predict on
            out = os.path.join(workdir, "samples")
            progress.log(
                f"wrote {len(export_samples(test_data, out))} test images to try --mode=predict on: "
                f"--config.predict.input={out}"
            )
    return result


def _check_training_data(s: Specs, train_data) -> InputContract:
    """Every check of the training data before any work is done or file written: at least 2 good images
    per class (one for the pool, one held out for its threshold; a warning below MIN_THRESHOLD_IMAGES
    held out), train.batch_size within the images, the ignore masks (their shape against the class's
    images) and the validation folder's layout. The input contract the fit records."""
    whole = train_data if train_data.image_of is None else untiled(train_data)
    names = [whole.class_names[i] for i in whole.class_ids]
    counts = Counter(names) if s.fit.per_class else Counter({"*": len(names)})
    quantile_rule = s.predict.threshold_rule != "f1" and not fixed_thresholds(s.predict.threshold, None)
    for cls, n in sorted(counts.items()):
        if n < 2:
            raise DataError(
                f"class {cls!r} has {n} good training image: at least 2 are needed (one for its pool, one held out to "
                f"calibrate its threshold); add good images of it"
            )
        held = _threshold_image_count(s, n)
        if held < MIN_THRESHOLD_IMAGES and quantile_rule:
            progress.log(
                f"warning: class {cls!r}'s threshold will rest on {held} good image(s) of its {n} (fewer than "
                f"{MIN_THRESHOLD_IMAGES}): its {s.predict.threshold_quantile:g} quantile is about their maximum; add "
                f"good images, or give labelled data.validation images or predict.threshold"
            )
    if s.train.batch_size > len(train_data):
        raise ConfigError(
            f"train.batch_size {s.train.batch_size} exceeds the {len(train_data)} training images; lower it"
        )
    classes = tuple(sorted(counts)) if s.fit.per_class else ("*",)
    aspect = aspect_ranges(whole)  # of the whole images: --mode=update refuses, and predict notes, another shape
    ignore = load_ignore_masks(s.data.ignore_masks, classes, s.data.image_size, s.data.geometry, aspect)
    if s.data.validation:
        validation_images(s.data.validation, classes, s.data.manual_dir)
    return InputContract(s.data.geometry, int(s.data.image_size), aspect, ignore)


def _threshold_image_count(s: Specs, n: int) -> int:
    """How many of a class's n good training images its quantile threshold will rest on: every one
    cross-fitted (fit.calibration_folds 0, the kNN M_po), else the held-out images of the folds."""
    one = held_count(n, s.fit.calibration_fraction)
    if s.scoring.mpo == "flow":
        return one
    return n if s.fit.calibration_folds == 0 else min(n, one * s.fit.calibration_folds)


def _train_stage(s: Specs, workdir, models, train_data, test_data, contract: InputContract):
    """Features, pools, the reconstructor (and the flow M_po), calibration; the fit saved.
    (params, step, seconds)."""
    extractor, model = models
    want = FeatureRequest(s.train.regress_raw, fine_embedding(s.scoring))
    feats = feature_cache.extract_features(extractor, train_data, s.data, want)
    fine = feats.fine
    class_names = [train_data.class_names[i] for i in train_data.class_ids]
    t0 = time.time()  # the pools depend on the features only: fitted first, so the learning curves can use them
    pools = fit_pools(feats.h_in, feats.h_tgt, class_names, s.fit, s.fit.seed, fine=fine, image_of=train_data.image_of)
    pools = dataclasses.replace(pools, contract=contract)
    progress.log(
        f"fitted {len(pools.class_names)} pool(s) of up to {pools.pool_in.shape[1]} tokens"
        + ("" if fine is None else f" (fine grid {fine.shape[1]}x{fine.shape[2]}: up to {pools.fine_in.shape[1]})")
        + f" in {time.time() - t0:.0f}s"
    )
    periodic = None
    if s.train.eval_every > 0 and test_data is None:
        progress.log("train.eval_every: no test images, so no learning curves")
    elif s.train.eval_every > 0:
        inputs = CurveInputs(
            build_eval_set(s.scoring, s.data, extractor, test_data, s.train.eval_images),
            lambda tree: place_for_scoring(s.scoring.devices, tree),
            feats,
        )
        periodic = make_learning_curves(s.train, s.scoring, s.data, model, pools, inputs)
    t0 = time.time()
    res = train(
        s.train, s.model, s.data.image_size, feats.h_in, feats.h_tgt, workdir, log=progress.log, periodic=periodic
    )
    seconds = time.time() - t0
    progress.log(
        f"reconstructor: {count_params(res.params):,} parameters; trained to step {res.steps} in {seconds:.0f}s"
    )
    mpo, f_train = train_mpo(restore.mpo_specs(s), FlowJob(workdir, feats.h_in, pools, class_names, train_data))
    tm = TrainedModel(extractor, model, res.params, pools, mpo)
    pools = _with_calibration(pools, s, _calibration(s, tm, feats, f_train, train_data))
    val = validation_thresholds(s.scoring, s.data, tm.with_pools(pools))
    pools = dataclasses.replace(pools, val_thresholds=val)
    _log_thresholds(s, pools)
    if is_writer():
        _replace_fit(pools, os.path.join(workdir, "fit"))
    barrier("fit saved")
    return res.params, res.steps, seconds


def _calibration(s: Specs, tm: TrainedModel, feats, f_train, train_data) -> dict:
    """The held-out images' scores (calibration.calibrate, per image), over every fold with
    fit.calibration_folds (cross-fitted: each image scored by pools fitted without it), the fold
    count logged; the flow M_po calibrates on the fit's own held-out images only (its pools are the
    flow's)."""
    image_of = train_data.image_of
    if s.scoring.mpo == "flow" or s.fit.calibration_folds == 1:
        if s.scoring.mpo == "flow" and s.fit.calibration_folds != 1:
            progress.log("calibration: the flow M_po is calibrated on the held-out images only (no cross-fitting)")
        return image_level(calibrate(s.scoring, s.data, tm, feats, f_train), tm.pools.held_out, image_of)
    t0 = time.time()
    names = [train_data.class_names[i] for i in train_data.class_ids]
    fits = [
        dataclasses.replace(f, contract=tm.pools.contract)
        for f in cross_fits(feats.h_in, feats.h_tgt, names, s.fit, feats.fine, image_of)
    ]
    cal = cross_fitted(s.scoring, s.data, tm, feats, (fits, image_of))
    counts = ", ".join(f"{c} {len(v)}" for c, v in cal["cal_scores"].items())
    progress.log(
        f"calibration cross-fitted over {len(fits) + 1} fold(s) in {time.time() - t0:.0f}s: images scored {counts}"
    )
    return cal


def _log_thresholds(s: Specs, fit: Fit) -> None:
    """Each class's threshold and how many images it rests on."""
    parts = []
    for cls in fit.class_names:
        try:
            thr = class_threshold(s.predict, s.scoring, fit, cls)
        except ConfigError as e:
            parts.append(f"{cls}: none ({e})")
            continue
        n = threshold_images(s.predict, fit, cls)
        parts.append(f"{cls} {thr:.4g} ({'given' if n == 0 else f'from {n} image(s)'})")
    progress.log(f"thresholds ({threshold_rule(s.predict, fit)}): " + "; ".join(parts))


def _with_calibration(pools: Fit, s: Specs, cal: dict) -> Fit:
    calibration = Calibration(cal["cal_scores"], cal["cal_map_max"], cal["term_stats"], scoring_signature(s.scoring))
    return dataclasses.replace(pools, calibration=calibration)


def _replace_fit(fit: Fit, fit_dir: str) -> None:
    """Save a newly trained fit. An earlier fit with --mode=update records is not silently lost: what
    the new one drops is said first, and the earlier file is kept beside it (fit.before-<time>.npz)."""
    try:
        old = Fit.load(fit_dir) if fit_state.exists(fit_dir) else None
    except UserError:
        old = None
    if old is not None and old.updates:
        added = "; ".join(f"class {u['class']}: {', '.join(sorted(u['files']))}" for u in old.updates)
        kept = os.path.join(fit_dir, f"fit.before-{time.strftime('%Y%m%d-%H%M%S')}.npz")
        if os.path.isfile(os.path.join(fit_dir, fit_state.FILE)):
            shutil.copyfile(os.path.join(fit_dir, fit_state.FILE), kept)
        progress.log(
            f"retraining drops the {len(old.updates)} --mode=update record(s) of the earlier fit ({added}): those "
            f"images are not in the training data; run --mode=update with them again (the earlier fit: {kept})"
        )
    fit.save(fit_dir)


def _recalibrate(s: Specs, tm: TrainedModel, train_data, rescale: int | None = None) -> Fit:
    """The fit of the trained model tm with its calibration for this run's scoring, when it differs
    from the training run's (an ablation row): the held-out training images scored again. In memory
    only: the saved fit and its thresholds stay those of the training scoring. rescale: a pool that
    changed (--mode=update), whose calibration scales (the held-out tokens' mean distance to it) are
    measured again first."""
    pools = tm.pools
    if tm.mpo.own_features:
        raise ConfigError(
            "scoring.mpo_fusion = sum under a scoring other than the training run's needs its term "
            "statistics, which cannot be recomputed with the flow's own backbone: use the training scoring"
        )
    if rescale is None:
        progress.log("the fit's term statistics are for another scoring: recomputing them on the held-out images")
    positions = np.concatenate([np.asarray(pools.held_out.get(c, []), np.int64) for c in pools.class_names])
    want = FeatureRequest(s.train.regress_raw, fine_embedding(s.scoring), "held-out features")
    feats = feature_cache.extract_at(tm.extractor, train_data, s.data, want, positions)
    bounds = np.cumsum([0] + [len(pools.held_out.get(c, [])) for c in pools.class_names])
    rows = {c: np.arange(bounds[k], bounds[k + 1]) for k, c in enumerate(pools.class_names)}
    if rescale is not None:
        mine = rows[pools.class_names[rescale]]
        pools = rescaled(pools, rescale, feats.h_in[mine], None if feats.fine is None else feats.fine[mine])
    local = pools.with_nominal(held_out=rows)  # positions into the extracted rows
    local_model = TrainedModel(tm.extractor, tm.model, to_local(tm.params), local, tm.mpo)
    cal = calibrate(s.scoring, s.data, local_model, feats)
    return _with_calibration(pools, s, image_level(cal, pools.held_out, train_data.image_of))


def _keep_cross_fitted(pools: Fit, before, changed: str) -> Fit:
    """After --mode=update recalibrated on fold 0's held-out images: the classes whose pools did not
    change keep their earlier scores over every fold (the same pools score them the same); the
    updated class rests on fold 0's held-out images (the other folds' pools lack the new images)."""
    cal = pools.calibration
    if before is None or not before.scores or before.scoring != cal.scoring:
        return pools
    scores = {c: (v if c == changed else before.scores.get(c, v)) for c, v in cal.scores.items()}
    maxima = {c: (v if c == changed else before.map_max.get(c, v)) for c, v in cal.map_max.items()}
    return dataclasses.replace(pools, calibration=dataclasses.replace(cal, scores=scores, map_max=maxima))


def _update(s: Specs, workdir) -> dict:
    """--mode=update (update.py): new good images join a class's pools; calibration and thresholds
    are recomputed on the held-out training images; the reconstructor is not touched."""
    _, train_data, _ = load_data(s.data)
    extractor, model, channels, grid = restore.models(s)
    params, step = restore_params(workdir, s.train, s.model, s.data.image_size, channels, grid)
    fit_dir = os.path.join(workdir, "fit")
    pools = Fit.load(fit_dir)
    restore.require_fine_pools(s, pools)
    tm = TrainedModel(extractor, model, params, pools, NearestNeighbourMpo(fine_on(s.scoring)))
    pools, record = add_images(s.scoring, s.data, s.fit, s.new_images, tm)
    if s.data.ignore_masks:
        ignore = load_ignore_masks(
            s.data.ignore_masks, pools.class_names, s.data.image_size, s.data.geometry, pools.contract.aspect
        )
        pools = dataclasses.replace(pools, contract=dataclasses.replace(pools.contract, ignore=ignore))
    before = pools.calibration
    pools = _recalibrate(s, tm.with_pools(pools), train_data, rescale=record["pool_index"])
    pools = _keep_cross_fitted(pools, before, record["class"])
    if pools.val_thresholds and not s.data.validation:
        progress.log(
            "update: the F1 thresholds were for the old pools and are dropped: give data.validation to redo them"
        )
    val = validation_thresholds(s.scoring, s.data, tm.with_pools(pools))
    entry = {k: v for k, v in record.items() if k != "pool_index"}
    pools = dataclasses.replace(pools, val_thresholds=val, updates=pools.updates + (entry,))
    _write_config(s, workdir, "update")
    if is_writer():
        pools.save(fit_dir)
    cls = record["class"]
    progress.log(
        f"update: class {cls} recalibrated (threshold {class_threshold(s.predict, s.scoring, pools, cls):.4g} from "
        f"{threshold_images(s.predict, pools, cls)} image(s), "
        f"{threshold_rule(s.predict, pools)}); the reconstructor (step {step}) is unchanged; "
        f"recorded in {fit_dir}/{fit_state.FILE}"
    )
    return {"update": {k: v for k, v in record.items() if k != "pool_index"}}
