"""The training command line: config defaults, bad input, and an end-to-end CarGoal1 run."""

import csv
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from cvpo_jax.config import CVPOConfig, TrainConfig

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "experiments" / "conf" / "train.yaml"
TINY_ALGO = [
    "algo.hidden_sizes=[32,32]",
    "algo.num_samples=8",
    "algo.dual_steps=5",
    "algo.mstep_steps=2",
]


def run_module(module, *args, cwd, timeout=600):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def run_train(*args, cwd, timeout=600):
    return run_module("experiments.train", *args, cwd=cwd, timeout=timeout)


def test_yaml_defaults_equal_the_dataclass_defaults():
    conf = yaml.safe_load(CONF.read_text())
    for f in dataclasses.fields(TrainConfig):
        value = conf[f.name]
        assert (tuple(value) if isinstance(value, list) else value) == f.default, f.name
    algo_default = CVPOConfig()
    for f in dataclasses.fields(CVPOConfig):
        if f.name == "cost_limit":
            assert (conf["cost_limit"],) == algo_default.cost_limit
        elif f.name == "episode_length":
            assert conf["algo"][f.name] is None  # Taken from the environment.
        else:
            value = conf["algo"][f.name]
            expected = getattr(algo_default, f.name)
            assert (tuple(value) if isinstance(value, list) else value) == expected, f.name
    assert set(conf["algo"]) == {f.name for f in dataclasses.fields(CVPOConfig)} - {"cost_limit"}


@pytest.mark.parametrize(
    "args, message",
    [
        (["env=CarGoal9"], "CarGoal"),  # Unknown env: names close matches.
        (["cost_limit=-1"], "cost_limit"),
        (["algo.gamma=1.5"], "gamma"),
        (["total_steps=1234"], "total_steps"),
        (["num_envs=0"], "num_envs"),
        (["costs=[hazards,hazards]"], "costs"),
        (["env=PointGoal2", "costs=[hazards,vases]", "cost_limit=[20,5]"], "vases_contact"),
        (["env=PointGoal1", "costs=[hazards]", "cost_limit=[20,5]"], "one limit per cost"),
        (["loop=host"], "apply to JAX environments"),
        (["env=brax/HopperVelocity", "loop=hots"], "loop='hots'; allowed: auto, host"),
        (["env=brax/HopperVelocity", "loop=host", "num_seeds=2"], "one seed per run"),
    ],
)
def test_bad_values_fail_early_with_a_clear_message(tmp_path, args, message):
    proc = run_train(*args, f"run_dir={tmp_path / 'run'}", cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert "error:" in proc.stderr and message in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "run").exists()  # Nothing half-written.


def test_unknown_config_key_is_rejected(tmp_path):
    proc = run_train("not_a_key=3", f"run_dir={tmp_path / 'run'}", cwd=tmp_path)
    assert proc.returncode != 0
    assert "not_a_key" in proc.stderr
    assert not (tmp_path / "run").exists()
    proc = run_train("algo.not_a_knob=3", f"run_dir={tmp_path / 'run'}", cwd=tmp_path)
    assert proc.returncode != 0 and "not_a_knob" in proc.stderr


def test_resume_of_a_directory_that_is_not_a_run(tmp_path):
    (tmp_path / "run").mkdir()
    proc = run_train(f"run_dir={tmp_path / 'run'}", "resume=true", cwd=tmp_path)
    assert proc.returncode == 2
    assert "not a cvpo-jax run" in proc.stderr
    assert list((tmp_path / "run").iterdir()) == []


@pytest.mark.slow
def test_end_to_end_cargoal1_train_and_resume(tmp_path):
    """The defaults' action repeat (4 on CarGoal1): counts in env steps, one
    transition per 4, episode lengths in env steps; resume keeps it."""
    run_dir = tmp_path / "run"
    common = [
        "env=CarGoal1",
        "warmup_steps=1040",
        "log_every=400",
        "checkpoint_every=400",
        "progress=false",
        f"run_dir={run_dir}",
        *TINY_ALGO,
    ]
    proc = run_train(*common, "total_steps=2000", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "completed at env step 2000" in proc.stderr
    assert "os.fork()" not in proc.stderr
    with open(run_dir / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["env_steps"]) for r in rows] == [400, 800, 1200, 1600, 2000]
    assert float(rows[-1]["eta"]) > 0 and rows[-1]["lambda"] != ""
    # CarGoal1 episodes are 1000 steps: the 2 envs both finish one at env step 2000.
    assert [int(r["episodes"]) for r in rows] == [0, 0, 0, 0, 2]
    assert float(rows[-1]["episode_length"]) == 1000
    assert 0 <= float(rows[-1]["episode_cost"]) <= 1000
    spec = json.loads((run_dir / "run.json").read_text())
    assert spec["train"]["action_repeat"] == 4 and spec["train"]["update_every"] == 40
    assert spec["algo"]["episode_length"] == 250  # decisions
    assert list((run_dir / "tb").glob("events.out.tfevents.*"))
    assert (run_dir / "checkpoints" / "2000").is_dir()
    assert not list(tmp_path.glob("MUJOCO_LOG.TXT"))
    # A key that differs from the saved run fails in one line naming only that key.
    proc = run_train(f"run_dir={run_dir}", "resume=true", "algo.num_samples=16", cwd=tmp_path)
    assert proc.returncode == 2
    assert "algo.num_samples=16 (the run has 8)" in proc.stderr
    assert "hidden_sizes" not in proc.stderr
    # Resume reads the rest from run.json: no algo keys retyped, and the env
    # subprocesses start without forking a running JAX runtime.
    proc = run_train(
        f"run_dir={run_dir}", "resume=true", "total_steps=2400", "progress=false", cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "completed at env step 2400" in proc.stderr
    assert "os.fork()" not in proc.stderr
    with open(run_dir / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["env_steps"]) for r in rows] == [400, 800, 1200, 1600, 2000, 2400]
    assert int(rows[-1]["updates"]) == int(rows[-2]["updates"]) + 80  # 400 steps x 0.2.


@pytest.mark.slow
def test_sweep_runs_every_job_and_reports_the_failed_one(tmp_path):
    """`-m`: a failing job (tau out of range) is reported and the next job still
    trains, in its own run_dir under the sweep dir; the exit status is 1."""
    proc = run_train(
        "-m",
        "algo.tau=2.0,0.5,0.4",
        "env=CarGoal1",
        "action_repeat=1",
        "update_every=50",
        "total_steps=600",
        "warmup_steps=500",
        "log_every=300",
        "checkpoint_every=600",
        "progress=false",
        "hydra.sweep.dir=sweep",
        *TINY_ALGO,
        cwd=tmp_path,
    )
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "sweep job failed with exit status 2: algo.tau=2.0" in proc.stderr
    assert "1 of 3 job(s) failed" in proc.stderr
    job_dirs = sorted(p.name for p in (tmp_path / "sweep").iterdir() if p.is_dir())
    assert job_dirs == ["algo.tau-0.4", "algo.tau-0.5"]
    for name in job_dirs:
        with open(tmp_path / "sweep" / name / "metrics.csv", newline="") as f:
            assert [int(r["env_steps"]) for r in csv.DictReader(f)] == [300, 600]
    assert (tmp_path / "sweep" / "multirun.yaml").is_file()
    # The third job's 2 subprocess envs start after JAX did: by forkserver, no warning.
    assert "os.fork()" not in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sweep"]  # Nothing else left.


@pytest.mark.slow
def test_two_constraints_end_to_end(tmp_path):
    """PointGoal2 with hazards and vase contacts constrained separately: one limit,
    one lambda, one Q_c and one episode-cost column each."""
    run_dir = tmp_path / "run"
    proc = run_train(
        "env=PointGoal2",
        "action_repeat=1",
        "update_every=50",
        "costs=[hazards,vases_contact]",
        "cost_limit=[20,5]",
        "total_steps=2000",
        "warmup_steps=1000",
        "log_every=1000",
        "checkpoint_every=2000",
        "progress=false",
        f"run_dir={run_dir}",
        *TINY_ALGO,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "cost " in proc.stderr and "/20, " in proc.stderr and "/5" in proc.stderr
    with open(run_dir / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    last = rows[-1]
    for column in ("episode_cost_0", "episode_cost_1", "lambda_0", "lambda_1", "q_cost_1"):
        assert last[column] != "", column
    costs = float(last["episode_cost_0"]), float(last["episode_cost_1"])
    assert float(last["episode_cost"]) == pytest.approx(sum(costs))
    assert float(last["qc_threshold_0"]) == pytest.approx(2.0, rel=1e-3)  # 20 * 0.1
    assert float(last["qc_threshold_1"]) == pytest.approx(0.5, rel=1e-3)
    # Evaluation reports each constraint against its own limit.
    proc = run_module(
        "experiments.evaluate", f"run_dir={run_dir}", "episodes=1", "max_steps=50", cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "cost hazards" in proc.stdout and "its limit 20" in proc.stdout
    assert "cost vases_contact" in proc.stdout and "its limit 5" in proc.stdout
    data = json.loads((run_dir / "eval" / "eval_step2000.json").read_text())
    assert data["cost_names"] == ["hazards", "vases_contact"]
    assert len(data["constraint_costs"]) == 1 and len(data["constraint_costs"][0]) == 2


@pytest.mark.slow
def test_kill_9_then_resume_with_nothing_retyped(tmp_path):
    """SIGKILL mid-run (no handler runs), then `run_dir=X resume=true`: training
    continues from the newest complete checkpoint to the saved budget, with the
    metrics rows and update count of an uninterrupted run."""
    import signal
    import time

    run_dir = tmp_path / "run"
    args = [
        "env=CarGoal1",
        "action_repeat=1",
        "update_every=50",
        "total_steps=3000",
        "warmup_steps=1000",
        "log_every=500",
        "checkpoint_every=500",
        "progress=false",
        f"run_dir={run_dir}",
        *TINY_ALGO,
    ]
    proc = subprocess.Popen(
        [sys.executable, "-m", "experiments.train", *args],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    deadline = time.monotonic() + 600
    while not (run_dir / "checkpoints" / "1500").is_dir():
        assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
        assert time.monotonic() < deadline
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    resumed = run_train(f"run_dir={run_dir}", "resume=true", "progress=false", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    # Updates start with the chunk that ends the warm-up: 10 per 50 steps from 1000.
    assert "completed at env step 3000 (410 updates)" in resumed.stderr
    assert "os.fork()" not in resumed.stderr
    with open(run_dir / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["env_steps"]) for r in rows] == [500, 1000, 1500, 2000, 2500, 3000]
    assert [int(r["updates"]) for r in rows] == [0, 10, 110, 210, 310, 410]
