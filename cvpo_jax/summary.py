"""Window summaries of a run's metrics.csv: the numbers of an ablation table.

For the rows with lo < env_steps <= hi: episode_return and episode_cost as means over
the episodes that ended there (rows weighted by their `episodes`), and the interval
means of the diagnostics (lambda, the fractions of updates with lambda at a bound and
with a feasible E-step, the cost critic's calibration bias and the realised cost-to-go,
env steps/s).
"""

from __future__ import annotations

import csv
import math
import os
from pathlib import Path

import numpy as np

from cvpo_jax.plotting import METRICS_FILE, csv_float

# Column of metrics.csv -> name in the summary, for the interval-mean diagnostics.
DIAGNOSTICS = {
    "lambda": "lambda",
    "lambda_at_upper": "lambda_at_upper",
    "lambda_at_lower": "lambda_at_lower",
    "estep_feasible": "estep_feasible",
    "qc_threshold": "qc_threshold",
    "calib_qc_bias": "qc_bias",
    "calib_qc_mc": "qc_mc",
    "calib_qr_bias": "qr_bias",
    "steps_per_s": "steps_per_s",
}


def window_summary(run_dir: str | os.PathLike, lo: int, hi: int) -> dict[str, float]:
    """Summary of the rows with lo < env_steps <= hi of run_dir/metrics.csv (see module doc)."""
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{str(path)!r} does not exist: {run_dir} is not a run directory.")
    with path.open(newline="") as f:
        rows = [r for r in csv.DictReader(f) if lo < csv_float(r["env_steps"]) <= hi]
    out: dict[str, float] = {"rows": float(len(rows))}
    episodes = np.asarray([csv_float(r.get("episodes")) for r in rows])
    episodes = np.where(np.isnan(episodes), 0.0, episodes)
    out["episodes"] = float(episodes.sum())
    for key in ("episode_return", "episode_cost"):
        values = np.asarray([csv_float(r.get(key)) for r in rows])
        ok = ~np.isnan(values) & (episodes > 0)
        total = episodes[ok].sum()
        out[key] = float(np.sum(values[ok] * episodes[ok]) / total) if total > 0 else math.nan
    for column, name in DIAGNOSTICS.items():
        values = np.asarray([csv_float(r.get(column)) for r in rows])
        out[name] = float(np.nanmean(values)) if np.any(~np.isnan(values)) else math.nan
    out["lambda_at_bound"] = out["lambda_at_upper"] + out["lambda_at_lower"]
    return out


TABLE_HEADER = (
    "variant",
    "return",
    "cost",
    "lambda at bound",
    "E-step feasible",
    "Q_c bias (realised)",
    "steps/s",
)


def markdown_row(name: str, s: dict[str, float]) -> str:
    cells = (
        name,
        f"{s['episode_return']:.1f}",
        f"{s['episode_cost']:.1f}",
        f"{s['lambda_at_bound']:.2f}",
        f"{s['estep_feasible']:.2f}",
        f"{s['qc_bias']:+.2f} ({s['qc_mc']:.2f})",
        f"{s['steps_per_s']:.0f}",
    )
    return "| " + " | ".join(cells) + " |"


def markdown_header() -> str:
    return "| " + " | ".join(TABLE_HEADER) + " |\n|" + "---|" * len(TABLE_HEADER)
