"""`resume=true run_dir=X` rebuilds the run's configuration from its run.json."""

import dataclasses

import pytest
from omegaconf import OmegaConf

from cvpo_jax.checkpoint import RunSpec
from cvpo_jax.config import CVPOConfig, TrainConfig
from experiments.cli import UsageError, build_configs
from experiments.resume import override_keys, resumed_config

# As a run.json holds it: action_repeat chosen (null resolves to 4 on this task).
TRAIN = TrainConfig(
    env="SafetyPointGoal1-v0", seed=3, total_steps=4000, warmup_steps=1200, action_repeat=4
)
ALGO = CVPOConfig(hidden_sizes=(32, 32), num_samples=8, cost_limit=(10.0,), tau=0.1)
SPEC = RunSpec(TRAIN, ALGO, "SafetyPointGoal1-v0", 60, (-1.0, -1.0), (1.0, 1.0))


def command_line(**top) -> OmegaConf:
    """A composed config as Hydra builds it: yaml defaults plus the given keys."""
    base = {
        **dataclasses.asdict(TrainConfig()),
        "cost_limit": 25.0,
        "run_dir": "runs/x",
        "resume": True,
        "progress": None,
        "num_seeds": 1,
        "backend": None,
        "algo": {**dataclasses.asdict(CVPOConfig()), "episode_length": None},
    }
    base["algo"].pop("cost_limit")
    cfg = OmegaConf.create(base)
    for key, value in top.items():
        OmegaConf.update(cfg, key.replace("__", "."), value)
    return cfg


def test_override_keys():
    assert override_keys(["algo.tau=0.1", "+x=1", "~y", "seed=2"]) == ["algo.tau", "x", "y", "seed"]


def test_resume_with_nothing_retyped_is_the_saved_run():
    cfg = resumed_config(command_line(), ["run_dir", "resume"], SPEC, None)
    train, algo = build_configs(cfg)
    assert train == TRAIN and algo == ALGO
    assert cfg.run_dir == "runs/x" and cfg.resume


def test_allowed_keys_change_and_agreeing_keys_pass():
    cfg = command_line(total_steps=9000, log_every=200, seed=3, algo__tau=0.1, cost_limit=[10])
    given = ["run_dir", "resume", "total_steps", "log_every", "seed", "algo.tau", "cost_limit"]
    train, algo = build_configs(resumed_config(cfg, given, SPEC, None))
    assert train == dataclasses.replace(TRAIN, total_steps=9000, log_every=200)
    assert algo == ALGO


def test_differing_keys_are_named_with_both_values():
    cfg = command_line(seed=4, algo__num_samples=16, algo__hidden_sizes=[32, 32])
    given = ["resume", "seed", "algo.num_samples", "algo.hidden_sizes", "env"]
    with pytest.raises(UsageError) as err:
        resumed_config(cfg, given, SPEC, "SafetyCarGoal1-v0")
    msg = str(err.value)
    assert "seed=4 (the run has 3)" in msg
    assert "algo.num_samples=16 (the run has 8)" in msg
    assert "env='SafetyCarGoal1-v0' (the run has 'SafetyPointGoal1-v0')" in msg
    assert "hidden_sizes" not in msg  # It agrees with the run.
