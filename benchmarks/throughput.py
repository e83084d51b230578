"""End-to-end training throughput against the raw environment rate, in one run.

    python -m benchmarks.throughput            # CarGoal1, 2 async envs, default update ratio
    python -m benchmarks.throughput --quick    # smoke test: tiny sizes

1. The raw rate: the same vector environment (SafetyCarGoal1-v0, num_envs envs)
   stepped with uniformly random actions, resets included.
2. The training rate: the real training loop (`cvpo_jax.train_loop.train`) with the
   default algorithm and update ratio, measured over its learning phase only (the
   metrics.csv intervals after the first learning interval, which holds the compile).
The ratio training / raw says how much the learner costs on top of the simulator;
the time per update it implies is reported too.
"""

from __future__ import annotations

import csv
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks import common
from cvpo_jax.config import CVPOConfig, TrainConfig


def raw_env_rate(env_name: str, num_envs: int, steps: int, seed: int = 0) -> dict:
    """Env steps/s of the vector env with random actions (after one warm-up episode start)."""
    from cvpo_jax.envs.safety_gymnasium import SafetyGymVectorEnv

    rng = np.random.default_rng(seed)
    with SafetyGymVectorEnv(env_name, num_envs, asynchronous=num_envs > 1) as env:
        env.reset(seed=seed)
        for _ in range(10):  # Warm-up: worker start-up, first resets.
            env.step(rng.uniform(env.action_low, env.action_high, (num_envs, env.action_size)))
        t0 = time.perf_counter()
        vector_steps = steps // num_envs
        for _ in range(vector_steps):
            env.step(rng.uniform(env.action_low, env.action_high, (num_envs, env.action_size)))
        seconds = time.perf_counter() - t0
    return {
        "env_steps": vector_steps * num_envs,
        "seconds": seconds,
        "steps_per_s": vector_steps * num_envs / seconds,
    }


def training_rate(cfg: TrainConfig, algo: CVPOConfig, run_dir: Path) -> dict:
    """Env steps/s of the training loop over its learning phase (compile excluded)."""
    from cvpo_jax.train_loop import train

    t0 = time.perf_counter()
    result = train(cfg, algo, run_dir, progress=False, episode_length_from_env=True)
    total = time.perf_counter() - t0
    with open(run_dir / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    first_learning = min(int(r["env_steps"]) for r in rows if r["updates"] != "0")
    measured = [r for r in rows if int(r["env_steps"]) > first_learning]
    steps = cfg.log_every * len(measured)
    seconds = sum(cfg.log_every / float(r["steps_per_s"]) for r in measured)
    return {
        "env_steps": steps,
        "seconds": seconds,
        "steps_per_s": steps / seconds,
        "updates": result.updates,
        "update_ratio": cfg.update_ratio,
        "whole_run_seconds": total,
        "intervals_s": [cfg.log_every / float(r["steps_per_s"]) for r in measured],
    }


def main(argv=None) -> dict:
    parser = common.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--env", default="CarGoal1")
    parser.add_argument("--num-envs", type=int, default=2)
    parser.add_argument(
        "--learning-steps", type=int, default=3000, help="env steps timed in the learning phase"
    )
    args = parser.parse_args(argv)
    out = common.output_path("throughput", args.out, args.quick)
    if args.quick:
        algo = CVPOConfig(hidden_sizes=(16, 16), num_samples=4, dual_steps=2, mstep_steps=1)
        cfg = TrainConfig(
            env=args.env,
            total_steps=600,
            num_envs=args.num_envs,
            warmup_steps=200,
            batch_size=32,
            buffer_size=2000,
            log_every=200,
            checkpoint_every=600,
        )
        raw_steps = 200
    else:
        algo = CVPOConfig()
        log_every = 480  # A multiple of the default update_every (40).
        warmup = 1040  # >= batch_size * action_repeat (256 * 4) on navigation tasks.
        cfg = TrainConfig(
            env=args.env,
            num_envs=args.num_envs,
            warmup_steps=warmup,
            total_steps=warmup + log_every + args.learning_steps,
            log_every=log_every,
            checkpoint_every=100_000_000,
        )
        raw_steps = 4000
    info = common.machine_info()
    raw_before = raw_env_rate(args.env, args.num_envs, raw_steps)
    with tempfile.TemporaryDirectory(prefix="cvpo_throughput_") as tmp:
        trained = training_rate(cfg, algo, Path(tmp) / "run")
    raw_after = raw_env_rate(args.env, args.num_envs, raw_steps)
    raw = (raw_before["steps_per_s"] + raw_after["steps_per_s"]) / 2
    ratio = trained["steps_per_s"] / raw
    per_step = 1.0 / trained["steps_per_s"] - 1.0 / raw
    per_update = per_step / cfg.update_ratio
    payload = {
        "name": "throughput",
        "machine": info,
        "settings": {
            "env": args.env,
            "num_envs": args.num_envs,
            "quick": args.quick,
            "train": cfg.__dict__,
            "algo": algo.__dict__,
        },
        "raw_env": {"before": raw_before, "after": raw_after, "steps_per_s": raw},
        "training": trained,
        "ratio_training_to_raw": ratio,
        "learner_seconds_per_env_step": per_step,
        "implied_seconds_per_update": per_update,
    }
    common.print_table(
        f"Training throughput on {args.env} ({args.num_envs} envs, update ratio "
        f"{cfg.update_ratio}; load {info['load_average_1_5_15']})",
        ["measure", "env steps/s", "ratio to raw env"],
        [
            ["raw vector env, random actions", raw, 1.0],
            ["training loop (learning phase)", trained["steps_per_s"], ratio],
        ],
    )
    print(
        f"learner time per env step {per_step * 1e3:.2f} ms; implied time per update "
        f"{per_update * 1e3:.1f} ms",
        flush=True,
    )
    print(f"wrote {common.write_json(out, payload)}", flush=True)
    return payload


if __name__ == "__main__":
    main()
