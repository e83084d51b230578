"""Evaluation of a trained policy: full episodes on one Safety-Gymnasium env, optional video.

    learner, policy_params, spec, step = load_policy("runs/CarGoal1/seed0-...")
    result = evaluate_policy(learner, policy_params, spec.env_id, episodes=10, seed=0)
    result.return_mean, result.cost_mean, result.returns   # [E] per episode

The env is a single in-process env (no worker processes, so nothing forks after JAX
has started its threads; only the video writer starts ffmpeg, by fork and exec). By
default the policy acts with its mean action (clipped to the action box);
``deterministic=False`` samples from it instead.

Headless video: MuJoCo renders through an OpenGL backend picked by the ``MUJOCO_GL``
environment variable. Importing this module sets ``MUJOCO_GL=osmesa`` (software
rendering, Debian package ``libosmesa6``) when the variable is unset, no display is
available and libOSMesa is installed; see :func:`configure_headless_rendering`.
gymnasium reads the variable only when the first renderer is created, so setting it
after ``import mujoco`` still works, as long as no OpenGL platform was loaded before
(e.g. by an earlier render with another backend). Entry points should import this
module (or call the function) before anything renders.
"""

from __future__ import annotations

import dataclasses
import functools
import gc
import os
import sys
import warnings
from pathlib import Path
from typing import Any

import numpy as np

_HEADLESS_BACKEND = "osmesa"


def configure_headless_rendering() -> str | None:
    """Sets ``MUJOCO_GL=osmesa`` when it is unset, headless and OSMesa is installed.

    Returns the backend that rendering will use (the value of ``MUJOCO_GL``), or
    None if it is unset (MuJoCo/gymnasium then try GLFW, which needs a display).
    """
    if not os.environ.get("MUJOCO_GL"):
        headless = not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))
        if sys.platform.startswith("linux") and headless and osmesa_available():
            os.environ["MUJOCO_GL"] = _HEADLESS_BACKEND
    return os.environ.get("MUJOCO_GL") or None


@functools.cache
def osmesa_available() -> bool:
    """Whether the OSMesa library (software OpenGL) can be loaded.

    Tries the library by name (dlopen) rather than ``ctypes.util.find_library``,
    which runs ``ldconfig`` in a subprocess.
    """
    import ctypes

    for name in ("libOSMesa.so.8", "libOSMesa.so.6", "libOSMesa.so"):
        try:
            ctypes.CDLL(name)
        except OSError:
            continue
        return True
    return False


configure_headless_rendering()

import jax  # noqa: E402

from cvpo_jax import checkpoint as ckpt  # noqa: E402
from cvpo_jax.checkpoint import checkpoint_steps  # noqa: E402  (re-exported)
from cvpo_jax.learner import Learner, make_learner  # noqa: E402

# Rendering defaults: "track" follows the agent from behind and above.
VIDEO_CAMERA = "track"
VIDEO_SIZE = (256, 256)


class RenderError(RuntimeError):
    """Rendering a video frame failed (usually no OpenGL backend for MUJOCO_GL)."""


@dataclasses.dataclass(frozen=True)
class EvalResult:
    """Per-episode results of an evaluation ([E] arrays, E = episodes).

    ``lengths`` are env steps per episode. An episode cut off by ``max_steps``
    (not by the env) has ``complete`` False. ``costs`` is the env's cost (its
    `cost_sum`); with cost signals selected (`cost_names`), ``constraint_costs``
    [E, M] holds each signal's episode cost. ``cost_entries`` and
    ``longest_cost_run`` [E] say how the cost was paid (`cost_stretches`): a cost of
    100 from 3 entries into a hazard is a route problem, from one stretch of 100
    steps a robot that does not get out.
    """

    env_id: str
    seed: int
    deterministic: bool
    returns: np.ndarray
    costs: np.ndarray
    lengths: np.ndarray
    complete: np.ndarray
    max_steps: int | None = None
    video_path: str | None = None
    cost_names: tuple[str, ...] | None = None
    constraint_costs: np.ndarray | None = None
    cost_entries: np.ndarray | None = None
    longest_cost_run: np.ndarray | None = None

    @property
    def episodes(self) -> int:
        return int(self.returns.shape[0])

    @property
    def return_mean(self) -> float:
        return float(np.mean(self.returns))

    @property
    def return_std(self) -> float:
        return float(np.std(self.returns))

    @property
    def cost_mean(self) -> float:
        return float(np.mean(self.costs))

    @property
    def cost_std(self) -> float:
        return float(np.std(self.costs))

    @property
    def length_mean(self) -> float:
        return float(np.mean(self.lengths))

    def to_json(self) -> dict[str, Any]:
        return {
            "env_id": self.env_id,
            "episodes": self.episodes,
            "seed": self.seed,
            "deterministic": self.deterministic,
            "max_steps": self.max_steps,
            "return_mean": self.return_mean,
            "return_std": self.return_std,
            "cost_mean": self.cost_mean,
            "cost_std": self.cost_std,
            "length_mean": self.length_mean,
            "returns": [float(x) for x in self.returns],
            "costs": [float(x) for x in self.costs],
            "lengths": [int(x) for x in self.lengths],
            "complete": [bool(x) for x in self.complete],
            "video_path": self.video_path,
            **(
                {}
                if self.cost_entries is None
                else {
                    "cost_entries": [int(x) for x in self.cost_entries],
                    "cost_entries_mean": float(np.mean(self.cost_entries)),
                    "longest_cost_run": [int(x) for x in self.longest_cost_run],
                    "longest_cost_run_max": int(np.max(self.longest_cost_run)),
                }
            ),
            **(
                {}
                if self.cost_names is None
                else {
                    "cost_names": list(self.cost_names),
                    "constraint_costs": np.asarray(self.constraint_costs).tolist(),
                    "constraint_cost_mean": np.mean(self.constraint_costs, axis=0).tolist(),
                }
            ),
        }


def cost_stretches(step_costs: np.ndarray) -> tuple[int, int]:
    """(entries, longest) of one episode's per-step costs [T]: the number of maximal
    stretches of consecutive steps with cost > 0, and the longest one's length."""
    costly = np.concatenate([[False], np.asarray(step_costs) > 0, [False]])
    edges = np.flatnonzero(np.diff(costly.astype(np.int8)))
    starts, ends = edges[0::2], edges[1::2]
    return int(starts.size), int((ends - starts).max()) if starts.size else 0


def load_policy(
    run_dir: str | os.PathLike, step: int | None = None, seed_index: int = 0, jax_env=None
):
    """Rebuilds a run's learner from run.json and restores its policy.

    Only the train state is restored (not the replay buffer). An on-device run holds
    one policy per seed: ``seed_index`` picks it (ignored for host runs). Its JAX env
    is built from the run's env id, or given as ``jax_env`` (an env of your own that
    the registry does not know).

    Returns:
      (learner, policy_params, spec, step): ``spec`` is the run's RunSpec and
      ``step`` the env step of the restored checkpoint (the newest by default).

    Raises:
      NotARunError: no run.json, an unreadable run.json, no checkpoint, or no
        checkpoint at ``step`` (the message lists the available steps).
      ValueError: ``seed_index`` outside the on-device run's seeds.
    """
    run_dir = Path(run_dir)
    spec = _checked_run(run_dir, step)
    if spec.on_device or jax_env is not None:
        from cvpo_jax.device_train import load_device_policy
        from cvpo_jax.envs.registry import make_jax_env

        env = jax_env if jax_env is not None else make_jax_env(spec.env_id, backend=spec.backend)
        learner, params, step = load_device_policy(run_dir, env, seed_index, step)
        return learner, params, spec, int(step)
    learner, state, step = _restore_host_state(run_dir, spec, step)
    return learner, state.policy_params, spec, step


def load_train_state(run_dir: str | os.PathLike, step: int | None = None):
    """A host run's learner and whole train state (critics included) at ``step`` (the
    newest by default): (learner, state, spec, step).

    Raises:
      NotARunError: as :func:`load_policy`.
      ValueError: an on-device run (one state per seed: `load_device_policy`).
    """
    run_dir = Path(run_dir)
    spec = _checked_run(run_dir, step)
    if spec.on_device:
        raise ValueError(
            f"{str(run_dir)!r} is an on-device run, whose train states are not host "
            "states; its policies load with load_policy(seed_index=...)."
        )
    learner, state, step = _restore_host_state(run_dir, spec, step)
    return learner, state, spec, step


def _checked_run(run_dir: Path, step: int | None):
    """The RunSpec of a run that holds a checkpoint (at ``step``, if given)."""
    try:
        spec = ckpt.load_run_spec(run_dir)
    except ckpt.NotARunError:
        raise
    except (ValueError, KeyError, TypeError) as err:
        raise ckpt.NotARunError(
            f"{str(run_dir)!r} has an unreadable {ckpt.RUN_FILE} ({type(err).__name__}: {err})."
        ) from err
    steps = checkpoint_steps(run_dir)
    if not steps:
        raise ckpt.NotARunError(f"{str(run_dir)!r} holds no complete checkpoint to evaluate.")
    if step is not None and step not in steps:
        raise ckpt.NotARunError(
            f"{str(run_dir)!r} has no checkpoint at step {step}; available steps: "
            f"{', '.join(map(str, steps))}."
        )
    return spec


def _restore_host_state(run_dir: Path, spec, step: int | None):
    """(learner, train state, step) of a host run's checkpoint (the newest if None)."""
    learner = make_learner(spec.algo, spec.obs_size, spec.action_low, spec.action_high)
    like = learner.init(jax.random.PRNGKey(0))
    step, state, _, _ = ckpt.restore_checkpoint(run_dir, like, step=step, with_replay=False)
    return learner, state, int(step)


def policy_count(run_dir: str | os.PathLike, step: int) -> int:
    """How many policies a run's checkpoint at ``step`` holds (an on-device run's seeds;
    1 for a host run)."""
    return int(ckpt.restore_loop_counters(Path(run_dir), step).get("num_seeds", 1))


def evaluation_env(spec, env: str | None = None) -> str:
    """The env id a run is evaluated on: ``env`` if given, else the run's own env, or
    for a JAX port (``mjx/...``) the Safety-Gymnasium task it stands for (so that the
    default evaluation of a policy trained in JAX is on the real task)."""
    from cvpo_jax.envs.registry import is_jax_env, resolve_env_id, safety_gym_counterpart

    if env is not None:
        return resolve_env_id(env)
    if is_jax_env(spec.env_id):
        return safety_gym_counterpart(spec.env_id) or spec.env_id
    return spec.env_id


def make_eval_env(env_id: str, render: dict | None = None):
    """One in-process env for evaluation: a Safety-Gymnasium task or an own factory's env."""
    from cvpo_jax.envs.custom import is_custom, load_factory
    from cvpo_jax.envs.safety_gymnasium import make_safety_gym_env

    if is_custom(env_id):
        if render:
            raise RenderError(f"video recording supports Safety-Gymnasium tasks, not {env_id!r}.")
        return load_factory(env_id)()
    return make_safety_gym_env(env_id, disable_env_checker=True, **(render or {}))


def _free_renderers(env) -> None:
    """Frees the env's offscreen GL contexts now (safety-gymnasium's close does not).

    Left to the interpreter's shutdown, their finalisers run after the OpenGL
    modules are torn down and print tracebacks.
    """
    task = getattr(env.unwrapped, "task", None)
    viewers = getattr(task, "_viewers", None)
    if not viewers:
        return
    for viewer in viewers.values():
        free = getattr(viewer, "free", None)
        if free is not None:
            try:
                free()
            finally:
                # Freed: make the finaliser's second free a no-op on a null context.
                ctx = getattr(viewer, "opengl_context", None)
                if ctx is not None and hasattr(ctx, "free"):
                    ctx.free = lambda: None
    viewers.clear()
    task.viewer = None
    gc.collect()


def check_episodes_and_seed(episodes: Any, seed: Any) -> None:
    """ValueError unless episodes is an integer >= 1 and seed an integer >= 0."""
    if not isinstance(episodes, int) or isinstance(episodes, bool) or episodes < 1:
        raise ValueError(f"episodes={episodes!r} must be an integer >= 1.")
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"seed={seed!r} must be an integer >= 0.")


def check_policy_fits(learner: Learner, env_id: str, obs_shape, action_shape) -> None:
    """ValueError naming both shapes unless the env's observation and action shapes are
    the policy's ([O] and [A])."""
    obs_size, action_size = learner.networks.obs_size, learner.networks.action_size
    if tuple(obs_shape) != (obs_size,):
        raise ValueError(
            f"{env_id} has observations of shape {tuple(obs_shape)}; the policy takes "
            f"({obs_size},)."
        )
    if tuple(action_shape) != (action_size,):
        raise ValueError(
            f"{env_id} has actions of shape {tuple(action_shape)}; the policy gives "
            f"({action_size},)."
        )


def evaluate_policy(
    learner: Learner,
    policy_params,
    env_id: str,
    episodes: int,
    seed: int,
    deterministic: bool = True,
    video_path: str | os.PathLike | None = None,
    video_episodes: int = 1,
    max_steps: int | None = None,
    *,
    video_camera: str = VIDEO_CAMERA,
    video_size: tuple[int, int] = VIDEO_SIZE,
    cost_names: tuple[str, ...] | None = None,
    action_repeat: int = 1,
) -> EvalResult:
    """Runs ``episodes`` full episodes of the policy and returns their returns and costs.

    Episode i starts from ``env.reset(seed=seed + i)``; a stochastic policy's noise at
    the t-th step of the evaluation uses ``fold_in(PRNGKey(seed), t)``, so a given
    seed always gives the same numbers on the same machine.

    Args:
      learner, policy_params: e.g. from :func:`load_policy`.
      env_id: short name or full id (see ``cvpo_jax.envs.registry.resolve_env_id``).
      episodes: E >= 1.
      seed: reset seed of the first episode and key of the policy noise.
      deterministic: act with the mean action (else sample); clipped to the box.
      video_path: write an mp4 of the first ``video_episodes`` episodes here.
      max_steps: cap on the steps of each episode (tests); None: until the env
        terminates or truncates it.
      video_camera, video_size: camera name and (width, height) of the video.
      cost_names: Safety-Gymnasium cost signals to sum per episode as well (the
        run's `costs`, e.g. ("hazards", "vases_contact")); None or ("sum",): only
        the env's cost.
      action_repeat: the policy acts every k env steps and its action is held in
        between, as in training with `action_repeat=k` (the run's, see
        `experiments.evaluate`); lengths, costs and stretches stay in env steps.

    Raises:
      ValueError: a bad argument, or an env whose spaces do not fit the policy.
      RenderError: rendering failed (with a hint about MUJOCO_GL).
    """
    from cvpo_jax.envs.action_repeat import check_repeat
    from cvpo_jax.envs.registry import is_jax_env, resolve_env_id

    check_episodes_and_seed(episodes, seed)
    check_repeat(action_repeat)
    if max_steps is not None and (not isinstance(max_steps, int) or max_steps < 1):
        raise ValueError(f"max_steps={max_steps!r} must be null or an integer >= 1.")
    if video_path is not None and (not isinstance(video_episodes, int) or video_episodes < 0):
        raise ValueError(f"video_episodes={video_episodes!r} must be an integer >= 0.")
    recording = video_path is not None and video_episodes > 0
    env_id = resolve_env_id(env_id)
    if is_jax_env(env_id):
        raise ValueError(
            f"{env_id} is a JAX task: roll it out with "
            "cvpo_jax.jax_evaluation.evaluate_jax_policy (all episodes at once)."
        )
    render = None
    if recording:
        configure_headless_rendering()
        width, height = (int(x) for x in video_size)
        render = {
            "render_mode": "rgb_array",
            "width": width,
            "height": height,
            "camera_name": video_camera,
        }
    env = make_eval_env(env_id, render)
    writer = None
    partial = None
    try:
        obs_space, act_space = env.observation_space, env.action_space
        low = np.asarray(act_space.low, np.float32)
        high = np.asarray(act_space.high, np.float32)
        check_policy_fits(learner, env_id, obs_space.shape, low.shape)
        if recording:
            env.reset(seed=seed)  # Builds the world, whose cameras can then be checked.
            _check_camera(env, video_camera)
            video_path = Path(video_path)
            video_path.parent.mkdir(parents=True, exist_ok=True)
            partial = video_path.with_name(video_path.stem + ".partial" + video_path.suffix)
            fps = int(env.metadata.get("render_fps", 30))
            writer = _VideoWriter(partial, fps)

        key = jax.random.PRNGKey(seed)
        returns = np.zeros(episodes, np.float64)
        costs = np.zeros(episodes, np.float64)
        if cost_names is not None and tuple(cost_names) == ("sum",):
            cost_names = None
        signals = np.zeros((episodes, len(cost_names or ())), np.float64)
        lengths = np.zeros(episodes, np.int64)
        complete = np.zeros(episodes, bool)
        entries = np.zeros(episodes, np.int64)
        longest = np.zeros(episodes, np.int64)
        t = 0
        for ep in range(episodes):
            obs, _ = env.reset(seed=seed + ep)
            step_costs = []
            record = writer is not None and ep < video_episodes
            if record:
                writer.append(_render(env))
            done = False
            while not done and (max_steps is None or lengths[ep] < max_steps):
                if lengths[ep] % action_repeat == 0:
                    obs_batch = np.asarray(obs, np.float32).reshape(1, -1)
                    action = learner.act(
                        policy_params, obs_batch, jax.random.fold_in(key, t), deterministic
                    )
                    action = np.clip(np.asarray(action, np.float32)[0], low, high)
                obs, reward, cost, terminated, truncated, info = env.step(
                    action.astype(act_space.dtype)
                )
                returns[ep] += float(reward)
                costs[ep] += float(cost)
                step_costs.append(float(cost))
                for m, name in enumerate(cost_names or ()):
                    signals[ep, m] += float(info[f"cost_{name}"])
                lengths[ep] += 1
                t += 1
                done = bool(terminated or truncated)
                if record:
                    writer.append(_render(env))
            complete[ep] = done
            entries[ep], longest[ep] = cost_stretches(np.asarray(step_costs))
        if writer is not None:
            writer.close()
            writer = None
            os.replace(partial, video_path)
            partial = None
    finally:
        if writer is not None:
            writer.close()
        if partial is not None and partial.exists():
            partial.unlink()
        if render is not None:
            _free_renderers(env)
        env.close()
    return EvalResult(
        env_id=env_id,
        seed=seed,
        deterministic=bool(deterministic),
        returns=returns,
        costs=costs,
        lengths=lengths,
        complete=complete,
        max_steps=max_steps,
        video_path=str(video_path) if recording else None,
        cost_names=None if cost_names is None else tuple(cost_names),
        constraint_costs=None if cost_names is None else signals,
        cost_entries=entries,
        longest_cost_run=longest,
    )


class _VideoWriter:
    """An mp4 writer (imageio + ffmpeg) fed one RGB frame at a time."""

    def __init__(self, path: Path, fps: int):
        import imageio.v2 as imageio

        # libx264 with yuv420p needs even sides: other sizes are padded to a multiple of 2.
        self._writer = imageio.get_writer(
            str(path),
            format="FFMPEG",
            mode="I",
            fps=fps,
            codec="libx264",
            pixelformat="yuv420p",
            macro_block_size=2,
            quality=7,
        )
        self._started = False

    def append(self, frame: np.ndarray) -> None:
        if self._started:
            self._writer.append_data(frame)
            return
        # The first frame starts the ffmpeg process. subprocess forks and execs at
        # once (in C), which cannot deadlock on JAX's threads; JAX's fork hook warns
        # about every fork regardless, so that one warning is silenced here.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r"os\.fork\(\) was called")
            self._writer.append_data(frame)
        self._started = True

    def close(self) -> None:
        self._writer.close()


def _check_camera(env, name: str) -> None:
    import mujoco

    model = env.unwrapped.task.model
    cameras = [mujoco.mj_id2name(model, mujoco.mjtObj.mjOBJ_CAMERA, i) for i in range(model.ncam)]
    if name not in cameras:
        raise ValueError(f"video_camera={name!r} is not a camera of this env; one of {cameras}.")


def _render(env) -> np.ndarray:
    try:
        frame = env.render()
    except Exception as err:  # The GL backends raise many types; re-raise with a hint.
        backend = os.environ.get("MUJOCO_GL") or "unset (GLFW, needs a display)"
        raise RenderError(
            f"rendering failed with MUJOCO_GL={backend}: {type(err).__name__}: {err}. "
            "Headless machines need MUJOCO_GL=osmesa (Debian/Ubuntu package libosmesa6) or "
            "MUJOCO_GL=egl, set before anything renders."
        ) from err
    return np.asarray(frame, np.uint8)


def summarize_training(metrics_path: str | os.PathLike) -> dict[str, float] | None:
    """The last metrics.csv row with finished episodes (training-time numbers), or None."""
    import csv

    path = Path(metrics_path)
    if not path.is_file():
        return None
    last = None
    with path.open(newline="") as f:
        for row in csv.DictReader(f):
            if row.get("episode_return"):
                last = row
    if last is None:
        return None
    return {
        "env_steps": int(float(last["env_steps"])),
        "episode_return": float(last["episode_return"]),
        "episode_cost": float(last["episode_cost"]),
        "episode_length": float(last["episode_length"]),
        "episodes": int(float(last["episodes"])),
    }


def write_result(path: str | os.PathLike, data: dict) -> None:
    """Writes ``data`` as JSON atomically (creating the parent directory)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ckpt.write_json_atomic(path, data)


__all__ = [
    "EvalResult",
    "RenderError",
    "checkpoint_steps",
    "configure_headless_rendering",
    "evaluate_policy",
    "load_policy",
    "summarize_training",
    "write_result",
]
