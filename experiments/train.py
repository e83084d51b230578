"""Train CVPO on a Safety-Gymnasium task.

    python -m experiments.train env=CarGoal1 total_steps=200000 seed=1 cost_limit=25
    python -m experiments.train run_dir=runs/my-run resume=true total_steps=400000

A resumed run keeps the configuration saved in its run.json (see experiments/resume.py).
A seed sweep runs every job, each in <sweep dir>/<its overrides> unless run_dir is given
(e.g. 'run_dir=runs/x/seed${seed}', quoted for the shell):

    python -m experiments.train -m seed=0,1,2 env=PointGoal1 total_steps=300000

See experiments/conf/train.yaml for every key.
"""

from __future__ import annotations

import re
import sys
import time
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from experiments.cli import SweepReport, UsageError, build_configs, run_cli, run_job
from experiments.resume import override_keys, resumed_config

LOOPS = ("auto", "host")  # auto: JAX envs train on device, the others on the host.


def default_run_dir(env: str, seed: int) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return Path("runs") / env.replace("/", "_") / f"seed{seed}-{stamp}"


def _resumed(cfg: DictConfig, given: list[str]) -> DictConfig:
    """The configuration saved in the run's run.json, with the allowed changes."""
    from cvpo_jax import checkpoint as ckpt
    from cvpo_jax.envs.registry import resolve_env_id

    if cfg.run_dir is None:
        raise UsageError("resume=true needs the run_dir of the run to continue.")
    spec = ckpt.load_run_spec(cfg.run_dir)
    num_seeds = None
    if spec.on_device:
        step = ckpt.latest_step(cfg.run_dir)
        if step is not None:
            num_seeds = int(ckpt.restore_loop_counters(cfg.run_dir, step)["num_seeds"])
    env_id = resolve_env_id(str(cfg.env)) if "env" in given else None
    return resumed_config(cfg, given, spec, env_id, num_seeds)


def _main(cfg: DictConfig, given: list[str]) -> int:
    from cvpo_jax.checkpoint import CheckpointError
    from cvpo_jax.envs.registry import is_jax_env, resolve_env_id
    from cvpo_jax.train_loop import TrainingDiverged, make_env, prepare_run_dir, train

    # Everything that can be wrong with the command line fails here, before any work.
    if cfg.resume:
        cfg = _resumed(cfg, given)
    env_id = resolve_env_id(str(cfg.env))
    train_cfg, algo = build_configs(cfg)
    run_dir = Path(cfg.run_dir) if cfg.run_dir is not None else default_run_dir(env_id, cfg.seed)
    prepare_run_dir(run_dir, bool(cfg.resume))

    num_seeds = cfg.num_seeds
    if not isinstance(num_seeds, int) or isinstance(num_seeds, bool) or num_seeds < 1:
        raise UsageError(f"num_seeds={num_seeds!r} must be an integer >= 1.")
    jax_env = is_jax_env(env_id)
    if cfg.loop not in LOOPS:
        raise UsageError(f"loop={cfg.loop!r}; allowed: {', '.join(LOOPS)}.")
    if not jax_env and (num_seeds != 1 or cfg.backend is not None or cfg.loop != "auto"):
        raise UsageError(
            "num_seeds, backend and loop apply to JAX environments (env=brax/... or mjx/...); "
            f"{env_id} runs on the host, one seed per run."
        )
    on_device = jax_env and cfg.loop != "host"
    if jax_env and not on_device and num_seeds != 1:
        raise UsageError(f"num_seeds={num_seeds}: loop=host trains one seed per run.")
    if jax_env and env_id.startswith("mjx/") and cfg.backend not in (None, "mjx"):
        raise UsageError(f"backend={cfg.backend!r}: {env_id} runs on MJX only; allowed: mjx.")
    if jax_env and env_id.startswith("brax/"):
        from cvpo_jax.envs.brax_velocity import BACKEND_CHOICES

        if cfg.backend is not None and cfg.backend not in BACKEND_CHOICES:
            raise UsageError(f"backend={cfg.backend!r}; allowed: {', '.join(BACKEND_CHOICES)}.")
    if on_device:
        from cvpo_jax.device_loop import check_device_config

        check_device_config(train_cfg)

    where = f"on device ({num_seeds} seed(s))" if on_device else "on the host"
    print(f"[cvpo] training {env_id} {where}; run_dir={run_dir}", file=sys.stderr, flush=True)
    try:
        if on_device:
            result = _train_on_device(cfg, train_cfg, algo, env_id, run_dir)
        else:
            result = train(
                train_cfg,
                algo,
                run_dir,
                resume=bool(cfg.resume),
                progress=cfg.progress,
                episode_length_from_env=cfg.algo.episode_length is None,
                env_factory=_jax_host_env_factory(env_id, cfg.backend) if jax_env else make_env,
            )
    except TrainingDiverged as err:
        print(f"error: training diverged: {err}", file=sys.stderr)
        return 1
    except CheckpointError as err:
        print(f"error: {err} Metrics so far are in {run_dir}.", file=sys.stderr)
        return 1
    row = result.last_row
    summary = f"[cvpo] {result.status} at env step {result.env_steps} ({result.updates} updates)"
    if row.get("episode_return") == row.get("episode_return"):  # Not NaN.
        summary += (
            f"; last episodes: return {row['episode_return']:.2f}, cost {row['episode_cost']:.1f}"
        )
    print(summary + f"\n[cvpo] run directory: {run_dir}", file=sys.stderr)
    return 0


def _jax_host_env_factory(env_id: str, backend: str | None):
    """loop=host: the JAX env, vmapped over num_envs and stepped from the host loop."""

    def factory(train_cfg):
        from cvpo_jax.envs.jax_host import JaxHostVectorEnv
        from cvpo_jax.envs.registry import make_jax_env

        return JaxHostVectorEnv(make_jax_env(env_id, backend=backend), train_cfg.num_envs)

    return factory


def _train_on_device(cfg, train_cfg, algo, env_id, run_dir):
    from cvpo_jax.device_train import train_on_device
    from cvpo_jax.envs.registry import make_jax_env

    env = make_jax_env(env_id, backend=cfg.backend)
    if cfg.algo.episode_length is None:
        algo = algo.replace(episode_length=int(env.episode_length))
    return train_on_device(
        train_cfg,
        algo,
        env,
        run_dir,
        num_seeds=cfg.num_seeds,
        resume=bool(cfg.resume),
        progress=cfg.progress,
    )


def swept_keys(args: list[str]) -> set[str]:
    """The keys a command line sweeps over (`seed=0,1`, `algo.tau=range(...)`)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    overrides = OverridesParser.create().parse_overrides(
        [a for a in args if "=" in a and not a.startswith("-")]
    )
    return {o.key_or_group for o in overrides if o.is_sweep_override()}


def sweep_run_dir(hydra_cfg, swept: set[str]) -> Path:
    """A sweep job's default run_dir: <sweep dir>/<its swept values>, e.g.
    runs/sweeps/20261201-141500/env-CarGoal1_seed-1. Only [A-Za-z0-9.-] appear in
    the name, so it can be passed back on the command line unquoted."""
    values = sorted(o for o in hydra_cfg.overrides.task if o.split("=", 1)[0] in swept)
    name = "_".join(re.sub(r"[^A-Za-z0-9.]+", "-", v) for v in values)
    return Path(hydra_cfg.sweep.dir) / (name or f"job{hydra_cfg.job.num}")


def main() -> None:
    """One run, or with `-m` every job of a sweep (a failed job does not stop it)."""
    report = SweepReport()
    swept = swept_keys(sys.argv[1:])

    @hydra.main(version_base=None, config_path="conf", config_name="train")
    def task(cfg: DictConfig) -> None:
        hydra_cfg = HydraConfig.get()
        given = override_keys(hydra_cfg.overrides.task)
        if hydra_cfg.mode != RunMode.MULTIRUN:
            run_cli(lambda: _main(cfg, given))
        if cfg.run_dir is None:
            cfg.run_dir = str(sweep_run_dir(hydra_cfg, swept))
        report.job_done(run_job(lambda: _main(cfg, given)), list(hydra_cfg.overrides.task))

    task()
    report.finish()


if __name__ == "__main__":
    main()
