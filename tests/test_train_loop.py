"""The host training loop on a scripted env: outputs, determinism, resume, NaN, Ctrl-C."""

import csv

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
    assert spec.algo == ALGO and spec.train == CFG and spec.env_id == "Scripted-v0"
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
