"""Plot learning curves (episode return and cost against env steps) from metrics.csv.

    python -m experiments.plot run_dir=runs/CarGoal1/seed0-20250101-120000
    python -m experiments.plot run_dir=runs/brax-halfcheetah     # an on-device multi-seed run
    python -m experiments.plot 'run_dirs=[runs/CarGoal1/seed0-...,runs/CarGoal1/seed1-...]'
    python -m experiments.plot run_dirs=[A,B,C] band=std out=figures/cargoal1.png
    python -m experiments.plot 'run_dirs=runs/SafetyPointGoal1-v0/*' smooth=5
    python -m experiments.plot sweep_dir=runs/sweeps/20261201-141500   # every job of a sweep

Hydra takes each key once, so several runs go in one list, `run_dirs=[A,B]`
(`run_dir=A` is the same as `run_dirs=[A]`; both may be given). Quote paths with
characters hydra's grammar does not accept bare, e.g. 'run_dirs=["~/runs/a"]'.
A multi-seed run of the on-device loop (a directory of `seed<i>/` runs) counts as
its seeds; a folder of runs (a sweep directory) counts as all of them. `smooth=N`
draws the trailing moving average over N logged rows (1: raw).

Two panels: the mean episode return and episode cost of the episodes that ended in
each logging interval (training-time numbers), with the run's cost limit as a
dashed line. Runs of the same environment and cost limit (e.g. seeds) are drawn as
their mean, interpolated onto the union of their env_steps, with a min-max (or
±std) band. The PNG goes to `out`, by default <first run_dir>/curves.png. The
drawing itself is `cvpo_jax.plotting`.
"""

from __future__ import annotations

from pathlib import Path

import hydra
from omegaconf import DictConfig

from cvpo_jax.plotting import (  # noqa: F401  (re-exported for existing imports)
    BANDS,
    NotPlottableError,
    RunCurves,
    aggregate,
    expand_run_dirs,
    group_runs,
    load_run,
    load_runs,
    plot_runs,
    smooth,
)
from experiments.cli import UsageError, run_cli, to_dict

KEYS = {"run_dir", "run_dirs", "sweep_dir", "band", "out", "title", "smooth"}


def parse_args(cfg: DictConfig) -> dict:
    data = to_dict(cfg)
    unknown = sorted(set(data) - KEYS)
    if unknown:
        raise UsageError(f"unknown key(s) {unknown}; allowed: {', '.join(sorted(KEYS))}.")
    dirs = data.get("run_dirs") or []
    if isinstance(dirs, str):
        dirs = [dirs]
    for key in ("sweep_dir", "run_dir"):
        if data.get(key) not in (None, ""):
            dirs = [data[key], *dirs]
    if not dirs:
        raise UsageError(
            "no runs given: pass run_dir=<run>, run_dirs=[<run>,<run>,...], a glob "
            "(run_dirs=runs/SafetyPointGoal1-v0/*) or sweep_dir=<folder of runs>."
        )
    try:
        paths = expand_run_dirs(dirs)
    except NotPlottableError as err:
        raise UsageError(str(err)) from err
    window = data.get("smooth", 1)
    if not isinstance(window, int) or isinstance(window, bool) or window < 1:
        raise UsageError(f"smooth={window!r} is invalid: must be an integer >= 1 (logged rows).")
    band = data.get("band")
    if band not in BANDS:
        raise UsageError(f"band={band!r} is invalid: must be one of {', '.join(BANDS)}.")
    out = data.get("out")
    out = Path(str(out)).expanduser() if out not in (None, "") else paths[0] / "curves.png"
    title = data.get("title")
    return {"run_dirs": paths, "band": band, "out": out, "title": title, "smooth": window}


def _main(cfg: DictConfig) -> int:
    args = parse_args(cfg)
    try:  # Every check before anything is written.
        runs = [smooth(run, args["smooth"]) for d in args["run_dirs"] for run in load_runs(d)]
    except NotPlottableError as err:
        raise UsageError(str(err)) from err
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
