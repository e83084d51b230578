"""Environment names: short names and full ids -> the id a backend makes.

``env=CarGoal1`` means ``SafetyCarGoal1-v0``; the full id works too, and both
match case-insensitively. Names of the form ``<backend>/<name>`` are routed to
another backend (``brax/HalfCheetahVelocity``: the JAX-native velocity tasks of
``cvpo_jax.envs.brax_velocity``; ``mjx/PointGoal1``: Safety-Gymnasium's navigation
tasks ported to MJX, ``cvpo_jax.envs.nav_env``); a name without a prefix belongs to
Safety-Gymnasium, and ``package.module:factory`` names your own environment
(``cvpo_jax.envs.custom``).

The Safety-Gymnasium list is read from safety-gymnasium's own registry, kept to
the tasks this project supports (and the compat layer was verified on):

- ``Safety{Point,Car,Racecar,Doggo,Ant}{Goal,Button,Push,Circle}{0,1,2}-v0``,
  short name without ``Safety`` and version, e.g. ``CarGoal1``;
- ``Safety<Robot>Velocity-v<k>``, short name e.g. ``HalfCheetahVelocity``,
  meaning the newest version (``-v1``); older full ids still resolve.
"""

from __future__ import annotations

import difflib
import functools
import re
import types
from collections.abc import Callable, Iterable, Mapping

SAFETY_GYM_BACKEND = "safety_gymnasium"
BRAX_BACKEND = "brax"
NAV_BACKEND = "mjx"
JAX_BACKENDS = (BRAX_BACKEND, NAV_BACKEND)  # Pure-JAX envs: the on-device loop takes them.

_NAVIGATION_ID = re.compile(
    r"^Safety(?P<short>(?:Point|Car|Racecar|Doggo|Ant)(?:Goal|Button|Push|Circle)[0-2])-v(?P<v>\d+)$"
)
_VELOCITY_ID = re.compile(r"^Safety(?P<short>[A-Za-z0-9]+Velocity)-v(?P<v>\d+)$")


def is_navigation_id(env_id: str) -> bool:
    """Whether a full id is one of Safety-Gymnasium's navigation tasks (SafetyPointGoal1-v0)."""
    return _NAVIGATION_ID.match(env_id) is not None


def build_safety_gym_names(env_ids: Iterable[str]) -> dict[str, str]:
    """Maps every accepted spelling (short name, full id) to a full id.

    Pure: ``env_ids`` is any collection of registered ids; unsupported ids are
    ignored. A short name maps to its newest version.

    Returns:
      dict from name to full id, keys in their canonical spelling.
    """
    newest: dict[str, tuple[int, str]] = {}
    names: dict[str, str] = {}
    for env_id in sorted(env_ids):
        match = _NAVIGATION_ID.match(env_id) or _VELOCITY_ID.match(env_id)
        if match is None:
            continue
        names[env_id] = env_id
        short, version = match.group("short"), int(match.group("v"))
        if short not in newest or version > newest[short][0]:
            newest[short] = (version, env_id)
    names.update({short: env_id for short, (_, env_id) in newest.items()})
    return names


@functools.cache
def safety_gym_names() -> Mapping[str, str]:
    """Accepted Safety-Gymnasium names -> full ids, from safety-gymnasium's registry."""
    from cvpo_jax.envs.safety_gymnasium_compat import import_safety_gymnasium

    import_safety_gymnasium()
    from safety_gymnasium.utils.registration import safe_registry

    # Read-only: the cached mapping is shared by every caller.
    return types.MappingProxyType(build_safety_gym_names(safe_registry))


def lookup(name: str, names: Mapping[str, str], backend: str) -> str:
    """Resolves ``name`` in ``names`` (exact first, then case-insensitive).

    Raises:
      ValueError: naming ``name``, the closest matches, and all short names.
    """
    if name in names:
        return names[name]
    folded = {key.lower(): value for key, value in names.items()}
    if name.lower() in folded:
        return folded[name.lower()]
    suggestions = difflib.get_close_matches(name, list(names), n=3, cutoff=0.6)
    if not suggestions:
        by_lower = difflib.get_close_matches(name.lower(), list(folded), n=3, cutoff=0.6)
        suggestions = [next(k for k in names if k.lower() == s) for s in by_lower]
    hint = f" Did you mean {' or '.join(repr(s) for s in suggestions)}?" if suggestions else ""
    short_names = sorted(k for k, v in names.items() if k != v)
    raise ValueError(
        f"unknown {backend} environment {name!r}.{hint} Valid names (short form; full ids "
        f"like 'SafetyCarGoal1-v0' work too): {', '.join(short_names)}"
    )


def _resolve_safety_gym(name: str) -> str:
    return lookup(name, safety_gym_names(), SAFETY_GYM_BACKEND)


def _brax_names() -> Mapping[str, str]:
    # Lazy: the brax module pulls in jax/flax, which name lookups do not need otherwise.
    from cvpo_jax.envs.brax_velocity import BRAX_VELOCITY_TASKS

    return {name: name for name in BRAX_VELOCITY_TASKS}


def _resolve_brax(name: str) -> str:
    from cvpo_jax.envs.brax_velocity import resolve_brax_name

    return resolve_brax_name(name)


def _resolve_nav(name: str) -> str:
    from cvpo_jax.envs.nav_task import resolve_nav_name

    return resolve_nav_name(name)


# Backend prefix -> resolver of the name after "<prefix>/". The empty prefix is
# the default backend.
BACKENDS: dict[str, Callable[[str], str]] = {
    "": _resolve_safety_gym,
    BRAX_BACKEND: _resolve_brax,
    NAV_BACKEND: _resolve_nav,
}


def is_jax_env(env_id: str) -> bool:
    """The id names a pure-JAX env (``brax/...``, ``mjx/...``)."""
    return split_backend(env_id)[0] in JAX_BACKENDS


def make_jax_env(env_id: str, backend: str | None = None, episode_length: int | None = None):
    """The JAX env of a ``brax/...`` or ``mjx/...`` id.

    ``backend`` is brax's physics backend for ``brax/`` tasks; the ``mjx/`` tasks run
    on MJX only (None or "mjx").
    """
    prefix, name = split_backend(env_id)
    if prefix == BRAX_BACKEND:
        from cvpo_jax.envs.brax_velocity import make_brax_velocity_env

        return make_brax_velocity_env(env_id, backend=backend, episode_length=episode_length)
    if prefix == NAV_BACKEND:
        if backend not in (None, "mjx"):
            raise ValueError(
                f"backend={backend!r}: {env_id} runs on MJX only (backend=null or mjx)"
            )
        from cvpo_jax.envs.nav_env import SafeNavEnv

        return SafeNavEnv.from_name(name, episode_length)
    raise ValueError(f"{env_id!r} is not a JAX env; JAX env prefixes: {', '.join(JAX_BACKENDS)}")


def safety_gym_counterpart(env_id: str) -> str | None:
    """The Safety-Gymnasium task a JAX port stands for (``mjx/PointGoal1`` ->
    ``SafetyPointGoal1-v0``); None for ids without one (``brax/...``, your own envs)."""
    prefix, name = split_backend(env_id)
    return _resolve_safety_gym(name) if prefix == NAV_BACKEND else None


def split_backend(name: str) -> tuple[str, str]:
    """Splits ``"brax/ant"`` into ``("brax", "ant")``; no prefix gives ``("", name)``."""
    prefix, sep, rest = name.partition("/")
    return (prefix, rest) if sep else ("", name)


def resolve_env_id(name: str) -> str:
    """Returns the full id for an environment name.

    ``"CarGoal1"``, ``"cargoal1"`` and ``"SafetyCarGoal1-v0"`` all give
    ``"SafetyCarGoal1-v0"``; ``"HalfCheetahVelocity"`` gives
    ``"SafetyHalfCheetahVelocity-v1"``. A name from a non-default backend keeps
    its prefix in the result (``"<backend>/<id>"``).

    Raises:
      ValueError: unknown name (with close matches and the valid names), or a
        backend prefix that is unknown or not available yet.
    """
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"environment name must be a non-empty string, got {name!r}")
    if ":" in name:  # Your own env, `package.module:factory` (see cvpo_jax.envs.custom).
        from cvpo_jax.envs.custom import load_factory

        load_factory(name.strip())  # Fails here, naming what is wrong.
        return name.strip()
    prefix, rest = split_backend(name.strip())
    if prefix not in BACKENDS:
        available = sorted(p for p in BACKENDS if p)
        raise ValueError(
            f"unknown environment backend {prefix!r} in {name!r}; available backend "
            f"prefixes: {available or 'none'} (or no prefix for Safety-Gymnasium)"
        )
    resolved = BACKENDS[prefix](rest)
    return f"{prefix}/{resolved}" if prefix else resolved


def _listing_backend_names(backend: str, caller: str) -> Mapping[str, str]:
    if backend == BRAX_BACKEND:
        return {f"{BRAX_BACKEND}/{k}": f"{BRAX_BACKEND}/{v}" for k, v in _brax_names().items()}
    if backend == NAV_BACKEND:
        from cvpo_jax.envs.nav_task import TASK_NAMES

        return {f"{NAV_BACKEND}/{n}": f"{NAV_BACKEND}/{n}" for n in TASK_NAMES}
    if backend not in ("", SAFETY_GYM_BACKEND):
        raise ValueError(
            f"{caller}: unknown backend {backend!r}; allowed: '', {SAFETY_GYM_BACKEND!r}, "
            f"{BRAX_BACKEND!r} or {NAV_BACKEND!r}"
        )
    return safety_gym_names()


def list_env_names(backend: str = "") -> list[str]:
    """Short names accepted by ``backend`` (default: Safety-Gymnasium), sorted."""
    names = _listing_backend_names(backend, "list_env_names")
    if backend in JAX_BACKENDS:
        return sorted(names)
    return sorted(k for k, v in names.items() if k != v)


def list_env_ids(backend: str = "") -> list[str]:
    """Full ids accepted by ``backend`` (default: Safety-Gymnasium), sorted."""
    names = _listing_backend_names(backend, "list_env_ids")
    if backend in JAX_BACKENDS:
        return sorted(names.values())
    return sorted(k for k, v in names.items() if k == v)
