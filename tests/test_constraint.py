"""Realised-cost feedback on the E-step threshold, the advantage form's budget and the
Lagrangian form's multiplier, against hand computations."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cvpo_jax.config import CVPOConfig
from cvpo_jax.constraint import (
    advantage_threshold,
    feedback_threshold_scale,
    lagrangian_update,
    realised_cost_trace,
    realised_cost_update,
    recovery_threshold,
)
from cvpo_jax.learner import make_learner
from cvpo_jax.types import Transition


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


def test_realised_cost_is_the_plain_mean_then_an_exponential_average():
    cfg = CVPOConfig(cost_limit=(25.0, 5.0), realised_cost_episodes=2)
    costs = np.array([[10.0, 1.0], [30.0, 3.0], [50.0, 0.0]])
    mean, count = realised_cost_update(np.zeros(2), 0.0, costs[:1], cfg)
    np.testing.assert_allclose(mean, [10.0, 1.0])  # the first episode sets it
    mean, count = realised_cost_update(mean, count, costs[1:], cfg)
    # Second: rate 1/2 -> (20, 2); third: rate max(1/3, 1/2) = 1/2 -> (35, 1).
    np.testing.assert_allclose(mean, [35.0, 1.0], rtol=1e-6)
    assert count == 3.0
    same, same_count = realised_cost_update(mean, count, np.zeros((0, 2)), cfg)
    np.testing.assert_allclose(same, mean)
    assert same_count == 3.0


def test_advantage_threshold_is_the_policy_mean_plus_the_realised_budget():
    cfg = CVPOConfig(cost_limit=(25.0, 10.0), gamma=0.99, episode_length=1000)
    q_c = np.random.default_rng(0).uniform(0.0, 5.0, (6, 4, 2)).astype(np.float32)
    realised = np.array([40.0, 4.0], np.float32)
    out = advantage_threshold(jnp.asarray(q_c), jnp.asarray(realised), jnp.asarray(3.0), cfg)
    per_cost = (1 - 0.99**1000) / (0.01 * 1000)  # one unit of episodic cost, per step
    expected = q_c.astype(np.float64).mean(axis=(0, 1)) + per_cost * (
        np.array([25.0, 10.0]) - realised
    )
    np.testing.assert_allclose(out, expected, rtol=1e-5)
    before = advantage_threshold(jnp.asarray(q_c), jnp.asarray(realised), jnp.asarray(0.0), cfg)
    np.testing.assert_allclose(before, q_c.mean(axis=(0, 1)), rtol=1e-5)


def test_update_step_uses_the_advantage_threshold():
    """In the advantage form the E-step threshold is the logged E_pi[Q_c] plus the
    budget from the realised cost; the level form ignores the realised cost."""
    cfg = CVPOConfig(hidden_sizes=(8,), num_samples=4, dual_steps=2, cost_limit=(20.0,))
    batch_size, obs_size = 16, 3
    rng = np.random.default_rng(1)
    batch = Transition(
        obs=jnp.asarray(rng.normal(size=(batch_size, obs_size)), jnp.float32),
        action=jnp.asarray(rng.uniform(-1, 1, (batch_size, 2)), jnp.float32),
        reward=jnp.asarray(rng.normal(size=batch_size), jnp.float32),
        cost=jnp.asarray(rng.uniform(0, 1, (batch_size, 1)), jnp.float32),
        next_obs=jnp.asarray(rng.normal(size=(batch_size, obs_size)), jnp.float32),
        terminated=jnp.zeros(batch_size, bool),
        truncated=jnp.zeros(batch_size, bool),
    )
    per_cost = (1 - 0.99**1000) / (0.01 * 1000)
    for form in ("advantage", "level"):
        algo = cfg.replace(constraint_form=form)
        learner = make_learner(algo, obs_size, (-1.0, -1.0), (1.0, 1.0))
        state = learner.init(jax.random.PRNGKey(0))
        duals = state.estep_duals.replace(
            realised_cost=jnp.asarray([32.0]), realised_episodes=jnp.asarray(5.0)
        )
        _, metrics = jax.jit(learner.update)(state.replace(estep_duals=duals), batch)
        if form == "advantage":
            budget = per_cost * (20.0 - 32.0)
            np.testing.assert_allclose(
                metrics["qc_threshold"], metrics["qc_policy"] + budget, rtol=1e-5, atol=1e-6
            )
        else:
            np.testing.assert_allclose(metrics["qc_threshold"], algo.qc_threshold, rtol=1e-6)


def test_advantage_form_rejects_the_threshold_feedback_and_unknown_forms():
    with pytest.raises(ValueError, match="cost_feedback_gain=0.01.*constraint_form=advantage"):
        CVPOConfig(constraint_form="advantage", cost_feedback_gain=0.01)
    with pytest.raises(ValueError, match="constraint_form='ratio'.*one of"):
        CVPOConfig(constraint_form="ratio")
    with pytest.raises(ValueError, match="realised_cost_episodes=0"):
        CVPOConfig(realised_cost_episodes=0)


def test_recovery_asks_for_a_fraction_of_the_reachable_decrease():
    """An unreachable threshold is raised to mean - f * (mean - reachable), with the
    reachable value from an independent solver (SciPy, in test_estep); a reachable one
    is left alone; with f = 0.5 the E-step is feasible and lambda stays off its bounds."""
    from test_estep import EPS, binding_problem, scipy_min_cost

    from cvpo_jax import estep as E

    with jax.enable_x64(True):
        q_r, q_c, _ = binding_problem(0, 1, b=6, k=8)
        cfg = CVPOConfig(cost_limit=(1.0,), estep_kl_eps=EPS, estep_recovery=0.5, dual_steps=2000)
        reach, _ = scipy_min_cost(q_c[..., 0], EPS)
        mean = q_c.mean()
        impossible = jnp.asarray([q_c.min() - 1.0])
        raised = recovery_threshold(jnp.asarray(q_c), impossible, cfg)
        np.testing.assert_allclose(
            float(raised[0]), mean - 0.5 * (mean - reach), atol=1e-3 * (mean - reach)
        )
        easy = jnp.asarray([mean])
        np.testing.assert_allclose(recovery_threshold(jnp.asarray(q_c), easy, cfg), easy)

        duals = E.init_estep_duals(cfg, dtype=jnp.float64)
        _, weights, info = E.estep(duals, jnp.asarray(q_r), jnp.asarray(q_c), raised, cfg)
        assert float(info["estep_feasible"][0]) == 1.0
        assert float(info["lambda_at_upper"][0]) == 0.0
        assert float(info["lambda_at_lower"][0]) == 0.0
        # The constraint binds at the raised threshold.
        np.testing.assert_allclose(float(info["qc_weighted"][0]), float(raised[0]), rtol=1e-3)


def test_lagrangian_multiplier_integrates_the_capped_cost_error():
    cfg = CVPOConfig(
        constraint_form="lagrangian",
        lagrangian_lr=0.1,
        cost_limit=(20.0, 0.5),
        lambda_bounds=(1e-8, 3.0),
    )
    costs = np.array([[30.0, 0.0], [300.0, 2.0], [0.0, 0.0]])
    # Errors (limit 20): 0.5, 10 (14 capped), -1; (limit 0.5, divided by max(0.5, 1)):
    # -0.5, 1.5, -0.5. lambda from (1, 1): 1.05 -> 2.05 -> 1.95; 0.95 -> 1.1 -> 1.05.
    out = lagrangian_update(np.zeros(2), costs, cfg)
    np.testing.assert_allclose(np.exp(out), [1.95, 1.05], rtol=1e-6)
    # Linear steps, clipped to the bounds each episode: the floor is left at the rate
    # it was reached, not in proportion to lambda.
    floor = lagrangian_update(np.zeros(2), np.zeros((30, 2)), cfg)
    np.testing.assert_allclose(np.exp(floor), [1e-8, 1e-8], rtol=1e-5)
    back = lagrangian_update(floor, np.array([[40.0, 0.5]]), cfg)
    np.testing.assert_allclose(np.exp(back), [0.1, 1e-8], rtol=1e-5, atol=1e-9)
    ceiling = lagrangian_update(np.zeros(2), np.full((10, 2), 400.0), cfg)
    np.testing.assert_allclose(np.exp(ceiling), [3.0, 3.0], rtol=1e-6)


def test_lagrangian_multiplier_on_the_log_scale_steps_by_the_clipped_error():
    cfg = CVPOConfig(
        constraint_form="lagrangian",
        lagrangian_scale="log",
        lagrangian_lr=0.1,
        cost_limit=(20.0, 0.5),
        lambda_bounds=(1e-3, 3.0),
    )
    costs = np.array([[30.0, 0.0], [300.0, 2.0], [0.0, 0.0]])
    # Errors (limit 20) 0.5, 13.5 -> 1, -1; (limit 0.5 over max(0.5, 1)) -0.5, 1.5 -> 1,
    # -0.5. log lambda from (0, 0): 0.05 -> 0.15 -> 0.05; -0.05 -> 0.05 -> 0.0.
    out = lagrangian_update(np.zeros(2), costs, cfg)
    np.testing.assert_allclose(out, [0.05, 0.0], atol=1e-6)
    # However costly, one episode moves lambda by at most exp(lr); from the floor it
    # rises at the rate it fell, in log units.
    start = np.log([0.01, 0.01])
    once = lagrangian_update(start, np.array([[1e4, 1e4]]), cfg)
    np.testing.assert_allclose(np.exp(once), 0.01 * np.exp(0.1), rtol=1e-5)
    floor = lagrangian_update(np.zeros(2), np.zeros((200, 2)), cfg)
    np.testing.assert_allclose(np.exp(floor), [1e-3, 1e-3], rtol=1e-5)
    up = lagrangian_update(floor, np.full((5, 2), 100.0), cfg)
    np.testing.assert_allclose(np.exp(up), 1e-3 * np.exp(0.5), rtol=1e-5)
    ceiling = lagrangian_update(np.zeros(2), np.full((30, 2), 400.0), cfg)
    np.testing.assert_allclose(np.exp(ceiling), [3.0, 3.0], rtol=1e-5)


def test_lagrangian_mean_signal_steps_by_the_running_mean_error():
    cfg = CVPOConfig(
        constraint_form="lagrangian",
        lagrangian_scale="log",
        lagrangian_signal="mean",
        lagrangian_lr=0.1,
        cost_limit=(20.0,),
        realised_cost_episodes=2,
        lambda_bounds=(1e-3, 3.0),
    )
    costs = np.array([[0.0], [60.0], [0.0], [40.0]])
    # Running mean (plain mean of the first 2, then rate 1/2): 0, 30, 15, 27.5; its
    # errors -1, 0.5, -0.25, 0.375: log lambda 0 -> -0.1 -> -0.05 -> -0.075 -> -0.0375.
    means = realised_cost_trace(np.zeros(1), 0.0, costs, cfg)
    np.testing.assert_allclose(means[:, 0], [0.0, 30.0, 15.0, 27.5])
    out = lagrangian_update(np.zeros(1), costs, cfg, means)
    np.testing.assert_allclose(out, [-0.0375], atol=1e-6)
    # Per episode the same costs give -0.1 + 0.1 - 0.1 + 0.1 = 0 (both clipped at 1).
    by_episode = lagrangian_update(np.zeros(1), costs, cfg.replace(lagrangian_signal="episode"))
    np.testing.assert_allclose(by_episode, [0.0], atol=1e-6)
    with pytest.raises(ValueError, match="running means"):
        lagrangian_update(np.zeros(1), costs, cfg)


def test_lagrangian_scale_rejects_unknown_names():
    with pytest.raises(ValueError, match="lagrangian_scale"):
        CVPOConfig(lagrangian_scale="exp")


def test_lagrangian_estep_keeps_lambda_and_solves_eta():
    """In the Lagrangian form the update leaves lambda where the train loop set it and
    solves only eta; the E-step's weights use that lambda (the logged qc_weighted is
    E_q[Q_c] under softmax((Q_r - lambda Q_c) / eta) from the same tables)."""
    from cvpo_jax.estep import estep, init_estep_duals

    rng = np.random.default_rng(3)
    q_r = jnp.asarray(rng.normal(size=(32, 8)), jnp.float32)
    q_c = jnp.asarray(rng.uniform(0, 2, (32, 8, 1)), jnp.float32)
    cfg = CVPOConfig(constraint_form="lagrangian", dual_steps=50)
    duals = init_estep_duals(cfg).replace(log_lambda=jnp.log(jnp.asarray([2.5])))
    new, weights, info = estep(duals, q_r, q_c, jnp.asarray([0.1]), cfg)
    np.testing.assert_allclose(np.exp(new.log_lambda), [2.5], rtol=1e-6)
    assert abs(float(new.log_eta - duals.log_eta)) > 1e-3
    eta = float(np.exp(new.log_eta))
    logits = (np.asarray(q_r, np.float64) - 2.5 * np.asarray(q_c[..., 0], np.float64)) / eta
    expected = np.exp(logits - logits.max(axis=1, keepdims=True))
    expected /= expected.sum(axis=1, keepdims=True)
    np.testing.assert_allclose(weights, expected, rtol=1e-4, atol=1e-6)
    # The level form with the same threshold (far below any Q_c) moves lambda up.
    level, _, _ = estep(duals, q_r, q_c, jnp.asarray([0.1]), cfg.replace(constraint_form="level"))
    assert float(level.log_lambda[0]) > float(np.log(2.5)) + 0.1


def test_lagrangian_form_rejects_the_threshold_levers():
    with pytest.raises(ValueError, match="estep_recovery=0.5.*constraint_form=lagrangian"):
        CVPOConfig(constraint_form="lagrangian", estep_recovery=0.5)
    with pytest.raises(ValueError, match="cost_feedback_gain=0.01.*constraint_form=lagrangian"):
        CVPOConfig(constraint_form="lagrangian", cost_feedback_gain=0.01)
    with pytest.raises(ValueError, match="lagrangian_lr=0"):
        CVPOConfig(lagrangian_lr=0)


def test_lagrangian_error_cap_tracks_the_mean_not_the_median():
    """Costs 0, 0, 75 per three episodes (limit 25): the median is 0 and the mean is at
    the limit. Clipped to [-1, 1] the errors -1, -1, 1 drive lambda down; capped at 10
    they are -1, -1, 2 and lambda does not move."""
    cfg = CVPOConfig(
        constraint_form="lagrangian",
        lagrangian_scale="log",
        lagrangian_lr=0.1,
        cost_limit=(25.0,),
        lambda_bounds=(1e-3, 20.0),
    )
    costs = np.tile([[0.0], [0.0], [75.0]], (4, 1))
    median = lagrangian_update(np.zeros(1), costs, cfg)
    np.testing.assert_allclose(median, [4 * 0.1 * (-1 - 1 + 1)], atol=1e-6)
    mean = lagrangian_update(np.zeros(1), costs, cfg.replace(lagrangian_error_cap=10.0))
    np.testing.assert_allclose(mean, [0.0], atol=1e-6)
    # Errors above the cap count as the cap: one episode of cost 1000 (error 39).
    once = lagrangian_update(
        np.zeros(1), np.array([[1000.0]]), cfg.replace(lagrangian_error_cap=10.0)
    )
    np.testing.assert_allclose(once, [1.0], atol=1e-6)


def test_lagrangian_proportional_term_scales_the_estep_lambda():
    """The E-step's lambda is exp(log lambda_I + kp * clip((C_real - limit) / limit, -1,
    1)), clipped to the bounds; the state keeps lambda_I, and the weights use the
    product (checked against a float64 softmax)."""
    from cvpo_jax.estep import estep, init_estep_duals, lagrangian_log_lambda

    cfg = CVPOConfig(
        constraint_form="lagrangian",
        lagrangian_scale="log",
        lagrangian_kp=0.5,
        cost_limit=(20.0, 4.0),
        lambda_bounds=(1e-3, 3.0),
        dual_steps=10,
    )
    duals = init_estep_duals(cfg).replace(log_lambda=jnp.log(jnp.asarray([0.2, 2.0])))
    # Before the first episode there is no proportional term.
    np.testing.assert_allclose(lagrangian_log_lambda(duals, cfg), np.log([0.2, 2.0]), rtol=1e-6)
    duals = duals.replace(
        realised_cost=jnp.asarray([30.0, 100.0]), realised_episodes=jnp.asarray(5.0)
    )
    # Errors 0.5 and 24 -> 1: lambda 0.2 * e^0.25; 2 * e^0.5 = 3.30 -> the ceiling 3.
    expected = np.array([0.2 * np.exp(0.25), 3.0])
    np.testing.assert_allclose(np.exp(lagrangian_log_lambda(duals, cfg)), expected, rtol=1e-5)
    below = duals.replace(realised_cost=jnp.asarray([0.0, 3.0]))
    np.testing.assert_allclose(
        np.exp(lagrangian_log_lambda(below, cfg)),
        [0.2 * np.exp(-0.5), 2.0 * np.exp(-0.125)],
        rtol=1e-5,
    )
    rng = np.random.default_rng(4)
    q_r = jnp.asarray(rng.normal(size=(16, 8)), jnp.float32)
    q_c = jnp.asarray(rng.uniform(0, 2, (16, 8, 2)), jnp.float32)
    new, weights, info = estep(duals, q_r, q_c, jnp.asarray([0.1, 0.1]), cfg)
    np.testing.assert_allclose(np.exp(new.log_lambda), [0.2, 2.0], rtol=1e-6)
    np.testing.assert_allclose(info["lambda"], expected, rtol=1e-5)
    eta = float(np.exp(new.log_eta))
    logits = (np.asarray(q_r, np.float64) - np.asarray(q_c, np.float64) @ expected) / eta
    want = np.exp(logits - logits.max(axis=1, keepdims=True))
    want /= want.sum(axis=1, keepdims=True)
    np.testing.assert_allclose(weights, want, rtol=1e-4, atol=1e-6)


def test_lagrangian_pi_knobs_fail_naming_the_field():
    with pytest.raises(ValueError, match="lagrangian_error_cap=0.5"):
        CVPOConfig(lagrangian_scale="log", lagrangian_error_cap=0.5)
    with pytest.raises(ValueError, match="lagrangian_error_cap=10.0.*lagrangian_scale=log"):
        CVPOConfig(lagrangian_error_cap=10.0)
    with pytest.raises(ValueError, match="lagrangian_kp=0.5.*lagrangian_scale=log"):
        CVPOConfig(constraint_form="lagrangian", lagrangian_kp=0.5)
    with pytest.raises(ValueError, match="lagrangian_kp=-1"):
        CVPOConfig(constraint_form="lagrangian", lagrangian_scale="log", lagrangian_kp=-1.0)
