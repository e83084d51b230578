"""Evaluate a trained run's policy on its environment (and optionally record a video).

    python -m experiments.evaluate run_dir=runs/CarGoal1/seed0-20250101-120000
    python -m experiments.evaluate run_dir=... episodes=20 seed=1 step=100000
    python -m experiments.evaluate run_dir=... video=true            # mp4 in <run_dir>/eval/
    python -m experiments.evaluate run_dir=... deterministic=false   # sample actions

Prints the return and cost (mean ± std over episodes) next to the run's cost limit
and the training-time numbers (last metrics.csv row with finished episodes), and
writes them to <run_dir>/eval/eval_step<step>.json (eval_step<step>_stochastic.json
with deterministic=false). See experiments/conf/evaluate.yaml for every key.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig

from experiments.cli import UsageError, run_cli, to_dict

KEYS = {
    "run_dir",
    "episodes",
    "seed",
    "step",
    "deterministic",
    "max_steps",
    "video",
    "video_path",
    "video_episodes",
    "video_camera",
    "video_width",
    "video_height",
}
EVAL_DIR = "eval"


def _int(data: dict, key: str, minimum: int, allow_none: bool = False) -> int | None:
    value = data.get(key)
    if value is None and allow_none:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        allowed = f"an integer >= {minimum}" + (" or null" if allow_none else "")
        raise UsageError(f"{key}={value!r} is invalid: must be {allowed}.")
    return value


def _bool(data: dict, key: str) -> bool:
    value = data.get(key)
    if not isinstance(value, bool):
        raise UsageError(f"{key}={value!r} is invalid: must be true or false.")
    return value


def parse_args(cfg: DictConfig) -> dict[str, Any]:
    """Validated arguments from the composed command-line config."""
    data = to_dict(cfg)
    unknown = sorted(set(data) - KEYS)
    if unknown:
        raise UsageError(f"unknown key(s) {unknown}; allowed: {', '.join(sorted(KEYS))}.")
    if data.get("run_dir") in (None, ""):
        raise UsageError("run_dir is required: python -m experiments.evaluate run_dir=<run>.")
    args = {
        "run_dir": Path(str(data["run_dir"])).expanduser(),
        "episodes": _int(data, "episodes", 1),
        "seed": _int(data, "seed", 0),
        "step": _int(data, "step", 0, allow_none=True),
        "deterministic": _bool(data, "deterministic"),
        "max_steps": _int(data, "max_steps", 1, allow_none=True),
        "video": _bool(data, "video"),
        "video_episodes": _int(data, "video_episodes", 1),
        "video_camera": str(data.get("video_camera")),
        "video_size": (_int(data, "video_width", 16), _int(data, "video_height", 16)),
        "video_path": data.get("video_path"),
    }
    if args["video_path"] is not None:
        if not args["video"]:
            raise UsageError("video_path is set but video=false; pass video=true to record.")
        args["video_path"] = Path(str(args["video_path"])).expanduser()
    return args


def _mean_std(values) -> str:
    import numpy as np

    values = np.asarray(values, np.float64)
    return f"{values.mean():.2f} ± {values.std():.2f}"


def report(spec, step: int, result, training: dict | None, run_dir: Path) -> str:
    """The human-readable summary printed by the command."""
    cost_limit = spec.algo.cost_limit[0]
    mode = (
        "deterministic evaluation (mean action)"
        if result.deterministic
        else "stochastic evaluation (sampled actions)"
    )
    lines = [
        f"Run {run_dir} ({spec.env_id}), checkpoint at env step {step}",
        f"{mode}: {result.episodes} episode(s), seed {result.seed}"
        + (f", at most {result.max_steps} steps each" if result.max_steps else ""),
        "",
        f"  {'episode':>7}  {'return':>10}  {'cost':>8}  {'length':>6}",
    ]
    for i in range(result.episodes):
        mark = "" if result.complete[i] else "  (cut at max_steps)"
        lines.append(
            f"  {i:>7}  {result.returns[i]:>10.2f}  {result.costs[i]:>8.1f}  "
            f"{int(result.lengths[i]):>6}{mark}"
        )
    verdict = "within" if result.cost_mean <= cost_limit else "ABOVE"
    lines += [
        "",
        f"  return  {_mean_std(result.returns)}  (mean ± std over episodes)",
        f"  cost    {_mean_std(result.costs)}  ({verdict} the cost limit {cost_limit:g})",
        f"  length  {result.length_mean:.0f}",
    ]
    if training is not None:
        lines.append(
            f"training-time (metrics.csv at env step {training['env_steps']}, "
            f"{training['episodes']} episode(s), sampled actions): "
            f"return {training['episode_return']:.2f}, cost {training['episode_cost']:.1f}"
        )
    else:
        lines.append("training-time: no finished episodes in metrics.csv yet")
    return "\n".join(lines)


def _main(cfg: DictConfig) -> int:
    args = parse_args(cfg)
    # Before anything imports mujoco: headless rendering needs MUJOCO_GL set.
    from cvpo_jax import evaluation

    run_dir = args["run_dir"]
    learner, policy_params, spec, step = evaluation.load_policy(run_dir, args["step"])

    out_dir = run_dir / EVAL_DIR
    stem = f"eval_step{step}" + ("" if args["deterministic"] else "_stochastic")
    video_path = None
    if args["video"]:
        video_path = args["video_path"] or out_dir / f"{stem}.mp4"
        print(
            f"[cvpo] recording {min(args['video_episodes'], args['episodes'])} episode(s) to "
            f"{video_path} (software rendering takes ~0.1 s per frame)",
            file=sys.stderr,
            flush=True,
        )
    start = time.perf_counter()
    try:
        result = evaluation.evaluate_policy(
            learner,
            policy_params,
            spec.env_id,
            episodes=args["episodes"],
            seed=args["seed"],
            deterministic=args["deterministic"],
            video_path=video_path,
            video_episodes=args["video_episodes"],
            max_steps=args["max_steps"],
            video_camera=args["video_camera"],
            video_size=args["video_size"],
        )
    except evaluation.RenderError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    seconds = time.perf_counter() - start
    training = evaluation.summarize_training(run_dir / "metrics.csv")
    print(report(spec, step, result, training, run_dir))

    data = {
        "run_dir": str(run_dir),
        "step": step,
        "cost_limit": list(spec.algo.cost_limit),
        **result.to_json(),
        "wall_time": seconds,
        "training": training,
    }
    json_path = out_dir / f"{stem}.json"
    evaluation.write_result(json_path, data)
    print(f"wrote {json_path}" + (f" and {video_path}" if video_path else ""))
    return 0


@hydra.main(version_base=None, config_path="conf", config_name="evaluate")
def main(cfg: DictConfig) -> None:
    run_cli(lambda: _main(cfg))


if __name__ == "__main__":
    main()
