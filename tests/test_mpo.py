"""M_po as one interface (maskad_jax/engine/mpo.py), its two implementations chosen once
(maskad_jax/training/mpo.py)."""

import numpy as np
import pytest

from configs import demo
from maskad_jax.common.specs import resolve
from maskad_jax.engine.mpo import FlowMpo, NearestNeighbourMpo
from maskad_jax.engine.scoring import make_score_features_fn
from maskad_jax.models.reconstructor import build_reconstructor
from maskad_jax.training.mpo import FlowJob, MpoSpecs, restore_mpo, train_mpo


def test_the_nearest_neighbour_mpo_is_the_distance_on_the_token_grid():
    knn = np.arange(2 * 6, dtype=np.float32).reshape(2, 6)
    tokens, idx, pidx = np.zeros((2, 6, 3)), np.zeros((2, 6), np.int32), np.zeros(2, np.int32)
    mpo, mpo_map = NearestNeighbourMpo().map({}, tokens, idx, knn, pidx, (2, 3))
    np.testing.assert_array_equal(np.asarray(mpo), knn)
    np.testing.assert_array_equal(np.asarray(mpo_map), knn.reshape(2, 2, 3))
    assert NearestNeighbourMpo().device_state() == {} and NearestNeighbourMpo().embed({}, None) is None
    with pytest.raises(ValueError, match="fine embedding"):
        NearestNeighbourMpo(fine=True).map({}, tokens, idx, knn, pidx, (2, 3))


def test_the_flow_mpo_brings_its_state_and_the_scoring_refuses_the_wrong_one():
    flow = FlowMpo(module=None, params={"w": np.ones(2)}, logp_ref=np.array([1.5]), cond_dim=8)
    assert set(flow.device_state()["flow"]) == {"params", "logp_ref"} and not flow.own_features
    s = resolve(demo.get_config("smoke"))
    model = build_reconstructor(s.model, 8, (4, 4))
    with pytest.raises(ValueError, match="needs the trained flow"):
        make_score_features_fn(s.scoring, model, flow)  # scoring.mpo = knn with a flow


def test_the_mpo_is_chosen_once_from_scoring_mpo():
    c = demo.get_config("smoke")
    s = resolve(c)
    sections = MpoSpecs(s.scoring, s.flow, s.model, s.data, s.fit, "one")
    mpo, own = train_mpo(sections, FlowJob(*("unused",) * 5))
    assert mpo == NearestNeighbourMpo(fine=True) and own is None  # the CPU-sized scoring: two grids
    assert restore_mpo(sections, "unused", 8, (4, 4), None) == mpo
