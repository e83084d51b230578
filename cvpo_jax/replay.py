"""Replay of whole transitions, on flashbax's item buffer.

Each item is one complete `Transition` (obs, action, reward, cost, next_obs,
terminated, truncated), so a sample can never pair an observation with the first
observation of the next episode across an auto-reset.

With `n_step > 1` a sample is an n-step transition built at sample time from n
consecutive items of the same environment (see `nstep_transition`): the stored
data stays 1-step, so the choice of n can change without touching the buffer.
Items of one env are `stride` (= the number of envs) apart, because every add
appends whole vector steps in (step, env) order.

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
    n_step: int = 1
    stride: int = 1
    gamma: float = 0.99
    cost_gamma: float | None = None
    next_action: bool = False  # Samples carry the data's next action (see sample_nstep).

    def init(self):
        return self.buffer.init(self.example)

    def add(self, state, transitions: Transition):
        return self.buffer.add(state, transitions)

    def sample(self, state, key: chex.PRNGKey) -> Transition:
        if self.n_step == 1 and not self.next_action:
            return self.buffer.sample(state, key).experience
        return sample_nstep(
            state,
            key,
            self.batch_size,
            self.n_step,
            self.stride,
            self.gamma,
            self.cost_gamma,
            next_action=self.next_action,
        )

    def sample_many(self, state, key: chex.PRNGKey, num: int) -> Transition:
        """`num` independent batches, stacked: leaves [U, B, ...]."""
        keys = jax.random.split(key, num)
        return jax.vmap(self.sample, in_axes=(None, 0))(state, keys)

    def can_sample(self, state) -> chex.Array:
        return self.buffer.can_sample(state)

    def example_batch(self) -> Transition:
        """Zeros with the structure of one sampled batch [B, ...] (n-step and
        next-action fields included), for tracing updates before any data exists."""
        shapes = jax.eval_shape(lambda k: self.sample(self.init(), k), jax.random.PRNGKey(0))
        return jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), shapes)


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
    capacity: int,
    batch_size: int,
    obs_size: int,
    action_size: int,
    num_constraints: int,
    *,
    n_step: int = 1,
    stride: int = 1,
    gamma: float = 0.99,
    cost_gamma: float | None = None,
    next_action: bool = False,
) -> Replay:
    """A uniform replay of at most `capacity` transitions, sampling batches of B.

    With n_step > 1 samples are n-step transitions over items `stride` apart (the
    number of envs adding one vector step at a time) discounted by `gamma` (the cost
    by `cost_gamma` when given). With `next_action` they also carry the action the
    data took at the bootstrap observation (`sample_nstep`).
    """
    if capacity < batch_size:
        raise ValueError(f"buffer capacity={capacity} must be >= batch_size={batch_size}.")
    if not isinstance(n_step, int) or n_step < 1:
        raise ValueError(f"n_step={n_step!r} must be an integer >= 1.")
    if not isinstance(stride, int) or stride < 1:
        raise ValueError(f"stride={stride!r} must be an integer >= 1 (the number of envs).")
    if (n_step - 1 + int(next_action)) * stride >= capacity:
        raise ValueError(
            f"buffer capacity={capacity} is too small for n_step={n_step} with {stride} envs."
        )
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
        n_step=n_step,
        stride=stride,
        gamma=float(gamma),
        cost_gamma=None if cost_gamma is None else float(cost_gamma),
        next_action=bool(next_action),
    )


def nstep_transition(seq: Transition, gamma: float, cost_gamma: float | None = None) -> Transition:
    """Folds n consecutive transitions of one env into one n-step transition.

    Args:
      seq: leaves [B, n, ...]: steps t..t+n-1 of the same env, in order.
      gamma: discount.
      cost_gamma: the cost's discount (None: gamma); it sets the cost sum's weights
        and `cost_discount`.

    Returns:
      A Transition [B] with reward = sum_{j<m} gamma^j r_{t+j} (cost likewise, [B, M]),
      next_obs = the bootstrap observation after step t+m-1, terminated from that step,
      truncated = whether the window was cut by a time limit, and discount =
      gamma^m (1 - terminated): the factor of the bootstrap value. m <= n stops at
      the first step that ends its episode (terminated or truncated), so no step of
      one episode bootstraps into the next.
    """
    n = seq.reward.shape[1]
    done = jnp.maximum(seq.terminated, seq.truncated).astype(jnp.float32)  # [B, n]
    # alive[:, j] = 1 while no earlier step of the window ended its episode.
    alive = jnp.cumprod(jnp.concatenate([jnp.ones_like(done[:, :1]), 1.0 - done[:, :-1]], 1), 1)
    steps = jnp.arange(n, dtype=jnp.float32)
    weights = alive * gamma**steps  # [B, n]
    gamma_c = gamma if cost_gamma is None else cost_gamma
    cost_weights = alive * gamma_c**steps
    m = jnp.sum(alive, axis=1).astype(jnp.int32)  # [B], >= 1
    last = m - 1
    pick = lambda x: jnp.take_along_axis(  # noqa: E731
        x, last.reshape((-1,) + (1,) * (x.ndim - 1)), axis=1
    )[:, 0]
    terminated = pick(seq.terminated)
    alive_after = 1.0 - terminated.astype(jnp.float32)
    return Transition(
        obs=seq.obs[:, 0],
        action=seq.action[:, 0],
        reward=jnp.sum(weights * seq.reward, axis=1),
        cost=jnp.einsum("bn,bnm->bm", cost_weights, seq.cost),
        next_obs=pick(seq.next_obs),
        terminated=terminated,
        truncated=pick(seq.truncated),
        discount=(gamma ** m.astype(jnp.float32)) * alive_after,
        cost_discount=(gamma_c ** m.astype(jnp.float32)) * alive_after,
    )


def sample_nstep(
    state,
    key: chex.PRNGKey,
    batch_size: int,
    n_step: int,
    stride: int,
    gamma: float,
    cost_gamma: float | None = None,
    next_action: bool = False,
) -> Transition:
    """B uniform n-step transitions (see `nstep_transition`) from an item buffer state.

    A window starts at any item whose n-1 successors (`stride` apart) are already
    in the buffer, so the newest (n-1)*stride items only appear as successors.

    With `next_action` the window is one item longer: that item is the same env's
    step after the window, whose observation is the bootstrap observation when no
    step of the window ended its episode; its action is returned as `next_action`,
    with `has_next_action` = 1 exactly then (0 where the window reached a
    termination, a time limit or a resume cut, whose next item is another episode's).
    """
    experience = jax.tree.map(lambda x: x[0], state.experience)  # [capacity, ...]
    capacity = experience.reward.shape[0]
    size = jnp.where(state.is_full, capacity, state.current_index)
    head = jnp.where(state.is_full, state.current_index, 0)
    length = n_step + int(next_action)
    num_starts = jnp.maximum(size - (length - 1) * stride, 1)
    offsets = jax.random.randint(key, (batch_size,), 0, num_starts)
    steps = jnp.arange(length) * stride
    idx = (head + offsets[:, None] + steps[None, :]) % capacity  # [B, length]
    seq = jax.tree.map(lambda x: x[idx], experience)
    if not next_action:
        return nstep_transition(seq, gamma, cost_gamma)
    out = nstep_transition(jax.tree.map(lambda x: x[:, :n_step], seq), gamma, cost_gamma)
    done = jnp.maximum(seq.terminated[:, :n_step], seq.truncated[:, :n_step])
    return out._replace(
        next_action=seq.action[:, n_step],
        has_next_action=1.0 - jnp.max(done.astype(jnp.float32), axis=1),
    )


def num_items(state) -> int:
    """How many transitions the buffer holds."""
    if bool(state.is_full):
        return int(state.experience.reward.shape[1])
    return int(state.current_index)


def filled_items(state) -> dict:
    """The filled part of the buffer as host arrays, plus the write position."""
    n = num_items(state)
    items = {
        k: np.asarray(v[0, :n]) for k, v in state.experience._asdict().items() if v is not None
    }
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


def cut_last_steps(state, num_envs: int):
    """Marks the newest vector step (num_envs items) truncated: its episodes end there.

    Used when the envs restart from a reset (resuming a run), so that n-step windows
    stop at the last stored step instead of running into the next episode. A one-step
    target is unchanged: truncation still bootstraps from the stored next_obs.
    """
    capacity = state.experience.reward.shape[1]
    size = jnp.where(state.is_full, capacity, state.current_index)
    idx = (state.current_index - 1 - jnp.arange(num_envs)) % capacity
    valid = jnp.arange(num_envs) < size
    truncated = state.experience.truncated
    new = truncated.at[0, idx].set(jnp.where(valid, 1.0, truncated[0, idx]))
    return state.replace(experience=state.experience._replace(truncated=new))
