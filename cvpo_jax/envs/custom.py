"""Your own environment: `env=package.module:factory` on the command line.

The host loop trains on any environment that follows Safety-Gymnasium's API:

- `factory()` (no arguments) returns one env; it must be importable by name
  (a module-level function), because each subprocess env imports and calls it;
- `observation_space` and `action_space` are flat `gymnasium.spaces.Box`es;
- `reset(seed=...) -> (obs, info)`;
- `step(action) -> (obs, reward, cost, terminated, truncated, info)`, with `cost`
  a finite number >= 0 for the step (the one constraint's signal);
- episodes end by `terminated` or `truncated`; the time limit (the episode length
  that converts the cost limit to the Q_c threshold) is `env.spec.max_episode_steps`
  when the env was registered with gymnasium, else the attribute
  `max_episode_steps` of the env.

`check_env` runs one reset and one step in the main process and names what is
wrong before any subprocess starts. `cvpo_jax.envs.examples:hazard_point` is a tiny
example (and what the tests train on).
"""

from __future__ import annotations

import importlib
import math
import re
from collections.abc import Callable
from typing import Any

import numpy as np

SEPARATOR = ":"
_SPEC = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")


def is_custom(name: str) -> bool:
    """Whether an env name is a `module:factory` reference."""
    return isinstance(name, str) and SEPARATOR in name


def load_factory(spec: str) -> Callable[[], Any]:
    """The callable named by `package.module:factory`.

    Raises:
      ValueError: a malformed reference, a module that does not import, or a name
        that is missing or not callable.
    """
    if not _SPEC.match(spec):
        raise ValueError(
            f"env={spec!r}: a custom environment is given as 'package.module:factory' "
            "(a module-level callable returning one env)."
        )
    module_name, attr = spec.split(SEPARATOR)
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ValueError(f"env={spec!r}: cannot import module {module_name!r} ({err}).") from err
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise ValueError(f"env={spec!r}: module {module_name!r} has no callable {attr!r}.")
    return factory


def episode_length_of(env: Any, spec: str) -> int:
    """The env's time limit (see the module doc)."""
    env_spec = getattr(env, "spec", None)
    length = getattr(env_spec, "max_episode_steps", None)
    if length is None:
        length = getattr(env, "max_episode_steps", None)
    if not isinstance(length, (int, np.integer)) or isinstance(length, bool) or length < 1:
        raise ValueError(
            f"env={spec!r}: the env needs a time limit: register it with gymnasium with "
            "max_episode_steps, or give it an integer attribute max_episode_steps >= 1 "
            f"(got {length!r})."
        )
    return int(length)


def _flat_box(space: Any, what: str, spec: str) -> None:
    from gymnasium import spaces

    if not isinstance(space, spaces.Box) or len(space.shape) != 1:
        raise ValueError(f"env={spec!r}: {what} must be a flat gymnasium Box; got {space!r}.")


def check_env(env: Any, spec: str, seed: int = 0) -> int:
    """Checks one env against the protocol with a reset and a step; returns its
    episode length.

    Raises:
      ValueError: naming the first thing that does not follow the protocol.
    """
    _flat_box(getattr(env, "observation_space", None), "observation_space", spec)
    _flat_box(getattr(env, "action_space", None), "action_space", spec)
    length = episode_length_of(env, spec)
    obs_shape = env.observation_space.shape
    out = env.reset(seed=seed)
    if not (isinstance(out, tuple) and len(out) == 2):
        raise ValueError(f"env={spec!r}: reset(seed=...) must return (obs, info); got {out!r}.")
    if np.shape(out[0]) != obs_shape:
        raise ValueError(
            f"env={spec!r}: reset's observation has shape {np.shape(out[0])}; "
            f"observation_space says {obs_shape}."
        )
    out = env.step(env.action_space.sample())
    if not (isinstance(out, tuple) and len(out) == 6):
        got = f"a {len(out)}-tuple" if isinstance(out, tuple) else repr(type(out).__name__)
        hint = " (gymnasium's 5-tuple: the cost is missing)" if got == "a 5-tuple" else ""
        raise ValueError(
            f"env={spec!r}: step(action) must return (obs, reward, cost, terminated, "
            f"truncated, info); got {got}{hint}."
        )
    obs, reward, cost = out[0], out[1], out[2]
    if np.shape(obs) != obs_shape:
        raise ValueError(
            f"env={spec!r}: step's observation has shape {np.shape(obs)}; "
            f"observation_space says {obs_shape}."
        )
    for name, value in (("reward", reward), ("cost", cost)):
        if np.ndim(value) != 0 or not math.isfinite(float(value)):
            raise ValueError(f"env={spec!r}: step's {name} must be a finite number; got {value!r}.")
    if float(cost) < 0:
        raise ValueError(f"env={spec!r}: step's cost must be >= 0; got {cost!r}.")
    return length


def make_custom_vector_env(
    spec: str,
    num_envs: int,
    asynchronous: bool = False,
    context: str | None = None,
    action_repeat: int = 1,
):
    """A `SafetyGymVectorEnv` of `num_envs` envs from the factory `spec`, checked first."""
    from cvpo_jax.envs.safety_gymnasium import SafetyGymVectorEnv

    factory = load_factory(spec)
    probe = factory()
    try:
        length = check_env(probe, spec)
    finally:
        close = getattr(probe, "close", None)
        if close is not None:
            close()
    return SafetyGymVectorEnv.from_env_fns(
        [factory] * num_envs,
        episode_length=length,
        asynchronous=asynchronous,
        context=context,
        env_id=spec,
        action_repeat=action_repeat,
    )
