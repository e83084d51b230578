"""What the on-device loop stores equals a plain rollout of a real brax env.

Part of the host-vs-device learning comparison: if the loop stored a transition
wrongly (a next_obs from the reset episode, a flag on the wrong step, an action
other than the one stepped, envs interleaved wrongly), learning would differ from
the host loop's while every shape still matched. The plain rollout below follows
the loop's documented key discipline (per vector step: rng -> rng, k_act, k_rand,
k_env, k_learn; uniform actions before warm-up, the policy's after; actions
clipped to the box) one step at a time in Python, with none of the loop's code
but `select_action` and the env's own reset/step.

Hopper on the spring backend (the cheapest to compile), episode length 20, so
that episodes end within each chunk.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cvpo_jax import replay as replay_lib
from cvpo_jax.config import CVPOConfig, TrainConfig
from cvpo_jax.device_loop import make_device_trainer
from cvpo_jax.envs.brax_velocity import make_brax_velocity_env
from cvpo_jax.learner import select_action

NUM_ENVS = 2
VECTOR_STEPS = 60
ALGO = CVPOConfig(hidden_sizes=(16, 16), num_samples=4, dual_steps=2, episode_length=20)
CHUNK = NUM_ENVS * VECTOR_STEPS
# Two chunks: the first is warm-up (uniform actions), the second acts with the policy.
# Updates run only at the end of each chunk (update_every = warm-up = one chunk), after
# its last transition is stored, so within a chunk the policy is fixed.
CFG = TrainConfig(
    env="brax/HopperVelocity",
    total_steps=2 * CHUNK,
    num_envs=NUM_ENVS,
    warmup_steps=CHUNK,
    batch_size=64,
    buffer_size=1000,
    update_ratio=0.05,
    update_every=CHUNK,
    log_every=CHUNK,
    checkpoint_every=2 * CHUNK,
)
FIELDS = ("obs", "action", "reward", "cost", "next_obs", "terminated", "truncated")


def _plain_rollout(env, trainer, runner):
    """[T, N, ...] arrays of each field over one chunk from `runner`, one vector step
    at a time."""
    low = jnp.asarray(env.action_low, jnp.float32)
    high = jnp.asarray(env.action_high, jnp.float32)
    params = runner.train_state.policy_params
    act = jax.jit(lambda o, k: select_action(params, trainer.learner.networks, o, k))
    step = jax.jit(jax.vmap(env.step_autoreset))
    rng, state = runner.rng, runner.env_state
    out = {k: [] for k in FIELDS}
    for t in range(VECTOR_STEPS):
        rng, k_act, k_rand, k_env, _ = jax.random.split(rng, 5)
        policy = act(state.obs, k_act)
        if int(runner.env_steps) + t * NUM_ENVS < CFG.warmup_steps:
            action = jax.random.uniform(k_rand, policy.shape, jnp.float32, low, high)
        else:
            action = policy
        action = jnp.clip(action, low, high)
        nxt = step(state, action, jax.random.split(k_env, NUM_ENVS))
        for name, value in (
            ("obs", state.obs),
            ("action", action),
            ("reward", nxt.reward),
            ("cost", nxt.cost[:, None]),
            ("next_obs", nxt.next_obs),
            ("terminated", nxt.terminated),
            ("truncated", nxt.truncated),
        ):
            out[name].append(np.asarray(value))
        state = nxt
    return {k: np.stack(v) for k, v in out.items()}


@pytest.mark.slow
def test_stored_transitions_equal_a_plain_rollout_of_a_real_brax_env():
    env = make_brax_velocity_env("brax/HopperVelocity", backend="spring", episode_length=20)
    trainer = make_device_trainer(CFG, ALGO, env)
    run_chunk = jax.jit(trainer.run_chunk)
    runner0 = jax.jit(trainer.init)(jax.random.PRNGKey(3))
    runner1, log1 = run_chunk(runner0)
    runner2, log2 = run_chunk(runner1)
    assert int(log1.env_steps) == CHUNK and int(log2.env_steps) == 2 * CHUNK
    # One update chunk at the end of each chunk.
    assert int(log1.updates) == CFG.updates_per_chunk
    assert int(log2.updates) == 2 * CFG.updates_per_chunk
    params0, params1 = runner0.train_state.policy_params, runner1.train_state.policy_params
    assert not all(jax.tree.leaves(jax.tree.map(np.array_equal, params0, params1)))

    stored = replay_lib.filled_items(runner2.buffer_state)["items"]
    chunks = [_plain_rollout(env, trainer, runner0), _plain_rollout(env, trainer, runner1)]
    want = {k: np.concatenate([c[k] for c in chunks]) for k in FIELDS}
    # Episodes ended (by the time limit) in both envs, so autoreset boundaries are
    # covered; the terminated flag takes the same path (the env tests cover falls).
    assert np.all(want["truncated"].sum(axis=0) >= 2)
    for name in FIELDS:
        got = stored[name].reshape(want[name].shape)  # Items are added step-major.
        if name in ("terminated", "truncated"):
            np.testing.assert_array_equal(got, want[name], err_msg=name)
        else:
            # The loop runs inside one lax.scan, the rollout step by step: XLA may fuse
            # the physics differently, so allow float32 rounding, nothing more.
            np.testing.assert_allclose(got, want[name], rtol=1e-5, atol=1e-5, err_msg=name)

    # Independently of the rollout: within an episode next_obs is the next obs, and
    # at an episode end it is the final observation, not the reset one.
    done = np.maximum(want["terminated"], want["truncated"])[:-1] > 0
    nxt, following = want["next_obs"][:-1], want["obs"][1:]
    np.testing.assert_array_equal(nxt[~done], following[~done])
    assert not np.allclose(nxt[done], following[done])
    assert np.all(np.abs(want["action"]) <= 1.0)  # Hopper's box is [-1, 1].
