"""A trained workdir restored once, as one object (Trained), for predict, export and the Python API.

restore(s, workdir, mode) checks and loads what scoring needs: the backbone, the reconstructor and its
checkpoint (refused when written with another model config), the fit (pools, calibration,
thresholds, the input contract), the M_po in use; then refuses a run whose geometry differs from the
fit's or whose scoring's term statistics were calibrated under another scoring. program(trained) is
the jitted test-time program (export.scoring_program) with its state placed on a device once, and
the contract (classes, thresholds, preprocessing) the export's manifest would hold.
"""

from __future__ import annotations

import os

import jax
import numpy as np

from maskad_jax.app import config_check
from maskad_jax.app.export import threshold_entries, tiles_entry
from maskad_jax.app.trained import Trained
from maskad_jax.common import progress, specs
from maskad_jax.common.errors import ConfigError, MissingInputError
from maskad_jax.common.parallel import place_for_scoring
from maskad_jax.common.specs import Specs
from maskad_jax.engine.coreset import assign_pools
from maskad_jax.engine.fit_state import Fit, scoring_difference, scoring_signature
from maskad_jax.engine.scoring import device_pools, fine_embedding, fine_on, make_score_fn, needs_term_stats
from maskad_jax.engine.thresholds import class_thresholds
from maskad_jax.models.reconstructor import build_reconstructor
from maskad_jax.training import feature_cache
from maskad_jax.training.mpo import MpoSpecs, restore_mpo
from maskad_jax.training.train import restore_params


def models(s: Specs):
    """(backbone extractor, reconstructor, feature channels, token grid) of the specs."""
    extractor = feature_cache.make_extractor(s.model, s.train.seed)
    gh, gw, channels = extractor.feature_shape(s.data.image_size)
    return extractor, build_reconstructor(s.model, channels, (gh, gw)), channels, (gh, gw)


def restore(s: Specs, workdir: str, mode: str) -> Trained:
    """The trained model of workdir for `mode` (predict, export; the API loads with predict's checks)."""
    extractor, model, channels, grid = models(s)
    params, step = restore_params(workdir, s.train, s.model, s.data.image_size, channels, grid)
    pools = Fit.load(os.path.join(workdir, "fit"))
    progress.log(f"restored the reconstructor at step {step} from {workdir}")
    mpo = restore_mpo(mpo_specs(s), workdir, channels, grid, pools)
    require_fine_pools(s, pools)
    pools.require_geometry(s.data)
    if needs_term_stats(s.scoring) and not pools.calibrated_for(s.scoring, terms_only=True):
        what = scoring_difference(pools.cal_scoring or {}, scoring_signature(s.scoring))
        raise ConfigError(
            f"--mode={mode} standardises the scores' terms by held-out statistics computed under the scoring the "
            f"model was trained with (scoring.mpo_fusion = sum), and this run's differs ({what}): score with the "
            f"training config's scoring"
        )
    return Trained(extractor, model, params, pools, mpo, specs=s, workdir=workdir, step=step)


def mpo_specs(s: Specs) -> MpoSpecs:
    """The sections the M_po is built, trained and restored from (training/mpo.py)."""
    return MpoSpecs(s.scoring, s.flow, s.model, s.data, s.fit, s.train.devices)


def restore_for(config, workdir: str, mode: str = "predict") -> Trained:
    """restore() from a ConfigDict (checked first, as run.py's): the Python API's entry."""
    config_check.validate(config, "train" if mode == "predict" else mode)
    return restore(specs.resolve(config), workdir, mode)


def require_fine_pools(s: Specs, pools):
    """The fit has the fine pools the scoring needs, made of the same fine embedding (fit.fine_strides
    and fit.fine_join: test tokens of another embedding would be measured against the wrong pool)."""
    if not fine_on(s.scoring):
        return
    if pools.fine_in is None:
        raise MissingInputError(
            "scoring.knn_fine needs the fine pools, and this workdir's fit has none (fitted by an older version "
            "or without knn_fine): rerun --mode=train on it (the trained reconstructor is kept; the fit is redone)"
        )
    rec = pools.nominal.fine_embedding or {"join": "repeat"}  # fits before the record: the repeat join
    want = fine_embedding(s.scoring)
    strides = tuple(rec.get("strides", want.strides))
    if rec["join"] != want.join or strides != want.strides:
        raise ConfigError(
            f"the fit's fine pools were made with fit.fine_join = {rec['join']!r} and fit.fine_strides = "
            f"{strides}, this run's config asks for {want.join!r} and {want.strides} (the CPU configs join "
            f"bilinearly since issue #35): pass --config.fit.fine_join={rec['join']} "
            f'--config.fit.fine_strides="{strides}" to score the workdir as it was fitted, or rerun --mode=train '
            f"with this config (the reconstructor is kept; the fit is redone)"
        )


def program(t: Trained):
    """(run(images uint8 (B, S, S, 3), keys (B,)[, boxes]) -> dict of numpy arrays, contract): the
    test-time program, compiled once per batch size, its state placed once on one device, and what the
    export's manifest says of classes, thresholds and preprocessing (serve_export.score_loaded reads
    it). The program is eval's: the nearest pool (one jitted call) then the scoring (engine/scoring's
    jitted program), so predict's numbers are eval's and the earlier versions' bit for bit; the export
    fuses the two into one program (export.scoring_program), which agrees to float rounding."""
    s = t.specs
    if s.scoring.mpo_normalisation != "calibration":
        raise ConfigError(
            "predict scores images one by one: scoring.mpo_normalisation must be 'calibration' "
            f"(got {s.scoring.mpo_normalisation!r}, which needs a whole test set)"
        )
    params, dev_pools = place_for_scoring("one", (t.params, device_pools(t.pools, t.mpo)))
    variables = t.extractor.variables
    score = make_score_fn(s.scoring, t.extractor, t.model, t.mpo)
    assign = jax.jit(lambda v, x: assign_pools(t.extractor.apply(v, x), dev_pools))
    thresholds = np.asarray(class_thresholds(s.predict, s.scoring, t.pools), np.float32)
    fixed = int(t.pools.pool_index([s.predict.class_name])[0]) if s.predict.class_name else None

    def run(images, keys, *boxes):
        x = jax.device_put(np.asarray(images, np.float32) / 255.0)  # as eval's loader: float32 u8 / 255
        pidx = assign(variables, x) if fixed is None else np.full(len(images), fixed, np.int32)
        pidx = np.asarray(pidx)
        out = score(params, variables, dev_pools, x, jax.device_put(pidx), keys, *boxes)
        out = {"map": np.asarray(out["map"]), "score": np.asarray(out["score"]), "class_index": pidx}
        out["threshold"] = thresholds[pidx]
        out["anomalous"] = out["score"] >= out["threshold"]
        return out

    contract = {
        "input": {
            "shape": ["batch", s.data.image_size, s.data.image_size, 3],
            **({"boxes": {}} if s.data.geometry == "pad" else {}),
        },
        "preprocess": {"geometry": s.data.geometry, "tiles": tiles_entry(s.data)},
        "classes": list(t.pools.class_names),
        "max_batch": int(s.data.eval_batch_size),
        **threshold_entries(s.scoring, s.predict, t.pools),
    }
    return run, contract
