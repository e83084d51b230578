"""Shared pieces of the command-line entry points: config conversion and errors."""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable
from typing import Any

from omegaconf import DictConfig, OmegaConf

from cvpo_jax.config import CVPOConfig, TrainConfig

CLI_KEYS = {
    "cost_limit",
    "run_dir",
    "resume",
    "progress",
    "algo",
    "num_seeds",
    "backend",
    "loop",
}


class UsageError(ValueError):
    """A bad command line: reported as one line, exit status 2."""


def to_dict(cfg: DictConfig) -> dict[str, Any]:
    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]


def _unknown(keys, allowed, where: str) -> None:
    unknown = sorted(set(keys) - set(allowed))
    if unknown:
        raise UsageError(
            f"unknown {where} key(s) {unknown}; allowed: {', '.join(sorted(allowed))}."
        )


def build_configs(
    cfg: DictConfig, episode_length: int | None = None
) -> tuple[TrainConfig, CVPOConfig]:
    """Validated (TrainConfig, CVPOConfig) from the composed command-line config, with
    `action_repeat` null replaced by the env's default repeat."""
    from cvpo_jax.envs.action_repeat import resolve_action_repeat

    data = to_dict(cfg)
    train_fields = {f.name for f in dataclasses.fields(TrainConfig)}
    algo_fields = {f.name for f in dataclasses.fields(CVPOConfig)} - {"cost_limit"}
    _unknown(data, train_fields | CLI_KEYS, "config")
    algo = dict(data.get("algo") or {})
    _unknown(algo, algo_fields, "algo")
    if algo.get("episode_length") is None:
        algo["episode_length"] = episode_length if episode_length is not None else 1000
    cost_limit = data["cost_limit"]
    limits = tuple(cost_limit) if isinstance(cost_limit, (list, tuple)) else (cost_limit,)
    train = TrainConfig(**{k: v for k, v in data.items() if k in train_fields})
    return resolve_action_repeat(train), CVPOConfig(cost_limit=limits, **algo)


def run_job(main: Callable[[], int | None]) -> int:
    """Runs `main`; a usage error becomes a one-line message and status 2."""
    from cvpo_jax.checkpoint import NotARunError

    try:
        code = main()
    except (UsageError, NotARunError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return code or 0


def run_cli(main: Callable[[], int | None]) -> None:
    """Runs `main` and exits with its status (see `run_job`)."""
    sys.exit(run_job(main))


class SweepReport:
    """The jobs of one Hydra sweep (`-m`): each runs whatever the others did, and
    the process exits non-zero at the end if any failed."""

    def __init__(self) -> None:
        self.failed: list[str] = []
        self.jobs = 0

    def job_done(self, code: int, overrides: list[str]) -> None:
        self.jobs += 1
        if code:
            line = " ".join(overrides) or "(no overrides)"
            self.failed.append(f"{line} (exit status {code})")
            print(f"[cvpo] sweep job failed with exit status {code}: {line}", file=sys.stderr)

    def finish(self) -> None:
        if not self.jobs:
            return  # Not a sweep: the single run exited with its own status.
        if self.failed:
            print(
                f"[cvpo] sweep: {len(self.failed)} of {self.jobs} job(s) failed:\n  "
                + "\n  ".join(self.failed),
                file=sys.stderr,
            )
            sys.exit(1)
        print(f"[cvpo] sweep: all {self.jobs} job(s) completed.", file=sys.stderr)
