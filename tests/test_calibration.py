"""Critic calibration: Monte Carlo sums, the steps compared, the statistics, and the
tracker on a scripted env whose discounted returns are known in closed form."""

import math

import jax.numpy as jnp
import numpy as np
import pytest

from cvpo_jax import calibration as C


def test_discounted_to_go_equals_the_explicit_sum():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(37, 2))
    g = 0.93
    out = C.discounted_to_go(x, g)
    for t in range(37):
        expected = sum(g ** (j - t) * x[j] for j in range(t, 37))
        np.testing.assert_allclose(out[t], expected, rtol=1e-12)


def test_tail_horizon():
    assert C.tail_horizon(0.99, 0.01) == 459
    assert 0.99**459 <= 0.01 < 0.99**458


def test_points_skip_the_truncated_tail_but_not_a_terminal_one():
    idx = C.calibration_points(1000, False, 0.99, 0.01, 64)
    assert idx.max() < 1000 - 459 and idx.size <= 64 and idx[0] == 0
    assert C.calibration_points(100, False, 0.99, 0.01, 64).size == 0
    term = C.calibration_points(100, True, 0.99, 0.01, 200)
    np.testing.assert_array_equal(term, np.arange(100))


def test_stats_bias_and_correlation():
    g = np.array([1.0, 2.0, 3.0, 4.0])
    s = C.calibration_stats(2 * g + 1, g)
    assert s["bias"] == pytest.approx(np.mean(g + 1))
    assert s["corr"] == pytest.approx(1.0)
    assert s["mc"] == pytest.approx(2.5)
    assert math.isnan(C.calibration_stats(np.ones(4), g)["corr"])
    assert all(math.isnan(v) for v in C.calibration_stats(np.zeros(0), np.zeros(0)).values())


def test_tracker_on_a_scripted_episode_with_known_returns():
    """Reward 1 and cost 1 at every step of a terminated T-step episode: G_t is
    (1 - g^(T-t)) / (1 - g). A 'critic' returning the exact values shows no bias and
    correlation 1; one that returns half the cost shows bias -mean(G)/2."""
    gamma, T, n_envs = 0.9, 30, 2
    exact = lambda t: (1 - gamma ** (T - t)) / (1 - gamma)  # noqa: E731

    def q_fn(scale, obs, action):
        t = obs[:, 0]
        value = (1 - gamma ** (T - t)) / (1 - gamma)
        return value, scale * value[:, None]

    tracker = C.CalibrationTracker(q_fn, n_envs, 1, gamma, max_points=64)
    for t in range(T):
        obs = np.full((n_envs, 1), float(t), np.float32)
        tracker.record(obs, np.zeros((n_envs, 1)), np.ones(n_envs), np.ones((n_envs, 1)))
        done = np.array([t == T - 1, False])  # Only env 0 finishes.
        tracker.finish(done, done, jnp.asarray(0.5))
    stats = tracker.interval_stats()
    mc = np.mean([exact(t) for t in range(T)])
    assert stats["calib_qr_bias"] == pytest.approx(0.0, abs=1e-4)
    assert stats["calib_qr_corr"] == pytest.approx(1.0, abs=1e-5)
    assert stats["calib_qc_mc"] == pytest.approx(mc, rel=1e-6)
    assert stats["calib_qc_bias"] == pytest.approx(-mc / 2, rel=1e-4)
    # A new interval starts empty.
    assert math.isnan(tracker.interval_stats()["calib_qc_bias"])


def test_column_names_per_constraint():
    assert "calib_qc_bias" in C.calibration_columns(1)
    assert {"calib_qc_bias_0", "calib_qc_bias_1"} <= set(C.calibration_columns(2))


def test_tracker_discounts_the_cost_with_cost_gamma():
    """Cost 1 per step discounted at 0.5, reward at 0.9: the realised cost-to-go of a
    terminated T-step episode is (1 - 0.5^(T-t)) / 0.5 at step t."""
    gamma, cost_gamma, T = 0.9, 0.5, 20

    def q_fn(_, obs, action):
        return jnp.zeros(obs.shape[0]), jnp.zeros((obs.shape[0], 1))

    tracker = C.CalibrationTracker(q_fn, 1, 1, gamma, cost_gamma=cost_gamma)
    for t in range(T):
        obs = np.full((1, 1), t, np.float32)
        tracker.record(obs, np.zeros((1, 1)), np.ones(1), np.ones((1, 1)))
        done = np.array([t == T - 1])
        tracker.finish(done, done, None)
    stats = tracker.interval_stats()
    mc_c = np.mean([(1 - cost_gamma ** (T - t)) / (1 - cost_gamma) for t in range(T)])
    mc_r = np.mean([(1 - gamma ** (T - t)) / (1 - gamma) for t in range(T)])
    assert stats["calib_qc_mc"] == pytest.approx(mc_c, rel=1e-6)
    assert stats["calib_qr_mc"] == pytest.approx(mc_r, rel=1e-6)
