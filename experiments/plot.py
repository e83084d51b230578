"""Plot learning curves (episode return and cost against env steps) from metrics.csv.

    python -m experiments.plot run_dir=runs/CarGoal1/seed0-20250101-120000
    python -m experiments.plot 'run_dirs=[runs/CarGoal1/seed0-...,runs/CarGoal1/seed1-...]'
    python -m experiments.plot run_dirs=[A,B,C] band=std out=figures/cargoal1.png

Hydra takes each key once, so several runs go in one list, `run_dirs=[A,B]`
(`run_dir=A` is the same as `run_dirs=[A]`; both may be given). Quote paths with
characters hydra's grammar does not accept bare, e.g. 'run_dirs=["~/runs/a"]'.

Two panels: the mean episode return and episode cost of the episodes that ended in
each logging interval (training-time numbers), with the run's cost limit as a
dashed line. Runs of the same environment and cost limit (e.g. seeds) are drawn as
their mean, interpolated onto the union of their env_steps, with a min-max (or
±std) band. The PNG goes to `out`, by default <first run_dir>/curves.png.
"""

from __future__ import annotations

import csv
import dataclasses
import math
import os
from collections.abc import Sequence
from pathlib import Path

import hydra
import numpy as np
from omegaconf import DictConfig

from experiments.cli import UsageError, run_cli, to_dict

KEYS = {"run_dir", "run_dirs", "band", "out", "title"}
BANDS = ("minmax", "std")
METRICS_FILE = "metrics.csv"
PANELS = (("episode_return", "episode return"), ("episode_cost", "episode cost"))


@dataclasses.dataclass(frozen=True)
class RunCurves:
    """One run's training-time curves: rows of metrics.csv with finished episodes."""

    run_dir: Path
    env_id: str
    cost_limit: tuple[float, ...]
    env_steps: np.ndarray  # [T]
    episode_return: np.ndarray  # [T]
    episode_cost: np.ndarray  # [T]


def _float(text: str | None) -> float:
    try:
        return float(text) if text not in (None, "") else math.nan
    except ValueError:
        return math.nan


def load_run(run_dir: str | os.PathLike) -> RunCurves:
    """Reads run.json and metrics.csv of a run.

    Raises:
      UsageError: not a run, no metrics.csv, or no finished episodes in it.
    """
    from cvpo_jax.checkpoint import NotARunError, load_run_spec

    run_dir = Path(run_dir)
    try:
        spec = load_run_spec(run_dir)
    except NotARunError as err:
        raise UsageError(str(err)) from err
    except (ValueError, KeyError, TypeError) as err:
        raise UsageError(f"{str(run_dir)!r} has an unreadable run.json ({err}).") from err
    path = run_dir / METRICS_FILE
    if not path.is_file():
        raise UsageError(f"{str(run_dir)!r} has no {METRICS_FILE} (has the run logged yet?).")
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        needed = ("env_steps", "episode_return", "episode_cost")
        missing = [c for c in needed if c not in (reader.fieldnames or [])]
        if missing:
            raise UsageError(f"{str(path)!r} is empty or lacks the column(s) {missing}.")
        rows = [
            (_float(r["env_steps"]), _float(r["episode_return"]), _float(r["episode_cost"]))
            for r in reader
        ]
    data = np.asarray(rows, np.float64).reshape(-1, 3)
    data = data[np.all(np.isfinite(data), axis=1)]
    if data.shape[0] == 0:
        raise UsageError(f"{str(path)!r} has no rows with finished episodes yet; nothing to plot.")
    data = data[np.argsort(data[:, 0], kind="stable")]
    return RunCurves(
        run_dir=run_dir,
        env_id=spec.env_id,
        cost_limit=tuple(float(c) for c in spec.algo.cost_limit),
        env_steps=data[:, 0],
        episode_return=data[:, 1],
        episode_cost=data[:, 2],
    )


def group_runs(runs: Sequence[RunCurves]) -> list[list[RunCurves]]:
    """Runs of the same env and cost limit (e.g. seeds), in order of first appearance."""
    groups: dict[tuple, list[RunCurves]] = {}
    for run in runs:
        groups.setdefault((run.env_id, run.cost_limit), []).append(run)
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
        values[i, inside] = np.interp(grid[inside], run.env_steps, getattr(run, metric))
    count = np.sum(np.isfinite(values), axis=0)
    mean = np.nanmean(values, axis=0)
    if band == "minmax":
        low, high = np.nanmin(values, axis=0), np.nanmax(values, axis=0)
    else:
        std = np.nanstd(values, axis=0)
        low, high = mean - std, mean + std
    return grid, mean, low, high, count


def plot_runs(runs: Sequence[RunCurves], out: Path, band: str = "minmax", title=None) -> None:
    """Draws the two panels and writes the PNG atomically to `out`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import EngFormatter

    groups = group_runs(runs)
    fig, axes = plt.subplots(2, 1, figsize=(8, 7), sharex=True, constrained_layout=True)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    limits_drawn: set[float] = set()
    for g, group in enumerate(groups):
        color = colors[g % len(colors)]
        env_id, cost_limit = group[0].env_id, group[0].cost_limit
        if len(group) == 1:
            label = group[0].run_dir.name or str(group[0].run_dir)
            if len(groups) > 1:
                label = f"{env_id}: {label}"
        else:
            label = f"{env_id}: mean of {len(group)} runs ({band} band)"
        for ax, (metric, _) in zip(axes, PANELS, strict=True):
            if len(group) == 1:
                run = group[0]
                x, y = run.env_steps, getattr(run, metric)
                ax.plot(
                    x,
                    y,
                    color=color,
                    marker="o" if x.size <= 30 else None,
                    ms=3,
                    lw=1.5,
                    label=label,
                )
            else:
                x, mean, low, high, _ = aggregate(group, metric, band)
                ax.plot(
                    x,
                    mean,
                    color=color,
                    marker="o" if x.size <= 30 else None,
                    ms=3,
                    lw=1.5,
                    label=label,
                )
                ax.fill_between(x, low, high, color=color, alpha=0.2, lw=0)
        for limit in cost_limit:
            if limit in limits_drawn:
                continue
            limits_drawn.add(limit)
            line_color = "black" if len(groups) == 1 else color
            axes[1].axhline(limit, color=line_color, ls="--", lw=1.2, label=f"cost limit {limit:g}")
    for ax, (_, ylabel) in zip(axes, PANELS, strict=True):
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(loc="best", fontsize="small")
    axes[1].set_xlabel("env steps")
    axes[1].set_xlim(left=0)
    axes[1].xaxis.set_major_formatter(EngFormatter(sep=""))
    envs = list(dict.fromkeys(run.env_id for run in runs))
    fig.suptitle(title or ", ".join(envs) + " (training-time episodes)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    try:
        fig.savefig(tmp, format="png", dpi=110)
        os.replace(tmp, out)
    finally:
        plt.close(fig)
        if tmp.exists():
            tmp.unlink()


def parse_args(cfg: DictConfig) -> dict:
    data = to_dict(cfg)
    unknown = sorted(set(data) - KEYS)
    if unknown:
        raise UsageError(f"unknown key(s) {unknown}; allowed: {', '.join(sorted(KEYS))}.")
    dirs = data.get("run_dirs") or []
    if isinstance(dirs, str):
        dirs = [dirs]
    if data.get("run_dir") not in (None, ""):
        dirs = [data["run_dir"], *dirs]
    if not dirs:
        raise UsageError("no runs given: pass run_dir=<run> or run_dirs=[<run>,<run>,...].")
    paths = list(dict.fromkeys(Path(str(d)).expanduser() for d in dirs))
    band = data.get("band")
    if band not in BANDS:
        raise UsageError(f"band={band!r} is invalid: must be one of {', '.join(BANDS)}.")
    out = data.get("out")
    out = Path(str(out)).expanduser() if out not in (None, "") else paths[0] / "curves.png"
    title = data.get("title")
    return {"run_dirs": paths, "band": band, "out": out, "title": title}


def _main(cfg: DictConfig) -> int:
    args = parse_args(cfg)
    runs = [load_run(d) for d in args["run_dirs"]]  # Every check before anything is written.
    try:
        plot_runs(runs, args["out"], args["band"], args["title"])
    except OSError as err:
        raise UsageError(f"cannot write {str(args['out'])!r}: {err}") from err
    print(f"wrote {args['out']}")
    return 0


@hydra.main(version_base=None, config_path="conf", config_name="plot")
def main(cfg: DictConfig) -> None:
    run_cli(lambda: _main(cfg))


if __name__ == "__main__":
    main()
