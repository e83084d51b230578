"""JAX-native Safety-Gymnasium Velocity tasks on brax: pure, vmappable, scannable.

Shape letters: O observation size, A action size. Every array in
:class:`EnvState` is per environment; ``jax.vmap`` adds a leading env axis.

A task is a brax locomotion env (reward = brax's own task reward) plus
Safety-Gymnasium's velocity constraint: ``cost = 1.0`` on a step whose velocity
metric is strictly above the robot's threshold, else ``0.0``. Thresholds and
velocity definitions mirror safety-gymnasium 1.0.0's ``-v1`` tasks
(``safety_gymnasium/tasks/safe_velocity/``); the ``-v1`` classes only override
``_velocity_threshold`` (Swimmer also ``step``) and inherit the rest from ``-v0``:

============  =========  ====================  ========================================  =======
name          threshold  velocity              Safety-Gymnasium source mirrored          backend
============  =========  ====================  ========================================  =======
HalfCheetah   3.2096     x: d qpos[0] / dt     half_cheetah_v1.py:27 (threshold),        mjx
                                               half_cheetah_v0.py:34,50
                                               ``cost = float(x_velocity > thr)``
Ant           2.6222     planar speed          ant_v1.py:27, ant_v0.py:33-37,66-67       mjx
                         sqrt(vx^2 + vy^2) of  ``velocity = np.sqrt(x_velocity**2 +
                         the torso             y_velocity**2)``
Hopper        0.7402     x: d qpos[0] / dt     hopper_v1.py:27, hopper_v0.py:34,52       mjx
Walker2d      2.3415     x: d qpos[0] / dt     walker2d_v1.py:27, walker2d_v0.py:34,52   mjx
Humanoid      1.4149     planar speed of the   humanoid_v1.py:27, humanoid_v0.py:32-37,  mjx
                         mass centre           61-62
============  =========  ====================  ========================================  =======

(file names abbreviated from ``safety_<robot>_velocity_v<k>.py``.) Swimmer
(``swimmer_v1.py:30,57``: threshold 0.2282 on the x velocity only, unlike
``-v0``'s planar speed) is listed as unavailable: brax 0.14.2's Swimmer supports
only the generalized backend, whose fluid model calls ``jnp.clip(a_min=...)``,
an argument jax 0.10 removed, so its step fails to trace.

Velocity from brax: every env above puts the finite-difference velocity that
its forward reward uses into ``state.metrics`` (``x_velocity``, and
``y_velocity`` for Ant/Humanoid), computed exactly like Safety-Gymnasium's:
HalfCheetah/Hopper/Walker2d take the torso's x position (the root slide and
hinge joints sit at the torso origin, so this equals ``qpos[0]``); Ant the
torso position (its centre of mass: the torso body holds only a sphere at its
origin; Safety-Gymnasium uses ``get_body_com('torso')``); Humanoid the
whole-body mass centre (Safety-Gymnasium's ``mass_center``). Control time steps
match too (HalfCheetah/Ant 0.05 s, Hopper/Walker2d 0.008 s, Humanoid 0.015 s on
mjx/generalized). Observations are brax's (Humanoid: 244, not gymnasium's 376).

Backends. The default is ``mjx`` for every robot, overridable per call:

- Fidelity: the thresholds were calibrated on MuJoCo dynamics. ``mjx`` *is*
  MuJoCo (its XLA port) at MuJoCo's time step (brax caps its Newton solver at
  one iteration for Ant/Humanoid, for speed); ``generalized`` is brax's own
  re-implementation of the same equations; ``spring`` and ``positional`` model
  contacts differently and, for HalfCheetah/Ant/Humanoid, change the time step,
  frame count and gears, so a velocity threshold means something else there.
  (All backends use brax's copies of the robot XMLs, close to gymnasium's.)
- Accelerators: ``mjx`` is the pipeline brax and MuJoCo Playground train with on
  GPU/TPU.
- CPU: measured on a shared 2-core machine (16 envs vmapped, ``lax.scan`` of
  100 ``step_autoreset`` calls after compile, steps/s, +-20% noise):

  ===========  ======  =====  ===========  ==========
  robot        spring  mjx    generalized  positional
  ===========  ======  =====  ===========  ==========
  HalfCheetah  5,500   2,800  2,700        2,300
  Ant          10,300  12,800 4,300        2,500
  ===========  ======  =====  ===========  ==========

  ``mjx`` matches or beats ``generalized``/``positional`` everywhere; only
  ``spring`` is faster, and only on HalfCheetah (~2x), at the cost of fidelity.
  Use ``backend="spring"`` for cheap CPU tests and smoke runs. The auto-reset
  costs 3-15% over a plain step on ``mjx``.

Episodes. :meth:`SafeBraxEnv.step` never resets; ``terminated`` is brax's
``done`` (unhealthy termination: Ant, Hopper, Walker2d, Humanoid), ``truncated``
is the time limit (``steps >= episode_length``) on a step that did not also
terminate, so the two are exclusive and bootstrapping needs only
``1 - terminated``. :meth:`SafeBraxEnv.step_autoreset` additionally replaces an
ended episode by a fresh one, sampled from a new key exactly like
:meth:`SafeBraxEnv.reset` (Safety-Gymnasium re-samples its initial noise every
reset). brax's own ``AutoResetWrapper`` is not used: it restores the first
state cached at reset (every episode of an env starts identically) and
overwrites ``obs`` without keeping the final observation. Its
``EpisodeWrapper`` is not used either: it tracks no cost, and its truncation
flag is the one reproduced here. The reset is computed on every step and
selected with ``jnp.where`` (which is what ``lax.cond`` becomes under ``vmap``
anyway).

Usage::

    env = make_brax_velocity_env("brax/AntVelocity")
    state = jax.vmap(env.reset)(jax.random.split(key, 16))
    def body(state, key):
        action = policy(state.obs)
        state = jax.vmap(env.step_autoreset)(state, action, jax.random.split(key, 16))
        return state, (state.next_obs, state.reward, state.cost, state.done)
    state, traj = jax.lax.scan(body, state, jax.random.split(key, 1000))
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import warnings
from collections.abc import Mapping
from typing import Any, Literal

import chex
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

PREFIX = "brax"
BACKEND_CHOICES = ("mjx", "generalized", "positional", "spring")
VelocityKind = Literal["x", "planar"]


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    """One safe velocity task.

    Attributes:
      robot: the env name in ``brax.envs`` (e.g. ``"halfcheetah"``).
      velocity_threshold: cost is 1 where the velocity metric exceeds this.
      velocity: ``"x"`` (forward velocity) or ``"planar"`` (sqrt(vx^2 + vy^2)).
      backend: default brax physics backend.
      episode_length: steps before truncation (Safety-Gymnasium: 1000).
      safety_gym_id: the Safety-Gymnasium task this one mirrors.
    """

    robot: str
    velocity_threshold: float
    velocity: VelocityKind
    backend: str = "mjx"
    episode_length: int = 1000
    safety_gym_id: str = ""

    def __post_init__(self):
        if self.velocity not in ("x", "planar"):
            raise ValueError(f"velocity must be 'x' or 'planar', got {self.velocity!r}")
        if self.backend not in BACKEND_CHOICES:
            raise ValueError(f"backend must be one of {BACKEND_CHOICES}, got {self.backend!r}")
        if not self.velocity_threshold > 0:
            raise ValueError(f"velocity_threshold must be > 0, got {self.velocity_threshold}")
        if self.episode_length < 1:
            raise ValueError(f"episode_length must be >= 1, got {self.episode_length}")


BRAX_VELOCITY_TASKS: Mapping[str, TaskSpec] = types.MappingProxyType(
    {
        "HalfCheetahVelocity": TaskSpec(
            "halfcheetah", 3.2096, "x", safety_gym_id="SafetyHalfCheetahVelocity-v1"
        ),
        "AntVelocity": TaskSpec("ant", 2.6222, "planar", safety_gym_id="SafetyAntVelocity-v1"),
        "HopperVelocity": TaskSpec("hopper", 0.7402, "x", safety_gym_id="SafetyHopperVelocity-v1"),
        "Walker2dVelocity": TaskSpec(
            "walker2d", 2.3415, "x", safety_gym_id="SafetyWalker2dVelocity-v1"
        ),
        "HumanoidVelocity": TaskSpec(
            "humanoid", 1.4149, "planar", safety_gym_id="SafetyHumanoidVelocity-v1"
        ),
    }
)

# Known Safety-Gymnasium velocity tasks that brax 0.14.2 cannot run here, with why.
UNAVAILABLE_TASKS: Mapping[str, str] = types.MappingProxyType(
    {
        "SwimmerVelocity": (
            "brax 0.14.2's Swimmer supports only the generalized backend, whose fluid "
            "model calls jnp.clip(a_min=...), removed in jax 0.10; its step fails to trace"
        ),
    }
)


def resolve_brax_name(name: str) -> str:
    """Returns the canonical task name (e.g. ``"AntVelocity"``) for ``name``.

    Accepts the canonical name in any case, with or without the ``brax/`` prefix.

    Raises:
      ValueError: unknown or unavailable name, listing the valid names and the
        closest matches.
    """
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"brax environment name must be a non-empty string, got {name!r}")
    short = name.strip()
    if short.lower().startswith(PREFIX + "/"):
        short = short[len(PREFIX) + 1 :]
    folded = {key.lower(): key for key in BRAX_VELOCITY_TASKS}
    if short.lower() in folded:
        return folded[short.lower()]
    valid = ", ".join(f"'{PREFIX}/{key}'" for key in BRAX_VELOCITY_TASKS)
    unavailable = {key.lower(): key for key in UNAVAILABLE_TASKS}
    if short.lower() in unavailable:
        key = unavailable[short.lower()]
        raise ValueError(
            f"brax environment {name!r} is not available: {UNAVAILABLE_TASKS[key]}. "
            f"Valid names: {valid}"
        )
    matches = difflib.get_close_matches(short.lower(), list(folded), n=3, cutoff=0.5)
    hint = (
        " Did you mean " + " or ".join(f"'{PREFIX}/{folded[m]}'" for m in matches) + "?"
        if matches
        else ""
    )
    raise ValueError(f"unknown brax environment {name!r}.{hint} Valid names: {valid}")


@flax.struct.dataclass
class EnvState:
    """The state of one environment after a reset or a step (a fixed-shape pytree).

    Attributes:
      brax_state: brax's own state (pipeline state, obs, metrics); internal.
      obs: [O] float32, the observation to act from (after an auto-reset: the
        first observation of the new episode).
      next_obs: [O] float32, the true next observation of the last transition
        (equals ``obs`` unless an episode just ended under auto-reset). At reset
        equal to ``obs``.
      reward: [] float32, brax's task reward of the last transition.
      cost: [] float32, 1.0 where ``velocity > threshold`` else 0.0.
      velocity: [] float32, the constraint's velocity metric of the last step.
      terminated: [] float32 0/1, brax's unhealthy-termination ``done``.
      truncated: [] float32 0/1, time limit reached and not terminated.
      steps: [] int32, steps taken in the current episode (0 after a reset).
      episode_return: [] float32, reward summed over the current episode.
      episode_cost: [] float32, cost summed over the current episode.
      final_return: [] float32, the ended episode's return (valid where ``done``).
      final_cost: [] float32, the ended episode's cost (valid where ``done``).
      final_length: [] int32, the ended episode's length (valid where ``done``).
    """

    brax_state: Any
    obs: chex.Array
    next_obs: chex.Array
    reward: chex.Array
    cost: chex.Array
    velocity: chex.Array
    terminated: chex.Array
    truncated: chex.Array
    steps: chex.Array
    episode_return: chex.Array
    episode_cost: chex.Array
    final_return: chex.Array
    final_cost: chex.Array
    final_length: chex.Array

    @property
    def done(self) -> chex.Array:
        """[] float32 0/1: the last transition ended its episode."""
        return jnp.maximum(self.terminated, self.truncated)


def _strong(tree: Any) -> Any:
    """Casts every array leaf to its own dtype, dropping weak types.

    brax's Ant/Hopper/Walker2d/Humanoid return a weakly typed ``done`` from
    ``step`` but a strong one from ``reset``; scan carries and ``jnp.where``
    between the two need identical types.
    """

    def strong(x: Any) -> Any:
        x = jnp.asarray(x)
        if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
            return x
        return jnp.asarray(x, dtype=x.dtype)

    return jax.tree.map(strong, tree)


class SafeBraxEnv:
    """A brax locomotion env with Safety-Gymnasium's velocity cost.

    Pure functions of (state, action, key); ``self`` holds only static
    configuration, so the methods can be jitted, vmapped and scanned.

    Attributes:
      name: canonical task name, e.g. ``"AntVelocity"``.
      spec: the :class:`TaskSpec`.
      backend: the brax physics backend in use.
      episode_length: steps before truncation.
      observation_size: O.
      action_size: A.
      action_low, action_high: [A] float32 numpy arrays (brax's ctrl range; the
        action is not clipped here, brax's actuators clip it).
      brax_env: the underlying brax env.
    """

    def __init__(self, name: str, spec: TaskSpec, backend: str, episode_length: int):
        import brax.envs

        self.name = name
        self.spec = spec
        self.backend = backend
        self.episode_length = int(episode_length)
        self.velocity_threshold = float(spec.velocity_threshold)
        with warnings.catch_warnings():
            # brax's notice that it is unmaintained in favour of MJX (which we use).
            warnings.filterwarnings("ignore", message="Brax System, piplines", category=UserWarning)
            self.brax_env = brax.envs.get_environment(spec.robot, backend=backend)
        # brax's observation_size property runs a reset op by op (a minute for mjx
        # on a busy CPU); tracing one gives the shape for free.
        obs_shape = jax.eval_shape(self.brax_env.reset, jax.random.PRNGKey(0)).obs.shape
        if len(obs_shape) != 1:
            raise ValueError(f"{name}: expected a flat observation, got shape {obs_shape}")
        self.observation_size = int(obs_shape[0])
        self.action_size = int(self.brax_env.action_size)
        ctrl_range = np.asarray(self.brax_env.sys.actuator.ctrl_range, dtype=np.float32)
        self.action_low = ctrl_range[:, 0].copy()
        self.action_high = ctrl_range[:, 1].copy()

    @property
    def env_id(self) -> str:
        """The registry's id, e.g. ``"brax/AntVelocity"``."""
        return f"{PREFIX}/{self.name}"

    def __repr__(self) -> str:
        return (
            f"SafeBraxEnv({PREFIX}/{self.name}, backend={self.backend!r}, "
            f"episode_length={self.episode_length}, threshold={self.velocity_threshold})"
        )

    def velocity(self, metrics: Mapping[str, chex.Array]) -> chex.Array:
        """The constraint's velocity metric [] float32 from brax's step metrics."""
        vx = jnp.asarray(metrics["x_velocity"], jnp.float32)
        if self.spec.velocity == "x":
            return vx
        vy = jnp.asarray(metrics["y_velocity"], jnp.float32)
        return jnp.sqrt(vx**2 + vy**2)

    def reset(self, key: chex.PRNGKey) -> EnvState:
        """A new episode from ``key`` (brax samples the initial state noise)."""
        bstate = _strong(self.brax_env.reset(key))
        obs = jnp.asarray(bstate.obs, jnp.float32)
        chex.assert_shape(obs, (self.observation_size,))
        zero = jnp.zeros((), jnp.float32)
        izero = jnp.zeros((), jnp.int32)
        return EnvState(
            brax_state=bstate,
            obs=obs,
            next_obs=obs,
            reward=zero,
            cost=zero,
            velocity=zero,
            terminated=zero,
            truncated=zero,
            steps=izero,
            episode_return=zero,
            episode_cost=zero,
            final_return=zero,
            final_cost=zero,
            final_length=izero,
        )

    def step(self, state: EnvState, action: chex.Array) -> EnvState:
        """One transition; never resets (after ``done`` the caller should reset).

        Args:
          state: the current state.
          action: [A] actions (cast to float32).

        Returns:
          The next state; ``obs == next_obs``; ``final_*`` hold the episode's
          totals so far (meaningful where ``done``).
        """
        action = jnp.asarray(action, jnp.float32)
        chex.assert_shape(action, (self.action_size,))
        # brax updates the metrics dict in place: hand it a copy.
        prev = state.brax_state.replace(metrics=dict(state.brax_state.metrics))
        bstate = _strong(self.brax_env.step(prev, action))
        obs = jnp.asarray(bstate.obs, jnp.float32)
        reward = jnp.asarray(bstate.reward, jnp.float32)
        velocity = self.velocity(bstate.metrics)
        cost = (velocity > self.velocity_threshold).astype(jnp.float32)
        terminated = (jnp.asarray(bstate.done) > 0).astype(jnp.float32)
        steps = state.steps + 1
        time_up = (steps >= self.episode_length).astype(jnp.float32)
        truncated = time_up * (1.0 - terminated)
        episode_return = state.episode_return + reward
        episode_cost = state.episode_cost + cost
        return EnvState(
            brax_state=bstate,
            obs=obs,
            next_obs=obs,
            reward=reward,
            cost=cost,
            velocity=velocity,
            terminated=terminated,
            truncated=truncated,
            steps=steps,
            episode_return=episode_return,
            episode_cost=episode_cost,
            final_return=episode_return,
            final_cost=episode_cost,
            final_length=steps,
        )

    def step_autoreset(self, state: EnvState, action: chex.Array, key: chex.PRNGKey) -> EnvState:
        """One transition; an ended episode is replaced by a new one from ``key``.

        Where the transition ends its episode (``done``), the returned ``obs``,
        ``steps``, ``episode_return``, ``episode_cost`` and brax state are those
        of ``reset(key)``; ``next_obs``, ``reward``, ``cost``, ``velocity``,
        ``terminated``, ``truncated`` and ``final_*`` describe the transition and
        the episode that ended. Elsewhere it equals :meth:`step`. Branch-free:
        safe under ``vmap``.
        """
        nxt = self.step(state, action)
        fresh = self.reset(key)
        done = nxt.done > 0

        def pick(a: chex.Array, b: chex.Array) -> chex.Array:
            return jnp.where(done, a, b)

        return nxt.replace(
            brax_state=jax.tree.map(pick, fresh.brax_state, nxt.brax_state),
            obs=pick(fresh.obs, nxt.obs),
            steps=pick(fresh.steps, nxt.steps),
            episode_return=pick(fresh.episode_return, nxt.episode_return),
            episode_cost=pick(fresh.episode_cost, nxt.episode_cost),
        )


def make_brax_velocity_env(
    name: str, backend: str | None = None, episode_length: int | None = None
) -> SafeBraxEnv:
    """Builds a safe velocity task, e.g. ``make_brax_velocity_env("brax/AntVelocity")``.

    Args:
      name: a task name (``"brax/AntVelocity"``, ``"AntVelocity"``, any case).
      backend: brax physics backend (``mjx``, ``generalized``, ``positional``,
        ``spring``); default the task's (see the module docstring).
      episode_length: steps before truncation; default the task's (1000).

    Raises:
      ValueError: unknown name, backend, or a non-positive episode length.
    """
    canonical = resolve_brax_name(name)
    spec = BRAX_VELOCITY_TASKS[canonical]
    backend = spec.backend if backend is None else backend
    if backend not in BACKEND_CHOICES:
        raise ValueError(f"backend must be one of {BACKEND_CHOICES}, got {backend!r}")
    episode_length = spec.episode_length if episode_length is None else episode_length
    if isinstance(episode_length, bool) or int(episode_length) != episode_length:
        raise ValueError(f"episode_length must be an integer, got {episode_length!r}")
    if episode_length < 1:
        raise ValueError(f"episode_length must be >= 1, got {episode_length}")
    return SafeBraxEnv(canonical, spec, backend, int(episode_length))
