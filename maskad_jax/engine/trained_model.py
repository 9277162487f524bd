"""The trained model as one record: what scores an image, passed whole to calibration, evaluation,
validation, the learning curves, export and predict (app/trained.py adds the specs and workdir)."""

from __future__ import annotations

import dataclasses

from maskad_jax.engine.fit_state import Fit


@dataclasses.dataclass(frozen=True)
class TrainedModel:
    """The parts a score is computed from.

    extractor: the frozen backbone (models/features.FeatureExtractor: .apply, .variables), or None
        where only features are scored (calibration, the learning curves);
    model: the reconstructor (a Flax module) and params: its trained parameters;
    pools: the fit (engine/fit_state.Fit: nominal pools, calibration, thresholds, input contract);
    mpo: the M_po in use (engine/mpo: kNN or flow), or None for the scoring's kNN M_po."""

    extractor: object
    model: object
    params: object
    pools: Fit
    mpo: object

    def with_pools(self, pools: Fit) -> "TrainedModel":
        """The same model over another fit (an updated pool, a recalibration)."""
        return dataclasses.replace(self, pools=pools)
