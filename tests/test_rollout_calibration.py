"""Critic calibration by rollouts past the time limit: scripted sums, real envs, the CLI."""

import math

import gymnasium as gym
import numpy as np
import pytest

from cvpo_jax.calibration import tail_horizon
from cvpo_jax.config import CVPOConfig
from cvpo_jax.envs.examples import HazardPoint
from cvpo_jax.envs.safety_gymnasium import make_safety_gym_env
from cvpo_jax.evaluation import evaluate_policy
from cvpo_jax.learner import make_learner
from cvpo_jax.rollout_calibration import calibrate_critics, lift_time_limit, rollout_calibration


class Counter(gym.Env):
    """Observation [env step of the episode]; reward 1 per step; costs 1 (`cost_a`)
    and 0.5 (`cost_b`) per step, the env's cost their sum. Truncated at
    max_episode_steps; terminated at `terminate_at` if given; `hard_limit` truncates
    regardless (a limit nothing can lift)."""

    def __init__(self, limit=20, terminate_at=None, hard_limit=None):
        self.observation_space = gym.spaces.Box(-np.inf, np.inf, (1,), np.float32)
        self.action_space = gym.spaces.Box(-1.0, 1.0, (1,), np.float32)
        self.max_episode_steps = limit
        self.terminate_at = terminate_at
        self.hard_limit = hard_limit
        self.t = 0

    def reset(self, *, seed=None, options=None):
        self.t = 0
        return np.array([0.0], np.float32), {}

    def step(self, action):
        self.t += 1
        terminated = self.terminate_at is not None and self.t >= self.terminate_at
        truncated = self.t >= self.max_episode_steps or (
            self.hard_limit is not None and self.t >= self.hard_limit
        )
        info = {"cost_a": 1.0, "cost_b": 0.5}
        return np.array([float(self.t)], np.float32), 1.0, 1.5, terminated, truncated, info


def explicit_to_go(per_decision, gamma, t, length):
    """sum_{j=0}^{length-1-t} gamma^j x, by a loop."""
    return sum(gamma**j * per_decision for j in range(length - t))


def recording_q(scale):
    """A stand-in critic: Q_r is the observation (the env step), Q_c scale[m] times it
    for constraint m; records the (obs, action) it was asked about."""
    calls = []

    def q_fn(obs, action):
        calls.append((obs.copy(), action.copy()))
        return obs[:, 0].astype(np.float64), scale * np.repeat(obs, len(scale), axis=1)

    return q_fn, calls


@pytest.mark.parametrize("repeat", [1, 2])
def test_scripted_sums_against_an_explicit_computation(repeat):
    """T = 20 env steps, never terminated: every decision of the episode proper is
    compared with the sum over the rest of the proper episode plus H decisions."""
    gamma, tol, T = 0.9, 0.05, 20
    H = tail_horizon(gamma, tol)
    env = Counter(limit=T)
    q_fn, calls = recording_q(np.array([1.0, 2.0]))
    seen_t = []

    def act(obs, t):
        seen_t.append(t)
        return np.zeros(1, np.float32)

    cal = rollout_calibration(
        env,
        act,
        q_fn,
        episodes=2,
        seed=0,
        gamma=gamma,
        action_repeat=repeat,
        cost_names=("a", "b"),
        tail_tol=tol,
        max_points=1000,
    )
    proper = T // repeat
    length = proper + H  # decisions per episode
    assert cal.time_limit == T and cal.tail_decisions == H and cal.points == 2 * proper
    # The critics saw each decision's first observation (its env step) and action.
    obs = np.concatenate([c[0] for c in calls])[:, 0]
    np.testing.assert_array_equal(obs, np.tile(np.arange(proper) * repeat, 2))
    # Noise keys count env steps over the whole calibration.
    np.testing.assert_array_equal(seen_t, np.arange(2 * length) * repeat)
    g_r = np.array([explicit_to_go(repeat * 1.0, gamma, t, length) for t in range(proper)] * 2)
    g_a = np.array([explicit_to_go(repeat * 1.0, gamma, t, length) for t in range(proper)] * 2)
    g_b = g_a / 2
    assert cal.reward["mc"] == pytest.approx(g_r.mean(), rel=1e-12)
    assert cal.reward["bias"] == pytest.approx(np.mean(obs - g_r), rel=1e-12)
    assert cal.cost[0]["bias"] == pytest.approx(np.mean(obs - g_a), rel=1e-12)
    assert cal.cost[1]["bias"] == pytest.approx(np.mean(2 * obs - g_b), rel=1e-12)
    assert cal.start_cost[1]["mc"] == pytest.approx(g_b[0], rel=1e-12)
    assert cal.start_cost[1]["bias"] == pytest.approx(-g_b[0], rel=1e-12)
    assert math.isnan(cal.start_reward["corr"])  # Q_r is 0 at every start.
    # The episode proper's sums: T steps of reward 1, costs 1 and 0.5.
    np.testing.assert_allclose(cal.episode_returns, [T, T])
    np.testing.assert_allclose(cal.episode_costs, [[T, T / 2]] * 2)
    # The env's own cost when no names are given.
    env = Counter(limit=T)
    cal = rollout_calibration(
        env, act, recording_q(np.array([1.0]))[0], episodes=1, seed=0, gamma=gamma,
        action_repeat=repeat, tail_tol=tol,
    )  # fmt: skip
    assert cal.start_cost[0]["mc"] == pytest.approx(1.5 * g_a[0], rel=1e-12)


def test_a_terminated_episode_is_exact_and_needs_no_tail():
    gamma, T = 0.9, 20
    q_fn, calls = recording_q(np.array([1.0]))
    cal = rollout_calibration(
        Counter(limit=T, terminate_at=12),
        lambda obs, t: np.zeros(1, np.float32),
        q_fn,
        episodes=1,
        seed=0,
        gamma=gamma,
        cost_gamma=0.5,
        max_points=1000,
    )
    assert cal.points == 12
    g_c = np.array([explicit_to_go(1.5, 0.5, t, 12) for t in range(12)])
    assert cal.cost[0]["mc"] == pytest.approx(g_c.mean(), rel=1e-12)
    assert cal.episode_returns[0] == 12


def test_a_limit_it_cannot_lift_is_an_error():
    with pytest.raises(RuntimeError, match="before the lifted limit"):
        rollout_calibration(
            Counter(limit=20, hard_limit=30),
            lambda obs, t: np.zeros(1, np.float32),
            recording_q(np.array([1.0]))[0],
            episodes=1,
            seed=0,
            gamma=0.9,
        )
    for bad, message in [
        ({"episodes": 0}, "episodes=0 must be an integer >= 1"),
        ({"tail_tol": 1.0}, r"tail_tol=1.0 must be in \(0, 1\)"),
        ({"max_points": 0}, "max_points=0 must be >= 1"),
    ]:
        kwargs = {"episodes": 1, "seed": 0, "gamma": 0.9, **bad}
        with pytest.raises(ValueError, match=message):
            rollout_calibration(Counter(), None, None, **kwargs)
    with pytest.raises(ValueError, match="no time limit"):
        lift_time_limit(gym.make("CartPole-v1").unwrapped, 10)


def test_lift_time_limit_on_real_envs():
    env = HazardPoint()
    assert lift_time_limit(env, 50) == 100 and env.max_episode_steps == 150
    # Again: from the original limit, not the lifted one.
    assert lift_time_limit(env, 20) == 100 and env.max_episode_steps == 120
    env = make_safety_gym_env("SafetyPointGoal1-v0")
    try:
        assert lift_time_limit(env, 3) == 1000
        assert lift_time_limit(env, 7) == 1000
        assert env.unwrapped.task.num_steps == 1007
        env.reset(seed=0)
        for t in range(1007):
            *_, terminated, truncated, _ = env.step(np.zeros(2))
            assert not terminated and truncated == (t == 1006)
    finally:
        env.close()


def test_calibrate_critics_on_point_goal1_matches_a_stochastic_evaluation():
    """A fresh learner on the real task with action repeat 4: the first episode's
    return and cost are what evaluate_policy reports for the same seed, and the
    critics were evaluated on the decisions' observations."""
    algo = CVPOConfig(hidden_sizes=(16, 16), num_samples=4, episode_length=250)
    env = make_safety_gym_env("SafetyPointGoal1-v0")
    obs_size, low, high = (
        env.observation_space.shape[0],
        env.action_space.low,
        env.action_space.high,
    )
    env.close()
    learner = make_learner(algo, obs_size, low, high)
    import jax

    state = learner.init(jax.random.PRNGKey(1))
    cal = calibrate_critics(
        learner, state, "PointGoal1", episodes=1, seed=3, action_repeat=4, tail_tol=0.5
    )
    ref = evaluate_policy(
        learner, state.policy_params, "PointGoal1", 1, 3, deterministic=False, action_repeat=4
    )
    assert cal.time_limit == 1000 and cal.tail_decisions == tail_horizon(0.99, 0.5)
    assert cal.episode_returns[0] == pytest.approx(ref.returns[0], rel=1e-9)
    assert cal.episode_costs[0, 0] == pytest.approx(ref.costs[0], rel=1e-9)
    assert cal.points == len(range(0, 250, 4))  # 64 points at most: every 4th of 250
    assert all(np.isfinite(cal.reward[k]) for k in ("bias", "mc"))
