"""Fresh critics fitted to a frozen policy: the on-policy data, both fits, the report."""

import dataclasses

import jax
import numpy as np
import pytest
from test_rollout_calibration import Counter, explicit_to_go

from cvpo_jax.calibration import tail_horizon
from cvpo_jax.config import CVPOConfig
from cvpo_jax.critic_refit import (
    collect_on_policy,
    compare_critics,
    fit_mc,
    fit_td,
    fresh_critic_state,
    level_decomposition,
    rates_by_decision,
)
from cvpo_jax.learner import make_learner


def zero_action(obs, t):
    return np.zeros(1, np.float32)


@pytest.mark.parametrize("repeat", [1, 2])
def test_on_policy_rows_hold_transitions_and_exact_to_go(repeat):
    gamma, tol, T = 0.9, 0.05, 20
    H = tail_horizon(gamma, tol)
    done = []
    data = collect_on_policy(
        Counter(limit=T), zero_action, episodes=2, seed=0, gamma=gamma, cost_gamma=0.5,
        action_repeat=repeat, tail_tol=tol, progress=done.append,
    )  # fmt: skip
    assert done == [1, 2]
    proper, length = T // repeat, T // repeat + H
    assert data.size == 2 * length
    np.testing.assert_array_equal(data.episode, np.repeat([0, 1], length))
    # Observations are the env step at each decision; next_obs the one after it.
    steps = np.tile(np.arange(length) * repeat, 2)
    np.testing.assert_array_equal(data.obs[:, 0], steps)
    np.testing.assert_array_equal(data.next_obs[:, 0], steps + repeat)
    np.testing.assert_allclose(data.reward, repeat * 1.0)
    np.testing.assert_allclose(data.cost[:, 0], repeat * 1.5)  # the env's cost
    # The run stops at the lifted limit: its last decision is truncated, none terminated.
    end = np.tile(np.arange(length) == length - 1, 2)
    np.testing.assert_array_equal(data.truncated, end)
    assert not data.terminated.any()
    valid = np.tile(np.arange(length) < proper, 2)
    np.testing.assert_array_equal(data.valid, valid)
    g_r = [explicit_to_go(repeat * 1.0, gamma, t, length) for t in range(proper)]
    g_c = [explicit_to_go(repeat * 1.5, 0.5, t, length) for t in range(proper)]
    np.testing.assert_allclose(data.reward_to_go[valid], g_r * 2, rtol=1e-12)
    np.testing.assert_allclose(data.cost_to_go[valid, 0], g_c * 2, rtol=1e-12)


def test_collecting_twice_from_one_env_runs_the_same_episodes():
    """The held-out episodes come from the env the fitting ones did: its time limit
    must be lifted from the original one again, not from the lifted one."""
    env = Counter(limit=20)
    first = collect_on_policy(env, zero_action, episodes=1, seed=0, gamma=0.9)
    second = collect_on_policy(env, zero_action, episodes=1, seed=1, gamma=0.9)
    assert second.size == first.size == 20 + tail_horizon(0.9, 0.01)
    np.testing.assert_array_equal(second.valid, first.valid)


def test_a_terminated_run_is_valid_throughout():
    data = collect_on_policy(
        Counter(limit=20, terminate_at=12), zero_action, episodes=1, seed=0, gamma=0.9,
        cost_names=("a", "b"),
    )  # fmt: skip
    assert data.size == 12 and data.valid.all()
    assert data.terminated[-1] == 1 and data.terminated[:-1].sum() == 0
    assert not data.truncated.any()
    np.testing.assert_allclose(data.cost, [[1.0, 0.5]] * 12)
    g = [explicit_to_go(0.5, 0.9, t, 12) for t in range(12)]
    np.testing.assert_allclose(data.cost_to_go[:, 1], g, rtol=1e-12)
    with pytest.raises(ValueError, match="episodes=0 must be an integer >= 1"):
        collect_on_policy(Counter(), zero_action, episodes=0, seed=0, gamma=0.9)


@pytest.fixture(scope="module")
def constant_task():
    """Counter at gamma 0.5 never ends within its lifted limit: Q_r = 1 / (1 - 0.5) = 2
    and Q_c = 1.5 / 0.5 = 3 at every (s, a), TD's fixed point and the realised to-go
    alike (to the tail tolerance 1e-3)."""
    algo = CVPOConfig(
        hidden_sizes=(32, 32), gamma=0.5, critic_lr=3e-3, episode_length=20, num_samples=4
    )
    learner = make_learner(algo, 1, [-1.0], [1.0])
    state = learner.init(jax.random.PRNGKey(0))
    collect = dict(seed=0, gamma=0.5, tail_tol=1e-3)
    train = collect_on_policy(Counter(limit=20), zero_action, episodes=4, **collect)
    held_out = collect_on_policy(Counter(limit=20), zero_action, episodes=1, **collect)
    return learner, state, train, held_out


def test_fresh_critics_fit_a_known_value_by_td_and_by_regression(constant_task):
    learner, state, train, held_out = constant_task
    before = jax.tree.map(np.asarray, state.critic_params)
    fit = dict(updates=1500, batch_size=32, seed=1, chunk=500)
    done = []
    td_state = fit_td(learner, state, train, progress=done.append, **fit)
    assert done == [500, 1000, 1500]
    mc_params = fit_mc(learner, state, train, **fit)
    # The trained state is untouched (not donated) and keeps its critics.
    jax.tree.map(
        np.testing.assert_array_equal, before, jax.tree.map(np.asarray, state.critic_params)
    )
    out = compare_critics(
        learner,
        {
            "trained": state.target_critic_params,
            "td": td_state.target_critic_params,
            "mc": mc_params,
        },
        held_out,
    )
    for name in ("td", "mc"):
        assert out[name]["reward"]["mc"] == pytest.approx(2.0, abs=2e-3)
        assert out[name]["cost"][0]["mc"] == pytest.approx(3.0, abs=3e-3)
        assert abs(out[name]["reward"]["bias"]) < 0.1, (name, out[name])
        assert abs(out[name]["cost"][0]["bias"]) < 0.15, (name, out[name])
    # The untrained critics are far from it: the fits did the work.
    assert abs(out["trained"]["cost"][0]["bias"]) > 1.0
    level = level_decomposition(
        learner, state.policy_params, {"td": td_state.target_critic_params}, train
    )["td"]
    # Cost 1.5 per decision at gamma 0.5: the stationary level 3 and a TD error near 0;
    # the reported means obey the TD error's definition.
    assert level["stationary"] == pytest.approx(3.0, rel=1e-12)
    assert level["q"] == pytest.approx(3.0, abs=0.15)
    assert abs(level["td_error"]) < 0.05
    assert level["td_error"] == pytest.approx(1.5 + 0.5 * level["next_q"] - level["q"], abs=1e-9)


def test_fresh_critic_state_is_new_critics_and_the_frozen_policy(constant_task):
    learner, state, *_ = constant_task
    fresh = fresh_critic_state(learner, state, jax.random.PRNGKey(5))
    leaves = lambda tree: [np.asarray(x) for x in jax.tree.leaves(tree)]  # noqa: E731
    assert any(
        not np.array_equal(a, b)
        for a, b in zip(leaves(fresh.critic_params), leaves(state.critic_params), strict=True)
    )
    for a, b in zip(leaves(fresh.critic_params), leaves(fresh.target_critic_params), strict=True):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(leaves(fresh.target_policy_params), leaves(state.policy_params), strict=True):
        np.testing.assert_array_equal(a, b)
    for bad, message in [
        ({"updates": 0}, "updates=0 must be an integer >= 1"),
        ({"batch_size": 1.5}, "batch_size=1.5 must be an integer >= 1"),
    ]:
        kwargs = {"updates": 10, "batch_size": 8, "seed": 0, **bad}
        with pytest.raises(ValueError, match=message):
            fit_td(learner, state, constant_task[2], **kwargs)


def test_rates_by_decision_bucket_each_runs_decisions():
    """Two runs of 5 and 3 decisions: index 0-1, 2-3, 4 within each run."""
    data = collect_on_policy(
        Counter(limit=20, terminate_at=5), zero_action, episodes=1, seed=0, gamma=0.9
    )
    data = dataclasses.replace(
        data,
        **{
            f.name: np.concatenate([getattr(data, f.name), getattr(data, f.name)[:3]])
            for f in dataclasses.fields(data)
        },
    )
    data = dataclasses.replace(data, episode=np.array([0, 0, 0, 0, 0, 1, 1, 1]))
    data = dataclasses.replace(data, reward=np.arange(8.0), cost=np.arange(8.0)[:, None] * 2)
    out = rates_by_decision(data, width=2)
    assert [b["decisions"] for b in out] == [[0, 2], [2, 4], [4, 6]]
    assert [b["rows"] for b in out] == [4, 3, 1]
    # Rows by index: 0 -> {0, 5}, 1 -> {1, 6}, 2 -> {2, 7}, 3 -> {3}, 4 -> {4}.
    assert [b["reward"] for b in out] == [np.mean([0, 1, 5, 6]), np.mean([2, 3, 7]), 4.0]
    assert out[1]["cost"] == [2 * np.mean([2, 3, 7])]
    with pytest.raises(ValueError, match="width=0 must be an integer >= 1"):
        rates_by_decision(data, width=0)
