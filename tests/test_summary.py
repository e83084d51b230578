"""Window summaries of metrics.csv against a hand computation."""

import csv
import math

import pytest

from cvpo_jax.summary import markdown_header, markdown_row, window_summary


def _write(path, rows):
    path.mkdir()
    keys = sorted({k for r in rows for k in r})
    with (path / "metrics.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)


def test_episode_means_are_weighted_by_episodes_and_diagnostics_averaged(tmp_path):
    rows = [
        dict(env_steps=1000, episodes=4, episode_return=100.0, episode_cost=0, **{"lambda": 9}),
        dict(
            env_steps=2000,
            episodes=1,
            episode_return=10.0,
            episode_cost=50,
            lambda_at_upper=1.0,
            lambda_at_lower=0.0,
            calib_qc_bias=0.5,
            calib_qc_mc=2.0,
            **{"lambda": 1},
        ),
        dict(
            env_steps=3000,
            episodes=0,
            episode_return="",
            episode_cost="",
            lambda_at_upper=0.0,
            lambda_at_lower=0.5,
            calib_qc_bias="",
            **{"lambda": 3},
        ),
        dict(
            env_steps=4000,
            episodes=3,
            episode_return=20.0,
            episode_cost=10,
            lambda_at_upper=0.0,
            lambda_at_lower=0.0,
            **{"lambda": 5},
        ),
    ]
    _write(tmp_path / "r", rows)
    s = window_summary(tmp_path / "r", 1000, 4000)
    assert s["episodes"] == 4
    assert s["episode_return"] == pytest.approx((10 + 3 * 20) / 4)
    assert s["episode_cost"] == pytest.approx((50 + 30) / 4)
    assert s["lambda"] == pytest.approx(3.0)
    assert s["lambda_at_bound"] == pytest.approx(1 / 3 + 0.5 / 3)
    assert s["qc_bias"] == pytest.approx(0.5)
    assert math.isnan(s["estep_feasible"])
    line = markdown_row("v", {**s, "estep_feasible": 0.5, "steps_per_s": 300.0})
    assert line.startswith("| v | 17.5 | 20.0 |") and "+0.50 (2.00)" in line
    assert markdown_header().count("|") > 6


def test_missing_run_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a run directory"):
        window_summary(tmp_path / "nope", 0, 1)


def test_summarize_cli_prints_one_row_per_run_and_rejects_bad_keys(tmp_path, capsys):
    from omegaconf import OmegaConf

    from experiments.cli import UsageError
    from experiments.summarize import _main

    rows = [
        dict(env_steps=s, episodes=1, episode_return=float(s), episode_cost=1.0)
        for s in (1000, 2000, 3000)
    ]
    _write(tmp_path / "a", rows)
    _write(tmp_path / "b", rows)
    cfg = OmegaConf.create(
        {"run_dirs": [str(tmp_path / "a"), str(tmp_path / "b")], "last": 2000, "window": None}
    )
    assert _main(cfg) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 4 and out[2].split("|")[2].strip() == "2500.0"  # rows 2000, 3000
    with pytest.raises(UsageError, match="exactly one"):
        _main(OmegaConf.create({"run_dirs": [str(tmp_path / "a")], "last": None, "window": None}))
    with pytest.raises(UsageError, match="unknown"):
        _main(OmegaConf.create({"run_dirs": [], "bogus": 1}))
