"""A JAX env in the host loop (`JaxHostVectorEnv`, `loop=host`).

The scripted JAX env and the scripted host env define the same task (observation,
reward, cost, time limit, seed-independent resets), so the host loop must produce
the same run on either: that checks the adapter against an independent env.
"""

from __future__ import annotations

import csv

import numpy as np
import pytest
from scripted_env import ScriptedVectorEnv
from scripted_jax_env import ScriptedJaxEnv
from test_cli_train import run_train
from test_train_loop import ALGO, CFG  # The host loop tests' tiny settings.

from cvpo_jax import checkpoint as ckpt
from cvpo_jax.envs.jax_host import JaxHostVectorEnv
from cvpo_jax.evaluation import load_policy
from cvpo_jax.train_loop import train


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_adapter_steps_vmapped_envs_and_closes_episodes():
    env = JaxHostVectorEnv(ScriptedJaxEnv(episode_length=5), num_envs=3)
    assert (env.observation_size, env.action_size, env.episode_length) == (4, 2, 5)
    assert env.loop == "host" and env.env_id == "ScriptedJax-v0"
    with pytest.raises(RuntimeError, match="before reset"):
        env.step(np.zeros((3, 2), np.float32))
    obs = env.reset(seed=1)
    np.testing.assert_allclose(obs, np.tile([0.0, 0.0, 1.0, 1.0], (3, 1)), atol=1e-7)
    rng = np.random.default_rng(0)
    rewards, ends = [], []
    for t in range(12):
        actions = rng.uniform(-1, 1, (3, 2)).astype(np.float32)
        result = env.step(actions)
        rewards.append(-((actions[:, 0] - 0.3) ** 2))
        np.testing.assert_allclose(result.reward, rewards[-1], rtol=1e-6)
        np.testing.assert_array_equal(result.cost, (actions[:, 0] > 0.5).astype(np.float32))
        done = result.episode.done
        assert done.dtype == bool and not result.terminated.any()
        np.testing.assert_array_equal(done, np.full(3, (t + 1) % 5 == 0))
        if done.any():
            ends.append(t)
            # next_obs is the episode's last observation, obs the next episode's first.
            np.testing.assert_allclose(result.next_obs[:, 0], 1.0, atol=1e-7)
            np.testing.assert_allclose(result.obs[:, 0], 0.0, atol=1e-7)
            want = np.sum(rewards[-5:], axis=0)
            np.testing.assert_allclose(result.episode.episode_return, want, rtol=1e-5)
    assert ends == [4, 9]
    with pytest.raises(ValueError, match=r"actions have shape \(2, 2\), expected \(3, 2\)"):
        env.step(np.zeros((2, 2), np.float32))
    with pytest.raises(ValueError, match="num_envs"):
        JaxHostVectorEnv(ScriptedJaxEnv(), num_envs=0)


def test_host_loop_on_the_jax_twin_equals_the_host_twin(tmp_path):
    host = train(
        CFG,
        ALGO,
        tmp_path / "host",
        progress=False,
        env_factory=lambda c: ScriptedVectorEnv(num_envs=c.num_envs),
    )
    jax_env = train(
        CFG,
        ALGO,
        tmp_path / "jax",
        progress=False,
        env_factory=lambda c: JaxHostVectorEnv(ScriptedJaxEnv(), c.num_envs),
    )
    assert host.env_steps == jax_env.env_steps == 400 and host.updates == jax_env.updates
    a, b = _rows(tmp_path / "host" / "metrics.csv"), _rows(tmp_path / "jax" / "metrics.csv")
    assert len(a) == len(b) == 4
    compared = 0
    for ra, rb in zip(a, b, strict=True):
        for key in ("episodes", "episode_return", "episode_cost", "critic_loss_reward", "lambda"):
            if ra[key] == "":
                assert rb[key] == ""
                continue
            # sin/cos of the observation may round differently in numpy and XLA.
            np.testing.assert_allclose(float(rb[key]), float(ra[key]), rtol=1e-4, err_msg=key)
            compared += 1
    assert compared >= 15
    spec = ckpt.load_run_spec(tmp_path / "jax")
    assert spec.loop == "host" and ckpt.load_run_spec(tmp_path / "host").loop is None
    assert not spec.on_device
    _, params, _, step = load_policy(tmp_path / "jax")
    assert step == 400 and params is not None


@pytest.mark.slow
def test_cli_loop_host_trains_a_brax_task_and_resumes(tmp_path):
    run_dir = tmp_path / "run"
    common = [
        "env=brax/HopperVelocity",
        "loop=host",
        "backend=spring",
        "num_envs=2",
        "warmup_steps=200",
        "batch_size=64",
        "update_every=100",
        "log_every=200",
        "checkpoint_every=200",
        "algo.hidden_sizes=[16,16]",
        "algo.num_samples=4",
        "progress=false",
        f"run_dir={run_dir}",
    ]
    proc = run_train(*common, "total_steps=400", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "on the host" in proc.stderr and "os.fork()" not in proc.stderr
    spec = ckpt.load_run_spec(run_dir)
    assert (spec.loop, spec.backend, spec.env_id) == ("host", "spring", "brax/HopperVelocity")
    proc = run_train(f"run_dir={run_dir}", "resume=true", "total_steps=600", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    rows = _rows(run_dir / "metrics.csv")
    assert [int(r["env_steps"]) for r in rows] == [200, 400, 600]
    assert np.isfinite(float(rows[-1]["critic_loss_reward"]))
    assert ckpt.checkpoint_steps(run_dir) == [400, 600]
