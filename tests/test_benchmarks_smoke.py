"""Smoke tests of the benchmarks: each runs with --quick and writes its JSON.

Only the structure of the output is checked (keys present, figures positive and
finite); timings are never compared with anything.
"""

import json
import math

import pytest

from benchmarks import estep as estep_bench
from benchmarks import update_step as update_bench

pytestmark = pytest.mark.slow


def _positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def _check_machine(data):
    machine = data["machine"]
    for key in ("cpu_model", "cpu_count", "versions", "jax_backend", "jax_devices", "date_utc"):
        assert key in machine, key
    for lib in ("jax", "jaxlib", "flax", "optax"):
        assert machine["versions"][lib], lib
    assert _positive(data["matmul_reference"]["flops_per_s"])


def _check_time(stats):
    for key in ("median_s", "p90_s", "min_s", "max_s"):
        assert _positive(stats[key]), (key, stats)
    assert _finite(stats["spread"])


def test_update_step_benchmark_quick(tmp_path):
    out = tmp_path / "update_step.json"
    update_bench.main(["--quick", "--out", str(out)])
    data = json.loads(out.read_text())
    assert data["benchmark"] == "update_step" and data["quick"] is True
    _check_machine(data)
    assert data["results"], "no setting was run"
    for result in data["results"].values():
        assert result["settings"]["obs_size"] == 72
        for key in ("lower_s", "compile_s", "total_s"):
            assert _positive(result["compile"][key]), key
        _check_time(result["update"])
        assert _positive(result["update"]["updates_per_s"])
        assert _positive(result["flops"]["xla"])
        assert _positive(result["flops"]["by_hand_matmul"]["total_naive"])
        # XLA counts a loop body once; the correction must agree with the 1-step compile.
        assert result["flops"]["loop_correction_check"] == pytest.approx(1.0, rel=0.05)
        assert _positive(result["achieved_flops_per_s"])
        assert _positive(result["fraction_of_matmul"])
        assert set(result["breakdown"]) >= {"critic_update", "estep", "mstep"}
        for part in result["breakdown"].values():
            _check_time(part)
            assert _positive(part["flops_xla"])
            assert _positive(part["fraction_of_matmul"])
        many = result["update_many"]
        for key in ("per_update_separate_s", "per_update_many_s", "speedup"):
            assert _positive(many[key]), key
    assert "Breakdown" in data["tables"]


def test_estep_benchmark_quick(tmp_path):
    estep_bench.main(["--quick", "--out", str(tmp_path)])
    data = json.loads((tmp_path / "estep.json").read_text())
    assert data["benchmark"] == "estep" and data["quick"] is True
    _check_machine(data)
    assert data["cases"], "no problem size was run"
    for case in data["cases"]:
        assert _finite(case["optimum"]["objective"])
        assert set(case["solvers"]) == {"jax_warm", "jax_cold", "slsqp", "slsqp_warm", "slsqp_jac"}
        for solver in case["solvers"].values():
            _check_time(solver["time"])
            assert _positive(solver["speedup_vs_slsqp"])
            assert _finite(solver["objective"])
            assert _finite(solver["rel_gap_vs_slsqp"])
            assert _finite(solver["rel_gap_vs_optimum"])
            assert _positive(solver["eta"])
    assert data["vmap"]
    for v in data["vmap"]:
        assert set(v["solvers"]) == {
            "jax_vmap_warm",
            "jax_vmap_cold",
            "slsqp_loop",
            "slsqp_loop_warm",
        }
        for solver in v["solvers"].values():
            _check_time(solver["time"])
            assert _positive(solver["speedup_vs_slsqp_loop"])
            assert _finite(solver["rel_gap_vs_slsqp"]["median"])


def test_throughput_benchmark_quick(tmp_path):
    from benchmarks import throughput

    out = tmp_path / "throughput.json"
    throughput.main(["--quick", "--out", str(out)])
    data = json.loads(out.read_text())
    assert data["machine"]["versions"]["jax"] and data["settings"]["quick"] is True
    for part in ("before", "after"):
        assert _positive(data["raw_env"][part]["steps_per_s"])
    assert _positive(data["training"]["steps_per_s"]) and data["training"]["updates"] > 0
    assert _positive(data["ratio_training_to_raw"])


def test_nav_env_rate_arguments_default_to_three_repeats():
    """The full run (no --quick) times 3 repeats unless told otherwise; --quick one."""
    from benchmarks import nav_env_rate

    assert nav_env_rate.parse_args(["--envs", "1", "16"]).repeats == 3
    assert nav_env_rate.parse_args(["--repeats", "5"]).repeats == 5
    assert nav_env_rate.parse_args(["--quick"]).repeats == 1
