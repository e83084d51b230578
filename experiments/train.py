"""Train CVPO on a Safety-Gymnasium task.

    python -m experiments.train env=CarGoal1 total_steps=200000 seed=1 cost_limit=25
    python -m experiments.train run_dir=runs/my-run resume=true total_steps=400000

See experiments/conf/train.yaml for every key.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import hydra
from omegaconf import DictConfig

from experiments.cli import UsageError, build_configs, run_cli


def default_run_dir(env: str, seed: int) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return Path("runs") / env.replace("/", "_") / f"seed{seed}-{stamp}"


def _main(cfg: DictConfig) -> int:
    from cvpo_jax.envs.registry import resolve_env_id
    from cvpo_jax.train_loop import TrainingDiverged, prepare_run_dir, train

    # Everything that can be wrong with the command line fails here, before any work.
    env_id = resolve_env_id(str(cfg.env))
    train_cfg, algo = build_configs(cfg)
    if cfg.run_dir is None and cfg.resume:
        raise UsageError("resume=true needs the run_dir of the run to continue.")
    run_dir = Path(cfg.run_dir) if cfg.run_dir is not None else default_run_dir(env_id, cfg.seed)
    prepare_run_dir(run_dir, bool(cfg.resume))

    print(f"[cvpo] training on {env_id}; run_dir={run_dir}", file=sys.stderr, flush=True)
    try:
        result = train(
            train_cfg,
            algo,
            run_dir,
            resume=bool(cfg.resume),
            progress=cfg.progress,
            episode_length_from_env=cfg.algo.episode_length is None,
        )
    except TrainingDiverged as err:
        print(f"error: training diverged: {err}", file=sys.stderr)
        return 1
    row = result.last_row
    summary = f"[cvpo] {result.status} at env step {result.env_steps} ({result.updates} updates)"
    if row.get("episode_return") == row.get("episode_return"):  # Not NaN.
        summary += (
            f"; last episodes: return {row['episode_return']:.2f}, cost {row['episode_cost']:.1f}"
        )
    print(summary + f"\n[cvpo] run directory: {run_dir}", file=sys.stderr)
    return 0


@hydra.main(version_base=None, config_path="conf", config_name="train")
def main(cfg: DictConfig) -> None:
    run_cli(lambda: _main(cfg))


if __name__ == "__main__":
    main()
