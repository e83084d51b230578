"""A tiny pure-JAX scripted environment with the interface of the on-device loop.

The JAX twin of scripted_env.ScriptedVectorEnv (one env; the loop vmaps it):
observation [t / T, sin t, cos t, 1], reward -(a0 - 0.3)^2, cost 1 when a0 > 0.5,
truncated (never terminated) after T steps; reset ignores its key.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np


@flax.struct.dataclass
class ScriptedState:
    t: jax.Array
    obs: jax.Array
    next_obs: jax.Array
    reward: jax.Array
    cost: jax.Array
    terminated: jax.Array
    truncated: jax.Array
    running_return: jax.Array
    running_cost: jax.Array
    final_return: jax.Array
    final_cost: jax.Array
    final_length: jax.Array


class ScriptedJaxEnv:
    env_id = "ScriptedJax-v0"
    observation_size = 4
    action_size = 2
    action_low = np.full(2, -1.0, np.float32)
    action_high = np.full(2, 1.0, np.float32)

    def __init__(self, episode_length: int = 10):
        self.episode_length = episode_length

    def _obs(self, t):
        t = t.astype(jnp.float32)
        return jnp.stack([t / self.episode_length, jnp.sin(t), jnp.cos(t), jnp.ones_like(t)])

    def reset(self, key):
        del key
        z = jnp.zeros((), jnp.float32)
        t = jnp.zeros((), jnp.int32)
        return ScriptedState(t, self._obs(t), self._obs(t), z, z, z, z, z, z, z, z, z)

    def step_autoreset(self, state, action, key):
        del key
        reward = -jnp.square(action[0] - 0.3)
        cost = (action[0] > 0.5).astype(jnp.float32)
        t = state.t + 1
        truncated = (t >= self.episode_length).astype(jnp.float32)
        running_return = state.running_return + reward
        running_cost = state.running_cost + cost
        done = truncated > 0
        return ScriptedState(
            t=jnp.where(done, 0, t),
            obs=self._obs(jnp.where(done, 0, t)),
            next_obs=self._obs(t),
            reward=reward,
            cost=cost,
            terminated=jnp.zeros((), jnp.float32),
            truncated=truncated,
            running_return=jnp.where(done, 0.0, running_return),
            running_cost=jnp.where(done, 0.0, running_cost),
            final_return=running_return,
            final_cost=running_cost,
            final_length=t.astype(jnp.float32),
        )
