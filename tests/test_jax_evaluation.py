"""Evaluation inside a JAX env against the same episodes stepped one by one in Python."""

import jax
import numpy as np
import pytest
from scripted_jax_env import ScriptedJaxEnv

from cvpo_jax.config import CVPOConfig
from cvpo_jax.jax_evaluation import evaluate_jax_policy
from cvpo_jax.learner import make_learner

ALGO = CVPOConfig(hidden_sizes=(8,), num_samples=4, dual_steps=2)


@pytest.fixture(scope="module")
def policy():
    env = ScriptedJaxEnv(episode_length=7)
    learner = make_learner(ALGO, env.observation_size, env.action_low, env.action_high)
    params = learner.init(jax.random.PRNGKey(3)).policy_params
    return env, learner, params


def _by_hand(env, learner, params, episodes, seed):
    """Each episode stepped in Python with the same keys and clipping."""
    key = jax.random.PRNGKey(seed)
    out = []
    for i in range(episodes):
        reset_key, act_key, env_key = jax.random.split(jax.random.fold_in(key, i), 3)
        state, total, cost = env.reset(reset_key), 0.0, 0.0
        for t in range(env.episode_length):
            action = learner.act(params, state.obs[None], jax.random.fold_in(act_key, t), False)
            action = np.clip(np.asarray(action)[0], env.action_low, env.action_high)
            state = env.step_autoreset(state, action, jax.random.fold_in(env_key, t))
            total, cost = total + float(state.reward), cost + float(state.cost)
            if float(state.truncated) or float(state.terminated):
                out.append((total, cost, t + 1))
                break
    return np.asarray(out)


def test_episodes_match_a_step_by_step_rollout(policy):
    env, learner, params = policy
    result = evaluate_jax_policy(learner, params, env, episodes=3, seed=5, deterministic=False)
    expected = _by_hand(env, learner, params, 3, 5)
    np.testing.assert_allclose(result.returns, expected[:, 0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(result.costs, expected[:, 1])
    np.testing.assert_array_equal(result.lengths, expected[:, 2])
    assert result.complete.all() and result.env_id == "ScriptedJax-v0"
    # Stochastic episodes differ from one another; the mean action does not vary.
    assert len(set(np.round(result.returns, 6))) > 1
    det = evaluate_jax_policy(learner, params, env, episodes=2, seed=0, env_id="x")
    assert det.returns[0] == pytest.approx(det.returns[1]) and det.env_id == "x"


def test_sizes_and_arguments_are_checked(policy):
    env, learner, params = policy
    other = make_learner(ALGO, 5, env.action_low, env.action_high)
    with pytest.raises(ValueError, match=r"observations of shape \(4,\); the policy takes \(5,\)"):
        evaluate_jax_policy(other, other.init(jax.random.PRNGKey(0)).policy_params, env, 1, 0)
    with pytest.raises(ValueError, match="episodes=0"):
        evaluate_jax_policy(learner, params, env, 0, 0)
