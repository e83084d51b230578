"""Batched Safety-Gymnasium environments with a numpy float32 boundary.

Shapes: N environments, O observation size, A action size.

:class:`SafetyGymVectorEnv` runs N copies of a task in safety-gymnasium's
vector env (subprocesses when N > 1 by default). Its :meth:`step` returns a
:class:`StepResult` with the observation to act from next (after auto-reset)
and, separately, the true next observation of the transition, which for an
episode that just ended is the final observation safety-gymnasium reports in
``info["final_observation"]``, not the first observation of the next episode.

The episode bookkeeping (:func:`accumulate_episodes`) and the final-observation
merge (:func:`true_next_observations`) are pure functions of arrays.
"""

from __future__ import annotations

import functools
import math
import multiprocessing
import signal
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple, Self

import numpy as np

from cvpo_jax.envs.registry import resolve_env_id
from cvpo_jax.envs.safety_gymnasium_compat import import_safety_gymnasium


class EpisodeStats(NamedTuple):
    """Per-env statistics of episodes that ended at this step.

    Entries where ``done`` is False are zero and carry no meaning.

    Attributes:
      done: [N] bool, the episode ended (terminated or truncated).
      episode_return: [N] float32, sum of rewards of the ended episode.
      episode_cost: [N] float32, sum of costs of the ended episode; [N, M] when the
        env reports M cost signals (`costs=`), one sum per signal.
      episode_length: [N] int32, number of steps of the ended episode.
    """

    done: np.ndarray
    episode_return: np.ndarray
    episode_cost: np.ndarray
    episode_length: np.ndarray


class EpisodeAccumulator(NamedTuple):
    """Running sums of the episodes in progress; [N] float64, [N] or [N, M] float64,
    [N] int64."""

    ret: np.ndarray
    cost: np.ndarray
    length: np.ndarray


class StepResult(NamedTuple):
    """One batched transition.

    Attributes:
      obs: [N, O] float32, observation to act from next (the reset observation
        where an episode just ended).
      next_obs: [N, O] float32, true next observation of this transition (the
        final observation where an episode just ended). Store this in replay.
      reward: [N] float32.
      cost: [N] float32, or [N, M] with M cost signals selected (`costs=`).
      terminated: [N] bool, the episode ended in a terminal state (bootstrap
        with zero).
      truncated: [N] bool, the episode was cut off, e.g. by the time limit
        (bootstrap from ``next_obs``).
      episode: per-env stats of the episodes that ended at this step.
    """

    obs: np.ndarray
    next_obs: np.ndarray
    reward: np.ndarray
    cost: np.ndarray
    terminated: np.ndarray
    truncated: np.ndarray
    episode: EpisodeStats


def init_episode_accumulator(num_envs: int, num_costs: int | None = None) -> EpisodeAccumulator:
    """Zero running sums for ``num_envs`` fresh episodes (costs [N], or [N, M])."""
    cost_shape = (num_envs,) if num_costs is None else (num_envs, num_costs)
    return EpisodeAccumulator(
        ret=np.zeros(num_envs, np.float64),
        cost=np.zeros(cost_shape, np.float64),
        length=np.zeros(num_envs, np.int64),
    )


def accumulate_episodes(
    acc: EpisodeAccumulator, reward: np.ndarray, cost: np.ndarray, done: np.ndarray
) -> tuple[EpisodeAccumulator, EpisodeStats]:
    """Adds one step to the running sums and closes the episodes that ended.

    Args:
      acc: running sums before this step, [N] each (costs [N] or [N, M]).
      reward, cost: [N] this step's reward and [N] (or [N, M]) cost (the step is
        part of the episode that ``done`` ends).
      done: [N] bool, terminated or truncated at this step.

    Returns:
      (sums for the episodes in progress after this step, zero where ``done``;
       stats of the ended episodes).
    """
    n = acc.ret.shape[0]
    expected = {"reward": (n,), "cost": acc.cost.shape, "done": (n,)}
    for label, arr in (("reward", reward), ("cost", cost), ("done", done)):
        if np.shape(arr) != expected[label]:
            raise ValueError(
                f"accumulate_episodes: {label} has shape {np.shape(arr)}, "
                f"expected {expected[label]}"
            )
    done = np.asarray(done, dtype=bool)
    done_c = done.reshape((n,) + (1,) * (acc.cost.ndim - 1))
    ret = acc.ret + reward
    total_cost = acc.cost + cost
    length = acc.length + 1
    stats = EpisodeStats(
        done=done.copy(),
        episode_return=np.where(done, ret, 0.0).astype(np.float32),
        episode_cost=np.where(done_c, total_cost, 0.0).astype(np.float32),
        episode_length=np.where(done, length, 0).astype(np.int32),
    )
    new_acc = EpisodeAccumulator(
        ret=np.where(done, 0.0, ret),
        cost=np.where(done_c, 0.0, total_cost),
        length=np.where(done, 0, length),
    )
    return new_acc, stats


def true_next_observations(obs: np.ndarray, done: np.ndarray, info: dict[str, Any]) -> np.ndarray:
    """Replaces the auto-reset observations of ended episodes by their final ones.

    Safety-gymnasium's vector envs (gymnasium 0.28/0.29 API) put the last
    observation of an ended episode in ``info["final_observation"][i]`` (an
    object array) with the mask ``info["_final_observation"]``.

    Args:
      obs: [N, O] observations returned by the vector env's step.
      done: [N] bool, terminated or truncated.
      info: the vector env's info dict.

    Returns:
      [N, O] float32 copy of ``obs`` with the rows of ended episodes replaced.

    Raises:
      RuntimeError: an env reported done without a final observation; using the
        reset observation instead would silently corrupt the transition.
    """
    next_obs = np.array(obs, dtype=np.float32, copy=True)
    done = np.asarray(done, dtype=bool)
    if not done.any():
        return next_obs
    mask = np.asarray(info.get("_final_observation", np.zeros_like(done)), dtype=bool)
    missing = np.flatnonzero(done & ~mask)
    if missing.size:
        raise RuntimeError(
            f"envs {missing.tolist()} reported done but info has no final_observation for "
            f"them (info keys: {sorted(info)}); cannot recover the true next observation"
        )
    final = info["final_observation"]
    for i in np.flatnonzero(mask):
        row = np.asarray(final[i], dtype=np.float32).reshape(-1)
        if row.shape != next_obs.shape[1:]:
            raise RuntimeError(
                f"final_observation of env {i} has shape {row.shape}, expected {next_obs.shape[1:]}"
            )
        next_obs[i] = row
    return next_obs


COST_PREFIX = "cost_"


def cost_signals(info: dict[str, Any]) -> list[str]:
    """The cost signals a Safety-Gymnasium step reports (`cost_hazards` -> "hazards",
    `cost_sum` -> "sum"), from one step's (vector) info dict."""
    return sorted(
        k[len(COST_PREFIX) :] for k in info if k.startswith(COST_PREFIX) and not k.startswith("_")
    )


def info_costs(info: dict[str, Any], names: Sequence[str], done: np.ndarray) -> np.ndarray:
    """[N, M] float32: the step's cost signal `names[m]` of every env.

    Ended episodes carry their last step's info in ``info["final_info"][i]`` (the
    top-level entries then belong to the reset), as for the final observation.
    """
    done = np.asarray(done, dtype=bool)
    out = np.zeros((done.shape[0], len(names)), np.float32)
    final = info.get("final_info")
    for m, name in enumerate(names):
        key = COST_PREFIX + name
        if key in info:
            out[:, m] = np.asarray(info[key], np.float32)
        for i in np.flatnonzero(done):
            out[i, m] = float(final[i][key])
    return out


def clip_actions(actions: np.ndarray, low: np.ndarray, high: np.ndarray) -> np.ndarray:
    """Clips [N, A] actions into the box ``[low, high]`` ([A] each).

    Raises:
      ValueError: wrong rank or action size, or a non-finite action (clipping
        would pass NaN through to the simulator).
    """
    actions = np.asarray(actions)
    if actions.ndim != 2 or actions.shape[1] != low.shape[0]:
        raise ValueError(f"actions must have shape [num_envs, {low.shape[0]}], got {actions.shape}")
    if not np.all(np.isfinite(actions)):
        raise ValueError(f"actions must be finite, got {actions}")
    return np.clip(actions, low, high)


def make_safety_gym_env(
    env_id: str, disable_env_checker: bool = True, ignore_sigint: bool = False, **make_kwargs
):
    """Makes one safety-gymnasium env (with its time limit) through the compat layer.

    Module-level so that it pickles by reference: subprocess workers started
    with "spawn" or "forkserver" re-import this module, which applies the
    compatibility fixes in the worker before safety_gymnasium is imported.
    With ``ignore_sigint`` (set for subprocess workers) Ctrl-C reaches only the
    main process, which can then stop at a consistent point and save a checkpoint
    while the workers are still alive. Other keyword arguments (e.g. render_mode,
    width, height, camera_name) go to ``safety_gymnasium.make``.
    """
    if ignore_sigint:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    safety_gymnasium = import_safety_gymnasium()
    return safety_gymnasium.make(env_id, disable_env_checker=disable_env_checker, **make_kwargs)


class SafetyGymVectorEnv:
    """N copies of a Safety-Gymnasium task behind a float32 numpy interface.

    Usage::

        with SafetyGymVectorEnv("CarGoal1", num_envs=2) as env:
            obs = env.reset(seed=0)                      # [N, O]
            result = env.step(np.zeros((2, env.action_size)))
    """

    def __init__(
        self,
        name: str,
        num_envs: int = 1,
        *,
        asynchronous: bool | None = None,
        context: str | None = None,
        costs: Sequence[str] | None = None,
        action_repeat: int = 1,
    ):
        """Makes the vector env.

        Args:
          name: short name or full id, see :func:`cvpo_jax.envs.registry.resolve_env_id`.
          num_envs: N >= 1.
          asynchronous: one subprocess per env; defaults to ``num_envs > 1``.
          context: multiprocessing start method for asynchronous envs (None:
            platform default, "fork" on Linux; "forkserver" or "spawn" avoid
            forking a process whose JAX runtime already started threads).
          costs: the cost signals to report, e.g. ("hazards", "vases_contact"), from
            the step's `cost_<name>` info entries: `step` then returns cost [N, M] and
            episodes sum each. None: the env's scalar cost [N] (its `cost_sum`).
          action_repeat: k >= 1: each env holds every action for k steps
            (`cvpo_jax.envs.action_repeat.ActionRepeat`); steps, rewards, costs and
            `episode_length` are then per decision.
        """
        if not isinstance(num_envs, int) or num_envs < 1:
            raise ValueError(f"num_envs must be an int >= 1, got {num_envs!r}")
        env_id = resolve_env_id(name)
        if "/" in env_id:
            raise ValueError(
                f"SafetyGymVectorEnv runs Safety-Gymnasium tasks only; {name!r} resolved to "
                f"{env_id!r}, which belongs to another backend"
            )
        safety_gymnasium = import_safety_gymnasium()
        episode_length = safety_gymnasium.utils.registration.spec(env_id).max_episode_steps
        # The env checker runs on env 0 only, as in safety_gymnasium.vector.make.
        if asynchronous is None:
            asynchronous = num_envs > 1
        env_fns = [
            functools.partial(
                make_safety_gym_env,
                env_id,
                disable_env_checker=i > 0,
                ignore_sigint=bool(asynchronous),
            )
            for i in range(num_envs)
        ]
        self._init(env_fns, asynchronous, context, episode_length, env_id, costs, action_repeat)

    @classmethod
    def from_env_fns(
        cls,
        env_fns: Sequence[Callable[[], Any]],
        *,
        episode_length: int,
        asynchronous: bool = False,
        context: str | None = None,
        env_id: str = "custom",
        costs: Sequence[str] | None = None,
        action_repeat: int = 1,
    ) -> SafetyGymVectorEnv:
        """Wraps envs with the safety-gymnasium 6-tuple API (e.g. scripted test envs).

        Args:
          env_fns: N callables, each returning an env whose ``step`` returns
            (obs, reward, cost, terminated, truncated, info).
          episode_length: the envs' time limit in env steps; reported as
            ``episode_length`` (in decisions: ceil(limit / action_repeat)).
          action_repeat: see ``__init__``.
        """
        if len(env_fns) < 1:
            raise ValueError("from_env_fns needs at least one env fn, got 0")
        self = cls.__new__(cls)
        self._init(
            list(env_fns), asynchronous, context, episode_length, env_id, costs, action_repeat
        )
        return self

    def _init(
        self, env_fns, asynchronous, context, episode_length, env_id, costs=None, action_repeat=1
    ) -> None:
        import_safety_gymnasium()
        from safety_gymnasium.vector import SafetyAsyncVectorEnv, SafetySyncVectorEnv

        # Here, not at the top: action_repeat imports COST_PREFIX from this module.
        from cvpo_jax.envs.action_repeat import check_repeat, repeated

        check_repeat(action_repeat)
        if action_repeat > 1:
            env_fns = [functools.partial(repeated, fn, action_repeat) for fn in env_fns]
            if episode_length is not None:
                episode_length = math.ceil(episode_length / action_repeat)

        if asynchronous:
            if context == "forkserver":
                # Forkserver children unpickle safety-gymnasium's worker function, which
                # imports safety_gymnasium, before anything of ours: the server must have
                # the compat layer's import hook already (it patches sources at import).
                multiprocessing.get_context("forkserver").set_forkserver_preload(
                    ["cvpo_jax.envs.safety_gymnasium_compat"]
                )
            vec = SafetyAsyncVectorEnv(env_fns, context=context)
        else:
            if context is not None:
                raise ValueError(f"context={context!r} needs asynchronous=True")
            vec = SafetySyncVectorEnv(env_fns)
        self._vec = vec
        try:
            obs_space, act_space = vec.single_observation_space, vec.single_action_space
            if len(obs_space.shape or ()) != 1 or len(act_space.shape or ()) != 1:
                raise ValueError(
                    f"{env_id}: need flat Box observation and action spaces, got "
                    f"{obs_space} and {act_space}"
                )
        except Exception:
            vec.close()
            raise
        self.env_id: str = env_id
        self.num_envs: int = len(env_fns)
        self.asynchronous: bool = bool(asynchronous)
        self.observation_size: int = int(obs_space.shape[0])
        self.action_size: int = int(act_space.shape[0])
        self.action_low: np.ndarray = np.asarray(act_space.low, np.float32)
        self.action_high: np.ndarray = np.asarray(act_space.high, np.float32)
        self.episode_length: int | None = episode_length  # In decisions.
        self.action_repeat: int = action_repeat
        self._action_dtype = act_space.dtype
        self.cost_names: tuple[str, ...] | None = None if costs is None else tuple(costs)
        self._closed = False
        if self.cost_names is not None and self.cost_names != ("sum",):
            try:
                self._check_cost_names()
            except Exception:
                vec.close()
                raise
        self._acc = self._fresh_accumulator()

    def _fresh_accumulator(self) -> EpisodeAccumulator:
        m = None if self.cost_names is None else len(self.cost_names)
        return init_episode_accumulator(self.num_envs, m)

    def _check_cost_names(self) -> None:
        """One reset and step to read the task's cost signals; unknown names fail here."""
        if not self.cost_names or len(set(self.cost_names)) != len(self.cost_names):
            raise ValueError(f"costs={list(self.cost_names)} must be distinct names, at least one.")
        self._vec.reset(seed=0)
        middle = (self.action_low + self.action_high) / 2
        *_, info = self._vec.step(np.tile(middle, (self.num_envs, 1)).astype(self._action_dtype))
        valid = cost_signals(info)
        unknown = [c for c in self.cost_names if c not in valid]
        if unknown:
            raise ValueError(
                f"costs={list(self.cost_names)}: {self.env_id} reports no cost signal "
                f"{unknown}; its signals: {', '.join(valid)}."
            )

    def reset(self, seed: int | None = None) -> np.ndarray:
        """Resets every env; env i is seeded with ``seed + i``.

        Returns:
          [N, O] float32 observations.
        """
        if seed is not None and not isinstance(seed, (int, np.integer)):
            raise ValueError(f"seed must be an int or None, got {seed!r}")
        obs, _ = self._vec.reset(seed=None if seed is None else int(seed))
        self._acc = self._fresh_accumulator()
        return np.asarray(obs, dtype=np.float32)

    def step(self, actions: np.ndarray) -> StepResult:
        """Steps every env with ``actions`` ([N, A]), clipped to the action box."""
        actions = clip_actions(actions, self.action_low, self.action_high)
        if actions.shape[0] != self.num_envs:
            raise ValueError(
                f"actions must have shape [{self.num_envs}, {self.action_size}], "
                f"got {actions.shape}"
            )
        obs, reward, cost, terminated, truncated, info = self._vec.step(
            actions.astype(self._action_dtype)
        )
        terminated = np.asarray(terminated, dtype=bool)
        truncated = np.asarray(truncated, dtype=bool)
        done = terminated | truncated
        cost = np.asarray(cost, dtype=np.float32)
        if self.cost_names == ("sum",):
            cost = cost[:, None]  # The step's cost is cost_sum.
        elif self.cost_names is not None:
            cost = info_costs(info, self.cost_names, done)
        self._acc, episode = accumulate_episodes(self._acc, reward, cost, done)
        return StepResult(
            obs=np.asarray(obs, dtype=np.float32),
            next_obs=true_next_observations(obs, done, info),
            reward=np.asarray(reward, dtype=np.float32),
            cost=cost,
            terminated=terminated,
            truncated=truncated,
            episode=episode,
        )

    def close(self) -> None:
        """Closes the envs and their worker processes; safe to call twice."""
        if not self._closed:
            self._closed = True
            self._vec.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def __repr__(self) -> str:
        mode = "async" if self.asynchronous else "sync"
        return (
            f"SafetyGymVectorEnv({self.env_id!r}, num_envs={self.num_envs}, {mode}, "
            f"obs={self.observation_size}, act={self.action_size})"
        )
