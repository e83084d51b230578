"""Run logging: metrics.csv, TensorBoard event files, and a progress display.

One row per logging interval: env_steps, wall_time, the mean episode_return /
episode_cost / episode_length of the episodes that ended in the interval (empty if
none did), and the mean of every update metric over the interval's updates.
Per-constraint metrics of size M are written as `name` when M = 1, else `name_i`.
With M > 1 constraints the episodes' costs are `episode_cost_i` per constraint and
`episode_cost` is their sum.
"""

from __future__ import annotations

import csv
import math
import os
import sys
from collections.abc import Mapping
from pathlib import Path

import numpy as np

METRICS_FILE = "metrics.csv"
TB_DIR = "tb"
EPISODE_COLUMNS = ("episode_return", "episode_cost", "episode_length", "episodes")
BASE_COLUMNS = ("env_steps", "wall_time", "steps_per_s", "updates", *EPISODE_COLUMNS)


def episode_cost_columns(num_constraints: int) -> list[str]:
    """The per-constraint episode-cost columns ([] for one constraint: `episode_cost`)."""
    return [] if num_constraints == 1 else [f"episode_cost_{m}" for m in range(num_constraints)]


def flat_metric_names(shapes: Mapping[str, tuple[int, ...]]) -> list[str]:
    """Column names for metrics of shape () or (M,)."""
    names = []
    for key in sorted(shapes):
        shape = tuple(shapes[key])
        if len(shape) == 0 or shape == (1,):
            names.append(key)
        elif len(shape) == 1:
            names.extend(f"{key}_{i}" for i in range(shape[0]))
        else:
            raise ValueError(f"metric {key!r} has shape {shape}; expected () or (M,)")
    return names


def flatten_metrics(metrics: Mapping[str, np.ndarray]) -> dict[str, float]:
    """Means over leading update axes of [U] or [U, M] metrics, flattened to floats."""
    out = {}
    for key in sorted(metrics):
        value = np.asarray(metrics[key], np.float64)
        if value.ndim <= 1:
            out[key] = float(np.mean(value))
        else:
            mean = value.reshape(-1, value.shape[-1]).mean(axis=0)
            if mean.shape[0] == 1:
                out[key] = float(mean[0])
            else:
                out.update({f"{key}_{i}": float(v) for i, v in enumerate(mean)})
    return out


def non_finite_metrics(metrics: Mapping[str, np.ndarray]) -> list[str]:
    """Names of the metrics holding NaN or inf, critic metrics first (where NaN starts)."""
    bad = [k for k, v in metrics.items() if not np.all(np.isfinite(np.asarray(v)))]
    return sorted(bad, key=lambda k: (not k.startswith(("critic", "q_")), k))


def truncate_csv(path: Path, max_env_steps: int) -> None:
    """Drops rows logged after `max_env_steps` (work a resumed run will redo)."""
    if not path.is_file():
        return
    with path.open(newline="") as f:
        rows = list(csv.reader(f))
    if not rows:
        return
    header, body = rows[0], rows[1:]
    idx = header.index("env_steps")
    kept = [r for r in body if r and int(float(r[idx])) <= max_env_steps]
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", newline="") as f:
        csv.writer(f).writerows([header, *kept])
    os.replace(tmp, path)


class RunLogger:
    """Accumulates episodes and update metrics; writes a row every logging interval."""

    def __init__(
        self,
        run_dir: Path,
        metric_names: list[str],
        total_steps: int,
        cost_limit: float | tuple[float, ...],
        start_step: int = 0,
        progress: bool | None = None,
        quiet: bool = False,
    ):
        self.run_dir = Path(run_dir)
        limits = tuple(cost_limit) if isinstance(cost_limit, (tuple, list)) else (cost_limit,)
        self.cost_columns = episode_cost_columns(len(limits))
        self.columns = [*BASE_COLUMNS, *self.cost_columns, *metric_names]
        self.total_steps = total_steps
        self.cost_limit = limits
        path = self.run_dir / METRICS_FILE
        truncate_csv(path, start_step)
        new_file = not path.is_file() or path.stat().st_size == 0
        if not new_file:
            with path.open(newline="") as f:
                header = next(csv.reader(f))
            if header != self.columns:
                raise ValueError(
                    f"{path} has columns {header[:6]}... that do not match this run's; "
                    "resume with the configuration the run was started with."
                )
        self._file = path.open("a", newline="")
        self._writer = csv.DictWriter(self._file, fieldnames=self.columns)
        if new_file:
            self._writer.writeheader()
            self._file.flush()
        from tensorboardX import SummaryWriter

        self._tb = SummaryWriter(str(self.run_dir / TB_DIR), purge_step=start_step or None)
        self._reset_interval()
        self.last_row: dict[str, float] = {}
        # quiet: rows go to files only (e.g. one logger per seed beside a shared display).
        self._display = (
            None if quiet else ProgressDisplay(total_steps, start_step, limits, progress)
        )

    def _reset_interval(self) -> None:
        # Per episode: (return, length, cost of each constraint...).
        self._episodes: list[tuple[float, ...]] = []
        self._updates: list[dict[str, float]] = []

    def record_episodes(self, done, episode_return, episode_cost, episode_length) -> None:
        """Episodes that ended: costs [N] (one constraint) or [N, M]."""
        costs = np.reshape(np.asarray(episode_cost, np.float64), (len(done), -1))
        for i in np.flatnonzero(np.asarray(done)):
            self._episodes.append(
                (float(episode_return[i]), float(episode_length[i]), *map(float, costs[i]))
            )

    def record_updates(self, metrics: Mapping[str, np.ndarray]) -> None:
        self._updates.append(flatten_metrics(metrics))

    def advance(self, env_steps: int) -> None:
        if self._display is not None:
            self._display.advance(env_steps)

    def write_row(
        self,
        env_steps: int,
        wall_time: float,
        steps_per_s: float,
        updates: int,
        extra: Mapping[str, float] | None = None,
    ):
        """Writes the interval's row from what was recorded since the last row (and `extra`)."""
        values = {"episodes": len(self._episodes)}
        if self._episodes:
            ret, length, *costs = np.mean(np.asarray(self._episodes), axis=0)
            values.update(episode_return=ret, episode_cost=sum(costs), episode_length=length)
            values.update(zip(self.cost_columns, costs, strict=False))
        if self._updates:
            keys = self._updates[0].keys()
            values.update({k: float(np.mean([u[k] for u in self._updates])) for k in keys})
        values.update(extra or {})
        return self.write_values(env_steps, wall_time, steps_per_s, updates, values)

    def write_values(
        self,
        env_steps: int,
        wall_time: float,
        steps_per_s: float,
        updates: int,
        values: Mapping[str, float],
    ) -> dict:
        """Writes one row from aggregated values (episode means, update-metric means)."""
        unknown = set(values) - set(self.columns)
        if unknown:
            raise ValueError(f"values for unknown columns {sorted(unknown)}")
        row: dict[str, float] = {key: math.nan for key in self.columns}
        row.update({k: (int(v) if k == "episodes" else float(v)) for k, v in values.items()})
        row.update(
            env_steps=env_steps, wall_time=wall_time, steps_per_s=steps_per_s, updates=updates
        )
        self._writer.writerow({k: ("" if _isnan(v) else v) for k, v in row.items()})
        self._file.flush()
        for key, value in row.items():
            if key != "env_steps" and not _isnan(value):
                self._tb.add_scalar(key, value, global_step=env_steps)
        self._tb.flush()
        self.last_row = row
        if self._display is not None:
            self._display.show(row)
        self._reset_interval()
        return row

    def message(self, text: str) -> None:
        if self._display is not None:
            self._display.message(text)

    def close(self) -> None:
        if self._display is not None:
            self._display.close()
        self._tb.close()
        self._file.close()


def _isnan(x) -> bool:
    return isinstance(x, float) and math.isnan(x)


class ProgressDisplay:
    """A rich progress bar on a terminal; one plain line per row otherwise."""

    def __init__(
        self, total: int, start: int, cost_limit: float | tuple[float, ...], enabled: bool | None
    ):
        if enabled is None:
            enabled = sys.stderr.isatty()
        limits = tuple(cost_limit) if isinstance(cost_limit, (tuple, list)) else (cost_limit,)
        self.cost_limit = limits
        self._progress = None
        if enabled:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeRemainingColumn,
            )

            self._progress = Progress(
                TextColumn("[bold]CVPO"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[rate]}"),
                TimeRemainingColumn(),
                TextColumn("{task.fields[stats]}"),
                transient=False,
            )
            self._task = self._progress.add_task(
                "train", total=total, completed=start, rate="", stats="warming up"
            )
            self._progress.start()

    def advance(self, env_steps: int) -> None:
        if self._progress is not None:
            self._progress.update(self._task, completed=env_steps)

    def _summary(self, row: dict) -> str:
        parts = []
        m = len(self.cost_limit)
        suffixes = [""] if m == 1 else [f"_{i}" for i in range(m)]
        if not _isnan(row.get("episode_return", math.nan)):
            parts.append(f"return {row['episode_return']:.2f}")
            costs = [row.get(f"episode_cost{s}", math.nan) for s in suffixes]
            limits = self.cost_limit
            pairs = ", ".join(f"{c:.1f}/{lim:g}" for c, lim in zip(costs, limits, strict=True))
            parts.append(f"cost {pairs}")
        lams = [row.get(f"lambda{s}", math.nan) for s in suffixes]
        if not all(_isnan(x) for x in lams):
            parts.append("lambda " + ", ".join(f"{x:.3g}" for x in lams))
        calib = []
        for s in suffixes:
            bias, mc = row.get(f"calib_qc_bias{s}", math.nan), row.get(f"calib_qc_mc{s}", math.nan)
            if not _isnan(bias):
                calib.append(f"{mc + bias:.2f} vs MC {mc:.2f}")
        if calib:
            parts.append("Qc " + ", ".join(calib))
        return "  ".join(parts) or "warming up"

    def show(self, row: dict) -> None:
        if self._progress is not None:
            self._progress.update(
                self._task,
                completed=row["env_steps"],
                rate=f"{row['steps_per_s']:.0f} steps/s",
                stats=self._summary(row),
            )
        else:
            print(
                f"[cvpo] step {int(row['env_steps'])}  {row['steps_per_s']:.0f} steps/s  "
                f"{self._summary(row)}",
                file=sys.stderr,
                flush=True,
            )

    def message(self, text: str) -> None:
        if self._progress is not None:
            self._progress.console.print(text)
        else:
            print(text, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
