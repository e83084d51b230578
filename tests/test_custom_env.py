"""Your own environment (`env=package.module:factory`): the protocol check names
what is wrong, and the example env trains and evaluates from the command line."""

import csv
import json

import gymnasium as gym
import numpy as np
import pytest
from test_cli_train import TINY_ALGO, run_module, run_train

from cvpo_jax.envs import custom
from cvpo_jax.envs.examples import HazardPoint, hazard_point
from cvpo_jax.envs.registry import resolve_env_id

EXAMPLE = "cvpo_jax.envs.examples:hazard_point"


class FiveTuple(HazardPoint):
    def step(self, action):
        obs, reward, _, terminated, truncated, info = super().step(action)
        return obs, reward, terminated, truncated, info


class WrongShape(HazardPoint):
    def step(self, action):
        obs, *rest = super().step(action)
        return (obs[:3], *rest)


class NegativeCost(HazardPoint):
    def step(self, action):
        obs, reward, _, *rest = super().step(action)
        return (obs, reward, -1.0, *rest)


class NoTimeLimit(HazardPoint):
    max_episode_steps = None


class DiscreteActions(HazardPoint):
    def __init__(self):
        super().__init__()
        self.action_space = gym.spaces.Discrete(3)


@pytest.mark.parametrize(
    "env_cls, message",
    [
        (FiveTuple, "got a 5-tuple \\(gymnasium's 5-tuple: the cost is missing\\)"),
        (WrongShape, "step's observation has shape \\(3,\\); observation_space says \\(4,\\)"),
        (NegativeCost, "cost must be >= 0"),
        (NoTimeLimit, "needs a time limit"),
        (DiscreteActions, "action_space must be a flat gymnasium Box"),
    ],
)
def test_check_env_names_what_is_wrong(env_cls, message):
    with pytest.raises(ValueError, match=message):
        custom.check_env(env_cls(), "my.module:factory")


def test_the_example_follows_the_protocol():
    assert custom.check_env(hazard_point(), EXAMPLE) == 100
    env = hazard_point()
    env.reset(seed=0)
    costs = [env.step(np.array([-1.0, 0.0]))[2] for _ in range(10)]
    assert sum(costs) > 0  # Driving straight at the goal crosses the hazard.


@pytest.mark.parametrize(
    "name, message",
    [
        ("no_colon_but:", "given as 'package.module:factory'"),
        ("no.such.module:f", "cannot import module 'no.such.module'"),
        ("cvpo_jax.envs.examples:nothing", "has no callable 'nothing'"),
    ],
)
def test_bad_factory_references_fail_at_resolution(name, message):
    with pytest.raises(ValueError, match=message):
        resolve_env_id(name)


def test_vector_env_of_the_example():
    env = custom.make_custom_vector_env(EXAMPLE, 2)
    try:
        assert env.env_id == EXAMPLE and env.episode_length == 100
        assert env.observation_size == 4 and env.action_size == 2
        obs = env.reset(seed=0)
        assert obs.shape == (2, 4)
        out = env.step(np.zeros((2, 2), np.float32))
        assert out.cost.shape == (2,)
    finally:
        env.close()


@pytest.mark.slow
def test_train_and_evaluate_the_example_from_the_command_line(tmp_path):
    run_dir = tmp_path / "run"
    proc = run_train(
        f"env={EXAMPLE}",
        "total_steps=600",
        "warmup_steps=320",
        "log_every=200",
        "checkpoint_every=600",
        "progress=false",
        f"run_dir={run_dir}",
        *TINY_ALGO,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(run_dir / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["env_steps"]) for r in rows] == [200, 400, 600]
    # 2 envs x 100-step episodes: 2 episodes end every 200 env steps.
    assert [int(r["episodes"]) for r in rows] == [2, 2, 2]
    assert float(rows[-1]["episode_length"]) == 100
    spec = json.loads((run_dir / "run.json").read_text())
    assert spec["env_id"] == EXAMPLE and spec["algo"]["episode_length"] == 100
    proc = run_module("experiments.evaluate", f"run_dir={run_dir}", "episodes=2", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads((run_dir / "eval" / "eval_step600.json").read_text())
    assert data["env_id"] == EXAMPLE and len(data["costs"]) == 2


def test_a_bad_factory_fails_the_command_in_one_line(tmp_path):
    proc = run_train("env=cvpo_jax.envs.examples:nothing", cwd=tmp_path)
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "has no callable 'nothing'" in errors[0]
