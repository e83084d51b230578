"""The host training loop: Safety-Gymnasium envs stepped on the host, jitted updates.

Per vector step there is one device call (the policy's action for all envs). Every
`update_every` env steps the collected transitions go to the replay in one call and
`updates_per_chunk` updates run back to back in one jitted call (sampling included).

Keys are derived, not carried: the action noise at env step t uses
fold_in(act_key, t) and the update chunk after n updates fold_in(learn_key, n), so a
resumed run draws the same keys as an uninterrupted one.

Every finished training episode is compared with the critics (`calibration.py`,
logged per interval), updates the realised-cost mean of `constraint_form=advantage`,
moves lambda in `constraint_form=lagrangian` and, with `cost_feedback_gain` > 0, the
E-step's threshold (`constraint.py`).
With `critic_pretrain_updates` the critics take that many critic-only updates once,
when the warm-up data is in. With `normalize_obs` the observation statistics are
taken from that data at the same point, before any update.

Ctrl-C (SIGINT) sets a flag; the loop stops at the next vector step, saves a
checkpoint of the last consistent point (whole chunks only) and returns. A second
Ctrl-C interrupts at once.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from cvpo_jax import checkpoint as ckpt
from cvpo_jax import replay as replay_lib
from cvpo_jax.calibration import CalibrationTracker, calibration_columns
from cvpo_jax.config import CVPOConfig, TrainConfig
from cvpo_jax.constraint import (
    feedback_threshold_scale,
    lagrangian_update,
    realised_cost_trace,
    realised_cost_update,
)
from cvpo_jax.learner import Learner, make_learner, with_obs_statistics
from cvpo_jax.networks import obs_statistics
from cvpo_jax.run_logging import RunLogger, flat_metric_names, non_finite_metrics
from cvpo_jax.types import Transition


class TrainingDiverged(RuntimeError):
    """An update produced NaN or inf; the last good checkpoint is kept."""


@dataclasses.dataclass(frozen=True)
class TrainResult:
    run_dir: Path
    env_steps: int
    updates: int
    status: str  # "completed" or "interrupted"
    last_row: dict


def env_start_method() -> str | None:
    """How env subprocesses start: fork (None) before the JAX runtime exists, and
    "forkserver" once it does, because forking its threads can deadlock (and JAX
    warns). Forkserver workers import Safety-Gymnasium afresh: ~1-2 s once per run.

    Forkserver children re-import the main module, so it is used only when that is
    a module (`python -m ...`) or a script file; elsewhere (e.g. `python -c`, stdin,
    pytest-xdist workers) the envs are forked as before.
    """
    from jax._src import xla_bridge  # No public API tells whether backends started.

    if not xla_bridge.backends_are_initialized():
        return None
    main = sys.modules.get("__main__")
    if getattr(getattr(main, "__spec__", None), "name", None):
        return "forkserver"
    path = getattr(main, "__file__", None)
    return "forkserver" if path is not None and os.path.isfile(path) else None


def make_env(cfg: TrainConfig):
    """The default environment factory: a Safety-Gymnasium vector env (or one of your
    own envs, `env=package.module:factory`), holding each action for `action_repeat`
    steps (null: the env's default repeat)."""
    from cvpo_jax.envs.action_repeat import resolve_action_repeat
    from cvpo_jax.envs.custom import is_custom, make_custom_vector_env
    from cvpo_jax.envs.safety_gymnasium import SafetyGymVectorEnv

    cfg = resolve_action_repeat(cfg)

    asynchronous = cfg.async_envs and cfg.num_envs > 1
    context = env_start_method() if asynchronous else None
    if is_custom(cfg.env):
        if cfg.costs != ("sum",):
            raise ValueError(
                f"costs={list(cfg.costs)}: your own env reports one cost per step (its "
                "step's cost); leave costs at its default [sum]."
            )
        return make_custom_vector_env(
            cfg.env, cfg.num_envs, asynchronous, context, action_repeat=cfg.action_repeat
        )
    return SafetyGymVectorEnv(
        cfg.env,
        cfg.num_envs,
        asynchronous=asynchronous,
        context=context,
        costs=cfg.costs,
        action_repeat=cfg.action_repeat,
    )


def env_reset_seed(seed: int, env_steps: int) -> int:
    """Reset seed of the envs when (re)starting at `env_steps`: distinct per run seed."""
    return int(np.random.SeedSequence([seed, env_steps]).generate_state(1)[0] % (2**31 - 1024))


def make_jitted_steps(learner: Learner, replay: replay_lib.Replay, updates_per_chunk: int):
    """(act, add, learn) jitted once for the loop."""

    def act(policy_params, obs, key, env_steps):
        return learner.act(policy_params, obs, jax.random.fold_in(key, env_steps))

    def learn(state, buffer_state, key, num_updates):
        batches = replay.sample_many(
            buffer_state, jax.random.fold_in(key, num_updates), updates_per_chunk
        )
        return learner.update_many(state, batches)

    return (
        jax.jit(act),
        jax.jit(replay.add, donate_argnums=0),
        jax.jit(learn, donate_argnums=0),
    )


PRETRAIN_CHUNK = 250  # Critic pre-training updates per jitted call.


def pretrain_critics(learner: Learner, replay, state, buffer_state, key, num_updates: int):
    """`num_updates` critic-only updates on the buffer (the warm-up data), in chunks.

    Keys come from `key` folded with the chunk index, so the result depends only on
    the seed and the data. Returns the state and the last chunk's mean critic losses.
    """
    sample = jax.jit(replay.sample_many, static_argnums=2)
    aux = {}
    done = 0
    while done < num_updates:
        size = min(PRETRAIN_CHUNK, num_updates - done)
        batches = sample(buffer_state, jax.random.fold_in(key, done), size)
        state, aux = learner.update_critics_many(state, batches)
        done += size
    return state, jax.tree.map(lambda x: float(jnp.mean(x)), jax.device_get(aux))


class _StopFlag:
    """SIGINT and SIGTERM handler: the first asks the loop to stop (it saves a
    checkpoint and closes the envs), the second interrupts. SIGTERM is what `kill`
    and job schedulers send; without a handler it would end the process at once."""

    def __init__(self):
        self.requested = False

    def __call__(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    @contextlib.contextmanager
    def installed(self):
        try:
            previous = {sig: signal.signal(sig, self) for sig in (signal.SIGINT, signal.SIGTERM)}
        except ValueError:  # Not the main thread: leave signals alone.
            yield self
            return
        try:
            yield self
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def prepare_run_dir(run_dir: Path, resume: bool) -> None:
    """Refuses to overwrite a run, or to resume something that is not one."""
    has_run = (run_dir / ckpt.RUN_FILE).is_file()
    if resume:
        ckpt.load_run_spec(run_dir)  # Raises NotARunError with a clear message.
        if ckpt.latest_step(run_dir) is None:
            raise ckpt.NotARunError(
                f"{str(run_dir)!r} has no complete checkpoint to resume from; "
                "start a new run instead (resume=false)."
            )
    elif has_run:
        raise ValueError(
            f"run_dir {str(run_dir)!r} already holds a run; pass resume=true to continue it "
            "or choose another run_dir."
        )


def _check_resumable(saved: ckpt.RunSpec, spec: ckpt.RunSpec) -> None:
    fixed = (
        "seed",
        "num_envs",
        "batch_size",
        "update_ratio",
        "update_every",
        "warmup_steps",
        "action_repeat",
    )
    changed = [f for f in fixed if getattr(saved.train, f) != getattr(spec.train, f)]
    if changed:
        # Checked first: a changed action_repeat also changes algo.episode_length.
        raise ValueError(f"resume=true cannot change {changed}; they were fixed by the run.")
    if saved.algo != spec.algo or saved.env_id != spec.env_id:
        raise ValueError(
            "resume=true needs the algorithm configuration and environment the run was "
            f"started with (saved env {saved.env_id}, algo {saved.algo}); got env "
            f"{spec.env_id}, algo {spec.algo}."
        )


def train(
    cfg: TrainConfig,
    algo: CVPOConfig,
    run_dir: str | Path,
    *,
    resume: bool = False,
    progress: bool | None = None,
    env_factory: Callable[[TrainConfig], object] = make_env,
    episode_length_from_env: bool = False,
) -> TrainResult:
    """Trains CVPO, writing metrics, TensorBoard files and checkpoints to `run_dir`.

    With `episode_length_from_env`, algo.episode_length (which sets the per-step cost
    threshold) is replaced by the environment's time limit.

    Raises:
      TrainingDiverged: a metric became NaN/inf (the last good checkpoint is kept).
      ValueError / NotARunError: a bad run_dir, or a resume that cannot continue.
    """
    run_dir = Path(run_dir)
    prepare_run_dir(run_dir, resume)
    if algo.num_constraints != len(cfg.costs):
        raise ValueError(
            f"cost_limit={list(algo.cost_limit)} has {algo.num_constraints} limit(s) for "
            f"costs={list(cfg.costs)}: give one limit per cost signal."
        )
    from cvpo_jax.envs.action_repeat import resolve_action_repeat

    env = env_factory(cfg)
    try:
        repeat = getattr(env, "action_repeat", 1)
        # The env says what action_repeat=null came to.
        cfg = resolve_action_repeat(cfg, repeat)
        if repeat != cfg.action_repeat:
            raise ValueError(
                f"action_repeat={cfg.action_repeat}: this env holds each action for {repeat} "
                "step(s); action repeat is applied by the host loop's Safety-Gymnasium and "
                "own-env factories only (not JAX envs), so use action_repeat=1 here."
            )
        if episode_length_from_env:
            algo = algo.replace(episode_length=int(env.episode_length))
        return _train(cfg, algo, run_dir, resume, progress, env)
    finally:
        env.close()


def _train(cfg, algo, run_dir, resume, progress, env) -> TrainResult:
    spec = ckpt.RunSpec.for_env(cfg, algo, env)
    learner = make_learner(algo, spec.obs_size, spec.action_low, spec.action_high)
    replay = replay_lib.make_replay(
        cfg.buffer_size,
        cfg.batch_size,
        spec.obs_size,
        len(spec.action_low),
        algo.num_constraints,
        n_step=algo.n_step,
        stride=cfg.num_envs,
        gamma=algo.gamma,
        cost_gamma=algo.gamma_cost,
        next_action=algo.cost_bootstrap == "data",
    )
    act_fn, add_fn, learn_fn = make_jitted_steps(learner, replay, cfg.updates_per_chunk)
    k_init, k_act, k_learn = jax.random.split(jax.random.PRNGKey(cfg.seed), 3)
    state = learner.init(k_init)
    np_rng = np.random.default_rng(cfg.seed)
    env_steps = updates = 0
    wall_offset = 0.0
    if resume:
        _check_resumable(ckpt.load_run_spec(run_dir), spec)
        env_steps, state, saved_replay, loop = ckpt.restore_checkpoint(run_dir, state)
        buffer_state = replay_lib.restore_items(replay, saved_replay)
        # The envs restart from a reset: no n-step window may run across that point.
        buffer_state = replay_lib.cut_last_steps(buffer_state, cfg.num_envs)
        updates = int(loop["updates"])
        wall_offset = float(loop["wall_time"])
        np_rng.bit_generator.state = loop["np_rng"]
    else:
        run_dir.mkdir(parents=True, exist_ok=True)
        buffer_state = replay.init()
    ckpt.save_run_spec(run_dir, spec)  # Records e.g. a longer total_steps on resume.

    example = replay.example_batch()
    shapes = jax.eval_shape(learner.update, state, example)[1]
    metric_names = flat_metric_names({k: v.shape for k, v in shapes.items()})
    metric_names += calibration_columns(algo.num_constraints)
    networks = learner.networks
    calibration = CalibrationTracker(
        lambda params, o, a: networks.pessimistic_q(params, o, a),
        cfg.num_envs,
        algo.num_constraints,
        algo.gamma,
        cost_gamma=algo.gamma_cost,
    )
    logger = RunLogger(
        run_dir,
        metric_names,
        cfg.total_steps,
        algo.cost_limit,
        start_step=env_steps,
        progress=progress,
    )

    # Env steps per vector step: each of the n envs holds its action for k steps.
    n, k, chunk = cfg.num_envs, cfg.action_repeat, cfg.update_every
    staging = {
        name: np.zeros((chunk // k, *leaf.shape), np.float32)
        for name, leaf in replay.example._asdict().items()
        if leaf is not None
    }
    low, high = env.action_low, env.action_high
    last_saved = env_steps if resume else -1
    stop = _StopFlag()
    start_time = time.perf_counter()
    interval_start = (start_time, env_steps)

    def save(at_steps, at_state, at_buffer, at_updates):
        nonlocal last_saved
        if not _all_finite(at_state):
            raise TrainingDiverged(
                f"the train state holds NaN/inf at env step {at_steps}; not saving it. "
                f"The last good checkpoint (step {last_saved}) is kept in {run_dir}."
            )
        loop = {
            "updates": at_updates,
            "wall_time": wall_offset + time.perf_counter() - start_time,
            "np_rng": np_rng.bit_generator.state,
        }
        ckpt.save_checkpoint(
            run_dir,
            at_steps,
            at_state,
            replay_lib.filled_items(at_buffer),
            loop,
            cfg.keep_checkpoints,
        )
        last_saved = at_steps

    status = "completed"
    try:
        with stop.installed():
            obs = env.reset(seed=env_reset_seed(cfg.seed, env_steps))
            while env_steps < cfg.total_steps:
                # Collect one chunk. On Ctrl-C the partial chunk is dropped, so what is
                # saved is always whole chunks: buffer, counters and state agree.
                steps = env_steps
                finished_costs = []
                for i in range(chunk // (n * k)):
                    if stop.requested:
                        break
                    if steps < cfg.warmup_steps:
                        actions = np_rng.uniform(low, high, size=(n, len(low)))
                    else:
                        actions = np.asarray(act_fn(state.policy_params, obs, k_act, steps))
                    actions = np.clip(actions, low, high).astype(np.float32)
                    result = env.step(actions)
                    rows = slice(i * n, (i + 1) * n)
                    staging["obs"][rows] = obs
                    staging["action"][rows] = actions
                    staging["reward"][rows] = result.reward
                    staging["cost"][rows] = np.reshape(result.cost, (n, -1))
                    staging["next_obs"][rows] = result.next_obs
                    staging["terminated"][rows] = result.terminated
                    staging["truncated"][rows] = result.truncated
                    done, ep_return, ep_cost, ep_length = result.episode
                    # Lengths in env steps (exact unless an episode ends inside a repeat).
                    logger.record_episodes(done, ep_return, ep_cost, ep_length * k)
                    finished_costs.extend(np.asarray(ep_cost)[np.flatnonzero(done)])
                    calibration.record(obs, actions, result.reward, staging["cost"][rows])
                    calibration.finish(done, result.terminated, state.target_critic_params)
                    obs = result.obs
                    steps += n * k
                if stop.requested:
                    status = "interrupted"
                    break
                buffer_state = add_fn(buffer_state, Transition(**staging))
                # The staging arrays are refilled next chunk: let the add consume them first.
                jax.block_until_ready(buffer_state)
                env_steps = steps
                if finished_costs and (
                    algo.cost_feedback_gain > 0 or algo.constraint_form != "level"
                ):
                    state = _apply_cost_feedback(state, finished_costs, algo)
                if algo.normalize_obs and updates == 0 and env_steps >= cfg.learning_starts:
                    state = _set_obs_statistics(state, buffer_state, logger)
                if (
                    cfg.critic_pretrain_updates
                    and updates == 0
                    and env_steps >= cfg.learning_starts
                ):
                    state, aux = pretrain_critics(
                        learner,
                        replay,
                        state,
                        buffer_state,
                        jax.random.fold_in(k_learn, 2**31 - 1),
                        cfg.critic_pretrain_updates,
                    )
                    logger.message(
                        f"[cvpo] pre-trained the critics with {cfg.critic_pretrain_updates} "
                        f"updates on {env_steps} warm-up steps (TD loss: reward "
                        f"{aux['critic_loss_reward']:.3g}, cost {aux['critic_loss_cost']:.3g})"
                    )
                if env_steps >= cfg.learning_starts:
                    state, metrics = learn_fn(state, buffer_state, k_learn, updates)
                    metrics = jax.device_get(metrics)
                    bad = non_finite_metrics(metrics)
                    if bad:
                        raise TrainingDiverged(
                            f"update metrics {', '.join(bad)} became NaN/inf in the updates after "
                            f"update {updates} (env step {env_steps}); stopping. The last good "
                            f"checkpoint (step {last_saved}) is kept in {run_dir}."
                        )
                    updates += cfg.updates_per_chunk
                    logger.record_updates(metrics)
                logger.advance(env_steps)
                if env_steps % cfg.log_every == 0 or env_steps >= cfg.total_steps:
                    now = time.perf_counter()
                    rate = (env_steps - interval_start[1]) / max(now - interval_start[0], 1e-9)
                    interval_start = (now, env_steps)
                    wall = wall_offset + now - start_time
                    logger.write_row(env_steps, wall, rate, updates, calibration.interval_stats())
                if env_steps % cfg.checkpoint_every == 0 or env_steps >= cfg.total_steps:
                    save(env_steps, state, buffer_state, updates)
        if status == "interrupted" and last_saved != env_steps:
            save(env_steps, state, buffer_state, updates)
            logger.message(
                f"Interrupted: saved a checkpoint at env step {env_steps} in {run_dir}; "
                "continue with resume=true."
            )
    finally:
        logger.close()
    return TrainResult(run_dir, env_steps, updates, status, logger.last_row)


def _set_obs_statistics(state, buffer_state, logger):
    """The state with the observation statistics of the data in the buffer (the warm-up
    steps: this runs once, before the first update). A resumed run keeps the ones in
    its checkpoint."""
    obs = replay_lib.filled_items(buffer_state)["items"]["obs"]
    stats = obs_statistics(obs)
    logger.message(
        f"[cvpo] observations standardised by the statistics of {len(obs)} warm-up "
        f"transitions (std {stats['std'].min():.3g}..{stats['std'].max():.3g})"
    )
    return with_obs_statistics(state, stats)


def _apply_cost_feedback(state, episode_costs, algo: CVPOConfig):
    """The train state with finished episodes' costs fed to the E-step: the threshold
    scale moved (`cost_feedback_gain`), the realised-cost mean updated and, in the
    Lagrangian form, lambda moved against the cost error."""
    duals = state.estep_duals
    costs = np.asarray(episode_costs)
    log_scale = feedback_threshold_scale(np.asarray(duals.log_threshold_scale), costs, algo)
    mean, count = realised_cost_update(
        np.asarray(duals.realised_cost), float(duals.realised_episodes), costs, algo
    )
    if algo.constraint_form == "lagrangian":
        trace = None  # the running mean after each episode: only the mean signal needs it
        if algo.lagrangian_signal == "mean":
            trace = realised_cost_trace(
                np.asarray(duals.realised_cost), float(duals.realised_episodes), costs, algo
            )
        log_lambda = lagrangian_update(np.asarray(duals.log_lambda), costs, algo, trace)
        duals = duals.replace(log_lambda=jnp.asarray(log_lambda))
    duals = duals.replace(
        log_threshold_scale=jnp.asarray(log_scale),
        realised_cost=jnp.asarray(mean),
        realised_episodes=jnp.asarray(count, duals.realised_episodes.dtype),
    )
    return state.replace(estep_duals=duals)


@jax.jit
def _all_finite_jit(tree) -> jax.Array:
    leaves = [
        jnp.all(jnp.isfinite(x))
        for x in jax.tree.leaves(tree)
        if jnp.issubdtype(x.dtype, jnp.floating)
    ]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.asarray(True)


def _all_finite(tree) -> bool:
    return bool(_all_finite_jit(tree))
