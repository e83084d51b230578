"""Host driver of the on-device loop: many seeds at once, sharded, logged, checkpointed.

The seeds (each initialised from its own key) are vmapped and their leading axis is
sharded across the available devices with `jax.sharding` (a 1-D mesh named
"seeds"; when the seed count does not divide the device count, the largest device
count that divides it is used). Between chunks of `log_every` env steps the host
writes one metrics.csv row per seed (`<run_dir>/seed<i>/`, the same format as the
host loop), checks for NaN/inf, and writes checkpoints; Ctrl-C saves and stops.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from cvpo_jax import checkpoint as ckpt
from cvpo_jax.config import CVPOConfig, TrainConfig
from cvpo_jax.device_loop import ChunkLog, RunnerState, make_device_trainer
from cvpo_jax.run_logging import ProgressDisplay, RunLogger, flat_metric_names, flatten_metrics
from cvpo_jax.train_loop import TrainingDiverged, TrainResult, _StopFlag, prepare_run_dir


def seed_sharding(num_seeds: int, devices=None) -> NamedSharding:
    """Shards a leading seed axis over as many devices as evenly divide it."""
    devices = list(devices if devices is not None else jax.devices())
    count = math.gcd(num_seeds, len(devices))
    mesh = Mesh(np.asarray(devices[:count]), ("seeds",))
    return NamedSharding(mesh, PartitionSpec("seeds"))


def seed_keys(seed: int, num_seeds: int) -> jax.Array:
    """One independent key per seed (never a shared init)."""
    return jax.random.split(jax.random.PRNGKey(seed), num_seeds)


def _slice_replay(runner: RunnerState, n: int) -> RunnerState:
    buffer = runner.buffer_state
    experience = jax.tree.map(lambda x: x[:, :, :n], buffer.experience)
    return runner.replace(buffer_state=buffer.replace(experience=experience))


def _unslice_replay(full: RunnerState, sliced: RunnerState, n: int) -> RunnerState:
    experience = jax.tree.map(
        lambda f, s: f.at[:, :, :n].set(s),
        full.buffer_state.experience,
        sliced.buffer_state.experience,
    )
    buffer = sliced.buffer_state.replace(experience=experience)
    return sliced.replace(buffer_state=buffer)


def _all_finite(tree) -> bool:
    leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)]
    return all(bool(jnp.all(jnp.isfinite(x))) for x in leaves)


def train_on_device(
    cfg: TrainConfig,
    algo: CVPOConfig,
    env,
    run_dir: str | Path,
    *,
    num_seeds: int = 1,
    resume: bool = False,
    progress: bool | None = None,
    devices=None,
) -> TrainResult:
    """Trains `num_seeds` seeds of CVPO on a JAX env entirely on device (see module doc)."""
    if num_seeds < 1:
        raise ValueError(f"num_seeds={num_seeds!r} must be an integer >= 1.")
    run_dir = Path(run_dir)
    prepare_run_dir(run_dir, resume)
    from cvpo_jax.envs.action_repeat import resolve_action_repeat

    cfg = resolve_action_repeat(cfg, 1)  # The on-device loop holds no action.
    trainer = make_device_trainer(cfg, algo, env)
    spec = ckpt.RunSpec.for_env(cfg, algo, env)
    sharding = seed_sharding(num_seeds, devices)
    init = jax.jit(jax.vmap(trainer.init), out_shardings=sharding)
    runner = init(seed_keys(cfg.seed, num_seeds))
    env_steps, wall_offset = 0, 0.0
    if resume:
        saved = ckpt.load_run_spec(run_dir)
        if saved.algo != algo or saved.env_id != spec.env_id:
            raise ValueError("resume=true needs the algorithm and environment of the run.")
        if saved.backend is not None and saved.backend != spec.backend:
            raise ValueError(
                f"the run was trained with backend={saved.backend!r}; got {spec.backend!r}."
            )
        step = ckpt.latest_step(run_dir)
        loop = ckpt.restore_loop_counters(run_dir, step)
        if int(loop["num_seeds"]) != num_seeds:
            raise ValueError(f"the run has {loop['num_seeds']} seeds; got num_seeds={num_seeds}.")
        n = min(step, cfg.buffer_size)  # Each seed's replay fill (lockstep).
        sliced = ckpt.restore_tree_checkpoint(run_dir, _slice_replay(runner, n), step)
        runner = jax.device_put(_unslice_replay(runner, sliced, n), sharding)
        env_steps, wall_offset = step, float(loop["wall_time"])
    else:
        run_dir.mkdir(parents=True, exist_ok=True)
    ckpt.save_run_spec(run_dir, spec)
    for i in range(num_seeds):
        (run_dir / f"seed{i}").mkdir(exist_ok=True)
        ckpt.save_run_spec(run_dir / f"seed{i}", spec)

    run_chunk = jax.jit(
        jax.vmap(trainer.run_chunk),
        in_shardings=(sharding,),
        out_shardings=(sharding, sharding),
        donate_argnums=0,
    )
    metric_shapes = trainer._metric_zeros(jax.tree.map(lambda x: x[0], runner.train_state))
    names = flat_metric_names({k: v.shape for k, v in metric_shapes.items()})
    loggers = [
        RunLogger(
            run_dir / f"seed{i}",
            names,
            cfg.total_steps,
            algo.cost_limit[0],
            start_step=env_steps,
            quiet=True,
        )
        for i in range(num_seeds)
    ]
    display = ProgressDisplay(cfg.total_steps, env_steps, algo.cost_limit[0], progress)
    start = time.perf_counter()
    last_saved = env_steps if resume else -1
    status = "completed"
    stop = _StopFlag()

    def save(at_steps, at_runner):
        nonlocal last_saved
        if not _all_finite(at_runner.train_state):
            raise TrainingDiverged(
                f"the train state holds NaN/inf at env step {at_steps}; the last good "
                f"checkpoint (step {last_saved}) is kept in {run_dir}."
            )
        loop = {"num_seeds": num_seeds, "wall_time": wall_offset + time.perf_counter() - start}
        n = min(at_steps, cfg.buffer_size)
        ckpt.save_tree_checkpoint(
            run_dir, at_steps, _slice_replay(at_runner, n), loop, cfg.keep_checkpoints
        )
        last_saved = at_steps

    updates_before = int(np.asarray(runner.updates)[0])
    try:
        with stop.installed():
            while env_steps < cfg.total_steps and not stop.requested:
                t0 = time.perf_counter()
                runner, log = run_chunk(runner)
                log: ChunkLog = jax.device_get(log)
                env_steps = int(log.env_steps[0])
                updates = int(log.updates[0])
                rate = cfg.log_every * num_seeds / max(time.perf_counter() - t0, 1e-9)
                if updates > updates_before:
                    bad = [k for k, v in log.metrics.items() if not np.all(np.isfinite(v))]
                    if bad:
                        raise TrainingDiverged(
                            f"update metrics {', '.join(sorted(bad))} became NaN/inf before env "
                            f"step {env_steps}; the last good checkpoint (step {last_saved}) is "
                            f"kept in {run_dir}."
                        )
                updates_before = updates
                wall = wall_offset + time.perf_counter() - start
                rows = [
                    logger.write_values(
                        env_steps, wall, rate / num_seeds, updates, _seed_values(log, i)
                    )
                    for i, logger in enumerate(loggers)
                ]
                display.show(_mean_row(rows, env_steps, rate))
                if env_steps % cfg.checkpoint_every == 0 or env_steps >= cfg.total_steps:
                    save(env_steps, runner)
            if stop.requested:
                status = "interrupted"
                if last_saved != env_steps:
                    save(env_steps, runner)
                display.message(f"Interrupted: saved a checkpoint at env step {env_steps}.")
    finally:
        display.close()
        for logger in loggers:
            logger.close()
    last = loggers[0].last_row if loggers else {}
    return TrainResult(run_dir, env_steps, int(np.asarray(runner.updates)[0]), status, last)


def _seed_values(log: ChunkLog, i: int) -> dict:
    values = {
        "episodes": int(log.episodes[i]),
        "episode_return": float(log.episode_return[i]),
        "episode_cost": float(log.episode_cost[i]),
        "episode_length": float(log.episode_length[i]),
    }
    values.update(flatten_metrics({k: v[i] for k, v in log.metrics.items()}))
    return values


def _mean_row(rows: list[dict], env_steps: int, rate: float) -> dict:
    """The display's row: the mean over seeds of each value (NaN-aware)."""
    out = {"env_steps": env_steps, "steps_per_s": rate}
    for key in ("episode_return", "episode_cost", "lambda"):
        vals = [r[key] for r in rows if key in r and not math.isnan(r[key])]
        out[key] = float(np.mean(vals)) if vals else math.nan
    return out


def load_device_policy(run_dir: str | Path, env, seed_index: int = 0, step: int | None = None):
    """One seed's policy from an on-device run: (learner, policy_params, step).

    Restores only the train states from the checkpoint (not the replay). `env` is the
    run's JAX environment (it fixes the networks' shapes).
    """
    import orbax.checkpoint as ocp

    run_dir = Path(run_dir)
    spec = ckpt.load_run_spec(run_dir)
    step = ckpt.latest_step(run_dir) if step is None else step
    if step is None:
        raise ckpt.NotARunError(f"{str(run_dir)!r} holds no complete checkpoint.")
    num_seeds = int(ckpt.restore_loop_counters(run_dir, step)["num_seeds"])
    if not 0 <= seed_index < num_seeds:
        raise ValueError(f"seed_index={seed_index} is out of range: the run has {num_seeds} seeds.")
    trainer = make_device_trainer(spec.train, spec.algo, env)
    abstract = jax.eval_shape(jax.vmap(trainer.init), seed_keys(spec.train.seed, num_seeds))
    one_device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    like = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=one_device),
        {"train_state": abstract.train_state},
    )
    restore = ocp.args.PyTreeRestore(
        like, restore_args=ocp.checkpoint_utils.construct_restore_args(like), partial_restore=True
    )
    manager = ocp.CheckpointManager(run_dir.absolute() / ckpt.CHECKPOINT_DIR)
    try:
        restored = manager.restore(step, args=ocp.args.Composite(tree=restore))
    finally:
        manager.close()
    params = restored["tree"]["train_state"].policy_params
    return trainer.learner, jax.tree.map(lambda x: x[seed_index], params), step
