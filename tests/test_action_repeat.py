"""ActionRepeat: sums over the held steps against the inner env stepped by hand, and
the host loop's `action_repeat` knob (env-step counts, transitions, evaluation)."""

import csv
import dataclasses
from pathlib import Path

import jax
import numpy as np
import pytest

from cvpo_jax import checkpoint as ckpt
from cvpo_jax import evaluation
from cvpo_jax.config import CVPOConfig, TrainConfig
from cvpo_jax.device_loop import make_device_trainer
from cvpo_jax.envs import action_repeat
from cvpo_jax.envs.action_repeat import ActionRepeat
from cvpo_jax.envs.custom import check_env, make_custom_vector_env
from cvpo_jax.envs.examples import STEP_SIZE, HazardPoint
from cvpo_jax.learner import make_learner
from cvpo_jax.train_loop import train


def _actions(n, seed=0):
    return np.random.default_rng(seed).uniform(-1, 1, size=(n, 2)).astype(np.float32)


def test_sums_reward_and_cost_over_the_held_steps_and_keeps_the_episode():
    k = 3
    wrapped, inner = ActionRepeat(HazardPoint(), k), HazardPoint()
    # 100 physical steps: 33 decisions of 3 and a last one of 1.
    assert wrapped.max_episode_steps == 34 and wrapped.spec is None
    obs_w, _ = wrapped.reset(seed=5)
    obs_i, _ = inner.reset(seed=5)
    np.testing.assert_array_equal(obs_w, obs_i)
    physical = decisions = 0
    for a in _actions(34):
        decisions += 1
        reward = cost = 0.0
        for _ in range(k):
            obs_i, r, c, term_i, trunc_i, _ = inner.step(a)
            reward, cost, physical = reward + r, cost + c, physical + 1
            if term_i or trunc_i:
                break
        obs_w, r_w, c_w, term_w, trunc_w, _ = wrapped.step(a)
        np.testing.assert_array_equal(obs_w, obs_i)
        assert r_w == pytest.approx(reward, abs=1e-12) and c_w == cost
        assert (term_w, trunc_w) == (term_i, trunc_i)
        if trunc_w:
            break
    assert decisions == 34 and physical == 100  # Truncated at the 34th decision, after step 100.
    assert check_env(ActionRepeat(HazardPoint(), 4), "x") == 25


def test_bad_repeat_is_rejected():
    for k in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match=r"action repeat k=.* must be an integer >= 1"):
            ActionRepeat(HazardPoint(), k)


@pytest.mark.slow
def test_safety_gymnasium_costs_and_info_costs_are_summed():
    wrapped = action_repeat.point_goal1_x4()
    from cvpo_jax.envs.nav_task import make_safety_gym_env

    inner = make_safety_gym_env("PointGoal1")
    assert wrapped.max_episode_steps == 250
    wrapped.reset(seed=1)
    inner.reset(seed=1)
    seen = 0.0
    for a in _actions(250, seed=2):
        want = {"reward": 0.0, "cost": 0.0, "cost_hazards": 0.0, "cost_sum": 0.0}
        for _ in range(4):
            _, r, c, _, _, info = inner.step(a)
            want["reward"] += r
            want["cost"] += c
            want["cost_hazards"] += info["cost_hazards"]
            want["cost_sum"] += info["cost_sum"]
        _, r_w, c_w, _, _, info_w = wrapped.step(a)
        assert r_w == pytest.approx(want["reward"], abs=1e-12)
        assert c_w == want["cost"]
        assert info_w["cost_hazards"] == want["cost_hazards"]
        assert info_w["cost_sum"] == want["cost_sum"]
        seen += c_w
    assert seen > 0  # The episode did pay costs, so the sums were exercised.


# The host loop's knob: counts in env steps, one transition per k of them.

EXAMPLE = "cvpo_jax.envs.examples:hazard_point"
TINY = CVPOConfig(hidden_sizes=(16, 16), num_samples=4, dual_steps=3, mstep_steps=1)
CFG = TrainConfig(
    env=EXAMPLE,
    total_steps=600,
    num_envs=2,
    async_envs=False,
    warmup_steps=300,
    batch_size=32,
    buffer_size=1000,
    update_ratio=0.1,
    update_every=20,
    log_every=200,
    checkpoint_every=600,
    action_repeat=2,
)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"action_repeat": 0}, "action_repeat=0 is invalid: must be null .* or an integer >= 1"),
        ({"action_repeat": 2.0}, "action_repeat=2.0 is invalid"),
        ({"action_repeat": 4, "update_every": 20}, "multiple of num_envs \\* action_repeat=8"),
        (
            {"action_repeat": 4, "update_every": 40, "warmup_steps": 520},
            ">= batch_size \\* action_repeat=1024",
        ),
    ],
)
def test_bad_action_repeat_settings_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**kwargs)


def test_null_repeat_is_chosen_per_env():
    """action_repeat=null: 4 on Safety-Gymnasium navigation tasks (any spelling), 1 on
    velocity tasks, JAX envs and own envs; a set value is kept; the checks run again
    with the chosen k and say where it came from."""
    assert TrainConfig().action_repeat is None and TrainConfig().repeat == 1
    resolve = action_repeat.resolve_action_repeat
    for env, k in [
        ("CarGoal1", 4),
        ("SafetyPointButton2-v0", 4),
        ("SafetyHopperVelocity-v1", 1),
        ("brax/AntVelocity", 1),
        ("mjx/PointGoal1", 1),
        ("cvpo_jax.envs.examples:hazard_point", 1),
    ]:
        assert resolve(TrainConfig(env=env)).action_repeat == k, env
    assert resolve(TrainConfig(env="CarGoal1", action_repeat=2)).action_repeat == 2
    assert resolve(TrainConfig(env="CarGoal1"), 5).action_repeat == 5
    with pytest.raises(ValueError, match=r"update_every=50 .*action_repeat=null holds each action"):
        resolve(TrainConfig(env="CarGoal1", update_every=50))
    with pytest.raises(ValueError, match="unknown"):
        resolve(TrainConfig(env="CarGoal9"))


def test_the_cli_and_the_loops_store_the_chosen_repeat(tmp_path):
    """build_configs resolves null before anything runs; the host loop with another
    factory takes the env's own repeat (the on-device loop's 1: test_device_loop)."""
    from omegaconf import OmegaConf

    from experiments.cli import build_configs

    yaml = OmegaConf.load(Path(__file__).resolve().parents[1] / "experiments/conf/train.yaml")
    for key in ("defaults", "hydra"):
        yaml.pop(key)
    train_cfg, _ = build_configs(yaml)
    assert train_cfg.env == "CarGoal1" and train_cfg.action_repeat == 4
    yaml.env = "brax/AntVelocity"
    assert build_configs(yaml)[0].action_repeat == 1

    unset = dataclasses.replace(CFG, action_repeat=None)
    factory = lambda cfg: make_custom_vector_env(EXAMPLE, 2, action_repeat=2)  # noqa: E731
    train(unset, TINY, tmp_path / "own", progress=False, env_factory=factory)
    assert ckpt.load_run_spec(tmp_path / "own").train.action_repeat == 2


def test_the_loop_counts_env_steps_and_stores_one_transition_per_decision(tmp_path):
    result = train(CFG, TINY, tmp_path / "run", progress=False, episode_length_from_env=True)
    assert result.env_steps == 600
    # Updates from env step 300: chunks of 20 env steps ending at 300..600, 2 updates each.
    assert result.updates == 16 * 2
    with open(tmp_path / "run" / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["env_steps"]) for r in rows] == [200, 400, 600]
    # 200 env steps are 100 per env: each ends one 100-step episode (50 decisions).
    assert [int(r["episodes"]) for r in rows] == [2, 2, 2]
    assert all(float(r["episode_length"]) == 100 for r in rows)
    spec = ckpt.load_run_spec(tmp_path / "run")
    assert spec.algo.episode_length == 50 and spec.train.action_repeat == 2
    learner = make_learner(spec.algo, spec.obs_size, spec.action_low, spec.action_high)
    _, _, saved, _ = ckpt.restore_checkpoint(tmp_path / "run", learner.init(jax.random.PRNGKey(0)))
    items = saved["items"]
    assert len(items["obs"]) == 300  # 600 env steps, 2 per transition.
    # HazardPoint moves by 0.1 * action per step: two steps per stored transition.
    moved = items["next_obs"][:, :2] - items["obs"][:, :2]
    np.testing.assert_allclose(moved, 2 * STEP_SIZE * np.clip(items["action"], -1, 1), atol=1e-5)
    with pytest.raises(ValueError, match=r"cannot change \['action_repeat'\]"):
        train(
            dataclasses.replace(CFG, action_repeat=1, total_steps=800),
            TINY,
            tmp_path / "run",
            resume=True,
            progress=False,
            episode_length_from_env=True,
        )


def test_an_env_without_the_repeat_is_refused(tmp_path):
    from scripted_env import ScriptedVectorEnv

    cfg = dataclasses.replace(CFG, env="Scripted-v0")
    with pytest.raises(ValueError, match="action_repeat=2: this env holds each action for 1"):
        train(cfg, TINY, tmp_path / "r", progress=False, env_factory=lambda _: ScriptedVectorEnv(2))
    with pytest.raises(ValueError, match="action_repeat=2: .* use action_repeat=1 on device"):
        make_device_trainer(dataclasses.replace(CFG, log_every=200), TINY, env=None)


def test_evaluation_holds_each_action_as_training_did():
    learner = make_learner(TINY, 4, -np.ones(2), np.ones(2))
    params = learner.init(jax.random.PRNGKey(1)).policy_params
    result = evaluation.evaluate_policy(learner, params, EXAMPLE, 2, seed=3, action_repeat=2)
    for ep in range(2):
        env = ActionRepeat(HazardPoint(), 2)
        obs, _ = env.reset(seed=3 + ep)
        ret = cost = 0.0
        done = False
        while not done:
            a = learner.act(params, obs[None], jax.random.PRNGKey(0), deterministic=True)
            obs, r, c, term, trunc, _ = env.step(np.clip(np.asarray(a)[0], -1, 1))
            ret, cost, done = ret + r, cost + c, term or trunc
        assert result.returns[ep] == pytest.approx(ret, abs=1e-9)
        assert result.costs[ep] == cost
    assert list(result.lengths) == [100, 100]
