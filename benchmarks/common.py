"""Shared benchmark utilities: timing, a same-run matmul reference, machine info, output.

Every speed a benchmark reports is also given as a ratio against a reference measured
in the same run (the float32 matmul below), because the machines these run on are
often shared and absolute times drift with the load.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

RESULTS_DIR = Path(__file__).resolve().parent / "results"


# ---------------------------------------------------------------- timing
def block(tree: Any) -> Any:
    """Waits for every array in `tree` (jax dispatch is asynchronous)."""
    return jax.block_until_ready(tree)


def summarize(seconds: Sequence[float]) -> dict:
    """Median, p10/p90, min/max, mean and relative spread of a list of durations (s)."""
    x = np.asarray(seconds, np.float64)
    if x.size == 0:
        raise ValueError("no timings to summarize")
    median = float(np.median(x))
    p10, p90 = (float(v) for v in np.percentile(x, [10, 90]))
    return {
        "n": int(x.size),
        "median_s": median,
        "p10_s": p10,
        "p90_s": p90,
        "min_s": float(x.min()),
        "max_s": float(x.max()),
        "mean_s": float(x.mean()),
        # (p90 - p10) / median: how noisy the figure is (0 = perfectly steady).
        "spread": (p90 - p10) / median if median > 0 else 0.0,
    }


def measure(call: Callable[[], Any], warmup: int = 2, repeats: int = 10) -> list[float]:
    """Times `call()` (which must block on its own results) `repeats` times after warm-up."""
    for _ in range(warmup):
        call()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        call()
        times.append(time.perf_counter() - t0)
    return times


def measure_interleaved(
    calls: dict[str, Callable[[], Any]], warmup: int = 2, repeats: int = 10
) -> dict[str, list[float]]:
    """Times several calls round-robin, so that a change of machine load hits them alike.

    Each `calls[name]()` must block on its own results. Returns name -> durations (s).
    """
    for _ in range(warmup):
        for call in calls.values():
            call()
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(repeats):
        for name, call in calls.items():
            t0 = time.perf_counter()
            call()
            times[name].append(time.perf_counter() - t0)
    return times


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    """(fn(), seconds) for a one-off step such as lowering or compiling."""
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


# ---------------------------------------------------------------- FLOPs
def compiled_flops(compiled: Any) -> float:
    """FLOPs from XLA's cost analysis of a compiled computation.

    `Compiled.cost_analysis()` returns a dict in current jax (a list of per-module
    dicts in older versions). Caution: XLA counts the body of a while loop (a
    `lax.scan`) once, whatever its trip count; callers correct for that.
    """
    analysis = compiled.cost_analysis()
    if analysis is None:
        return float("nan")
    if isinstance(analysis, dict):
        analysis = [analysis]
    return float(sum(float(a.get("flops", 0.0)) for a in analysis))


def jit_flops(fn: Callable, *args, **kwargs) -> float:
    """FLOPs of `jax.jit(fn)(*args)` by XLA's cost analysis (loop bodies counted once)."""
    return compiled_flops(jax.jit(fn, **kwargs).lower(*args).compile())


def matmul_reference(n: int = 2048, warmup: int = 2, repeats: int = 10) -> dict:
    """FLOP/s of a jitted float32 n x n x n matrix product: the same-run speed ceiling."""
    ka, kb = jax.random.split(jax.random.PRNGKey(0))
    a = jax.random.normal(ka, (n, n), jnp.float32)
    b = jax.random.normal(kb, (n, n), jnp.float32)
    f = jax.jit(jnp.matmul)
    times = measure(lambda: block(f(a, b)), warmup=warmup, repeats=repeats)
    flops = 2.0 * n**3
    stats = summarize(times)
    return {
        "n": n,
        "flops": flops,
        "time": stats,
        "flops_per_s": flops / stats["median_s"],
        "times_s": times,
    }


def pool_references(*refs: dict) -> dict:
    """Pools matmul references taken at several points of a run (e.g. start and end).

    The pooled `flops_per_s` (from the median of all timings) is the figure the
    benchmark divides by; each run's own figure is kept to show the drift.
    """
    times = [t for r in refs for t in r["times_s"]]
    stats = summarize(times)
    return {
        "n": refs[0]["n"],
        "flops": refs[0]["flops"],
        "time": stats,
        "flops_per_s": refs[0]["flops"] / stats["median_s"],
        "per_run_flops_per_s": [r["flops_per_s"] for r in refs],
    }


# ---------------------------------------------------------------- XLA:CPU workaround
# jaxlib 0.10.2's CPU LAPACK kernels (here the triangular solves inside distrax's
# MultivariateNormalTri log_prob / KL, used by the M-step) split a large batch into
# tasks on XLA's intra-op thread pool and block until they finish. When as many such
# calls run concurrently as the pool has threads (2 on a 2-core machine), every pool
# thread waits and the update never returns. XLA's memory-oriented scheduler keeps
# those calls apart; on this machine it made no measurable difference to speed.
XLA_CPU_WORKAROUND_FLAG = "--xla_cpu_enable_concurrency_optimized_scheduler=false"


def apply_xla_cpu_workaround(enable: bool = True) -> dict:
    """Adds XLA_CPU_WORKAROUND_FLAG to XLA_FLAGS (effective only before jax starts a backend)."""
    try:
        from jax._src import xla_bridge

        initialized = bool(xla_bridge.backends_are_initialized())
    except Exception:
        initialized = None
    before = os.environ.get("XLA_FLAGS", "")
    if enable and "xla_cpu_enable_concurrency_optimized_scheduler" not in before:
        os.environ["XLA_FLAGS"] = (before + " " + XLA_CPU_WORKAROUND_FLAG).strip()
    after = os.environ.get("XLA_FLAGS", "")
    # A flag added now only counts if no backend has read XLA_FLAGS yet.
    in_effect = XLA_CPU_WORKAROUND_FLAG in (after if initialized is False else before)
    return {
        "requested": enable,
        "xla_flags": after,
        "in_effect": in_effect,
        "backend_already_initialized": initialized,
    }


# ---------------------------------------------------------------- machine and versions
def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(module: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(module)
    except Exception:
        return None


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=5,
        )
        return out.stdout.strip() or None
    except Exception:
        return None


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def machine_info() -> dict:
    """CPU, cores, load, library versions, jax backend and devices, date, commit."""
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    return {
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "usable_cores": usable,
        "load_average_1_5_15": load_average(),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "versions": {
            name: _version(name)
            for name in ("jax", "jaxlib", "flax", "optax", "distrax", "numpy", "scipy")
        },
        "jax_backend": jax.default_backend(),
        "jax_devices": [str(d) for d in jax.devices()],
        "device_kind": jax.devices()[0].device_kind,
        "date_utc": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "git_commit": _git_commit(),
    }


# ---------------------------------------------------------------- command line and output
def base_parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument(
        "--quick",
        action="store_true",
        help="tiny sizes and one repetition (a smoke test; the figures mean nothing)",
    )
    parser.add_argument(
        "--repeats", type=int, default=None, help="timed repetitions per measurement"
    )
    parser.add_argument(
        "--out",
        type=str,
        default=None,
        help="JSON output: a file (*.json) or a folder. Default: benchmarks/results/<name>.json, "
        "or a temporary folder with --quick",
    )
    return parser


def output_path(name: str, out: str | None, quick: bool) -> Path:
    """Where a benchmark's JSON goes (see `base_parser`'s --out)."""
    if out:
        path = Path(out)
        return path if path.suffix == ".json" else path / f"{name}.json"
    if quick:
        return Path(tempfile.mkdtemp(prefix="cvpo_bench_")) / f"{name}.json"
    return RESULTS_DIR / f"{name}.json"


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (np.ndarray, jax.Array)):
        return _jsonable(np.asarray(x).tolist())
    if isinstance(x, (np.floating, float)):
        x = float(x)
        return x if math.isfinite(x) else str(x)
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (np.bool_,)):
        return bool(x)
    return x


def write_json(path: Path, payload: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        json.dump(_jsonable(payload), f, indent=2, sort_keys=False)
        f.write("\n")
    return path


def format_table(title: str, headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A Markdown table (also readable on a terminal)."""

    def cell(v: Any) -> str:
        if isinstance(v, float):
            if v == 0 or not math.isfinite(v):
                return str(v)
            if abs(v) >= 1e4 or abs(v) < 1e-3:
                return f"{v:.3g}"
            return f"{v:.4g}" if abs(v) < 10 else f"{v:.1f}"
        return str(v)

    cells = [[cell(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    line = lambda vals: (
        "| " + " | ".join(v.ljust(w) for v, w in zip(vals, widths, strict=True)) + " |"
    )  # noqa: E731
    out = [f"\n{title}\n", line(headers), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out += [line(r) for r in cells]
    return "\n".join(out)


def print_table(title: str, headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    text = format_table(title, headers, rows)
    print(text, flush=True)
    return text
