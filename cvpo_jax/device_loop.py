"""The on-device loop: env steps, replay, updates, all inside `lax.scan`, for JAX envs.

    runner = init(rng)                       # one seed
    runner, log = run_chunk(runner)          # log_every env steps, entirely on device
    train = make_train(...)                  # init + every chunk: train(rng) -> (runner, logs)
    jax.jit(jax.vmap(train))(rngs)           # many seeds at once, each from its own key

A JAX environment here is any object with `observation_size`, `action_size`,
`action_low`, `action_high`, `episode_length`, `env_id`, and pure functions
`reset(key) -> state` and `step_autoreset(state, action, key) -> state`, where the
state has fields obs [O] (to act from), next_obs [O] (the true next observation of
the last transition, the final one where an episode ended), reward [], cost [],
terminated [], truncated [] (float32 0/1), and the ended episode's
final_return [], final_cost [], final_length [] (valid where done). Several
envs per seed are vmapped; they all step in lockstep.

The update cadence is the host loop's: every `update_every` env steps,
`updates_per_chunk` updates run back to back, once warm-up is over.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import chex
import flax.struct
import jax
import jax.numpy as jnp

from cvpo_jax import replay as replay_lib
from cvpo_jax.config import CVPOConfig, TrainConfig
from cvpo_jax.learner import Learner, make_learner, select_action, update_step
from cvpo_jax.types import TrainState, Transition


@jax.custom_batching.custom_vmap
def lockstep(x):
    """`x` itself; under vmap, the first member's value, unbatched.

    The seeds step in lockstep, so their counters agree; an unbatched predicate keeps
    `lax.cond` a real branch under `vmap` (a batched one turns it into `select`, which
    runs the updates on every vector step and throws most of them away).
    """
    return x


@lockstep.def_vmap
def _lockstep_vmap(axis_size, in_batched, x):
    (batched,) = in_batched
    return (x[0] if batched else x), False


@flax.struct.dataclass
class RunnerState:
    """Everything one seed carries between chunks (a pytree; vmap adds a seed axis)."""

    train_state: TrainState
    buffer_state: Any
    env_state: Any  # The vmapped env state: leaves [N, ...].
    rng: jax.Array
    env_steps: chex.Array  # int32 []
    updates: chex.Array  # int32 []


class ChunkLog(flax.struct.PyTreeNode):
    """What a chunk reports: env steps at its end, episode means, update-metric means."""

    env_steps: chex.Array
    updates: chex.Array
    episodes: chex.Array
    episode_return: chex.Array  # NaN when no episode ended in the chunk.
    episode_cost: chex.Array
    episode_length: chex.Array
    metrics: dict  # Means over the chunk's updates; NaN when none ran.


@dataclasses.dataclass(frozen=True)
class DeviceTrainer:
    """The pure functions of the on-device loop for one configuration (see module doc)."""

    cfg: TrainConfig
    algo: CVPOConfig
    env: Any
    learner: Learner
    replay: replay_lib.Replay

    @property
    def steps_per_chunk(self) -> int:
        """Vector steps per chunk: one chunk is one logging interval."""
        return self.cfg.log_every // self.cfg.num_envs

    @property
    def num_chunks(self) -> int:
        return self.cfg.total_steps // self.cfg.log_every

    def init(self, rng: chex.PRNGKey) -> RunnerState:
        k_learner, k_env, k_run = jax.random.split(rng, 3)
        env_keys = jax.random.split(k_env, self.cfg.num_envs)
        return RunnerState(
            train_state=self.learner.init(k_learner),
            buffer_state=self.replay.init(),
            env_state=jax.vmap(self.env.reset)(env_keys),
            rng=k_run,
            env_steps=jnp.zeros((), jnp.int32),
            updates=jnp.zeros((), jnp.int32),
        )

    def _metric_zeros(self, train_state: TrainState) -> dict:
        example = self.replay.example_batch()
        shapes = jax.eval_shape(
            lambda s, b: update_step(s, b, self.learner.networks, self.algo), train_state, example
        )[1]
        return {k: jnp.zeros(v.shape, jnp.float32) for k, v in shapes.items()}

    def _vector_step(self, carry, i):
        runner, sums, start = carry
        cfg, env = self.cfg, self.env
        rng, k_act, k_rand, k_env, k_learn = jax.random.split(runner.rng, 5)
        obs = runner.env_state.obs
        low = jnp.asarray(env.action_low, jnp.float32)
        high = jnp.asarray(env.action_high, jnp.float32)
        policy_action = select_action(
            runner.train_state.policy_params, self.learner.networks, obs, k_act
        )
        random_action = jax.random.uniform(k_rand, policy_action.shape, jnp.float32, low, high)
        action = jnp.where(runner.env_steps < cfg.warmup_steps, random_action, policy_action)
        action = jnp.clip(action, low, high)
        env_state = jax.vmap(env.step_autoreset)(
            runner.env_state, action, jax.random.split(k_env, cfg.num_envs)
        )
        transition = Transition(
            obs=obs,
            action=action,
            reward=env_state.reward,
            cost=env_state.cost[:, None],
            next_obs=env_state.next_obs,
            terminated=env_state.terminated,
            truncated=env_state.truncated,
        )
        buffer_state = self.replay.add(runner.buffer_state, transition)
        env_steps = runner.env_steps + cfg.num_envs

        # From the scan index and the chunk's (unbatched) start: a real branch under vmap.
        shared_steps = start + (i + 1) * cfg.num_envs
        do_update = (shared_steps % cfg.update_every == 0) & (shared_steps >= cfg.learning_starts)

        def learn(train_state):
            batches = self.replay.sample_many(buffer_state, k_learn, cfg.updates_per_chunk)
            train_state, metrics = jax.lax.scan(
                lambda s, b: update_step(s, b, self.learner.networks, self.algo),
                train_state,
                batches,
            )
            return train_state, jax.tree.map(lambda m: jnp.mean(m, axis=0), metrics)

        def skip(train_state):
            return train_state, self._metric_zeros(train_state)

        train_state, metrics = jax.lax.cond(do_update, learn, skip, runner.train_state)
        done = jnp.maximum(env_state.terminated, env_state.truncated)
        sums = {
            "episodes": sums["episodes"] + jnp.sum(done),
            "episode_return": sums["episode_return"] + jnp.sum(done * env_state.final_return),
            "episode_cost": sums["episode_cost"] + jnp.sum(done * env_state.final_cost),
            "episode_length": sums["episode_length"] + jnp.sum(done * env_state.final_length),
            "update_chunks": sums["update_chunks"] + do_update,
            "metrics": jax.tree.map(
                lambda s, m: s + jnp.where(do_update, m, 0.0), sums["metrics"], metrics
            ),
        }
        updates = runner.updates + jnp.where(do_update, cfg.updates_per_chunk, 0)
        runner = RunnerState(
            train_state=train_state,
            buffer_state=buffer_state,
            env_state=env_state,
            rng=rng,
            env_steps=env_steps,
            updates=updates.astype(jnp.int32),
        )
        return (runner, sums, start), None

    def run_chunk(self, runner: RunnerState) -> tuple[RunnerState, ChunkLog]:
        """`log_every` env steps (with their updates) in one lax.scan."""
        f32 = jnp.float32
        sums = {
            "episodes": jnp.zeros((), f32),
            "episode_return": jnp.zeros((), f32),
            "episode_cost": jnp.zeros((), f32),
            "episode_length": jnp.zeros((), f32),
            "update_chunks": jnp.zeros((), f32),
            "metrics": self._metric_zeros(runner.train_state),
        }
        start = lockstep(runner.env_steps)
        (runner, sums, _), _ = jax.lax.scan(
            self._vector_step,
            (runner, sums, start),
            jnp.arange(self.steps_per_chunk, dtype=jnp.int32),
        )

        def mean(total, count):
            return jnp.where(count > 0, total / jnp.maximum(count, 1.0), jnp.nan)

        log = ChunkLog(
            env_steps=runner.env_steps,
            updates=runner.updates,
            episodes=sums["episodes"],
            episode_return=mean(sums["episode_return"], sums["episodes"]),
            episode_cost=mean(sums["episode_cost"], sums["episodes"]),
            episode_length=mean(sums["episode_length"], sums["episodes"]),
            metrics=jax.tree.map(lambda m: mean(m, sums["update_chunks"]), sums["metrics"]),
        )
        return runner, log

    def make_train(self):
        """train(rng) -> (final runner, logs stacked over chunks): the whole run in one scan."""

        def train(rng):
            runner = self.init(rng)
            return jax.lax.scan(lambda r, _: self.run_chunk(r), runner, None, self.num_chunks)

        return train


def check_device_config(cfg: TrainConfig) -> None:
    """The on-device loop logs once per chunk of `log_every` env steps."""
    if cfg.log_every % cfg.num_envs:
        raise ValueError(
            f"TrainConfig.log_every={cfg.log_every} must be a multiple of num_envs={cfg.num_envs}."
        )
    if cfg.total_steps % cfg.log_every or cfg.checkpoint_every % cfg.log_every:
        raise ValueError(
            f"TrainConfig.total_steps={cfg.total_steps} and checkpoint_every="
            f"{cfg.checkpoint_every} must be multiples of log_every={cfg.log_every} "
            "(the on-device loop runs in chunks of log_every env steps)."
        )


def make_device_trainer(cfg: TrainConfig, algo: CVPOConfig, env) -> DeviceTrainer:
    """Builds the on-device loop's functions for a JAX env (see module docstring)."""
    check_device_config(cfg)
    if algo.num_constraints != 1:
        raise ValueError(f"cost_limit={algo.cost_limit}: these tasks have one cost signal.")
    if algo.cost_feedback_gain > 0:
        raise ValueError(
            f"cost_feedback_gain={algo.cost_feedback_gain}: the realised-cost feedback runs in "
            "the host loop only; use cost_feedback_gain=0 for on-device training."
        )
    if algo.constraint_form != "level":
        raise ValueError(
            f"constraint_form={algo.constraint_form!r}: the realised episode cost it needs is "
            "tracked in the host loop only; use constraint_form=level on device (or loop=host)."
        )
    if cfg.repeat != 1:
        raise ValueError(
            f"action_repeat={cfg.action_repeat}: action repeat runs in the host loop's "
            "Safety-Gymnasium and own envs only; use action_repeat=1 on device."
        )
    if algo.normalize_obs:
        raise ValueError(
            "normalize_obs=true: the observation statistics are taken from the warm-up data "
            "in the host loop only; use normalize_obs=false on device (or loop=host)."
        )
    if cfg.critic_pretrain_updates:
        raise ValueError(
            f"critic_pretrain_updates={cfg.critic_pretrain_updates}: critic pre-training runs "
            "in the host loop only; use 0 for on-device training."
        )
    learner = make_learner(algo, env.observation_size, env.action_low, env.action_high)
    replay = replay_lib.make_replay(
        cfg.buffer_size,
        cfg.batch_size,
        env.observation_size,
        env.action_size,
        1,
        n_step=algo.n_step,
        stride=cfg.num_envs,
        gamma=algo.gamma,
        cost_gamma=algo.gamma_cost,
        next_action=algo.cost_bootstrap == "data",
    )
    return DeviceTrainer(cfg=cfg, algo=algo, env=env, learner=learner, replay=replay)
