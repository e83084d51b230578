"""A markdown table of training windows: return, cost and the constraint diagnostics.

    python -m experiments.summarize 'run_dirs=[runs/a,runs/b]' last=50000
    python -m experiments.summarize run_dirs=[runs/a] window=[200000,300000]

One row per run (per seed of an on-device multi-seed run): the episode-weighted
return and cost of the training episodes in the window, the fraction of updates with
lambda at a bound and with a feasible E-step, the cost critic's calibration bias with
the realised discounted cost-to-go in brackets, and env steps/s (`cvpo_jax.summary`).
"""

from __future__ import annotations

from pathlib import Path

import hydra
from omegaconf import DictConfig

from cvpo_jax.plotting import seed_dirs
from cvpo_jax.summary import markdown_header, markdown_row, window_summary
from experiments.cli import UsageError, _unknown, run_cli, to_dict

KEYS = {"run_dirs", "last", "window"}


def _main(cfg: DictConfig) -> int:
    data = to_dict(cfg)
    _unknown(data, KEYS, "summarize")
    dirs = data.get("run_dirs") or []
    dirs = [dirs] if isinstance(dirs, str) else dirs
    if not dirs:
        raise UsageError("no runs given: pass run_dirs=[<run>,<run>,...].")
    window, last = data.get("window"), data.get("last")
    if (window is None) == (last is None):
        raise UsageError("give exactly one of last=<env steps> or window=[lo,hi].")
    if window is not None and (len(window) != 2 or not window[0] < window[1]):
        raise UsageError(f"window={window!r} must be [lo, hi] with lo < hi.")
    if last is not None and (not isinstance(last, int) or last < 1):
        raise UsageError(f"last={last!r} must be a positive integer (env steps).")
    print(markdown_header())
    for d in dirs:
        path = Path(str(d)).expanduser()
        for run in seed_dirs(path) or [path]:
            if last is not None:
                hi = _last_step(run)
                lo = hi - last
            else:
                lo, hi = window
            try:
                summary = window_summary(run, lo, hi)
            except FileNotFoundError as err:
                raise UsageError(str(err)) from err
            print(markdown_row(f"{run} ({lo // 1000}-{hi // 1000}k)", summary))
    return 0


def _last_step(run: Path) -> int:
    import csv

    with (run / "metrics.csv").open(newline="") as f:
        steps = [int(float(r["env_steps"])) for r in csv.DictReader(f)]
    if not steps:
        raise UsageError(f"{run}/metrics.csv has no rows yet.")
    return steps[-1]


@hydra.main(version_base=None, config_path="conf", config_name="summarize")
def main(cfg: DictConfig) -> None:
    run_cli(lambda: _main(cfg))


if __name__ == "__main__":
    main()
