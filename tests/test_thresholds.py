"""Calibrated thresholds belong to the scoring they were calibrated under (engine/fit_state.Fit, predict)."""

import dataclasses

import numpy as np
import pytest

from configs import demo
from maskad_jax.common.errors import ConfigError
from maskad_jax.common.specs import resolve
from maskad_jax.engine.fit_state import Calibration, Fit, NominalPools, scoring_signature
from maskad_jax.engine.thresholds import class_thresholds


def _pools(config):
    k, p, c = 2, 3, 4
    nominal = NominalPools(
        np.zeros((k, p, c), np.float32),
        np.zeros((k, p, c), np.float32),
        np.ones((k, p), bool),
        np.ones((k,), np.float32),
        ("a", "b"),
        {"a": np.array([0, 1]), "b": np.array([2, 3, 4])},
    )
    scores = {"a": [1.0, 2.0, 3.0, 4.0, 5.0], "b": [10.0, 20.0, 30.0]}
    return Fit(nominal, Calibration(scores, scoring=scoring_signature(resolve(config).scoring)))


def test_signature_survives_a_save_and_load_and_placement_fields_do_not_count(tmp_path):
    c = demo.get_config("smoke")
    pools = _pools(c)
    pools.save(str(tmp_path))
    loaded = Fit.load(str(tmp_path))
    assert loaded.cal_scoring == scoring_signature(resolve(c).scoring)
    c.scoring.branches_per_step = 4  # where the work runs, not what it computes
    # numpy's default ('linear') quantile of [1..5] at 0.5 is 3; of [10, 20, 30] at 0.5 is 20
    c.predict.threshold_quantile = 0.5
    assert class_thresholds(resolve(c).predict, resolve(c).scoring, loaded) == [3.0, 20.0]


def test_another_scoring_is_refused_naming_the_fields_unless_the_threshold_is_given():
    c = demo.get_config("smoke")
    pools = _pools(c)
    c.scoring.use_assdis = not c.scoring.use_assdis
    c.scoring.sigma = 2.5
    with pytest.raises(ConfigError) as err:
        class_thresholds(resolve(c).predict, resolve(c).scoring, pools)
    assert "scoring.sigma" in str(err.value) and "scoring.use_assdis" in str(err.value)
    assert "predict.threshold" in str(err.value)
    c.predict.threshold = 0.7  # an explicit threshold is the user's, whatever the scoring
    assert class_thresholds(resolve(c).predict, resolve(c).scoring, pools) == [0.7, 0.7]


def test_fits_written_before_the_signature_existed_are_not_refused():
    c = demo.get_config("smoke")
    pools = _pools(c)
    pools = dataclasses.replace(pools, calibration=dataclasses.replace(pools.calibration, scoring=None))
    c.scoring.sigma = 2.5
    c.predict.threshold_quantile = 1.0
    assert class_thresholds(resolve(c).predict, resolve(c).scoring, pools) == [5.0, 30.0]


def test_false_alarms_count_the_good_test_images_over_each_threshold_and_say_what_it_targets():
    """Hand-worked: quantile 0.5 gives thresholds 3 (class a) and 20 (class b); a's good test images
    score 1, 3 and 4 (two at or over 3: 2/3), its defective one is not counted; b's threshold is fixed
    at 25 (no target), its good images 24 and 26 (1/2)."""
    from maskad_jax.engine.thresholds import false_alarms

    c = demo.get_config("smoke")
    c.predict.threshold_quantile = 0.5
    c.predict.threshold = "b=25"
    s = resolve(c)
    pools = _pools(c)
    scores = [1.0, 3.0, 4.0, 9.0, 24.0, 26.0]
    labels = [0, 0, 0, 1, 0, 0]
    classes = ["a", "a", "a", "a", "b", "b"]
    rows = false_alarms(s.predict, s.scoring, pools, scores, labels, classes)
    assert rows["a"] == {
        "threshold": 3.0,
        "good_images": 3,
        "false_alarms": 2,
        "rate": pytest.approx(2 / 3),
        "target": 0.5,
        "threshold_images": 5,
    }
    assert rows["b"]["threshold"] == 25.0 and rows["b"]["false_alarms"] == 1 and rows["b"]["rate"] == 0.5
    assert rows["b"]["target"] is None and rows["b"]["threshold_images"] == 0
