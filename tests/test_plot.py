"""Learning-curve plots: reading runs and multi-seed runs, grouping seeds, the mean and band,
the CLI."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf

from cvpo_jax import checkpoint as ckpt
from cvpo_jax.config import CVPOConfig, TrainConfig
from cvpo_jax.plotting import (
    NotPlottableError,
    _group_label,
    aggregate,
    expand_run_dirs,
    group_runs,
    load_run,
    load_runs,
    panels,
    plot_runs,
    smooth,
)
from experiments.cli import UsageError
from experiments.plot import parse_args

REPO = Path(__file__).resolve().parents[1]
HEADER = (
    "env_steps,wall_time,steps_per_s,updates,episode_return,episode_cost,"
    "episode_length,episodes,lambda\n"
)
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def make_run(path, rows, env_id="SafetyCarGoal1-v0", cost_limit=25.0, seed=0, loop=None):
    """A run directory with run.json and metrics.csv rows (env_steps, return, cost)."""
    path.mkdir(parents=True)
    spec = ckpt.RunSpec(
        train=TrainConfig(seed=seed),
        algo=CVPOConfig(cost_limit=(cost_limit,)),
        env_id=env_id,
        obs_size=72,
        action_low=(-1.0, -1.0),
        action_high=(1.0, 1.0),
        loop=loop,
    )
    ckpt.save_run_spec(path, spec)
    lines = [HEADER]
    for step, ret, cost in rows:
        fields = ("", "", "", 0) if ret is None else (ret, cost, 1000, 2)
        lines.append(f"{step},1.0,100.0,10,{','.join(map(str, fields))},0.5\n")
    (path / "metrics.csv").write_text("".join(lines))
    return path


def seeds(tmp_path, n=2):
    """n runs of one env; run i logs return 10 * i + step / 1000 and cost 30 - i."""
    return [
        make_run(
            tmp_path / f"seed{i}",
            [(s, 10.0 * i + s / 1000, 30.0 - i) for s in range(1000 + 500 * i, 6001, 1000)],
            seed=i,
        )
        for i in range(n)
    ]


def run_cli(*args, cwd):
    return subprocess.run(
        [sys.executable, "-m", "experiments.plot", *args],
        cwd=cwd,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_load_run_keeps_rows_with_episodes(tmp_path):
    path = make_run(tmp_path / "run", [(1000, None, None), (2000, 1.5, 40.0), (3000, 2.5, 20.0)])
    run = load_run(path)
    assert run.env_id == "SafetyCarGoal1-v0" and run.cost_limit == (25.0,)
    np.testing.assert_array_equal(run.env_steps, [2000, 3000])
    np.testing.assert_array_equal(run.episode_return, [1.5, 2.5])
    np.testing.assert_array_equal(run.episode_cost, [40.0, 20.0])


@pytest.mark.parametrize(
    "setup, message",
    [
        (lambda p: p.mkdir(), "not a cvpo-jax run directory"),
        (lambda p: (make_run(p, []), (p / "metrics.csv").unlink()), "has no metrics.csv"),
        (lambda p: (make_run(p, []), (p / "metrics.csv").write_text("")), "is empty"),
        (lambda p: make_run(p, [(1000, None, None)]), "no rows with finished episodes"),
    ],
)
def test_load_run_rejects_bad_runs(tmp_path, setup, message):
    path = tmp_path / "bad"
    setup(path)
    with pytest.raises(NotPlottableError, match=message):
        load_run(path)


def test_aggregate_mean_and_bands_on_the_union_grid(tmp_path):
    runs = [load_run(p) for p in seeds(tmp_path)]
    # Run 0 logs at 1000, 2000, ..., 6000; run 1 at 1500, 2500, ..., 5500.
    grid, mean, low, high, count = aggregate(runs, "episode_return", "minmax")
    np.testing.assert_array_equal(
        grid, [1000, 1500, 2000, 2500, 3000, 3500, 4000, 4500, 5000, 5500, 6000]
    )
    np.testing.assert_array_equal(count, [1, 2, 2, 2, 2, 2, 2, 2, 2, 2, 1])
    # Both runs are linear in the step: run 1 is run 0 plus 10 wherever both exist.
    inside = count == 2
    np.testing.assert_allclose(mean[inside], grid[inside] / 1000 + 5.0)
    np.testing.assert_allclose(low[inside], grid[inside] / 1000)
    np.testing.assert_allclose(high[inside], grid[inside] / 1000 + 10.0)
    np.testing.assert_allclose(mean[~inside], grid[~inside] / 1000)  # Run 0 alone.
    _, mean_c, low_c, high_c, _ = aggregate(runs, "episode_cost", "std")
    np.testing.assert_allclose(mean_c[inside], 29.5)
    np.testing.assert_allclose(low_c[inside], 29.0)
    np.testing.assert_allclose(high_c[inside], 30.0)
    with pytest.raises(ValueError, match="band"):
        aggregate(runs, "episode_cost", "iqr")


def test_group_runs_by_env_and_cost_limit(tmp_path):
    a, b = seeds(tmp_path)
    c = make_run(tmp_path / "point", [(1000, 1.0, 5.0)], env_id="SafetyPointGoal1-v0")
    d = make_run(tmp_path / "strict", [(1000, 1.0, 5.0)], cost_limit=10.0)
    groups = group_runs([load_run(p) for p in (a, c, b, d)])
    assert [[r.run_dir.name for r in g] for g in groups] == [
        ["seed0", "seed1"],
        ["point"],
        ["strict"],
    ]


def test_plot_runs_writes_png(tmp_path):
    runs = [load_run(p) for p in seeds(tmp_path, 3)]
    runs.append(load_run(make_run(tmp_path / "point", [(1000, 1.0, 5.0)], "SafetyPointGoal1-v0")))
    out = tmp_path / "figs" / "curves.png"
    plot_runs(runs, out, band="std")
    data = out.read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 10_000
    assert sorted(p.name for p in out.parent.iterdir()) == ["curves.png"]


def test_parse_args_accepts_run_dir_and_run_dirs():
    base = {"run_dir": None, "run_dirs": [], "band": "minmax", "out": None, "title": None}
    args = parse_args(OmegaConf.create({**base, "run_dir": "a", "run_dirs": ["b", "a"]}))
    assert args["run_dirs"] == [Path("a"), Path("b")]
    assert args["out"] == Path("a") / "curves.png"
    args = parse_args(OmegaConf.create({**base, "run_dirs": "b", "out": "x.png"}))
    assert args["run_dirs"] == [Path("b")] and args["out"] == Path("x.png")
    with pytest.raises(UsageError, match="no runs given"):
        parse_args(OmegaConf.create(base))
    with pytest.raises(UsageError, match="band='x'"):
        parse_args(OmegaConf.create({**base, "run_dir": "a", "band": "x"}))
    with pytest.raises(UsageError, match="unknown key"):
        parse_args(OmegaConf.create({**base, "run_dir": "a", "runs": ["a"]}))


def test_cli_writes_png_for_seeds(tmp_path):
    a, b = seeds(tmp_path)
    proc = run_cli(f"run_dirs=[{a},{b}]", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    data = (a / "curves.png").read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 10_000
    assert f"wrote {a / 'curves.png'}" in proc.stdout


def test_cli_bad_run_exits_2_without_writing(tmp_path):
    (good,) = seeds(tmp_path, 1)
    missing = tmp_path / "no-such-run"
    out = tmp_path / "out.png"
    proc = run_cli(f"run_dirs=[{good},{missing}]", f"out={out}", cwd=tmp_path)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and str(missing) in lines[0]
    assert not out.exists() and not (good / "curves.png").exists()


def multi_seed_run(path, n=3):
    """What train_on_device writes: run.json on top, seed<i>/{run.json, metrics.csv}."""
    path.mkdir(parents=True)
    for i in range(n):
        make_run(
            path / f"seed{i}",
            [(s, 10.0 * i + s / 1000, 30.0 - i) for s in range(1000, 6001, 1000)],
            env_id="brax/HalfCheetahVelocity",
        )
    (path / "run.json").write_text((path / "seed0" / "run.json").read_text())
    (path / "checkpoints").mkdir()
    return path


def test_load_runs_reads_each_seed_of_a_multi_seed_run(tmp_path):
    path = multi_seed_run(tmp_path / "run", n=11)
    runs = load_runs(path)
    # In seed order (seed10 after seed9, not after seed1).
    assert [r.run_dir.name for r in runs] == [f"seed{i}" for i in range(11)]
    assert all(r.env_id == "brax/HalfCheetahVelocity" for r in runs)
    np.testing.assert_array_equal(runs[10].episode_return, 100.0 + runs[0].env_steps / 1000)
    assert len(group_runs(runs)) == 1
    # A plain run is itself; a seed directory of a multi-seed run is a run too.
    assert [r.run_dir for r in load_runs(path / "seed3")] == [path / "seed3"]


def test_host_loop_and_device_runs_of_one_task_are_separate_curves(tmp_path):
    device = load_runs(multi_seed_run(tmp_path / "device", n=2))
    host = [
        load_run(
            make_run(
                tmp_path / f"host{i}",
                [(s, 5.0 + i, 20.0) for s in range(1000, 6001, 1000)],
                env_id="brax/HalfCheetahVelocity",
                loop="host",
            )
        )
        for i in range(2)
    ]
    assert {r.loop for r in device} == {"device"} and {r.loop for r in host} == {"host"}
    groups = group_runs([*device, *host])
    assert [[r.run_dir.name for r in g] for g in groups] == [["seed0", "seed1"], ["host0", "host1"]]
    out = plot_runs([*device, *host], tmp_path / "both.png")
    assert out.read_bytes().startswith(PNG_MAGIC)
    labels = [_group_label(g, "minmax", True) for g in groups]
    assert labels == [
        "brax/HalfCheetahVelocity on device: mean of 2 seeds (minmax band)",
        "brax/HalfCheetahVelocity (host loop): mean of 2 seeds (minmax band)",
    ]
    assert load_run(make_run(tmp_path / "sg", [(1000, 1.0, 5.0)])).loop == "host"


def test_load_runs_rejects_directories_without_runs(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(NotPlottableError, match="not a cvpo-jax run directory"):
        load_runs(tmp_path / "empty")
    path = multi_seed_run(tmp_path / "run", n=2)
    (path / "seed1" / "metrics.csv").write_text(HEADER + "1000,1.0,100.0,0,,,,0,\n")
    with pytest.raises(NotPlottableError, match="no rows with finished episodes"):
        load_runs(path)


def test_cli_draws_a_multi_seed_run_as_mean_and_band(tmp_path):
    path = multi_seed_run(tmp_path / "run")
    proc = run_cli(f"run_dir={path}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    data = (path / "curves.png").read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 10_000
    assert f"wrote {path / 'curves.png'}" in proc.stdout


@pytest.mark.slow
def test_plots_a_multi_seed_run_of_the_on_device_loop(tmp_path):
    from scripted_jax_env import ScriptedJaxEnv
    from test_device_loop import ALGO, CFG

    from cvpo_jax.device_train import train_on_device

    result = train_on_device(
        CFG, ALGO, ScriptedJaxEnv(), tmp_path / "run", num_seeds=2, progress=False
    )
    assert result.status == "completed"
    runs = load_runs(tmp_path / "run")
    assert [r.run_dir.name for r in runs] == ["seed0", "seed1"]
    for run in runs:
        assert run.env_id == "ScriptedJax-v0" and run.cost_limit == ALGO.cost_limit
        np.testing.assert_array_equal(run.env_steps, [100, 200, 300, 400])
    assert not np.allclose(runs[0].episode_return, runs[1].episode_return)  # Their own seeds.
    out = plot_runs(runs, tmp_path / "curves.png")
    assert out.read_bytes().startswith(PNG_MAGIC)


def test_smooth_is_a_trailing_moving_average(tmp_path):
    run = load_run(
        make_run(
            tmp_path / "r",
            [(s, float(s // 1000), 10.0 * (s // 1000)) for s in range(1000, 5001, 1000)],
        )
    )
    out = smooth(run, 2)
    np.testing.assert_allclose(out.episode_return, [1.0, 1.5, 2.5, 3.5, 4.5])
    np.testing.assert_allclose(out.episode_cost, [10.0, 15.0, 25.0, 35.0, 45.0])
    np.testing.assert_array_equal(out.env_steps, run.env_steps)
    np.testing.assert_allclose(smooth(run, 1).episode_return, run.episode_return)
    np.testing.assert_allclose(smooth(run, 99).episode_return, [1.0, 1.5, 2.0, 2.5, 3.0])
    with pytest.raises(ValueError, match="smooth"):
        smooth(run, 0)


def test_a_folder_of_runs_and_a_glob_give_all_its_runs(tmp_path):
    sweep = tmp_path / "sweep"
    for name in ("seed=1", "seed=0"):
        make_run(sweep / name, [(1000, 1.0, 5.0)])
    multi_seed_run(sweep / "zz-device", n=2)
    (sweep / "empty").mkdir()
    names = [str(r.run_dir.relative_to(sweep)) for r in load_runs(sweep)]
    assert names == ["seed=0", "seed=1", "zz-device/seed0", "zz-device/seed1"]
    got = expand_run_dirs([f"{sweep}/seed=*", sweep / "seed=0"])
    assert got == [sweep / "seed=0", sweep / "seed=1"]
    with pytest.raises(NotPlottableError, match="matches no directory"):
        expand_run_dirs([f"{sweep}/nothing*"])


def test_cli_plots_a_glob_smoothed_and_says_how_many_seeds(tmp_path):
    seeds(tmp_path / "runs", 2)
    out = tmp_path / "c.png"
    proc = run_cli(f"run_dirs={tmp_path}/runs/seed*", "smooth=3", f"out={out}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert out.read_bytes().startswith(PNG_MAGIC)
    proc = run_cli(f"sweep_dir={tmp_path}/runs", "smooth=0", cwd=tmp_path)
    assert proc.returncode == 2 and "smooth=0 is invalid" in proc.stderr


def test_two_constraints_get_one_cost_panel_each(tmp_path):
    path = tmp_path / "two"
    path.mkdir()
    spec = ckpt.RunSpec(
        train=TrainConfig(costs=("hazards", "vases_contact")),
        algo=CVPOConfig(cost_limit=(20.0, 5.0)),
        env_id="SafetyPointGoal2-v0",
        obs_size=72,
        action_low=(-1.0, -1.0),
        action_high=(1.0, 1.0),
    )
    ckpt.save_run_spec(path, spec)
    lines = ["env_steps,episode_return,episode_cost,episodes,episode_cost_0,episode_cost_1\n"]
    lines += [f"{s},{s / 1000},{30 + s / 1000},2,{20 + s / 1000},10\n" for s in (1000, 2000)]
    (path / "metrics.csv").write_text("".join(lines))
    run = load_run(path)
    np.testing.assert_allclose(run.episode_cost, [31, 32])
    np.testing.assert_allclose(run.metric("episode_cost_0"), [21, 22])
    np.testing.assert_allclose(run.metric("episode_cost_1"), [10, 10])
    assert run.cost_names == ("hazards", "vases_contact")
    labels = [label for _, label, _ in panels(run.cost_limit, run.cost_names)]
    assert labels == ["episode return", "episode cost: hazards", "episode cost: vases_contact"]
    out = plot_runs([run, smooth(run, 2)], tmp_path / "two.png")
    assert out.read_bytes().startswith(PNG_MAGIC)
    (one,) = seeds(tmp_path / "one", 1)
    with pytest.raises(NotPlottableError, match="different numbers of constraints"):
        plot_runs([run, load_run(one)], tmp_path / "mixed.png")
