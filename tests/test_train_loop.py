"""The host training loop on a scripted env: outputs, determinism, resume, NaN, Ctrl-C."""

import csv
import dataclasses
import os
import signal

import chex
import jax
import numpy as np
import pytest
from scripted_env import ScriptedVectorEnv

from cvpo_jax import checkpoint as ckpt
from cvpo_jax.config import CVPOConfig, TrainConfig
from cvpo_jax.learner import make_learner
from cvpo_jax.train_loop import TrainingDiverged, train

ALGO = CVPOConfig(
    hidden_sizes=(16, 16),
    num_samples=4,
    dual_steps=3,
    mstep_steps=1,
    num_reward_critics=1,
    num_cost_critics=1,
    cost_limit=(2.0,),
    episode_length=10,
)
CFG = TrainConfig(
    env="Scripted-v0",
    total_steps=400,
    num_envs=2,
    warmup_steps=150,
    batch_size=32,
    buffer_size=1000,
    update_ratio=0.1,
    update_every=50,
    log_every=100,
    checkpoint_every=200,
)


def run(tmp_path, name, cfg=CFG, resume=False, **env_kwargs):
    env = ScriptedVectorEnv(num_envs=cfg.num_envs, **env_kwargs)
    result = train(
        cfg, ALGO, tmp_path / name, resume=resume, progress=False, env_factory=lambda _: env
    )
    return result, env


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def restore_state(run_dir):
    spec = ckpt.load_run_spec(run_dir)
    learner = make_learner(spec.algo, spec.obs_size, spec.action_low, spec.action_high)
    step, state, _, loop = ckpt.restore_checkpoint(
        run_dir, learner.init(jax.random.PRNGKey(0)), with_replay=False
    )
    return step, state, loop


def test_training_writes_metrics_tensorboard_checkpoints(tmp_path):
    result, env = run(tmp_path, "a")
    assert result.status == "completed" and result.env_steps == 400
    # Updates start after warm-up: chunks ending at 150, 200, ..., 400, 5 updates each.
    assert result.updates == 6 * 5
    assert env.closed
    rows = read_csv(tmp_path / "a" / "metrics.csv")
    assert [int(r["env_steps"]) for r in rows] == [100, 200, 300, 400]
    # 2 envs x 10-step episodes: 10 episodes end per 100 env steps.
    assert all(int(r["episodes"]) == 10 for r in rows)
    assert all(float(r["episode_length"]) == 10 for r in rows)
    assert rows[0]["lambda"] == "" and rows[-1]["lambda"] != ""  # No updates in warm-up.
    for key in ("eta", "critic_loss_reward", "kl_mean_ratio", "qc_ratio", "episode_cost"):
        assert np.isfinite(float(rows[-1][key])), key
    assert list((tmp_path / "a" / "tb").glob("events.out.tfevents.*"))
    assert sorted(p.name for p in (tmp_path / "a" / "checkpoints").iterdir()) == ["200", "400"]
    spec = ckpt.load_run_spec(tmp_path / "a")
    # action_repeat=null is stored as the repeat the env has (1).
    assert spec.train == dataclasses.replace(CFG, action_repeat=1)
    assert spec.algo == ALGO and spec.env_id == "Scripted-v0"
    step, state, loop = restore_state(tmp_path / "a")
    assert step == 400 and int(state.step) == 30 and loop["updates"] == 30


def test_same_seed_same_run(tmp_path):
    run(tmp_path, "a")
    run(tmp_path, "b")
    _, s_a, _ = restore_state(tmp_path / "a")
    _, s_b, _ = restore_state(tmp_path / "b")
    chex.assert_trees_all_equal(s_a, s_b)
    rows_a = read_csv(tmp_path / "a" / "metrics.csv")
    rows_b = read_csv(tmp_path / "b" / "metrics.csv")
    for ra, rb in zip(rows_a, rows_b, strict=True):
        for k in ra:
            if k not in ("wall_time", "steps_per_s"):
                assert ra[k] == rb[k], k


def test_resume_continues_and_equals_an_uninterrupted_run(tmp_path):
    run(tmp_path, "full")
    half = CFG.__class__(**{**CFG.__dict__, "total_steps": 200})
    first, _ = run(tmp_path, "resumed", cfg=half)
    assert first.env_steps == 200
    second, env = run(tmp_path, "resumed", resume=True)
    assert second.env_steps == 400 and second.updates == 30
    _, s_full, _ = restore_state(tmp_path / "full")
    _, s_res, _ = restore_state(tmp_path / "resumed")
    # The scripted env resets identically, so resuming at an episode boundary must
    # reproduce the uninterrupted run exactly: keys, replay, optimiser states.
    chex.assert_trees_all_equal(s_full, s_res)
    rows = read_csv(tmp_path / "resumed" / "metrics.csv")
    assert [int(r["env_steps"]) for r in rows] == [100, 200, 300, 400]  # No duplicates.
    assert ckpt.load_run_spec(tmp_path / "resumed").train.total_steps == 400


def test_nan_stops_training_and_keeps_the_last_good_checkpoint(tmp_path):
    with pytest.raises(TrainingDiverged, match="critic_loss_reward"):
        run(tmp_path, "nan", nan_after=250)
    step, state, _ = restore_state(tmp_path / "nan")
    assert step == 200
    assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(state))


def test_ctrl_c_saves_and_resume_finishes(tmp_path):
    result, env = run(tmp_path, "int", sigint_after=260)
    assert result.status == "interrupted"
    # The chunk in progress (250-300) is dropped: the checkpoint holds whole chunks.
    assert result.env_steps == 250
    assert ckpt.latest_step(tmp_path / "int") == 250
    assert env.closed
    resumed, _ = run(tmp_path, "int", resume=True)
    assert resumed.status == "completed" and resumed.env_steps == 400


def test_sigterm_asks_the_loop_to_stop_as_ctrl_c_does():
    """`kill` sends SIGTERM: inside the loop it sets the same stop flag as Ctrl-C (the
    loop then saves and closes, as the test above shows for SIGINT); outside, the
    previous handlers are back."""
    from cvpo_jax.train_loop import _StopFlag

    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    flag = _StopFlag()
    with flag.installed():
        assert signal.getsignal(signal.SIGTERM) is flag
        os.kill(os.getpid(), signal.SIGTERM)
        assert flag.requested
        with pytest.raises(KeyboardInterrupt):  # a second one interrupts at once
            os.kill(os.getpid(), signal.SIGTERM)
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before


def test_refuses_to_overwrite_or_resume_a_non_run(tmp_path):
    run(tmp_path, "a", cfg=CFG.__class__(**{**CFG.__dict__, "total_steps": 100}))
    with pytest.raises(ValueError, match="already holds a run"):
        run(tmp_path, "a")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ckpt.NotARunError, match="not a cvpo-jax run"):
        run(tmp_path, "empty", resume=True)
    assert list((tmp_path / "empty").iterdir()) == []


def test_resume_rejects_a_changed_algorithm(tmp_path):
    run(tmp_path, "a", cfg=CFG.__class__(**{**CFG.__dict__, "total_steps": 100}))
    env = ScriptedVectorEnv(num_envs=2)
    with pytest.raises(ValueError, match="algorithm configuration"):
        train(
            CFG,
            ALGO.replace(tau=0.1),
            tmp_path / "a",
            resume=True,
            progress=False,
            env_factory=lambda _: env,
        )


def _train_with(tmp_path, name, algo=ALGO, cfg=CFG):
    env = ScriptedVectorEnv(num_envs=cfg.num_envs)
    return train(cfg, algo, tmp_path / name, progress=False, env_factory=lambda _: env)


def test_calibration_columns_are_logged_for_finished_episodes(tmp_path):
    """The scripted env's 10-step episodes end with a time limit; with gamma 0.5 the
    tail horizon is 7 steps, so 3 steps of every episode are compared."""
    algo = ALGO.replace(gamma=0.5)
    result = _train_with(tmp_path, "calib", algo)
    rows = read_csv(result.run_dir / "metrics.csv")
    for key in ("calib_qr_bias", "calib_qr_mc", "calib_qc_bias", "calib_qc_mc"):
        assert all(r[key] != "" for r in rows), key
    # MC cost-to-go is a discounted sum of 0/1 costs: within [0, 1 / (1 - gamma)].
    assert all(0.0 <= float(r["calib_qc_mc"]) <= 2.0 for r in rows)


def test_n_step_and_constraint_knobs_train_end_to_end(tmp_path):
    algo = ALGO.replace(n_step=3, lambda_max_log_step=0.1, cost_feedback_gain=0.05)
    result = _train_with(tmp_path, "nstep", algo)
    rows = read_csv(result.run_dir / "metrics.csv")
    assert result.status == "completed"
    # The scripted policy pays cost ~50% of steps early on (limit 2 per 10 steps):
    # the feedback must have moved the threshold away from its converted value.
    thresholds = [float(r["qc_threshold"]) for r in rows if r["qc_threshold"]]
    assert thresholds and not np.allclose(thresholds, algo.qc_threshold[0])
    for key in ("lambda_at_upper", "lambda_at_lower", "estep_feasible", "qc_reachable"):
        assert all(r[key] != "" for r in rows if r["updates"] != "0"), key


class _CostRecorder(ScriptedVectorEnv):
    """The scripted env, keeping every finished episode's cost in order."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.finished_costs = []

    def step(self, actions):
        result = super().step(actions)
        done, cost = result.episode[0], result.episode[2]
        self.finished_costs.extend(np.asarray(cost)[np.flatnonzero(done)].tolist())
        return result


def test_advantage_form_tracks_the_realised_episode_cost(tmp_path):
    """The state after training holds the running mean of every finished episode's
    cost, fed in the order the episodes ended (checked against the env's own record)."""
    from cvpo_jax.constraint import realised_cost_update

    algo = ALGO.replace(constraint_form="advantage", realised_cost_episodes=5)
    env = _CostRecorder(num_envs=CFG.num_envs)
    result = train(CFG, algo, tmp_path / "adv", progress=False, env_factory=lambda _: env)
    assert result.status == "completed"
    _, state, _ = restore_state(result.run_dir)
    costs = np.asarray(env.finished_costs).reshape(-1, 1)
    assert len(costs) == CFG.total_steps // 10  # 10-step episodes
    expected, count = realised_cost_update(np.zeros(1), 0.0, costs, algo)
    assert float(state.estep_duals.realised_episodes) == count
    np.testing.assert_allclose(state.estep_duals.realised_cost, expected, rtol=1e-5)
    rows = read_csv(result.run_dir / "metrics.csv")
    assert all(r["qc_threshold"] != "" for r in rows if r["updates"] != "0")


@pytest.mark.parametrize(("scale", "signal"), [("linear", "episode"), ("log", "mean")])
def test_lagrangian_form_moves_lambda_with_every_finished_episode(tmp_path, scale, signal):
    """lambda after training is the Lagrangian update over every finished episode's
    cost (or the running mean after it) in the order they ended, from lambda_init
    (the updates leave it alone)."""
    from cvpo_jax.constraint import lagrangian_update, realised_cost_trace

    algo = ALGO.replace(
        constraint_form="lagrangian",
        lagrangian_lr=0.02,
        lagrangian_scale=scale,
        lagrangian_signal=signal,
    )
    env = _CostRecorder(num_envs=CFG.num_envs)
    result = train(CFG, algo, tmp_path / "lag", progress=False, env_factory=lambda _: env)
    assert result.status == "completed" and result.updates > 0
    _, state, _ = restore_state(result.run_dir)
    costs = np.asarray(env.finished_costs).reshape(-1, 1)
    means = realised_cost_trace(np.zeros(1), 0.0, costs, algo)
    expected = lagrangian_update(np.log([algo.lambda_init]), costs, algo, means)
    assert abs(float(expected[0])) > 1e-3  # the episodes moved it
    np.testing.assert_allclose(state.estep_duals.log_lambda, expected, rtol=1e-5, atol=1e-6)


def test_critic_pretraining_moves_only_the_critics(tmp_path):
    cfg = dataclasses.replace(CFG, total_steps=150, critic_pretrain_updates=40)
    algo = ALGO
    result = _train_with(tmp_path, "pre", algo, cfg)
    # total_steps = warm-up + one chunk: the state holds the pre-training and one chunk
    # of CVPO updates; compare with a run without pre-training.
    _, pre, _ = restore_state(result.run_dir)
    plain = _train_with(
        tmp_path, "plain", algo, dataclasses.replace(cfg, critic_pretrain_updates=0)
    )
    _, base, _ = restore_state(plain.run_dir)
    assert not jax.tree.all(
        jax.tree.map(lambda a, b: bool(np.allclose(a, b)), pre.critic_params, base.critic_params)
    )
    assert result.updates == plain.updates  # Pre-training updates are not CVPO updates.


def test_critic_update_step_leaves_the_policy_alone():
    from cvpo_jax.learner import critic_update_step
    from cvpo_jax.replay import example_transition

    learner = make_learner(ALGO, 4, [-1.0, -1.0], [1.0, 1.0])
    state = learner.init(jax.random.PRNGKey(0))
    ex = example_transition(4, 2, 1)
    rng = np.random.default_rng(0)
    batch = jax.tree.map(lambda x: jax.numpy.asarray(rng.normal(size=(32, *x.shape)), x.dtype), ex)
    batch = batch._replace(terminated=batch.terminated * 0, truncated=batch.truncated * 0)
    step = jax.jit(lambda s, b: critic_update_step(s, b, learner.networks, ALGO))
    losses = []
    for _ in range(60):
        state, aux = step(state, batch)
        losses.append(float(aux["critic_loss_reward"]))
    fresh = learner.init(jax.random.PRNGKey(0))
    chex.assert_trees_all_equal(state.policy_params, fresh.policy_params)
    chex.assert_trees_all_equal(state.estep_duals.log_lambda, fresh.estep_duals.log_lambda)
    assert losses[-1] < 0.75 * losses[0]  # Fits the (random) targets.


def test_n_step_run_resumes_and_matches_an_uninterrupted_run(tmp_path):
    """The scripted env's episodes end at the checkpoint (10-step episodes, checkpoint at
    200), so cutting the n-step windows there on resume changes nothing: the resumed
    run's state equals the uninterrupted one's."""
    algo = ALGO.replace(n_step=3)
    env = ScriptedVectorEnv(num_envs=2)
    full = train(CFG, algo, tmp_path / "full", progress=False, env_factory=lambda _: env)
    half_cfg = dataclasses.replace(CFG, total_steps=200)
    env = ScriptedVectorEnv(num_envs=2)
    train(half_cfg, algo, tmp_path / "split", progress=False, env_factory=lambda _: env)
    env = ScriptedVectorEnv(num_envs=2)
    resumed = train(
        CFG, algo, tmp_path / "split", resume=True, progress=False, env_factory=lambda _: env
    )
    assert resumed.env_steps == full.env_steps and resumed.updates == full.updates
    _, a, _ = restore_state(full.run_dir)
    _, b, _ = restore_state(resumed.run_dir)
    chex.assert_trees_all_close(a.policy_params, b.policy_params, rtol=1e-5, atol=1e-6)
