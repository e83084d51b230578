"""Policy evaluation on a tiny real CarGoal1 run: loading, episodes, determinism, video, CLI."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cvpo_jax import checkpoint as ckpt
from cvpo_jax.config import CVPOConfig, TrainConfig
from cvpo_jax.evaluation import (
    checkpoint_steps,
    cost_stretches,
    evaluate_policy,
    load_policy,
    osmesa_available,
    summarize_training,
)
from cvpo_jax.train_loop import train

REPO = Path(__file__).resolve().parents[1]
CFG = TrainConfig(
    env="CarGoal1",
    total_steps=400,
    warmup_steps=300,
    batch_size=32,
    update_every=50,
    action_repeat=1,
    update_ratio=0.1,
    log_every=100,
    checkpoint_every=200,
    num_envs=1,
    buffer_size=1000,
)
ALGO = CVPOConfig(
    hidden_sizes=(16, 16),
    num_samples=4,
    dual_steps=2,
    mstep_steps=1,
    num_reward_critics=1,
    num_cost_critics=1,
)
MAX_STEPS = 50


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A finished 400-step CarGoal1 run with checkpoints at steps 200 and 400."""
    path = tmp_path_factory.mktemp("evalrun") / "run"
    result = train(CFG, ALGO, path, progress=False)
    assert result.status == "completed"
    return path


@pytest.fixture(scope="module")
def policy(run_dir):
    return load_policy(run_dir)


def run_cli(module, *args, cwd):
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=cwd,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_load_policy_rebuilds_learner_from_run_json(run_dir, policy):
    learner, params, spec, step = policy
    assert step == 400
    assert spec.env_id == "SafetyCarGoal1-v0"
    assert learner.cfg == spec.algo
    assert learner.networks.obs_size == spec.obs_size
    assert checkpoint_steps(run_dir) == [200, 400]
    # An older checkpoint holds other parameters.
    _, old_params, _, old_step = load_policy(run_dir, step=200)
    assert old_step == 200
    leaves = zip(jax_leaves(params), jax_leaves(old_params), strict=True)
    assert any(not np.array_equal(a, b) for a, b in leaves)


def jax_leaves(tree):
    import jax

    return [np.asarray(x) for x in jax.tree.leaves(tree)]


def test_load_policy_errors_name_the_run(run_dir, tmp_path):
    with pytest.raises(ckpt.NotARunError, match="available steps: 200, 400"):
        load_policy(run_dir, step=300)
    with pytest.raises(ckpt.NotARunError, match=str(tmp_path)):
        load_policy(tmp_path)


def test_evaluate_shapes_finite_and_reproducible(policy):
    learner, params, spec, _ = policy
    first = evaluate_policy(learner, params, spec.env_id, episodes=2, seed=3, max_steps=MAX_STEPS)
    for values in (first.returns, first.costs, first.lengths):
        assert values.shape == (2,)
        assert np.all(np.isfinite(values))
    np.testing.assert_array_equal(first.lengths, [MAX_STEPS, MAX_STEPS])
    assert not first.complete.any()  # Cut by max_steps, not ended by the env.
    assert np.all(first.costs >= 0)
    assert first.return_mean == pytest.approx(np.mean(first.returns))
    assert first.cost_std == pytest.approx(np.std(first.costs))
    assert first.deterministic and first.video_path is None
    data = json.loads(json.dumps(first.to_json()))
    assert data["returns"] == list(first.returns) and data["episodes"] == 2
    # Cost stretches: none without cost, at most one per costly step otherwise.
    assert np.all((first.cost_entries == 0) == (first.costs == 0))
    assert np.all(first.longest_cost_run <= first.costs) and len(data["cost_entries"]) == 2

    again = evaluate_policy(learner, params, "CarGoal1", episodes=2, seed=3, max_steps=MAX_STEPS)
    np.testing.assert_array_equal(again.returns, first.returns)
    np.testing.assert_array_equal(again.costs, first.costs)


def test_stochastic_evaluation_is_seeded(policy):
    learner, params, spec, _ = policy
    kwargs = dict(episodes=1, seed=5, max_steps=20, deterministic=False)
    a = evaluate_policy(learner, params, spec.env_id, **kwargs)
    b = evaluate_policy(learner, params, spec.env_id, **kwargs)
    assert not a.deterministic
    np.testing.assert_array_equal(a.returns, b.returns)
    mean_action = evaluate_policy(learner, params, spec.env_id, episodes=1, seed=5, max_steps=20)
    assert mean_action.returns[0] != a.returns[0]


def test_evaluate_rejects_bad_arguments(policy):
    learner, params, spec, _ = policy
    with pytest.raises(ValueError, match="episodes=0"):
        evaluate_policy(learner, params, spec.env_id, episodes=0, seed=0)
    with pytest.raises(ValueError, match="max_steps=0"):
        evaluate_policy(learner, params, spec.env_id, episodes=1, seed=0, max_steps=0)
    with pytest.raises(ValueError, match="observations of shape"):
        evaluate_policy(learner, params, "PointGoal1", episodes=1, seed=0, max_steps=5)


def test_summarize_training_reads_last_row_with_episodes(tmp_path):
    path = tmp_path / "metrics.csv"
    path.write_text(
        "env_steps,wall_time,steps_per_s,updates,episode_return,episode_cost,"
        "episode_length,episodes\n"
        "1000,1,1,0,2.5,30,1000,2\n"
        "1500,2,1,5,,,,0\n"
    )
    assert summarize_training(path) == {
        "env_steps": 1000,
        "episode_return": 2.5,
        "episode_cost": 30.0,
        "episode_length": 1000.0,
        "episodes": 2,
    }
    assert summarize_training(tmp_path / "missing.csv") is None


@pytest.mark.slow
@pytest.mark.skipif(not osmesa_available(), reason="OSMesa (libosmesa6) is not installed")
def test_video_is_written(policy, tmp_path):
    if os.environ.get("MUJOCO_GL") not in ("osmesa", "egl"):
        pytest.skip(f"no headless GL backend configured (MUJOCO_GL={os.environ.get('MUJOCO_GL')})")
    learner, params, spec, _ = policy
    video = tmp_path / "clips" / "clip.mp4"
    result = evaluate_policy(
        learner, params, spec.env_id, episodes=2, seed=0, max_steps=20, video_path=video
    )
    assert result.video_path == str(video)
    data = video.read_bytes()
    assert len(data) > 1000
    assert data[4:8] == b"ftyp"  # An MP4 container.
    assert sorted(p.name for p in video.parent.iterdir()) == ["clip.mp4"]  # No partial file.
    np.testing.assert_array_equal(result.lengths, [20, 20])


def test_cli_not_a_run_exits_2_and_writes_nothing(tmp_path):
    target = tmp_path / "not-a-run"
    target.mkdir()
    proc = run_cli("experiments.evaluate", f"run_dir={target}", cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and str(target) in lines[0]
    assert "Traceback" not in proc.stderr
    assert list(target.iterdir()) == []


@pytest.mark.slow
def test_cli_evaluates_and_writes_json(run_dir, tmp_path):
    proc = run_cli(
        "experiments.evaluate",
        f"run_dir={run_dir}",
        "episodes=2",
        "max_steps=30",
        "step=200",
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    assert "deterministic evaluation" in proc.stdout
    assert "cost limit 25" in proc.stdout
    # 400 steps end no 1000-step episode: metrics.csv has no training-time episodes.
    assert "training-time: no finished episodes" in proc.stdout
    path = run_dir / "eval" / "eval_step200.json"
    data = json.loads(path.read_text())
    assert data["step"] == 200 and data["episodes"] == 2 and data["max_steps"] == 30
    assert data["cost_limit"] == [25.0]
    assert len(data["returns"]) == 2 and np.all(np.isfinite(data["returns"]))
    assert data["training"] is None


@pytest.mark.parametrize(
    "override, message",
    [
        ({"run_dir": None}, "run_dir is required"),
        ({"episodes": 0}, "episodes=0 is invalid"),
        ({"seed": "x"}, "seed='x' is invalid"),
        ({"deterministic": "yes"}, "deterministic='yes' is invalid"),
        ({"video_path": "a.mp4"}, "video=false"),
        ({"foo": 1}, r"unknown key\(s\) \['foo'\]"),
        ({"calibrate": True, "max_steps": 5}, "drop max_steps"),
    ],
)
def test_cli_arguments_are_validated(override, message):
    from omegaconf import OmegaConf

    from experiments.cli import UsageError
    from experiments.evaluate import parse_args

    data = OmegaConf.to_container(OmegaConf.load(REPO / "experiments/conf/evaluate.yaml"))
    data.pop("defaults"), data.pop("hydra")
    assert parse_args(OmegaConf.create({**data, "run_dir": "r"}))["episodes"] == 10
    with pytest.raises(UsageError, match=message):
        parse_args(OmegaConf.create({**data, "run_dir": "r", **override}))


@pytest.mark.slow
def test_cli_evaluates_several_runs_into_one_table(run_dir, tmp_path):
    import shutil

    sweep = tmp_path / "sweep"
    for name in ("seed-0", "seed-1"):
        shutil.copytree(run_dir, sweep / name, ignore=shutil.ignore_patterns("eval"))
    common = ["episodes=2", "max_steps=20", "step=200"]
    proc = run_cli("experiments.evaluate", f"sweep_dir={sweep}", *common, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "mean ± std over 2 runs" in proc.stdout
    summary = json.loads((sweep / "eval_2runs.json").read_text())
    assert [Path(r["run_dir"]).name for r in summary["runs"]] == ["seed-0", "seed-1"]
    per_run = [np.mean(r["costs"]) for r in summary["runs"]]
    assert summary["cost_mean"] == pytest.approx(np.mean(per_run))
    assert summary["cost_std_over_runs"] == pytest.approx(np.std(per_run))
    assert (sweep / "seed-1" / "eval" / "eval_step200.json").is_file()
    out = tmp_path / "e.json"
    proc = run_cli(
        "experiments.evaluate", f"run_dirs={sweep}/seed-*", f"out={out}", *common, cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr
    assert len(json.loads(out.read_text())["runs"]) == 2


def test_evaluation_env_is_the_override_or_the_ported_task():
    from types import SimpleNamespace

    from cvpo_jax.evaluation import evaluation_env

    def spec(env_id):
        return SimpleNamespace(env_id=env_id)

    assert evaluation_env(spec("SafetyCarGoal1-v0")) == "SafetyCarGoal1-v0"
    assert evaluation_env(spec("SafetyCarGoal1-v0"), "CarGoal2") == "SafetyCarGoal2-v0"
    assert evaluation_env(spec("mjx/PointGoal1")) == "SafetyPointGoal1-v0"
    assert evaluation_env(spec("mjx/PointGoal1"), "mjx/pointgoal1") == "mjx/PointGoal1"
    assert evaluation_env(spec("brax/ant")) == "brax/ant"  # no counterpart: its own task
    with pytest.raises(ValueError, match="unknown"):
        evaluation_env(spec("SafetyPointGoal1-v0"), "mjx/PointGoal9")


def test_evaluation_on_another_task_is_labelled_and_kept_apart(run_dir, policy):
    """env= evaluates the run's policy on another task with the same spaces and writes
    it next to, not over, the evaluation on the run's own task; a task whose
    observations do not fit is refused naming both shapes."""
    from omegaconf import OmegaConf

    from experiments.evaluate import _evaluate, parse_args

    data = OmegaConf.to_container(OmegaConf.load(REPO / "experiments/conf/evaluate.yaml"))
    data.pop("defaults"), data.pop("hydra")
    overrides = {"run_dir": str(run_dir), "episodes": 1, "max_steps": 20, "step": 200}
    args = parse_args(OmegaConf.create({**data, **overrides, "env": "CarGoal2"}))
    out = _evaluate(run_dir, args)
    assert out["env_id"] == "SafetyCarGoal2-v0" and out["trained_on"] == "SafetyCarGoal1-v0"
    written = run_dir / "eval" / "eval_step200_on_SafetyCarGoal2-v0.json"
    assert json.loads(written.read_text())["env_id"] == "SafetyCarGoal2-v0"
    learner, params, _, _ = policy
    with pytest.raises(ValueError, match=r"SafetyCarGoal0-v0 has observations of shape \(40,\)"):
        evaluate_policy(learner, params, "CarGoal0", episodes=1, seed=0, max_steps=2)


def test_jax_evaluation_refuses_video_and_step_caps_before_building_anything(run_dir):
    from omegaconf import OmegaConf

    from experiments.cli import UsageError
    from experiments.evaluate import _evaluate, parse_args

    data = OmegaConf.to_container(OmegaConf.load(REPO / "experiments/conf/evaluate.yaml"))
    data.pop("defaults"), data.pop("hydra")
    base = {**data, "run_dir": str(run_dir), "env": "mjx/PointGoal1"}
    for extra, message in [
        ({"video": True}, "video=True"),
        ({"max_steps": 5}, "max_steps=5"),
        ({"calibrate": True}, "calibrate=True"),
    ]:
        args = parse_args(OmegaConf.create({**base, **extra}))
        with pytest.raises(UsageError, match=f"{message} is for Safety-Gymnasium tasks"):
            _evaluate(run_dir, args)


def test_calibration_through_the_cli_is_reported_and_stored(run_dir, capsys):
    """calibrate=true adds the critics' calibration to the printed report and the
    JSON; its first (only) episode is the stochastic evaluation's."""
    from omegaconf import OmegaConf

    from experiments.evaluate import _evaluate, parse_args

    data = OmegaConf.to_container(OmegaConf.load(REPO / "experiments/conf/evaluate.yaml"))
    data.pop("defaults"), data.pop("hydra")
    overrides = {"run_dir": str(run_dir), "episodes": 1, "step": 200, "deterministic": False}
    out = _evaluate(run_dir, parse_args(OmegaConf.create({**data, **overrides, "calibrate": True})))
    printed = capsys.readouterr().out
    assert "critic calibration (1 sampled episode(s) run 459 decisions past" in printed
    assert "E-step threshold on Q_c" in printed
    cal = out["calibration"]
    assert cal["time_limit"] == 1000 and cal["points"] == len(range(0, 1000, 16))
    assert cal["episode_returns"][0] == pytest.approx(out["returns"][0], rel=1e-9)
    assert cal["episode_costs"][0][0] == pytest.approx(out["costs"][0], rel=1e-9)
    written = json.loads((run_dir / "eval" / "eval_step200_stochastic.json").read_text())
    assert written["calibration"]["cost"][0]["bias"] == pytest.approx(cal["cost"][0]["bias"])


def test_calibration_over_runs_is_per_constraint():
    from experiments.evaluate import calibration_over_runs

    runs = [
        {"calibration": {"cost": [{"bias": -1.0, "mc": 10.0}, {"bias": 0.5, "mc": 2.0}]}},
        {"calibration": {"cost": [{"bias": -3.0, "mc": 14.0}, {"bias": 0.5, "mc": 4.0}]}},
    ]
    out = calibration_over_runs(runs)
    assert out["calibration_qc_bias_mean"] == [-2.0, 0.5]
    assert out["calibration_qc_bias_std_over_runs"] == [1.0, 0.0]
    assert out["calibration_qc_mc_mean"] == [12.0, 3.0]
    assert out["calibration_qc_mc_std_over_runs"] == [2.0, 1.0]


@pytest.mark.parametrize(
    ("step_costs", "expected"),
    [
        ([], (0, 0)),
        ([0, 0, 0], (0, 0)),
        ([1, 1, 1], (1, 3)),
        ([0, 1, 1, 0, 0, 1, 0], (2, 2)),
        ([1, 0, 1, 1, 1, 0, 0, 2.5], (3, 3)),
    ],
)
def test_cost_stretches_counts_entries_and_the_longest_stay(step_costs, expected):
    assert cost_stretches(np.asarray(step_costs, np.float64)) == expected


def test_refit_critic_cli_reports_three_critics(run_dir, capsys, tmp_path):
    """experiments.refit_critic on the real CarGoal1 run: the frozen policy's episodes,
    both fresh critics and the trained ones in the table and the JSON."""
    from omegaconf import OmegaConf

    from experiments.cli import UsageError
    from experiments.refit_critic import _main

    data = OmegaConf.to_container(OmegaConf.load(REPO / "experiments/conf/refit_critic.yaml"))
    data.pop("defaults"), data.pop("hydra")
    out = tmp_path / "refit.json"
    args = {
        **data, "run_dir": str(run_dir), "episodes": 1, "eval_episodes": 1, "updates": 20,
        "batch_size": 16, "out": str(out),
    }  # fmt: skip
    assert _main(OmegaConf.create(args)) == 0
    printed = capsys.readouterr().out
    report = json.loads(out.read_text())
    assert report["step"] == 400 and report["action_repeat"] == 1
    # One episode of 1000 env steps run 459 decisions past its limit.
    assert report["transitions"] == 1459
    assert len(report["held_out_episode_costs"]) == 1
    assert [b["decisions"] for b in report["rates_by_decision"]][-1] == [1400, 1500]
    assert "Cost per decision by decision index (fitting episodes): 0-99: " in printed
    assert set(report["level"]) == {"trained", "td", "mc"}
    assert "Q_c level on the fitting episodes (all rows)" in printed
    for part in ("held_out", "train"):
        assert set(report[part]) == {"trained", "td", "mc"}
        for name in ("trained", "td", "mc"):
            assert f"| {name} | {part} |" in printed
            assert np.isfinite(report[part][name]["cost"][0]["bias"])
    for bad, message in [
        ({"run_dir": None}, "no run given"),
        ({"nope": 1}, r"unknown refit_critic key\(s\) \['nope'\]"),
        ({"eval_episodes": 0}, "eval_episodes=0 must be an integer >= 1"),
        ({"action_repeat": 0}, "action repeat k=0 must be an integer >= 1"),
        ({"env": "brax/HalfCheetahVelocity"}, "is a JAX env"),
    ]:
        with pytest.raises((UsageError, ValueError), match=message):
            _main(OmegaConf.create({**args, **bad}))
