"""Replay of whole transitions, on flashbax's item buffer.

Each item is one complete `Transition` (obs, action, reward, cost, next_obs,
terminated, truncated), so a sample can never pair an observation with the first
observation of the next episode across an auto-reset.

The buffer's arrays have a leading axis of 1 (flashbax's add-batch axis) followed by
the capacity. `filled_items` / `restore_items` move the filled part to and from host
numpy arrays for checkpoints, so a checkpoint stores what was collected, not the
whole preallocated capacity.
"""

from __future__ import annotations

from typing import NamedTuple

import chex
import flashbax as fbx
import jax
import jax.numpy as jnp
import numpy as np

from cvpo_jax.types import Transition


class Replay(NamedTuple):
    """Pure functions over a flashbax buffer state.

    init() -> state; add(state, Transition[n]) -> state; sample(state, key) -> Transition[B];
    sample_many(state, key, u) -> Transition[U, B]; can_sample(state) -> bool.
    """

    buffer: fbx.item_buffer.TrajectoryBuffer
    example: Transition
    capacity: int
    batch_size: int

    def init(self):
        return self.buffer.init(self.example)

    def add(self, state, transitions: Transition):
        return self.buffer.add(state, transitions)

    def sample(self, state, key: chex.PRNGKey) -> Transition:
        return self.buffer.sample(state, key).experience

    def sample_many(self, state, key: chex.PRNGKey, num: int) -> Transition:
        """`num` independent batches, stacked: leaves [U, B, ...]."""
        keys = jax.random.split(key, num)
        return jax.vmap(self.sample, in_axes=(None, 0))(state, keys)

    def can_sample(self, state) -> chex.Array:
        return self.buffer.can_sample(state)


def example_transition(obs_size: int, action_size: int, num_constraints: int) -> Transition:
    """A single zero transition with the dtypes the buffer stores (all float32)."""
    f = jnp.float32
    return Transition(
        obs=jnp.zeros((obs_size,), f),
        action=jnp.zeros((action_size,), f),
        reward=jnp.zeros((), f),
        cost=jnp.zeros((num_constraints,), f),
        next_obs=jnp.zeros((obs_size,), f),
        terminated=jnp.zeros((), f),
        truncated=jnp.zeros((), f),
    )


def make_replay(
    capacity: int, batch_size: int, obs_size: int, action_size: int, num_constraints: int
) -> Replay:
    """A uniform replay of at most `capacity` transitions, sampling batches of B."""
    if capacity < batch_size:
        raise ValueError(f"buffer capacity={capacity} must be >= batch_size={batch_size}.")
    buffer = fbx.make_item_buffer(
        max_length=capacity,
        min_length=batch_size,
        sample_batch_size=batch_size,
        add_sequences=False,
        add_batches=True,
    )
    return Replay(
        buffer=buffer,
        example=example_transition(obs_size, action_size, num_constraints),
        capacity=capacity,
        batch_size=batch_size,
    )


def num_items(state) -> int:
    """How many transitions the buffer holds."""
    if bool(state.is_full):
        return int(state.experience.reward.shape[1])
    return int(state.current_index)


def filled_items(state) -> dict:
    """The filled part of the buffer as host arrays, plus the write position."""
    n = num_items(state)
    items = {k: np.asarray(v[0, :n]) for k, v in state.experience._asdict().items()}
    return {
        "items": items,
        "current_index": np.asarray(state.current_index),
        "is_full": np.asarray(state.is_full),
    }


def restore_items(replay: Replay, saved: dict):
    """A fresh buffer state holding the transitions saved by `filled_items`."""
    state = replay.init()
    items = saved["items"]
    n = len(items["reward"])
    if n > replay.capacity:
        raise ValueError(
            f"The checkpoint holds {n} transitions but buffer_size={replay.capacity}; "
            "resume with a buffer at least as large."
        )
    experience = Transition(
        **{k: getattr(state.experience, k).at[0, :n].set(jnp.asarray(items[k])) for k in items}
    )
    return state.replace(
        experience=experience,
        current_index=jnp.asarray(saved["current_index"], state.current_index.dtype),
        is_full=jnp.asarray(saved["is_full"], state.is_full.dtype),
    )
