"""M_po chosen once (scoring.mpo), trained or restored here, handed to scoring as one object
(engine/mpo.py): NearestNeighbourMpo for knn and none, FlowMpo for flow.

The nearest-neighbour M_po has nothing of its own to fit, calibrate or save: its pools and their
held-out scales are the fit's (training/fit.py, <workdir>/fit/). The flow is trained after the
reconstructor, calibrated on the held-out images (L_ref), checkpointed (<workdir>/flow_checkpoints)
and its L_ref saved (<workdir>/fit/flow.json); with flow.features = backbone its own backbone's
features get their own pool (<workdir>/fit/flow_pool).
"""

from __future__ import annotations

import dataclasses
import os
import time

from maskad_jax.common import progress
from maskad_jax.common.parallel import is_writer, to_local
from maskad_jax.common.specs import DataSpec, FitSpec, FlowSpec, ModelSpec, ScoringSpec
from maskad_jax.engine.fit_state import Fit
from maskad_jax.engine.mpo import FlowMpo, NearestNeighbourMpo
from maskad_jax.engine.scoring import fine_on
from maskad_jax.models.flow import build_flow
from maskad_jax.training import feature_cache
from maskad_jax.training.feature_cache import FeatureRequest
from maskad_jax.training.fit import fit_pools
from maskad_jax.training.flow_fit import (
    calibrate_flow,
    load_flow_reference,
    restore_flow,
    save_flow_reference,
    train_flow,
)
from maskad_jax.training.loop import LoopOptions


@dataclasses.dataclass(frozen=True)
class MpoSpecs:
    """The config sections the M_po is built, trained and restored from (app/restore.mpo_specs), and
    the training mesh (train.devices) the flow shares with the reconstructor."""

    scoring: ScoringSpec
    flow: FlowSpec
    model: ModelSpec
    data: DataSpec
    fit: FitSpec
    devices: str = "auto"


@dataclasses.dataclass(frozen=True)
class FlowJob:
    """What the flow trains on: the workdir, the training images' features h_in, the fit (pools),
    each training image's class name and the training split (for the flow's own backbone)."""

    workdir: str
    h_in: object
    pools: Fit
    class_names: list
    data: object


def train_mpo(m: MpoSpecs, job: FlowJob):
    """The M_po of scoring.mpo after the reconstructor's training. Returns (M_po, its own features of
    the training images or None)."""
    if m.scoring.mpo != "flow":
        return NearestNeighbourMpo(fine_on(m.scoring)), None
    return _train_flow(m, job)


def restore_mpo(m: MpoSpecs, workdir, channels, grid, pools):
    """The M_po of scoring.mpo for a trained workdir (eval, predict, export)."""
    fs = m.flow
    if m.scoring.mpo != "flow":
        return NearestNeighbourMpo(fine_on(m.scoring))
    embedder, fpools = None, None
    if fs.features == "backbone":
        embedder = feature_cache.make_flow_embedder(fs, m.model)
        fpools = Fit.load(os.path.join(workdir, "fit", "flow_pool"))
        channels, grid = embedder.channels, embedder.feature_shape(m.data.image_size)[:2]
    flow, params, step = restore_flow(workdir, fs, channels, grid)
    progress.log(f"restored the flow at step {step} from {workdir}")
    ref = load_flow_reference(os.path.join(workdir, "fit"), pools.class_names)
    return FlowMpo(flow, to_local(params), ref, fs.cond_dim, embedder, fpools)


def _train_flow(m: MpoSpecs, job: FlowJob):
    """Train (or resume) the flow M_po, calibrate L_ref on held-out images, save it."""
    fs, fit, workdir = m.flow, m.fit, job.workdir
    t0 = time.time()
    embedder, feats, fpools = None, job.h_in, job.pools
    if fs.features == "backbone":
        embedder = feature_cache.make_flow_embedder(fs, m.model)
        feats = feature_cache.extract_features(embedder, job.data, m.data, FeatureRequest(False, desc="flow features"))
        feats = feats.h_in
        fpools = fit_pools(feats, None, job.class_names, dataclasses.replace(fit, pool_ratio=fs.pool_ratio), fit.seed)
        if is_writer():
            fpools.save(os.path.join(workdir, "fit", "flow_pool"))
        progress.log(
            f"flow backbone {fs.backbone.arch}: features {feats.shape[1:]}, pool of up to "
            f"{fpools.pool_in.shape[1]} tokens"
        )
    opts = LoopOptions(log=progress.log, devices=m.devices)
    res = train_flow(fs, feats, fpools, fpools.pool_index(job.class_names), workdir, opts)
    flow_params = to_local(res.params)
    ref = calibrate_flow(fs, flow_params, feats, fpools)
    if is_writer():
        save_flow_reference(os.path.join(workdir, "fit"), ref, fpools.class_names)
    progress.log(
        f"flow M_po: trained to step {res.steps} in {time.time() - t0:.0f}s; L_ref "
        + ", ".join(f"{c} {r:.3f}" for c, r in zip(fpools.class_names, ref))
    )
    own = embedder is not None
    mpo = FlowMpo(build_flow(fs, feats.shape[-1]), flow_params, ref, fs.cond_dim, embedder, fpools if own else None)
    return mpo, (feats if own else None)
