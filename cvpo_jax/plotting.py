"""Learning curves of runs: episode return and cost against env steps, from metrics.csv.

    runs = load_runs("runs/brax-halfcheetah")      # a run, or a multi-seed run: one per seed
    plot_runs(runs, Path("curves.png"))             # seeds drawn as their mean and band

A run directory holds run.json and metrics.csv (the host loop's runs, and each
``seed<i>/`` of an on-device multi-seed run). Two panels: the mean episode return
and episode cost of the episodes that ended in each logging interval
(training-time numbers), with the run's cost limit as a dashed line. Runs of the
same environment and cost limit (e.g. seeds) are drawn as their mean,
interpolated onto the union of their env_steps, with a min-max (or ±std) band.

Drawing uses matplotlib's object API without pyplot, so it neither needs a
display nor changes the backend of a notebook that imports it.
"""

from __future__ import annotations

import csv
import dataclasses
import glob
import math
import os
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from cvpo_jax.run_logging import episode_cost_columns

BANDS = ("minmax", "std")
METRICS_FILE = "metrics.csv"
_SEED_DIR = re.compile(r"seed(\d+)$")


class NotPlottableError(ValueError):
    """A directory that is not a run, or a run with nothing to plot yet."""


@dataclasses.dataclass(frozen=True)
class RunCurves:
    """One run's training-time curves: rows of metrics.csv with finished episodes."""

    run_dir: Path
    env_id: str
    cost_limit: tuple[float, ...]
    env_steps: np.ndarray  # [T]
    episode_return: np.ndarray  # [T]
    episode_cost: np.ndarray  # [T] (with several constraints: their sum)
    constraint_costs: tuple[np.ndarray, ...] = ()  # [T] per constraint when M > 1
    cost_names: tuple[str, ...] = ("sum",)  # The run's cost signals (TrainConfig.costs).
    loop: str = "host"  # "device" for the on-device loop's runs.

    def metric(self, name: str) -> np.ndarray:
        """A curve by name: episode_return, episode_cost or episode_cost_<m>."""
        if name.startswith("episode_cost_"):
            return self.constraint_costs[int(name.rsplit("_", 1)[1])]
        return getattr(self, name)


def panels(
    cost_limit: Sequence[float], names: Sequence[str] = ()
) -> list[tuple[str, str, float | None]]:
    """(metric, y label, cost limit drawn) of each panel: return, then one cost panel
    per constraint (labelled with its signal's name when `names` has one per limit)."""
    first = ("episode_return", "episode return", None)
    if len(cost_limit) == 1:
        return [first, ("episode_cost", "episode cost", cost_limit[0])]
    labels = names if len(names) == len(cost_limit) else [str(m) for m in range(len(cost_limit))]
    return [first] + [
        (f"episode_cost_{m}", f"episode cost: {label}", limit)
        for m, (label, limit) in enumerate(zip(labels, cost_limit, strict=True))
    ]


def csv_float(text: str | None) -> float:
    """A metrics.csv cell as a float; empty or unparsable cells are NaN."""
    try:
        return float(text) if text not in (None, "") else math.nan
    except ValueError:
        return math.nan


def load_run(run_dir: str | os.PathLike) -> RunCurves:
    """Reads run.json and metrics.csv of one run.

    Raises:
      NotPlottableError: not a run, no metrics.csv, or no finished episodes in it.
    """
    from cvpo_jax.checkpoint import NotARunError, load_run_spec

    run_dir = Path(run_dir)
    try:
        spec = load_run_spec(run_dir)
    except NotARunError as err:
        raise NotPlottableError(str(err)) from err
    except (ValueError, KeyError, TypeError) as err:
        raise NotPlottableError(f"{str(run_dir)!r} has an unreadable run.json ({err}).") from err
    path = run_dir / METRICS_FILE
    if not path.is_file():
        raise NotPlottableError(
            f"{str(run_dir)!r} has no {METRICS_FILE} (has the run logged yet?)."
        )
    per_constraint = episode_cost_columns(len(spec.algo.cost_limit))
    needed = ("env_steps", "episode_return", "episode_cost", *per_constraint)
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in needed if c not in (reader.fieldnames or [])]
        if missing:
            raise NotPlottableError(f"{str(path)!r} is empty or lacks the column(s) {missing}.")
        rows = [tuple(csv_float(r[c]) for c in needed) for r in reader]
    data = np.asarray(rows, np.float64).reshape(-1, len(needed))
    data = data[np.all(np.isfinite(data), axis=1)]
    if data.shape[0] == 0:
        raise NotPlottableError(
            f"{str(path)!r} has no rows with finished episodes yet; nothing to plot."
        )
    data = data[np.argsort(data[:, 0], kind="stable")]
    return RunCurves(
        run_dir=run_dir,
        env_id=spec.env_id,
        cost_limit=tuple(float(c) for c in spec.algo.cost_limit),
        env_steps=data[:, 0],
        episode_return=data[:, 1],
        episode_cost=data[:, 2],
        constraint_costs=tuple(data[:, 3 + m] for m in range(len(per_constraint))),
        cost_names=tuple(spec.train.costs),
        loop="device" if spec.on_device else "host",
    )


def seed_dirs(run_dir: str | os.PathLike) -> list[Path]:
    """The ``seed<i>/`` subdirectories of a multi-seed run, in seed order (may be empty)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    found = []
    for child in run_dir.iterdir():
        match = _SEED_DIR.match(child.name)
        if match and child.is_dir() and (child / METRICS_FILE).is_file():
            found.append((int(match.group(1)), child))
    return [path for _, path in sorted(found)]


def load_runs(run_dir: str | os.PathLike) -> list[RunCurves]:
    """The runs in a directory: [the run] for a run, one per seed for a multi-seed run,
    and every run below a folder of runs (a sweep directory, runs/<env>/).

    A directory with its own metrics.csv is one run. Otherwise its ``seed<i>/``
    subdirectories holding a metrics.csv (what ``train_on_device`` writes) are its
    seeds, loaded in seed order. Otherwise each subdirectory that holds a run (or a
    multi-seed run) contributes its runs, in name order.

    Raises:
      NotPlottableError: none of these, or a run with nothing to plot yet.
    """
    run_dir = Path(run_dir)
    if (run_dir / METRICS_FILE).is_file():
        return [load_run(run_dir)]
    seeds = seed_dirs(run_dir)
    if seeds:
        return [load_run(path) for path in seeds]
    children = sorted(p for p in run_dir.iterdir() if p.is_dir()) if run_dir.is_dir() else []
    runs = [c for c in children if (c / METRICS_FILE).is_file() or seed_dirs(c)]
    if not runs:
        return [load_run(run_dir)]  # Raises the reason it is not a run.
    return [run for c in runs for run in load_runs(c)]


def expand_run_dirs(patterns: Sequence[str | os.PathLike]) -> list[Path]:
    """Paths with glob patterns (``runs/SafetyPointGoal1-v0/*``) expanded to the
    matching directories, in name order; other paths as given, duplicates dropped.

    Raises:
      NotPlottableError: a pattern that matches no directory.
    """
    out: list[Path] = []
    for pattern in patterns:
        text = os.path.expanduser(str(pattern))
        if not glob.has_magic(text):
            out.append(Path(text))
            continue
        matches = sorted(Path(m) for m in glob.glob(text) if Path(m).is_dir())
        if not matches:
            raise NotPlottableError(f"{text!r} matches no directory.")
        out.extend(matches)
    return list(dict.fromkeys(out))


def smooth(run: RunCurves, window: int) -> RunCurves:
    """The run with return and cost replaced by their trailing moving average over
    `window` logged rows (fewer at the start); window 1 leaves it unchanged."""
    if not isinstance(window, int) or isinstance(window, bool) or window < 1:
        raise ValueError(f"smooth={window!r} must be an integer >= 1 (logged rows).")

    def trailing_mean(x: np.ndarray) -> np.ndarray:
        total = np.cumsum(np.concatenate([[0.0], x]))
        n = np.arange(1, x.shape[0] + 1)
        lo = np.maximum(n - window, 0)
        return (total[n] - total[lo]) / (n - lo)

    return dataclasses.replace(
        run,
        episode_return=trailing_mean(run.episode_return),
        episode_cost=trailing_mean(run.episode_cost),
        constraint_costs=tuple(trailing_mean(c) for c in run.constraint_costs),
    )


def group_runs(runs: Sequence[RunCurves]) -> list[list[RunCurves]]:
    """Runs of the same env, loop and cost limit (e.g. seeds), in order of first
    appearance."""
    groups: dict[tuple, list[RunCurves]] = {}
    for run in runs:
        groups.setdefault((run.env_id, run.loop, run.cost_limit), []).append(run)
    return list(groups.values())


def aggregate(runs: Sequence[RunCurves], metric: str, band: str = "minmax"):
    """Mean and band of several runs on the union of their env_steps.

    Each run is linearly interpolated between its own first and last logged step
    and left out outside them, so a point's statistics cover the runs that reached it.

    Returns:
      (grid [G], mean [G], low [G], high [G], count [G] runs covering each point).
    """
    if band not in BANDS:
        raise ValueError(f"band={band!r} must be one of {BANDS}.")
    grid = np.unique(np.concatenate([r.env_steps for r in runs]))
    values = np.full((len(runs), grid.shape[0]), np.nan)
    for i, run in enumerate(runs):
        inside = (grid >= run.env_steps[0]) & (grid <= run.env_steps[-1])
        values[i, inside] = np.interp(grid[inside], run.env_steps, run.metric(metric))
    count = np.sum(np.isfinite(values), axis=0)
    mean = np.nanmean(values, axis=0)
    if band == "minmax":
        low, high = np.nanmin(values, axis=0), np.nanmax(values, axis=0)
    else:
        std = np.nanstd(values, axis=0)
        low, high = mean - std, mean + std
    return grid, mean, low, high, count


def _env_label(run: RunCurves) -> str:
    """The env id, with the loop for JAX tasks (which can train in either)."""
    if run.loop == "device":
        return f"{run.env_id} on device"
    from cvpo_jax.envs.registry import is_jax_env

    return f"{run.env_id} (host loop)" if is_jax_env(run.env_id) else run.env_id


def _group_label(group: Sequence[RunCurves], band: str, several_groups: bool) -> str:
    env_id = _env_label(group[0])
    if len(group) == 1:
        label = group[0].run_dir.name or str(group[0].run_dir)
        return f"{env_id}: {label} (1 seed)" if several_groups else f"{label} (1 seed)"
    return f"{env_id}: mean of {len(group)} seeds ({band} band)"


def plot_runs(
    runs: Sequence[RunCurves], out: str | os.PathLike, band: str = "minmax", title=None
) -> Path:
    """Draws the panels (return, then one cost panel per constraint) and writes the PNG
    atomically to `out`; returns its path."""
    from matplotlib import rcParams
    from matplotlib.figure import Figure
    from matplotlib.ticker import EngFormatter

    if not runs:
        raise NotPlottableError("no runs to plot.")
    if band not in BANDS:
        raise ValueError(f"band={band!r} must be one of {BANDS}.")
    out = Path(out)
    if len({len(r.cost_limit) for r in runs}) > 1:
        raise NotPlottableError(
            "the runs have different numbers of constraints; plot them separately."
        )
    layout = panels(runs[0].cost_limit, runs[0].cost_names)
    groups = group_runs(runs)
    fig = Figure(figsize=(8, 3.5 * len(layout)), layout="constrained")
    axes = fig.subplots(len(layout), 1, sharex=True)
    colors = rcParams["axes.prop_cycle"].by_key()["color"]
    limits_drawn: set[tuple[int, float]] = set()
    for g, group in enumerate(groups):
        color = colors[g % len(colors)]
        label = _group_label(group, band, len(groups) > 1)
        for ax, (metric, _, _) in zip(axes, layout, strict=True):
            if len(group) == 1:
                x, y = group[0].env_steps, group[0].metric(metric)
            else:
                x, y, low, high, _ = aggregate(group, metric, band)
                ax.fill_between(x, low, high, color=color, alpha=0.2, lw=0)
            ax.plot(
                x, y, color=color, marker="o" if x.size <= 30 else None, ms=3, lw=1.5, label=label
            )
        for p, (_, _, limit) in enumerate(panels(group[0].cost_limit)):
            if limit is None or (p, limit) in limits_drawn:
                continue
            limits_drawn.add((p, limit))
            line_color = "black" if len(groups) == 1 else color
            axes[p].axhline(limit, color=line_color, ls="--", lw=1.2, label=f"cost limit {limit:g}")
    for ax, (_, ylabel, _) in zip(axes, layout, strict=True):
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(loc="best", fontsize="small")
    axes[-1].set_xlabel("env steps")
    axes[-1].set_xlim(left=0)
    axes[-1].xaxis.set_major_formatter(EngFormatter(sep=""))
    envs = list(dict.fromkeys(run.env_id for run in runs))
    fig.suptitle(title or ", ".join(envs) + " (training-time episodes)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    try:
        fig.savefig(tmp, format="png", dpi=110)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            tmp.unlink()
    return out
