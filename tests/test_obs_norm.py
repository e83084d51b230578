"""normalize_obs: the warm-up statistics, their use in every network call, and that
they stay fixed through updates, checkpoints and evaluation."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_train_loop import ALGO, CFG, read_csv, restore_state, run

from cvpo_jax import checkpoint as ckpt
from cvpo_jax import evaluation
from cvpo_jax.config import CVPOConfig, TrainConfig
from cvpo_jax.device_loop import make_device_trainer
from cvpo_jax.learner import make_learner, with_obs_statistics
from cvpo_jax.networks import OBS_CLIP, OBS_NORM, OBS_VAR_FLOOR, obs_statistics
from cvpo_jax.train_loop import train
from cvpo_jax.types import Transition

OBS, ACT = 5, 2
NORM_ALGO = CVPOConfig(
    hidden_sizes=(16, 16), num_samples=4, dual_steps=3, mstep_steps=2, normalize_obs=True
)


def _learner(cfg=NORM_ALGO):
    return make_learner(cfg, OBS, -np.ones(ACT), np.ones(ACT))


def _stats(seed=0):
    rng = np.random.default_rng(seed)
    return {
        "mean": rng.normal(size=OBS).astype(np.float32),
        "std": rng.uniform(0.1, 3.0, size=OBS).astype(np.float32),
    }


def _standardised(obs, stats):
    """Independent float64 computation of the networks' input."""
    z = (np.asarray(obs, np.float64) - stats["mean"].astype(np.float64)) / stats["std"].astype(
        np.float64
    )
    return np.clip(z, -OBS_CLIP, OBS_CLIP)


def _batch(rng, b=32, m=1):
    f = lambda *s: jnp.asarray(rng.normal(size=s), jnp.float32)  # noqa: E731
    return Transition(
        obs=f(b, OBS) * 5 + 2,
        action=jnp.clip(f(b, ACT), -1, 1),
        reward=f(b),
        cost=jnp.abs(f(b, m)),
        next_obs=f(b, OBS) * 5 + 2,
        terminated=jnp.zeros((b,)),
        truncated=jnp.zeros((b,)),
    )


def test_obs_statistics_against_numpy():
    rng = np.random.default_rng(1)
    obs = rng.normal(size=(200, 4)) * [1.0, 9.0, 0.0, 0.3] + [0.0, -2.0, 9.81, 0.5]
    stats = obs_statistics(obs)
    var = ((obs - obs.mean(0)) ** 2).sum(0) / len(obs)
    np.testing.assert_allclose(stats["mean"], obs.mean(0), rtol=1e-6)
    np.testing.assert_allclose(stats["std"], np.sqrt(var + OBS_VAR_FLOOR), rtol=1e-6)
    # A constant feature (index 2) gets the floor, not a zero std.
    assert stats["std"][2] == pytest.approx(np.sqrt(OBS_VAR_FLOOR))
    assert stats["mean"].dtype == np.float32 and stats["std"].dtype == np.float32
    with pytest.raises(ValueError, match=r"\[N >= 2, O\]; got shape \(1, 4\)"):
        obs_statistics(obs[:1])


def test_networks_see_standardised_observations():
    learner = _learner()
    nets = learner.networks
    stats = _stats()
    state = with_obs_statistics(learner.init(jax.random.PRNGKey(0)), stats)
    rng = np.random.default_rng(2)
    obs = rng.normal(size=(6, OBS)).astype(np.float32) * 4
    obs[0, 0] = stats["mean"][0] + 50 * stats["std"][0]  # Beyond the clip.
    z = jnp.asarray(_standardised(obs, stats), jnp.float32)
    assert float(np.abs(z).max()) == OBS_CLIP

    mean, tril = nets.policy_apply(state.policy_params, obs)
    want_mean, want_tril = nets.policy.apply({"params": state.policy_params["params"]}, z)
    np.testing.assert_allclose(mean, want_mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(tril, want_tril, rtol=1e-5, atol=1e-6)

    actions = jnp.asarray(rng.uniform(-1, 1, size=(6, 3, ACT)), jnp.float32)
    got = nets.critic_values(state.critic_params, obs, actions)  # [N, B, K] path
    want = nets.critic.apply({"params": state.critic_params["params"]}, z, actions)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    got_one = nets.critic_values(state.critic_params, obs, actions[:, 0])  # [N, B] path
    np.testing.assert_allclose(got_one, want[..., 0], rtol=1e-5, atol=1e-5)

    # act: the deterministic action is the mean at the standardised observation.
    act = learner.act(state.policy_params, obs, jax.random.PRNGKey(0), deterministic=True)
    np.testing.assert_allclose(act, want_mean, rtol=1e-5, atol=1e-6)


def test_default_runs_carry_no_statistics():
    learner = _learner(dataclasses.replace(NORM_ALGO, normalize_obs=False))
    state = learner.init(jax.random.PRNGKey(0))
    assert set(state.policy_params) == {"params"} and set(state.critic_params) == {"params"}
    with pytest.raises(ValueError, match="normalize_obs=false"):
        with_obs_statistics(state, _stats())


def test_bad_statistics_are_rejected():
    state = _learner().init(jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match=r"'mean' has shape \(4,\); expected \(5,\)"):
        with_obs_statistics(state, {"mean": np.zeros(4), "std": np.ones(OBS)})
    with pytest.raises(ValueError, match="'std' must be > 0"):
        with_obs_statistics(state, {"mean": np.zeros(OBS), "std": np.zeros(OBS)})


def test_updates_leave_the_statistics_exactly_as_set():
    learner = _learner()
    stats = _stats(3)
    state = with_obs_statistics(learner.init(jax.random.PRNGKey(0)), stats)
    before = jax.tree.map(np.asarray, state.policy_params["params"])
    rng = np.random.default_rng(4)
    for _ in range(5):
        state, _ = learner.update(state, _batch(rng))
    for name in ("policy_params", "target_policy_params", "critic_params", "target_critic_params"):
        held = getattr(state, name)[OBS_NORM]
        np.testing.assert_array_equal(held["mean"], stats["mean"], err_msg=name)
        np.testing.assert_array_equal(held["std"], stats["std"], err_msg=name)
    moved = jax.tree.map(
        lambda a, b: not np.array_equal(a, b), before, state.policy_params["params"]
    )
    assert any(jax.tree.leaves(moved))  # The parameters themselves did learn.


def test_the_device_loop_refuses_normalize_obs():
    with pytest.raises(ValueError, match="normalize_obs=true: .* host loop only"):
        make_device_trainer(TrainConfig(env="x", log_every=2000), NORM_ALGO, env=None)


def test_the_train_loop_takes_the_warm_up_statistics_and_resume_keeps_them(tmp_path, monkeypatch):
    monkeypatch.setattr("test_train_loop.ALGO", dataclasses.replace(ALGO, normalize_obs=True))
    run(tmp_path, "full")
    _, state, _ = restore_state(tmp_path / "full")
    spec = ckpt.load_run_spec(tmp_path / "full")
    learner = make_learner(spec.algo, spec.obs_size, spec.action_low, spec.action_high)
    _, _, saved, _ = ckpt.restore_checkpoint(tmp_path / "full", learner.init(jax.random.PRNGKey(0)))
    warmup_obs = saved["items"]["obs"][: CFG.learning_starts]
    want = obs_statistics(warmup_obs)
    for name in ("policy_params", "target_policy_params", "critic_params", "target_critic_params"):
        np.testing.assert_array_equal(getattr(state, name)[OBS_NORM]["mean"], want["mean"])
        np.testing.assert_array_equal(getattr(state, name)[OBS_NORM]["std"], want["std"])

    # Stopped at 200 and resumed: the same statistics and the same metrics.
    run(tmp_path, "split", cfg=dataclasses.replace(CFG, total_steps=200))
    run(tmp_path, "split", resume=True)
    _, resumed, _ = restore_state(tmp_path / "split")
    np.testing.assert_array_equal(resumed.policy_params[OBS_NORM]["std"], want["std"])
    full_rows, split_rows = (
        read_csv(tmp_path / "full" / "metrics.csv"),
        read_csv(tmp_path / "split" / "metrics.csv"),
    )
    assert [r["episode_return"] for r in full_rows] == [r["episode_return"] for r in split_rows]


@pytest.mark.slow
def test_a_safety_gymnasium_run_standardises_and_evaluates_with_its_statistics(tmp_path):
    cfg = TrainConfig(
        env="PointGoal1",
        total_steps=300,
        num_envs=1,
        async_envs=False,
        warmup_steps=200,
        batch_size=32,
        buffer_size=1000,
        update_ratio=0.1,
        update_every=50,
        action_repeat=1,
        log_every=100,
        checkpoint_every=300,
    )
    algo = dataclasses.replace(NORM_ALGO, cost_limit=(25.0,))
    train(cfg, algo, tmp_path / "run", progress=False, episode_length_from_env=True)
    learner, policy_params, spec, step = evaluation.load_policy(tmp_path / "run")
    assert step == 300 and spec.obs_size == 60
    stats = jax.tree.map(np.asarray, policy_params[OBS_NORM])
    # The accelerometer's vertical axis reads gravity, constant: its std is the floor.
    assert stats["std"].min() == pytest.approx(np.sqrt(OBS_VAR_FLOOR), rel=1e-3)
    assert stats["std"].max() > 1.0  # The horizontal accelerometer varies by far the most.
    obs = np.random.default_rng(0).normal(size=(3, 60)).astype(np.float32)
    act = learner.act(policy_params, obs, jax.random.PRNGKey(0), deterministic=True)
    z = jnp.asarray(_standardised(obs, stats), jnp.float32)
    want, _ = learner.networks.policy.apply({"params": policy_params["params"]}, z)
    np.testing.assert_allclose(act, want, rtol=1e-5, atol=1e-6)
    result = evaluation.evaluate_policy(learner, policy_params, spec.env_id, episodes=1, seed=0)
    assert len(result.costs) == 1
