"""A JAX environment stepped from the host loop, behind the host vector-env interface.

The on-device loop and the host loop should learn alike on the same task; this
adapter lets the host loop (`train_loop.train`, `loop=host` on the command line)
run the very env the on-device loop runs, so that a difference between the loops
can be told from a difference between MuJoCo and brax physics.

N copies of the JAX env are vmapped and stepped with `step_autoreset` in one
jitted call per vector step; the env keys come from the reset seed (split once per
vector step), so a seed gives the same episodes every time.
"""

from __future__ import annotations

import jax
import numpy as np

from cvpo_jax.envs.safety_gymnasium import StepResult, accumulate_episodes, init_episode_accumulator


class JaxHostVectorEnv:
    """N vmapped copies of a JAX env (the on-device loop's interface, see
    `device_loop`) with the `SafetyGymVectorEnv` interface: reset(seed) -> obs [N, O];
    step(actions [N, A]) -> StepResult."""

    loop = "host"  # Recorded in run.json: resume and policy loading take the host path.

    def __init__(self, env, num_envs: int):
        if isinstance(num_envs, bool) or not isinstance(num_envs, int) or num_envs < 1:
            raise ValueError(f"num_envs={num_envs!r} must be an integer >= 1.")
        self.env = env
        self.num_envs = num_envs
        self.env_id = env.env_id
        self.backend = getattr(env, "backend", None)
        self.observation_size = int(env.observation_size)
        self.action_size = int(env.action_size)
        self.action_low = np.asarray(env.action_low, np.float32)
        self.action_high = np.asarray(env.action_high, np.float32)
        self.episode_length = int(env.episode_length)
        self._reset = jax.jit(jax.vmap(env.reset))
        self._step = jax.jit(_vector_step(env, num_envs))
        self._state = None
        self._key = None
        self._acc = None

    def reset(self, seed: int | None = None) -> np.ndarray:
        key = jax.random.PRNGKey(0 if seed is None else seed)
        key, k_reset = jax.random.split(key)
        self._key = key
        self._state = self._reset(jax.random.split(k_reset, self.num_envs))
        self._acc = init_episode_accumulator(self.num_envs)
        return np.asarray(self._state.obs)

    def step(self, actions: np.ndarray) -> StepResult:
        if self._state is None:
            raise RuntimeError("JaxHostVectorEnv.step before reset.")
        actions = np.asarray(actions, np.float32)
        if actions.shape != (self.num_envs, self.action_size):
            raise ValueError(
                f"actions have shape {actions.shape}, expected {(self.num_envs, self.action_size)}."
            )
        self._key, self._state = self._step(self._key, self._state, actions)
        st = self._state
        # Only what the loop needs comes to the host, not the whole physics state.
        obs, next_obs, reward, cost, terminated, truncated = jax.device_get(
            (st.obs, st.next_obs, st.reward, st.cost, st.terminated, st.truncated)
        )
        reward = np.asarray(reward, np.float32)
        cost = np.asarray(cost, np.float32)
        terminated = np.asarray(terminated) > 0
        truncated = np.asarray(truncated) > 0
        self._acc, episode = accumulate_episodes(self._acc, reward, cost, terminated | truncated)
        return StepResult(
            obs=np.asarray(obs),
            next_obs=np.asarray(next_obs),
            reward=reward,
            cost=cost,
            terminated=terminated,
            truncated=truncated,
            episode=episode,
        )

    def close(self) -> None:
        self._state = None


def _vector_step(env, num_envs: int):
    def step(key, state, actions):
        key, k_env = jax.random.split(key)
        return key, jax.vmap(env.step_autoreset)(state, actions, jax.random.split(k_env, num_envs))

    return step
