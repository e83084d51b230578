"""`resume=true run_dir=X`: the run's own configuration from its run.json.

A resumed run keeps everything the run was started with. Keys given on the command
line must agree with the saved ones, except the few that may change on resume
(`RESUME_MAY_CHANGE`); a key that differs fails at once, naming only those keys.
"""

from __future__ import annotations

import dataclasses
import numbers
from collections.abc import Iterable, Sequence
from typing import Any

from omegaconf import DictConfig, OmegaConf

from cvpo_jax.checkpoint import RunSpec
from experiments.cli import UsageError, to_dict

# What a resumed run may change: its budget (upward, checked by the loop), how it
# reports, and how often it saves. Everything else is fixed by the run.
RESUME_MAY_CHANGE = frozenset(
    {
        "run_dir",
        "resume",
        "progress",
        "total_steps",
        "log_every",
        "checkpoint_every",
        "keep_checkpoints",
    }
)


def override_keys(overrides: Iterable[str]) -> list[str]:
    """The dotted keys of Hydra override strings (`algo.tau=0.1`, `+x=1`, `~y`)."""
    return [o.split("=", 1)[0].lstrip("+~") for o in overrides]


def saved_cli_config(spec: RunSpec, num_seeds: int | None) -> dict[str, Any]:
    """A saved run in the command line's layout (top-level train keys, algo.*)."""
    algo = dataclasses.asdict(spec.algo)
    cost_limit = list(algo.pop("cost_limit"))
    return {
        **dataclasses.asdict(spec.train),
        "env": spec.env_id,
        "cost_limit": cost_limit[0] if len(cost_limit) == 1 else cost_limit,
        "algo": algo,
        "backend": spec.backend,
        "num_seeds": 1 if num_seeds is None else num_seeds,
        "loop": spec.loop or "auto",
    }


def _get(tree: dict[str, Any], key: str) -> Any:
    for part in key.split("."):
        if not isinstance(tree, dict) or part not in tree:
            return None
        tree = tree[part]
    return tree


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, Sequence) and not isinstance(a, str):
        a = list(a)
        if not isinstance(b, Sequence) or isinstance(b, str):
            return len(a) == 1 and _same(a[0], b)  # cost_limit=[25] equals 25
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(b, Sequence) and not isinstance(b, str):
        return _same(b, a)
    numeric = (numbers.Real,)
    if isinstance(a, numeric) and isinstance(b, numeric) and not isinstance(a, bool):
        return not isinstance(b, bool) and float(a) == float(b)
    return a == b


def resumed_config(
    cfg: DictConfig,
    given: Iterable[str],
    spec: RunSpec,
    env_id: str | None,
    num_seeds: int | None = None,
) -> DictConfig:
    """The configuration to resume with: the saved run, plus allowed changes.

    Args:
      cfg: the composed command-line configuration.
      given: the keys the command line set (see `override_keys`).
      spec: the run's saved spec (run.json).
      env_id: the resolved id of `env` if the command line gave it, else None.
      num_seeds: seeds of an on-device run (from its checkpoint), None on the host.

    Raises:
      UsageError: a given key differs from the saved run; the message names each one
        with both values.
    """
    current = to_dict(cfg)
    saved = saved_cli_config(spec, num_seeds)
    conflicts = []
    for key in dict.fromkeys(given):
        if key in RESUME_MAY_CHANGE:
            continue
        if key == "algo.episode_length" and _get(current, key) is None:
            continue  # null means "the env's", which the saved run already resolved.
        new = env_id if key == "env" else _get(current, key)
        old = _get(saved, key)
        if not _same(new, old):
            conflicts.append(f"{key}={new!r} (the run has {old!r})")
    if conflicts:
        raise UsageError(
            "resume=true continues the run with its saved configuration (run.json); "
            f"these keys differ from it: {'; '.join(conflicts)}. Drop them, or start a "
            f"new run. Allowed to change on resume: {', '.join(sorted(RESUME_MAY_CHANGE))}."
        )
    changed = {k: current[k] for k in given if k in RESUME_MAY_CHANGE and k in current}
    # run_dir, resume and progress are not part of a run's saved configuration.
    fresh = {k: current.get(k) for k in ("run_dir", "resume", "progress")}
    return OmegaConf.create({**saved, **changed, **fresh})
