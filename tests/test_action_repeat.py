"""ActionRepeat: sums over the held steps against the inner env stepped by hand."""

import numpy as np
import pytest

from cvpo_jax.envs import action_repeat
from cvpo_jax.envs.action_repeat import ActionRepeat
from cvpo_jax.envs.custom import check_env
from cvpo_jax.envs.examples import HazardPoint


def _actions(n, seed=0):
    return np.random.default_rng(seed).uniform(-1, 1, size=(n, 2)).astype(np.float32)


def test_sums_reward_and_cost_over_the_held_steps_and_keeps_the_episode():
    k = 3
    wrapped, inner = ActionRepeat(HazardPoint(), k), HazardPoint()
    # 100 physical steps: 33 decisions of 3 and a last one of 1.
    assert wrapped.max_episode_steps == 34 and wrapped.spec is None
    obs_w, _ = wrapped.reset(seed=5)
    obs_i, _ = inner.reset(seed=5)
    np.testing.assert_array_equal(obs_w, obs_i)
    physical = decisions = 0
    for a in _actions(34):
        decisions += 1
        reward = cost = 0.0
        for _ in range(k):
            obs_i, r, c, term_i, trunc_i, _ = inner.step(a)
            reward, cost, physical = reward + r, cost + c, physical + 1
            if term_i or trunc_i:
                break
        obs_w, r_w, c_w, term_w, trunc_w, _ = wrapped.step(a)
        np.testing.assert_array_equal(obs_w, obs_i)
        assert r_w == pytest.approx(reward, abs=1e-12) and c_w == cost
        assert (term_w, trunc_w) == (term_i, trunc_i)
        if trunc_w:
            break
    assert decisions == 34 and physical == 100  # Truncated at the 34th decision, after step 100.
    assert check_env(ActionRepeat(HazardPoint(), 4), "x") == 25


def test_bad_repeat_is_rejected():
    for k in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match=r"action repeat k=.* must be an integer >= 1"):
            ActionRepeat(HazardPoint(), k)


@pytest.mark.slow
def test_safety_gymnasium_costs_and_info_costs_are_summed():
    wrapped = action_repeat.point_goal1_x4()
    from cvpo_jax.envs.nav_task import make_safety_gym_env

    inner = make_safety_gym_env("PointGoal1")
    assert wrapped.max_episode_steps == 250
    wrapped.reset(seed=1)
    inner.reset(seed=1)
    seen = 0.0
    for a in _actions(250, seed=2):
        want = {"reward": 0.0, "cost": 0.0, "cost_hazards": 0.0, "cost_sum": 0.0}
        for _ in range(4):
            _, r, c, _, _, info = inner.step(a)
            want["reward"] += r
            want["cost"] += c
            want["cost_hazards"] += info["cost_hazards"]
            want["cost_sum"] += info["cost_sum"]
        _, r_w, c_w, _, _, info_w = wrapped.step(a)
        assert r_w == pytest.approx(want["reward"], abs=1e-12)
        assert c_w == want["cost"]
        assert info_w["cost_hazards"] == want["cost_hazards"]
        assert info_w["cost_sum"] == want["cost_sum"]
        seen += c_w
    assert seen > 0  # The episode did pay costs, so the sums were exercised.
