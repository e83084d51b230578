"""Policy evaluation inside a JAX env (``mjx/...``, ``brax/...``): every episode at once.

The host evaluation (`evaluation.evaluate_policy`) steps a Safety-Gymnasium env one
action at a time. Here E episodes run side by side: the env is vmapped over E reset
keys and stepped for its episode length in one `lax.scan`, with the policy's action
computed on device. The env's own episode bookkeeping (`final_return`,
`final_cost`, `final_length` at the step that ends an episode) gives each episode's
numbers; steps after an episode's end (auto-reset into the next) are ignored.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from cvpo_jax.evaluation import EvalResult, check_episodes_and_seed, check_policy_fits
from cvpo_jax.learner import Learner


def evaluate_jax_policy(
    learner: Learner,
    policy_params,
    env,
    episodes: int,
    seed: int,
    deterministic: bool = True,
    env_id: str | None = None,
) -> EvalResult:
    """Runs ``episodes`` episodes of the policy in the JAX env ``env``, all at once.

    Episode i starts from ``env.reset(fold_in(PRNGKey(seed), i))``; a stochastic
    policy's noise at step t of episode i uses ``fold_in(fold_in(key, i), t)``.
    Actions are clipped to the env's box, as in the host evaluation.

    Args:
      learner, policy_params: the policy (e.g. from `evaluation.load_policy`).
      env: a JAX env with ``reset(key)``, ``step_autoreset(state, action, key)``,
        ``episode_length``, ``action_low``/``action_high`` and the episode fields
        (``terminated``, ``truncated``, ``final_return``, ``final_cost``,
        ``final_length``).
      episodes: E >= 1; seed >= 0.
      env_id: the id recorded in the result (default: ``env.env_id``).

    Returns:
      An EvalResult with returns, costs and lengths [E]; ``complete`` is False for an
      episode that did not end within ``env.episode_length`` steps.
    """
    check_episodes_and_seed(episodes, seed)
    low = jnp.asarray(env.action_low, jnp.float32)
    high = jnp.asarray(env.action_high, jnp.float32)
    check_policy_fits(learner, env_id or env.env_id, (int(env.observation_size),), low.shape)
    returns, costs, lengths, ended = _rollout(
        learner, policy_params, env, episodes, seed, bool(deterministic), low, high
    )
    return EvalResult(
        env_id=env_id or env.env_id,
        seed=seed,
        deterministic=bool(deterministic),
        returns=np.asarray(returns, np.float64),
        costs=np.asarray(costs, np.float64),
        lengths=np.asarray(lengths, np.int64),
        complete=np.asarray(ended, bool),
    )


def _rollout(learner, policy_params, env, episodes, seed, deterministic, low, high):
    """(returns, costs, lengths, ended) [E] of the first episode of each of E envs."""
    key = jax.random.PRNGKey(seed)
    keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(episodes))

    def one_episode(episode_key):
        reset_key, act_key, env_key = jax.random.split(episode_key, 3)
        state = env.reset(reset_key)

        def step(carry, t):
            state, record, ended = carry
            action = learner.act(
                policy_params, state.obs[None], jax.random.fold_in(act_key, t), deterministic
            )[0]
            action = jnp.clip(action, low, high)
            state = env.step_autoreset(state, action, jax.random.fold_in(env_key, t))
            done = jnp.maximum(state.terminated, state.truncated) > 0
            first = done & ~ended
            now = jnp.stack([state.final_return, state.final_cost, state.final_length])
            record = jnp.where(first, now, record)
            return (state, record, ended | done), None

        init = (state, jnp.zeros(3, jnp.float32), jnp.zeros((), bool))
        steps = jnp.arange(int(env.episode_length))
        (_, record, ended), _ = jax.lax.scan(step, init, steps)
        return record[0], record[1], record[2], ended

    return jax.jit(jax.vmap(one_episode))(keys)
