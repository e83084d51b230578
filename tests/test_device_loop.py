"""The on-device loop on a scripted JAX env: seeds, compilation, sharding, learning."""

import csv
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from scripted_jax_env import ScriptedJaxEnv

from cvpo_jax.config import CVPOConfig, TrainConfig
from cvpo_jax.device_loop import make_device_trainer

ROOT = Path(__file__).resolve().parents[1]
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
    env="ScriptedJax-v0",
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


@pytest.fixture(scope="module")
def trainer():
    return make_device_trainer(CFG, ALGO, ScriptedJaxEnv())


def test_chunk_counts_steps_episodes_and_updates(trainer):
    runner = jax.jit(trainer.init)(jax.random.PRNGKey(0))
    run_chunk = jax.jit(trainer.run_chunk)
    logs = []
    for _ in range(4):
        runner, log = run_chunk(runner)
        logs.append(jax.device_get(log))
    assert [int(log.env_steps) for log in logs] == [100, 200, 300, 400]
    # Updates every 50 env steps from 150 on, 5 per chunk: 0, 10, 20, 30.
    assert [int(log.updates) for log in logs] == [0, 10, 20, 30]
    assert int(runner.train_state.step) == 30
    # 2 envs x 10-step episodes: 10 episodes per 100 env steps, each 10 long.
    assert all(float(log.episodes) == 10 and float(log.episode_length) == 10 for log in logs)
    assert np.isnan(logs[0].metrics["eta"]) and np.isfinite(logs[-1].metrics["eta"])
    assert int(runner.buffer_state.current_index) == 400


def test_run_chunk_compiles_once(monkeypatch):
    env = ScriptedJaxEnv()
    traces = []
    original = env.step_autoreset

    def counting(*args):
        traces.append(1)
        return original(*args)

    monkeypatch.setattr(env, "step_autoreset", counting)
    trainer = make_device_trainer(CFG, ALGO, env)
    runner = jax.jit(trainer.init)(jax.random.PRNGKey(0))
    run_chunk = jax.jit(trainer.run_chunk)
    for _ in range(3):
        runner, _ = run_chunk(runner)
    assert len(traces) == 1


def test_vmapped_seeds_have_their_own_keys_and_differ(trainer):
    keys = jax.random.split(jax.random.PRNGKey(0), 3)
    runners = jax.jit(jax.vmap(trainer.init))(keys)
    first_layer = runners.train_state.policy_params["params"]["Dense_0"]["kernel"]
    assert not np.allclose(first_layer[0], first_layer[1])  # No shared initialisation.
    runners, logs = jax.jit(jax.vmap(trainer.run_chunk))(runners)
    returns = np.asarray(logs.episode_return)
    assert len(set(np.round(returns, 5))) == 3
    # Each vmapped seed equals the same seed run alone.
    single, log0 = jax.jit(trainer.run_chunk)(jax.jit(trainer.init)(keys[1]))
    np.testing.assert_allclose(float(log0.episode_return), returns[1], rtol=1e-5)


@pytest.mark.slow
def test_short_on_device_training_improves_return_within_the_cost_limit():
    # gamma 0.9 suits the 10-step episodes: with 0.99 the bootstrap at the time limit
    # reads the critic at the final observation (t = T), a state never acted from, and
    # that extrapolation dominates a 100-step horizon.
    cfg = TrainConfig(
        env="ScriptedJax-v0",
        total_steps=4000,
        num_envs=4,
        warmup_steps=400,
        batch_size=64,
        buffer_size=10_000,
        update_ratio=0.25,
        update_every=40,
        log_every=400,
        checkpoint_every=4000,
    )
    algo = ALGO.replace(
        hidden_sizes=(32, 32),
        num_samples=16,
        dual_steps=10,
        mstep_steps=3,
        tau=0.05,
        kl_mean_eps=0.01,
        kl_cov_eps=0.005,
        gamma=0.9,
    )
    trainer = make_device_trainer(cfg, algo, ScriptedJaxEnv())
    _, logs = jax.jit(trainer.make_train())(jax.random.PRNGKey(0))
    returns = np.asarray(logs.episode_return)
    costs = np.asarray(logs.episode_cost)
    # Random actions: return about -4.3 and cost about 2.5 per 10-step episode (above 2).
    assert returns[0] < -3.0 and costs[0] > 2.0
    assert returns[-1] > -0.5, returns
    assert costs[-1] <= 2.0, costs


def _read(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


SHARDING_SCRIPT = """
import sys, jax
sys.path.insert(0, {tests!r})
from scripted_jax_env import ScriptedJaxEnv
from test_device_loop import ALGO, CFG
from cvpo_jax.device_train import train_on_device
assert len(jax.devices()) == 4, jax.devices()
devices = jax.devices() if sys.argv[2] == "all" else jax.devices()[:1]
r = train_on_device(CFG, ALGO, ScriptedJaxEnv(), sys.argv[1], num_seeds=4, progress=False,
                    devices=devices)
assert r.status == "completed" and r.env_steps == 400
"""


@pytest.mark.slow
def test_sharded_over_4_devices_equals_one_device(tmp_path):
    script = tmp_path / "shard.py"
    script.write_text(SHARDING_SCRIPT.format(tests=str(ROOT / "tests")))
    env = {
        **os.environ,
        "XLA_FLAGS": os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4",
        "PYTHONPATH": str(ROOT),
    }
    for name, devices in (("sharded", "all"), ("single", "one")):
        proc = subprocess.run(
            [sys.executable, str(script), str(tmp_path / name), devices],
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
    for seed in range(4):
        a = _read(tmp_path / "sharded" / f"seed{seed}" / "metrics.csv")
        b = _read(tmp_path / "single" / f"seed{seed}" / "metrics.csv")
        assert len(a) == len(b) == 4
        for ra, rb in zip(a, b, strict=True):
            for key in ra:
                if key in ("wall_time", "steps_per_s") or ra[key] == "":
                    continue
                # atol: float32 rounding of near-zero values (e.g. the dual objective
                # ~1e-3) differs with the XLA program's fusion across device layouts;
                # rtol 1e-4: ratios to small bounds (kl / eps_cov, eps_cov 5e-4)
                # magnify that rounding (2.9e-5 relative measured).
                np.testing.assert_allclose(
                    float(ra[key]),
                    float(rb[key]),
                    rtol=1e-4,
                    atol=1e-6,
                    err_msg=f"seed {seed} {key}",
                )
    # The seeds differ from each other.
    finals = [
        _read(tmp_path / "sharded" / f"seed{s}" / "metrics.csv")[-1]["episode_return"]
        for s in range(4)
    ]
    assert len(set(finals)) == 4


@pytest.mark.slow
def test_train_on_device_checkpoints_resume_and_policy_loading(tmp_path):
    from cvpo_jax import checkpoint as ckpt
    from cvpo_jax.device_train import load_device_policy, train_on_device

    half = TrainConfig(**{**CFG.__dict__, "total_steps": 200})
    result = train_on_device(
        half, ALGO, ScriptedJaxEnv(), tmp_path / "run", num_seeds=2, progress=False
    )
    assert result.status == "completed" and result.env_steps == 200
    result = train_on_device(
        CFG, ALGO, ScriptedJaxEnv(), tmp_path / "run", num_seeds=2, progress=False, resume=True
    )
    assert result.env_steps == 400 and result.updates == 30
    assert ckpt.latest_step(tmp_path / "run") == 400
    rows = _read(tmp_path / "run" / "seed1" / "metrics.csv")
    assert [int(r["env_steps"]) for r in rows] == [100, 200, 300, 400]
    learner, p0, step = load_device_policy(tmp_path / "run", ScriptedJaxEnv(), seed_index=0)
    _, p1, _ = load_device_policy(tmp_path / "run", ScriptedJaxEnv(), seed_index=1)
    assert step == 400
    k0 = p0["params"]["Dense_0"]["kernel"]
    assert k0.shape == (4, 16) and not np.allclose(k0, p1["params"]["Dense_0"]["kernel"])
    obs = np.zeros((3, 4), np.float32)
    action = learner.act(p0, obs, jax.random.PRNGKey(0), deterministic=True)
    assert action.shape == (3, 2) and np.all(np.abs(np.asarray(action)) <= 1)
    with pytest.raises(ValueError, match="seed_index=2"):
        load_device_policy(tmp_path / "run", ScriptedJaxEnv(), seed_index=2)
    # The evaluation's loader gives the same seed's policy (what experiments.evaluate
    # rolls out on the Safety-Gymnasium counterpart of an mjx/ run).
    from cvpo_jax.evaluation import load_policy, policy_count

    assert policy_count(tmp_path / "run", 400) == 2
    _, q1, spec, q_step = load_policy(tmp_path / "run", seed_index=1, jax_env=ScriptedJaxEnv())
    assert q_step == 400 and spec.env_id == "ScriptedJax-v0"
    np.testing.assert_array_equal(
        q1["params"]["Dense_0"]["kernel"], p1["params"]["Dense_0"]["kernel"]
    )
    # action_repeat=null is stored as the on-device loop's 1.
    assert CFG.action_repeat is None and spec.train.action_repeat == 1


def test_updates_stay_a_real_branch_when_seeds_are_vmapped(trainer):
    # A batched predicate would turn the update's lax.cond into a select that runs the
    # updates on every vector step; the seeds' shared step counter keeps it a branch.
    runners = jax.vmap(trainer.init)(jax.random.split(jax.random.PRNGKey(0), 2))
    jaxpr = str(jax.make_jaxpr(jax.vmap(trainer.run_chunk))(runners))
    assert "cond[" in jaxpr


@pytest.mark.parametrize(
    "algo, match",
    [
        (ALGO.replace(cost_feedback_gain=0.01), "cost_feedback_gain=0.01.*host loop only"),
        (ALGO.replace(constraint_form="advantage"), "constraint_form='advantage'.*host loop"),
        (ALGO.replace(constraint_form="lagrangian"), "constraint_form='lagrangian'.*host loop"),
    ],
)
def test_host_only_constraint_options_fail_early_on_device(algo, match):
    with pytest.raises(ValueError, match=match):
        make_device_trainer(CFG, algo, ScriptedJaxEnv())
