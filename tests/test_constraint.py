"""Realised-cost feedback on the E-step threshold, against a hand computation."""

import numpy as np
import pytest

from cvpo_jax.config import CVPOConfig
from cvpo_jax.constraint import feedback_threshold_scale


def test_feedback_moves_against_the_cost_error():
    cfg = CVPOConfig(cost_feedback_gain=0.01, cost_limit=(20.0,))
    costs = np.array([[30.0], [200.0], [0.0], [20.0], [1000.0]])
    # Errors: 0.5, 9, -1, 0, and 49 capped at 10.
    out = feedback_threshold_scale(np.zeros(1), costs, cfg)
    np.testing.assert_allclose(out, [-0.01 * (0.5 + 9.0 - 1.0 + 0.0 + 10.0)], rtol=1e-6)


def test_feedback_has_no_drift_when_the_mean_cost_is_at_the_limit():
    """Heavy-tailed costs with mean = limit (three free episodes, one costing 4x the
    limit) leave the scale where it was: the controller tracks the mean."""
    cfg = CVPOConfig(cost_feedback_gain=0.01, cost_limit=(25.0,))
    costs = np.array([[0.0], [0.0], [0.0], [100.0]] * 5)
    out = feedback_threshold_scale(np.zeros(1), costs, cfg)
    np.testing.assert_allclose(out, [0.0], atol=1e-6)


def test_feedback_stays_in_its_bounds_and_is_off_at_gain_zero():
    cfg = CVPOConfig(cost_feedback_gain=1.0, cost_feedback_bounds=(0.5, 2.0))
    high = feedback_threshold_scale(np.zeros(1), np.full((10, 1), 500.0), cfg)
    low = feedback_threshold_scale(np.zeros(1), np.zeros((10, 1)), cfg)
    np.testing.assert_allclose(high, [np.log(0.5)], rtol=1e-6)
    np.testing.assert_allclose(low, [np.log(2.0)], rtol=1e-6)
    off = feedback_threshold_scale(np.full(1, 0.3), np.full((3, 1), 500.0), CVPOConfig())
    np.testing.assert_allclose(off, [0.3], rtol=1e-6)


def test_feedback_per_constraint_and_small_limits():
    cfg = CVPOConfig(cost_feedback_gain=0.2, cost_limit=(0.0, 10.0))
    # Limit 0 normalises by 1: cost 0.5 is an error of 0.5.
    out = feedback_threshold_scale(np.zeros(2), np.array([[0.5, 5.0]]), cfg)
    np.testing.assert_allclose(out, [-0.1, 0.1], rtol=1e-6)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"cost_feedback_gain": -0.1},
        {"cost_feedback_bounds": (2.0, 3.0)},
        {"cost_feedback_bounds": (0.0, 3.0)},
        {"lambda_max_log_step": -1.0},
        {"n_step": 0},
        {"n_step": 2.0},
        {"cost_aggregate": "median"},
    ],
)
def test_bad_constraint_knobs_fail_naming_the_field(kwargs):
    (name,) = kwargs
    with pytest.raises(ValueError, match=f"CVPOConfig.{name}="):
        CVPOConfig(**kwargs)
