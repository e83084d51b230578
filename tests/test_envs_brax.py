"""Tests for the brax safe velocity tasks (cvpo_jax.envs.brax_velocity).

Fast tests only trace (jax.eval_shape): shapes, dtypes, weak types, retracing.
The physics tests share one compiled rollout of Hopper on the spring backend
(the cheapest to compile here), 4 envs x 40 steps with episode_length 20:
env 0 random actions, env 1 full forward, env 2 full backward (falls over
quickly), env 3 alternating. They are marked slow because of that compile.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cvpo_jax.envs.brax_velocity import (
    BRAX_VELOCITY_TASKS,
    UNAVAILABLE_TASKS,
    EnvState,
    make_brax_velocity_env,
    resolve_brax_name,
)

TEST_BACKEND = "spring"
EPISODE_LENGTH = 20
NUM_ENVS = 4
NUM_STEPS = 40

SCALAR_FIELDS = (
    "reward",
    "cost",
    "velocity",
    "terminated",
    "truncated",
    "episode_return",
    "episode_cost",
    "final_return",
    "final_cost",
)


@pytest.fixture(scope="module")
def hopper():
    return make_brax_velocity_env(
        "brax/HopperVelocity", backend=TEST_BACKEND, episode_length=EPISODE_LENGTH
    )


# --------------------------------------------------------------------------- names


def test_resolve_accepts_canonical_case_and_prefix():
    assert resolve_brax_name("AntVelocity") == "AntVelocity"
    assert resolve_brax_name("antvelocity") == "AntVelocity"
    assert resolve_brax_name("brax/HalfCheetahVelocity") == "HalfCheetahVelocity"
    assert resolve_brax_name(" BRAX/walker2dvelocity ") == "Walker2dVelocity"


def test_unknown_name_raises_with_suggestion_and_valid_names():
    with pytest.raises(ValueError, match=r"Did you mean 'brax/AntVelocity'") as info:
        resolve_brax_name("AntVelocty")
    for name in BRAX_VELOCITY_TASKS:
        assert f"brax/{name}" in str(info.value)
    with pytest.raises(ValueError, match="Did you mean 'brax/HalfCheetahVelocity'"):
        make_brax_velocity_env("brax/HalfCheetah")
    with pytest.raises(ValueError, match="unknown brax environment"):
        resolve_brax_name("CarGoal1")
    with pytest.raises(ValueError, match="non-empty"):
        resolve_brax_name("")


def test_unavailable_task_explains_why():
    assert "SwimmerVelocity" in UNAVAILABLE_TASKS
    with pytest.raises(ValueError, match="not available.*a_min"):
        resolve_brax_name("brax/SwimmerVelocity")


def test_make_rejects_bad_backend_and_episode_length():
    with pytest.raises(ValueError, match="backend"):
        make_brax_velocity_env("HopperVelocity", backend="bullet")
    with pytest.raises(ValueError, match="episode_length"):
        make_brax_velocity_env("HopperVelocity", backend=TEST_BACKEND, episode_length=0)


# ------------------------------------------------------- Safety-Gymnasium source


def _safe_velocity_dir() -> Path:
    spec = importlib.util.find_spec("safety_gymnasium")  # locates, does not import
    if spec is None or spec.origin is None:
        pytest.skip("safety_gymnasium is not installed")
    return Path(spec.origin).parent / "tasks" / "safe_velocity"


_SG_FILES = {
    "HalfCheetahVelocity": "half_cheetah",
    "AntVelocity": "ant",
    "HopperVelocity": "hopper",
    "Walker2dVelocity": "walker2d",
    "HumanoidVelocity": "humanoid",
}


@pytest.mark.parametrize("name", sorted(BRAX_VELOCITY_TASKS))
def test_threshold_and_velocity_match_safety_gymnasium_v1(name):
    spec = BRAX_VELOCITY_TASKS[name]
    folder = _safe_velocity_dir()
    v1 = (folder / f"safety_{_SG_FILES[name]}_velocity_v1.py").read_text()
    v0 = (folder / f"safety_{_SG_FILES[name]}_velocity_v0.py").read_text()
    threshold = re.findall(r"self\._velocity_threshold = ([0-9.]+)", v1)
    assert [float(t) for t in threshold] == [spec.velocity_threshold]
    # -v1 inherits step() from -v0 unless it defines its own.
    step_source = v1 if "def step" in v1 else v0
    if spec.velocity == "planar":
        assert "velocity = np.sqrt(x_velocity**2 + y_velocity**2)" in step_source
        assert "cost = float(velocity > self._velocity_threshold)" in step_source
    else:
        assert "cost = float(x_velocity > self._velocity_threshold)" in step_source
    assert spec.episode_length == 1000
    assert spec.safety_gym_id == f"Safety{name}-v1"


def test_swimmer_v1_uses_x_velocity_only():
    # Documents the definition an eventual brax Swimmer task must use.
    v1 = (_safe_velocity_dir() / "safety_swimmer_velocity_v1.py").read_text()
    assert "self._velocity_threshold = 0.2282" in v1
    assert "cost = float(x_velocity > self._velocity_threshold)" in v1


def test_velocity_metric_definitions():
    ant = make_brax_velocity_env("AntVelocity", backend=TEST_BACKEND)
    cheetah = make_brax_velocity_env("HalfCheetahVelocity", backend=TEST_BACKEND)
    metrics = {"x_velocity": jnp.float32(3.0), "y_velocity": jnp.float32(-4.0)}
    assert float(ant.velocity(metrics)) == pytest.approx(5.0)
    assert float(cheetah.velocity(metrics)) == pytest.approx(3.0)
    assert ant.velocity_threshold == 2.6222
    assert cheetah.velocity_threshold == 3.2096


# ------------------------------------------------------------ shapes (traced)


def _assert_env_state_spec(env, state, batch=()):
    assert state.obs.shape == batch + (env.observation_size,)
    assert state.next_obs.shape == batch + (env.observation_size,)
    assert state.obs.dtype == jnp.float32 and state.next_obs.dtype == jnp.float32
    for field in SCALAR_FIELDS:
        value = getattr(state, field)
        assert value.shape == batch and value.dtype == jnp.float32, field
    for field in ("steps", "final_length"):
        value = getattr(state, field)
        assert value.shape == batch and value.dtype == jnp.int32, field
    weak = [
        jax.tree_util.keystr(path)
        for path, leaf in jax.tree_util.tree_leaves_with_path(state)
        if leaf.weak_type
    ]
    assert not weak, f"weakly typed leaves: {weak}"


def test_reset_step_shapes_dtypes_and_no_weak_types(hopper):
    assert (hopper.observation_size, hopper.action_size) == (11, 3)
    assert hopper.action_low.dtype == np.float32 and hopper.action_low.shape == (3,)
    np.testing.assert_array_equal(hopper.action_low, -1.0)
    np.testing.assert_array_equal(hopper.action_high, 1.0)
    action = jnp.zeros(hopper.action_size)
    state = jax.eval_shape(hopper.reset, jax.random.PRNGKey(0))
    _assert_env_state_spec(hopper, state)
    stepped = jax.eval_shape(hopper.step, state, action)
    _assert_env_state_spec(hopper, stepped)
    auto = jax.eval_shape(hopper.step_autoreset, state, action, jax.random.PRNGKey(1))
    _assert_env_state_spec(hopper, auto)
    keys = jax.random.split(jax.random.PRNGKey(0), 5)
    batched = jax.eval_shape(jax.vmap(hopper.reset), keys)
    batched = jax.eval_shape(
        jax.vmap(hopper.step_autoreset), batched, jnp.zeros((5, hopper.action_size)), keys
    )
    _assert_env_state_spec(hopper, batched, batch=(5,))
    with pytest.raises(AssertionError):
        jax.eval_shape(hopper.step, state, jnp.zeros(hopper.action_size + 1))


def test_scan_carry_is_stable_and_does_not_retrace(hopper):
    traces = [0]

    def counted_step(state, action, key):
        traces[0] += 1
        return hopper.step_autoreset(state, action, key)

    @jax.jit
    def rollout(state, keys):
        def body(state, key):
            return counted_step(state, jnp.ones(hopper.action_size), key), None

        return jax.lax.scan(body, state, keys)[0]

    keys = jax.random.split(jax.random.PRNGKey(0), 3)
    state0 = jax.eval_shape(hopper.reset, jax.random.PRNGKey(0))
    state1 = jax.eval_shape(rollout, state0, keys)
    state2 = jax.eval_shape(rollout, state1, keys)
    jax.eval_shape(rollout, state2, keys)
    assert traces[0] == 1
    # Identical avals (shape, dtype, weak type) in and out: a jit cache hit.
    assert jax.tree.structure(state0) == jax.tree.structure(state1)
    assert jax.tree.leaves(state0) == jax.tree.leaves(state1)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(BRAX_VELOCITY_TASKS))
def test_every_task_traces_with_default_backend(name):
    env = make_brax_velocity_env(f"brax/{name}")
    assert env.backend == BRAX_VELOCITY_TASKS[name].backend
    assert env.episode_length == 1000
    state = jax.eval_shape(env.reset, jax.random.PRNGKey(0))
    state = jax.eval_shape(
        env.step_autoreset, state, jnp.zeros(env.action_size), jax.random.PRNGKey(1)
    )
    _assert_env_state_spec(env, state)


# ------------------------------------------------------ physics (one compile)


def _done(traj: EnvState) -> np.ndarray:
    return np.maximum(traj.terminated, traj.truncated)


@pytest.fixture(scope="module")
def rollout(hopper):
    """Runs the test rollout; returns numpy arrays (time-major [T, N])."""

    def run(reset_keys, step_keys, actions):
        state0 = jax.vmap(hopper.reset)(reset_keys)

        def body(state, xs):
            key, action = xs
            keys = jax.random.split(key, NUM_ENVS)
            x_before = state.brax_state.pipeline_state.x.pos[:, 0, 0]
            nxt = jax.vmap(hopper.step_autoreset)(state, action, keys)
            reset_obs = jax.vmap(hopper.reset)(keys).obs  # the same keys: same reset
            return nxt, (nxt, state.obs, state.steps, x_before, reset_obs)

        final, traj = jax.lax.scan(body, state0, (step_keys, actions))
        return state0, final, traj

    rng = np.random.default_rng(0)
    actions = np.zeros((NUM_STEPS, NUM_ENVS, hopper.action_size), np.float32)
    actions[:, 0] = rng.uniform(-1.0, 1.0, (NUM_STEPS, hopper.action_size))
    actions[:, 1] = 1.0
    actions[:, 2] = -1.0
    actions[:, 3] = np.array([1.0, -1.0, 1.0], np.float32)
    key_reset, key_steps = jax.random.split(jax.random.PRNGKey(42))
    args = (
        jax.random.split(key_reset, NUM_ENVS),
        jax.random.split(key_steps, NUM_STEPS),
        actions,
    )
    # Unoptimised machine code compiles ~2x faster; these runs are tiny.
    compiled = jax.jit(run).lower(*args).compile({"xla_backend_optimization_level": 0})
    state0, final, (traj, obs_before, steps_before, x_before, reset_obs) = compiled(*args)
    to_np = lambda tree: jax.tree.map(np.asarray, tree)
    return {
        "state0": to_np(state0),
        "final": to_np(final),
        "traj": to_np(traj),
        "obs_before": np.asarray(obs_before),
        "steps_before": np.asarray(steps_before),
        "x_before": np.asarray(x_before),
        "reset_obs": np.asarray(reset_obs),
        "dt": float(hopper.brax_env.dt),
    }


@pytest.mark.slow
def test_rollout_dtypes(rollout, hopper):
    traj: EnvState = rollout["traj"]
    assert traj.obs.shape == (NUM_STEPS, NUM_ENVS, hopper.observation_size)
    assert traj.obs.dtype == np.float32 and traj.reward.dtype == np.float32
    assert np.all(np.isfinite(traj.obs)) and np.all(np.isfinite(traj.reward))


@pytest.mark.slow
def test_cost_is_velocity_above_threshold(rollout, hopper):
    traj = rollout["traj"]
    threshold = np.float32(hopper.velocity_threshold)
    np.testing.assert_array_equal(traj.cost, (traj.velocity > threshold).astype(np.float32))
    # Both outcomes occur (env 1 runs forward fast, env 2 backwards).
    assert traj.cost.max() == 1.0 and traj.cost.min() == 0.0
    assert traj.cost[:, 1].sum() > 0 and traj.cost[:, 2].sum() == 0
    # The velocity read independently: torso x displacement over one control step,
    # where the next step starts from this step's result (no reset in between).
    x = rollout["x_before"]
    independent = (x[1:] - x[:-1]) / rollout["dt"]
    continuing = _done(traj)[:-1] == 0
    assert continuing.sum() > NUM_STEPS
    np.testing.assert_allclose(traj.velocity[:-1][continuing], independent[continuing], atol=1e-4)


@pytest.mark.slow
def test_time_limit_truncates_and_unhealthy_terminates(rollout):
    traj = rollout["traj"]
    assert set(np.unique(traj.terminated)) <= {0.0, 1.0}
    assert set(np.unique(traj.truncated)) <= {0.0, 1.0}
    assert np.all(traj.terminated * traj.truncated == 0)
    # Truncation exactly at episode_length steps, and only there.
    truncated = traj.truncated > 0
    assert truncated.any()
    assert np.all(traj.final_length[truncated] == EPISODE_LENGTH)
    at_limit = traj.final_length == EPISODE_LENGTH
    assert np.all(_done(traj)[at_limit] == 1)
    # Hopper falling backwards (env 2) terminates before the time limit.
    terminated = traj.terminated > 0
    assert terminated[:, 2].any()
    assert np.all(traj.final_length[terminated] < EPISODE_LENGTH)
    assert traj.final_length.max() <= EPISODE_LENGTH


@pytest.mark.slow
def test_autoreset_exposes_final_obs_and_starts_a_fresh_episode(rollout):
    traj = rollout["traj"]
    done = _done(traj) > 0
    assert done.sum() >= NUM_ENVS
    # Where an episode ended: obs is the reset obs for the step's key, next_obs the
    # final obs of the ended episode, and the episode counters restart.
    np.testing.assert_array_equal(traj.obs[done], rollout["reset_obs"][done])
    assert np.all(np.abs(traj.next_obs[done] - traj.obs[done]).max(axis=-1) > 1e-3)
    assert np.all(traj.steps[done] == 0)
    assert np.all(traj.episode_return[done] == 0) and np.all(traj.episode_cost[done] == 0)
    # Elsewhere obs is next_obs and the counters advance.
    np.testing.assert_array_equal(traj.obs[~done], traj.next_obs[~done])
    np.testing.assert_array_equal(traj.steps[~done], rollout["steps_before"][~done] + 1)
    # The next step acts from the obs returned here.
    np.testing.assert_array_equal(rollout["obs_before"][1:], traj.obs[:-1])
    # final_* report the whole finished episode.
    for env in range(NUM_ENVS):
        start = 0
        for t in np.flatnonzero(done[:, env]):
            assert traj.final_length[t, env] == t + 1 - start
            np.testing.assert_allclose(
                traj.final_return[t, env], traj.reward[start : t + 1, env].sum(), rtol=1e-5
            )
            np.testing.assert_allclose(traj.final_cost[t, env], traj.cost[start : t + 1, env].sum())
            start = t + 1


@pytest.mark.slow
def test_envs_and_episodes_start_from_different_states(rollout):
    first = rollout["state0"].obs
    assert first.shape == (NUM_ENVS, 11)
    assert np.all(np.abs(first[0] - first[1:]).max(axis=-1) > 0)
    # Auto-reset re-samples the initial state (it does not replay the first one).
    traj = rollout["traj"]
    resets = traj.obs[_done(traj)[:, 2] > 0, 2]
    assert len(resets) >= 2
    assert np.abs(resets[0] - first[2]).max() > 0
    assert np.abs(resets[0] - resets[1]).max() > 0
