"""Batched env adapter: auto-reset, final observations, episode stats, seeding.

Most tests drive a scripted env through safety-gymnasium's real vector envs, so
every expected observation is known exactly; one test runs SafetyCarGoal1.
"""

import gymnasium
import numpy as np
import pytest

from cvpo_jax.envs.safety_gymnasium import (
    SafetyGymVectorEnv,
    accumulate_episodes,
    clip_actions,
    init_episode_accumulator,
    true_next_observations,
)
from cvpo_jax.envs.safety_gymnasium_compat import import_safety_gymnasium


@pytest.fixture(autouse=True)
def _mujoco_logs_in_tmp(tmp_path, monkeypatch):
    # MuJoCo writes MUJOCO_LOG.TXT into the cwd on errors; keep it out of the repo.
    monkeypatch.chdir(tmp_path)


class ScriptedSafetyEnv(gymnasium.Env):
    """A safety-gymnasium style env whose observations encode its own state.

    obs = [t, episode, last clipped action, reset seed or -1], where t counts
    steps in the episode. reward = t after the step, cost = 1 on odd t. It
    terminates when t reaches ``terminate_at``; otherwise the SafeTimeLimit
    wrapper truncates it.
    """

    def __init__(self, terminate_at=None):
        self.observation_space = gymnasium.spaces.Box(-np.inf, np.inf, (4,), np.float64)
        self.action_space = gymnasium.spaces.Box(-1.0, 1.0, (1,), np.float64)
        self.terminate_at = terminate_at
        self.episode = -1
        self.seed_seen = -1.0

    def _obs(self, action=0.0):
        return np.array([self.t, self.episode, action, self.seed_seen], np.float64)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.t, self.episode = 0, self.episode + 1
        if seed is not None:
            self.seed_seen = float(seed)
        return self._obs(), {}

    def step(self, action):
        self.t += 1
        terminated = self.t == self.terminate_at
        return self._obs(float(action[0])), float(self.t), float(self.t % 2), terminated, False, {}


EPISODE_LENGTH = 5


def _scripted_fns(terminate_ats):
    SafeTimeLimit = import_safety_gymnasium().wrappers.SafeTimeLimit
    return [
        (lambda k=k: SafeTimeLimit(ScriptedSafetyEnv(k), EPISODE_LENGTH)) for k in terminate_ats
    ]


@pytest.fixture(params=[False, True], ids=["sync", "async"])
def scripted(request):
    # env 0 terminates at t=3; env 1 is truncated by the time limit at t=5.
    env = SafetyGymVectorEnv.from_env_fns(
        _scripted_fns([3, None]), episode_length=EPISODE_LENGTH, asynchronous=request.param
    )
    yield env
    env.close()


def test_scripted_auto_reset_uses_final_observation(scripted):
    obs = scripted.reset(seed=7)
    assert obs.dtype == np.float32 and obs.shape == (2, 4)
    # Sub-env i is seeded with seed + i.
    np.testing.assert_array_equal(obs[:, 3], [7.0, 8.0])

    results = [scripted.step(np.full((2, 1), 0.5)) for _ in range(EPISODE_LENGTH)]

    # Step 3: env 0 terminates; next_obs is its final obs (t=3, episode 0),
    # obs is the reset obs of episode 1.
    r = results[2]
    np.testing.assert_array_equal(r.terminated, [True, False])
    np.testing.assert_array_equal(r.truncated, [False, False])
    np.testing.assert_array_equal(r.next_obs[0, :2], [3.0, 0.0])
    np.testing.assert_array_equal(r.obs[0, :2], [0.0, 1.0])
    np.testing.assert_array_equal(r.next_obs[1], r.obs[1])
    np.testing.assert_array_equal(r.episode.done, [True, False])
    assert r.episode.episode_return[0] == 1 + 2 + 3
    assert r.episode.episode_cost[0] == 2  # costs 1, 0, 1
    assert r.episode.episode_length[0] == 3

    # Step 5: env 1 hits the time limit -> truncated, not terminated.
    r = results[4]
    np.testing.assert_array_equal(r.terminated, [False, False])
    np.testing.assert_array_equal(r.truncated, [False, True])
    np.testing.assert_array_equal(r.next_obs[1, :2], [5.0, 0.0])
    np.testing.assert_array_equal(r.obs[1, :2], [0.0, 1.0])
    # env 0 is mid-episode 1 (t=2), unaffected.
    np.testing.assert_array_equal(r.next_obs[0, :2], [2.0, 1.0])
    assert r.episode.episode_return[1] == 15 and r.episode.episode_cost[1] == 3
    assert r.episode.episode_length[1] == EPISODE_LENGTH
    # Env 0's second episode started from zero running sums.
    assert r.episode.episode_return[0] == 0 and not r.episode.done[0]

    for r in results:
        assert r.reward.dtype == np.float32 and r.cost.dtype == np.float32
        assert r.next_obs.dtype == np.float32 and r.terminated.dtype == bool


def test_scripted_actions_are_clipped(scripted):
    scripted.reset(seed=0)
    r = scripted.step(np.array([[3.0], [-0.25]]))
    np.testing.assert_array_equal(r.next_obs[:, 2], [1.0, -0.25])


def test_scripted_rejects_bad_actions(scripted):
    scripted.reset(seed=0)
    with pytest.raises(ValueError, match="shape"):
        scripted.step(np.zeros((3, 1)))
    with pytest.raises(ValueError, match="finite"):
        scripted.step(np.array([[np.nan], [0.0]]))


def test_scripted_reset_clears_running_episode_sums():
    with SafetyGymVectorEnv.from_env_fns(_scripted_fns([None]), episode_length=5) as env:
        env.reset(seed=0)
        env.step(np.zeros((1, 1)))
        env.step(np.zeros((1, 1)))
        env.reset(seed=0)
        results = [env.step(np.zeros((1, 1))) for _ in range(5)]
    assert results[-1].episode.episode_length[0] == 5
    assert results[-1].episode.episode_return[0] == 15


def test_accumulate_episodes_pure():
    acc = init_episode_accumulator(2)
    acc, stats = accumulate_episodes(
        acc, np.array([1.0, 2.0]), np.array([0.0, 1.0]), np.array([False, False])
    )
    assert not stats.done.any() and np.all(stats.episode_length == 0)
    acc, stats = accumulate_episodes(
        acc, np.array([3.0, 4.0]), np.array([1.0, 1.0]), np.array([True, False])
    )
    np.testing.assert_array_equal(stats.done, [True, False])
    np.testing.assert_array_equal(stats.episode_return, [4.0, 0.0])
    np.testing.assert_array_equal(stats.episode_cost, [1.0, 0.0])
    np.testing.assert_array_equal(stats.episode_length, [2, 0])
    np.testing.assert_array_equal(acc.ret, [0.0, 6.0])
    np.testing.assert_array_equal(acc.length, [0, 2])
    with pytest.raises(ValueError, match="reward has shape"):
        accumulate_episodes(acc, np.zeros(3), np.zeros(2), np.zeros(2, bool))


def test_true_next_observations_pure():
    obs = np.array([[0.0, 0.0], [1.0, 1.0]])
    final = np.array([None, np.array([9.0, 9.0])], dtype=object)
    info = {"final_observation": final, "_final_observation": np.array([False, True])}
    next_obs = true_next_observations(obs, np.array([False, True]), info)
    np.testing.assert_array_equal(next_obs, [[0.0, 0.0], [9.0, 9.0]])
    assert next_obs.dtype == np.float32
    np.testing.assert_array_equal(obs[1], [1.0, 1.0])  # input untouched
    with pytest.raises(RuntimeError, match="no final_observation"):
        true_next_observations(obs, np.array([True, False]), info)


def test_clip_actions_pure():
    low, high = np.array([-1.0, 0.0], np.float32), np.array([1.0, 2.0], np.float32)
    out = clip_actions(np.array([[-5.0, 5.0], [0.5, 1.0]]), low, high)
    np.testing.assert_array_equal(out, [[-1.0, 2.0], [0.5, 1.0]])


def test_car_goal_vector_env_and_seeding():
    """The real task: shapes, dtypes, box, seeding determinism."""
    with SafetyGymVectorEnv("CarGoal1", num_envs=1, asynchronous=False) as env:
        assert (env.observation_size, env.action_size, env.episode_length) == (72, 2, 1000)
        np.testing.assert_array_equal(env.action_low, [-1.0, -1.0])
        np.testing.assert_array_equal(env.action_high, [1.0, 1.0])
        assert env.action_low.dtype == np.float32
        first = env.reset(seed=3)
        actions = np.random.default_rng(0).uniform(-2, 2, (10, 1, 2))
        traj = [env.step(a).obs for a in actions]
        again = env.reset(seed=3)
        traj_again = [env.step(a).obs for a in actions]
        other = env.reset(seed=4)
    assert first.shape == (1, 72) and first.dtype == np.float32
    np.testing.assert_array_equal(first, again)
    np.testing.assert_array_equal(np.stack(traj), np.stack(traj_again))
    assert not np.array_equal(first, other)


def test_constructor_rejects_bad_arguments():
    with pytest.raises(ValueError, match="num_envs"):
        SafetyGymVectorEnv("CarGoal1", num_envs=0)
    with pytest.raises(ValueError, match="unknown"):
        SafetyGymVectorEnv("CarGaol1")


def test_info_costs_read_ended_episodes_from_final_info():
    from cvpo_jax.envs.safety_gymnasium import cost_signals, info_costs

    # Env 1 ended this step: its top-level entries belong to the reset.
    info = {
        "cost_hazards": np.array([1.0, 0.0]),
        "_cost_hazards": np.array([True, True]),
        "cost_vases_contact": np.array([0.0, 0.0]),
        "_cost_vases_contact": np.array([True, True]),
        "cost_sum": np.array([1.0, 0.0]),
        "_cost_sum": np.array([True, True]),
        "final_info": np.array(
            [None, {"cost_hazards": 1.0, "cost_vases_contact": 1.0, "cost_sum": 2.0}]
        ),
    }
    assert cost_signals(info) == ["hazards", "sum", "vases_contact"]
    out = info_costs(info, ["vases_contact", "hazards"], np.array([False, True]))
    np.testing.assert_array_equal(out, [[0.0, 1.0], [1.0, 1.0]])
