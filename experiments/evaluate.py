"""Evaluate a trained run's policy on its environment or another (and optionally record a video).

    python -m experiments.evaluate run_dir=runs/CarGoal1/seed0-20250101-120000
    python -m experiments.evaluate run_dir=... episodes=20 seed=1 step=100000
    python -m experiments.evaluate run_dir=... video=true            # mp4 in <run_dir>/eval/
    python -m experiments.evaluate run_dir=... deterministic=false   # sample actions
    python -m experiments.evaluate 'run_dirs=[A,B,C]'   # or a glob, or sweep_dir=<folder>
    python -m experiments.evaluate run_dir=... env=PointGoal2     # on another task (same sizes)
    python -m experiments.evaluate run_dir=<an mjx/PointGoal1 run>  # each seed on SafetyPointGoal1
    python -m experiments.evaluate run_dir=... calibrate=true   # + critics against realised sums

Prints the return and cost (mean ± std over episodes) next to the run's cost limit
and the training-time numbers (last metrics.csv row with finished episodes), and
writes them to <run_dir>/eval/eval_step<step>.json (eval_step<step>_stochastic.json
with deterministic=false). Several runs (e.g. seeds) are evaluated one after the
other and summarised in one table (per run, and mean ± std over runs) and one JSON
(`out`, default <parent of the first run>/eval_<n>runs.json).
With calibrate=true (host runs) the sampled policy also runs `episodes` episodes past
the time limit and its critics are compared with the realised discounted return and
cost-to-go (`cvpo_jax.rollout_calibration`), stored under "calibration" in the JSON.
See experiments/conf/evaluate.yaml for every key.
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
    "run_dirs",
    "sweep_dir",
    "out",
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
    "env",
    "seed_index",
    "calibrate",
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
    args = {
        "run_dirs": _run_dirs(data),
        "out": None if data.get("out") in (None, "") else Path(str(data["out"])).expanduser(),
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
        "env": None if data.get("env") in (None, "") else str(data["env"]),
        "seed_index": _int(data, "seed_index", 0, allow_none=True),
        "calibrate": _bool(data, "calibrate"),
    }
    if args["video_path"] is not None:
        if not args["video"]:
            raise UsageError("video_path is set but video=false; pass video=true to record.")
        args["video_path"] = Path(str(args["video_path"])).expanduser()
    if args["calibrate"] and args["max_steps"] is not None:
        raise UsageError(
            "calibrate=true runs whole episodes on past the time limit: drop max_steps."
        )
    if args["video"] and len(args["run_dirs"]) > 1:
        raise UsageError("video=true records one run: pass a single run_dir.")
    if args["out"] is not None and len(args["run_dirs"]) == 1:
        raise UsageError("out names the summary of several runs; one run writes <run_dir>/eval/.")
    return args


def _run_dirs(data: dict) -> list[Path]:
    """run_dir, run_dirs (globs allowed) and sweep_dir (a folder of runs) as run paths."""
    from cvpo_jax.plotting import NotPlottableError, expand_run_dirs, seed_dirs

    dirs = data.get("run_dirs") or []
    dirs = [dirs] if isinstance(dirs, str) else list(dirs)
    if data.get("run_dir") not in (None, ""):
        dirs = [data["run_dir"], *dirs]
    try:
        paths = expand_run_dirs(dirs)
    except NotPlottableError as err:
        raise UsageError(str(err)) from err
    sweep = data.get("sweep_dir")
    if sweep not in (None, ""):
        sweep = Path(str(sweep)).expanduser()
        children = sorted(p for p in sweep.iterdir() if p.is_dir()) if sweep.is_dir() else []
        found = [p for p in children if (p / "run.json").is_file() and not seed_dirs(p)]
        if not found:
            raise UsageError(f"sweep_dir={str(sweep)!r} holds no run directories.")
        paths = list(dict.fromkeys([*paths, *found]))
    if not paths:
        raise UsageError(
            "run_dir is required: python -m experiments.evaluate run_dir=<run> "
            "(or run_dirs=[<run>,...], a glob, or sweep_dir=<folder of runs>)."
        )
    return paths


def _mean_std(values) -> str:
    import numpy as np

    values = np.asarray(values, np.float64)
    return f"{values.mean():.2f} ± {values.std():.2f}"


def report(
    spec, step: int, result, training: dict | None, run_dir: Path, seed_index: int = 0
) -> str:
    """The human-readable summary printed by the command."""
    import numpy as np

    cost_limit = spec.algo.cost_limit[0]
    mode = (
        "deterministic evaluation (mean action)"
        if result.deterministic
        else "stochastic evaluation (sampled actions)"
    )
    seed = f", seed {seed_index} of the on-device run" if spec.on_device else ""
    lines = [
        f"Run {run_dir} ({spec.env_id}{seed}), checkpoint at env step {step}",
        *([f"evaluated on {result.env_id}"] if result.env_id != spec.env_id else []),
        f"{mode}: {result.episodes} episode(s), seed {result.seed}"
        + (f", at most {result.max_steps} steps each" if result.max_steps else ""),
        "",
        f"  {'episode':>7}  {'return':>10}  {'cost':>8}  {'length':>6}"
        + ("" if result.cost_entries is None else f"  {'entries':>7}  {'longest':>7}"),
    ]
    for i in range(result.episodes):
        mark = "" if result.complete[i] else "  (cut at max_steps)"
        stretches = (
            ""
            if result.cost_entries is None
            else f"  {int(result.cost_entries[i]):>7}  {int(result.longest_cost_run[i]):>7}"
        )
        lines.append(
            f"  {i:>7}  {result.returns[i]:>10.2f}  {result.costs[i]:>8.1f}  "
            f"{int(result.lengths[i]):>6}{stretches}{mark}"
        )
    lines += ["", f"  return  {_mean_std(result.returns)}  (mean ± std over episodes)"]
    if result.cost_names is None:
        verdict = "within" if result.cost_mean <= cost_limit else "ABOVE"
        lines.append(
            f"  cost    {_mean_std(result.costs)}  ({verdict} the cost limit {cost_limit:g})"
        )
    else:
        for m, (name, limit) in enumerate(
            zip(result.cost_names, spec.algo.cost_limit, strict=True)
        ):
            values = result.constraint_costs[:, m]
            verdict = "within" if values.mean() <= limit else "ABOVE"
            lines.append(f"  cost {name}  {_mean_std(values)}  ({verdict} its limit {limit:g})")
        lines.append(f"  cost (all sources)  {_mean_std(result.costs)}")
    lines.append(f"  length  {result.length_mean:.0f}")
    if result.cost_entries is not None:
        lines.append(
            f"  cost paid in {np.mean(result.cost_entries):.1f} stretches of costly steps "
            f"per episode (entries), the longest {int(np.max(result.longest_cost_run))} steps"
        )
    if training is not None:
        lines.append(
            f"training-time (metrics.csv at env step {training['env_steps']}, "
            f"{training['episodes']} episode(s), sampled actions): "
            f"return {training['episode_return']:.2f}, cost {training['episode_cost']:.1f}"
        )
    else:
        lines.append("training-time: no finished episodes in metrics.csv yet")
    return "\n".join(lines)


def summary_table(results: list[dict]) -> str:
    """Per-run means and the mean ± std over runs (population std, as over episodes)."""
    import numpy as np

    lines = [f"  {'run':<40}  {'step':>8}  {'return':>16}  {'cost':>16}"]
    for r in results:
        name = str(r["run_dir"]) + (f" seed{r['seed_index']}" if r.get("on_device") else "")
        lines.append(
            f"  {name[-40:]:<40}  {r['step']:>8}  "
            f"{_mean_std(r['returns']):>16}  {_mean_std(r['costs']):>16}"
        )
    ret = np.array([np.mean(r["returns"]) for r in results])
    cost = np.array([np.mean(r["costs"]) for r in results])
    lines.append(
        f"  {'mean ± std over ' + str(len(results)) + ' runs':<40}  {'':>8}  "
        f"{_mean_std(ret):>16}  {_mean_std(cost):>16}"
    )
    return "\n".join(lines)


def _main(cfg: DictConfig) -> int:
    args = parse_args(cfg)
    from cvpo_jax import evaluation

    results = []
    for run_dir in args["run_dirs"]:
        for seed_index in _seed_indices(run_dir, args):
            data = _evaluate(run_dir, args, seed_index)
            if data is None:
                return 1
            results.append(data)
    if len(results) == 1:
        return 0
    import numpy as np

    print("\n" + summary_table(results))
    out = args["out"] or args["run_dirs"][0].parent / f"eval_{len(results)}runs.json"
    means = {k: [float(np.mean(r[k])) for r in results] for k in ("returns", "costs")}
    summary = {
        "runs": results,
        "return_mean": float(np.mean(means["returns"])),
        "return_std_over_runs": float(np.std(means["returns"])),
        "cost_mean": float(np.mean(means["costs"])),
        "cost_std_over_runs": float(np.std(means["costs"])),
    }
    if args["calibrate"]:
        calibration = calibration_over_runs(results)
        summary.update(calibration)
        print(
            "  critic calibration, Q_c bias (Q - realised), mean ± std over runs: "
            + ", ".join(
                f"{m:+.3f} ± {sd:.3f}"
                for m, sd in zip(
                    calibration["calibration_qc_bias_mean"],
                    calibration["calibration_qc_bias_std_over_runs"],
                    strict=True,
                )
            )
        )
    evaluation.write_result(out, summary)
    print(f"wrote {out}")
    return 0


def calibration_over_runs(results: list[dict]) -> dict[str, list[float]]:
    """Each constraint's Q_c calibration bias and realised mean, mean and population
    std over runs ([M] lists); the per-run numbers stay under "runs"."""
    import numpy as np

    out = {}
    for key in ("bias", "mc"):
        values = np.array([[c[key] for c in r["calibration"]["cost"]] for r in results])
        out[f"calibration_qc_{key}_mean"] = values.mean(axis=0).tolist()
        out[f"calibration_qc_{key}_std_over_runs"] = values.std(axis=0).tolist()
    return out


def _seed_indices(run_dir: Path, args: dict) -> list[int]:
    """The policies of a run to evaluate: each seed of an on-device run (or the one
    `seed_index` names); [0] for a host run."""
    from cvpo_jax import checkpoint, evaluation

    spec = checkpoint.load_run_spec(run_dir)
    if not spec.on_device:
        if args["seed_index"] not in (None, 0):
            raise UsageError(
                f"seed_index={args['seed_index']}: {run_dir} is a host run with one policy."
            )
        return [0]
    step = args["step"] if args["step"] is not None else checkpoint.latest_step(run_dir)
    if step is None:
        raise checkpoint.NotARunError(f"{str(run_dir)!r} holds no complete checkpoint.")
    count = evaluation.policy_count(run_dir, step)
    if args["seed_index"] is None:
        return list(range(count))
    if args["seed_index"] >= count:
        raise UsageError(
            f"seed_index={args['seed_index']} is out of range: {run_dir} has {count} seed(s)."
        )
    return [args["seed_index"]]


def _evaluate_in_jax(learner, policy_params, spec, env_id: str, args: dict):
    """All episodes at once inside the JAX env ``env_id`` (`jax_evaluation`)."""
    from cvpo_jax.envs.registry import make_jax_env
    from cvpo_jax.jax_evaluation import evaluate_jax_policy

    backend = spec.backend if env_id == spec.env_id else None
    env = make_jax_env(env_id, backend=backend)
    print(
        f"[cvpo] compiling {args['episodes']} {env_id} episodes into one program "
        "(minutes on a CPU for mjx/ tasks)",
        file=sys.stderr,
        flush=True,
    )
    return evaluate_jax_policy(
        learner, policy_params, env, args["episodes"], args["seed"], args["deterministic"]
    )


def _evaluate(run_dir: Path, args: dict, seed_index: int = 0) -> dict | None:
    """Evaluates one policy of a run, prints its report and writes its JSON; None on a
    render error."""
    # Before anything imports mujoco: headless rendering needs MUJOCO_GL set.
    from cvpo_jax import checkpoint, evaluation
    from cvpo_jax.envs.registry import is_jax_env

    state = None
    if args["calibrate"]:  # The whole train state: the critics too, restored once.
        if checkpoint.load_run_spec(run_dir).on_device:
            raise UsageError("calibrate=true is for host runs (the critics of one train state).")
        learner, state, spec, step = evaluation.load_train_state(run_dir, args["step"])
        policy_params = state.policy_params
    else:
        learner, policy_params, spec, step = evaluation.load_policy(
            run_dir, args["step"], seed_index
        )
    env_id = evaluation.evaluation_env(spec, args["env"])
    if is_jax_env(env_id):
        for key in ("video", "max_steps", "calibrate"):
            if args[key]:
                raise UsageError(
                    f"{key}={args[key]!r} is for Safety-Gymnasium tasks, not {env_id}."
                )

    out_dir = run_dir / EVAL_DIR
    stem = f"eval_step{step}"
    if spec.on_device:
        stem += f"_seed{seed_index}"
    if env_id != spec.env_id:
        stem += "_on_" + env_id.replace("/", "-")
    stem += "" if args["deterministic"] else "_stochastic"
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
    if is_jax_env(env_id):
        result = _evaluate_in_jax(learner, policy_params, spec, env_id, args)
    else:
        try:
            result = evaluation.evaluate_policy(
                learner,
                policy_params,
                env_id,
                episodes=args["episodes"],
                seed=args["seed"],
                deterministic=args["deterministic"],
                video_path=video_path,
                video_episodes=args["video_episodes"],
                max_steps=args["max_steps"],
                video_camera=args["video_camera"],
                video_size=args["video_size"],
                cost_names=spec.train.costs,
                action_repeat=spec.train.action_repeat,
            )
        except evaluation.RenderError as err:
            print(f"error: {err}", file=sys.stderr)
            return None
    seconds = time.perf_counter() - start
    # An on-device run logs each seed in its own folder.
    log_dir = run_dir / f"seed{seed_index}" if spec.on_device else run_dir
    training = evaluation.summarize_training(log_dir / "metrics.csv")
    print(report(spec, step, result, training, run_dir, seed_index))

    calibration = None
    if state is not None:
        calibration = _calibrate(learner, state, spec, env_id, args)
        print(calibration_report(calibration, spec))
    data = {
        "run_dir": str(run_dir),
        "trained_on": spec.env_id,
        "on_device": spec.on_device,
        "seed_index": seed_index,
        "step": step,
        "cost_limit": list(spec.algo.cost_limit),
        **result.to_json(),
        "wall_time": seconds,
        "training": training,
        **({} if calibration is None else {"calibration": calibration.to_json()}),
    }
    json_path = out_dir / f"{stem}.json"
    evaluation.write_result(json_path, data)
    print(f"wrote {json_path}" + (f" and {video_path}" if video_path else ""))
    return data


def _calibrate(learner, state, spec, env_id: str, args: dict):
    """The run's critics against rollouts past the time limit (`rollout_calibration`)."""
    from cvpo_jax.rollout_calibration import calibrate_critics

    print(
        f"[cvpo] calibration: {args['episodes']} sampled episode(s) run on past the time limit",
        file=sys.stderr,
        flush=True,
    )
    return calibrate_critics(
        learner,
        state,
        env_id,
        episodes=args["episodes"],
        seed=args["seed"],
        action_repeat=spec.train.action_repeat,
        cost_names=spec.train.costs,
    )


def calibration_report(cal, spec) -> str:
    """The calibration's lines: bias (Q - realised), correlation and realised mean."""

    def row(name, s):
        return f"  {name:<12}  {s['bias']:>+9.3f}  {s['corr']:>6.2f}  {s['mc']:>9.3f}"

    names = ["Q_c"] if len(cal.cost) == 1 else [f"Q_c[{n}]" for n in spec.train.costs]
    thresholds = spec.algo.qc_threshold if spec.algo.episode_length else None
    lines = [
        f"critic calibration ({cal.episodes} sampled episode(s) run {cal.tail_decisions} "
        f"decisions past the time limit {cal.time_limit}; {cal.points} decisions compared):",
        f"  {'':<12}  {'bias':>9}  {'corr':>6}  {'realised':>9}",
        row("Q_r", cal.reward),
        *(row(n, s) for n, s in zip(names, cal.cost, strict=True)),
        row("Q_r at t=0", cal.start_reward),
        *(row(n + " at t=0", s) for n, s in zip(names, cal.start_cost, strict=True)),
        f"  sampled policy: return {cal.episode_returns.mean():.2f}, cost "
        + ", ".join(f"{c:.1f}" for c in cal.episode_costs.mean(axis=0)),
    ]
    if thresholds:
        lines.append("  E-step threshold on Q_c: " + ", ".join(f"{t:.3f}" for t in thresholds))
    return "\n".join(lines)


@hydra.main(version_base=None, config_path="conf", config_name="evaluate")
def main(cfg: DictConfig) -> None:
    run_cli(lambda: _main(cfg))


if __name__ == "__main__":
    main()
