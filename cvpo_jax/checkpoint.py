"""Checkpoints of a run with orbax: train state, replay contents and loop counters.

A run directory holds `run.json` (the resolved configuration and the environment's
spaces, enough to rebuild the learner), `checkpoints/<env_step>/` (orbax, written to
a temporary directory and renamed on completion, so a crash never leaves a half
checkpoint), `metrics.csv` and `tb/`.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from cvpo_jax.config import CVPOConfig, TrainConfig
from cvpo_jax.types import TrainState

RUN_FILE = "run.json"
CHECKPOINT_DIR = "checkpoints"


class NotARunError(ValueError):
    """The directory is not a cvpo-jax run (no run.json or no checkpoint)."""


@dataclasses.dataclass(frozen=True)
class RunSpec:
    """Everything needed to rebuild a run's learner without its environment."""

    train: TrainConfig
    algo: CVPOConfig
    env_id: str
    obs_size: int
    action_low: tuple[float, ...]
    action_high: tuple[float, ...]

    @classmethod
    def for_env(cls, train: TrainConfig, algo: CVPOConfig, env: Any) -> RunSpec:
        """The spec of a run on `env` (any env with the adapters' space attributes)."""
        return cls(
            train=train,
            algo=algo,
            env_id=env.env_id,
            obs_size=int(env.observation_size),
            action_low=tuple(float(x) for x in env.action_low),
            action_high=tuple(float(x) for x in env.action_high),
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "train": dataclasses.asdict(self.train),
            "algo": dataclasses.asdict(self.algo),
            "env_id": self.env_id,
            "obs_size": self.obs_size,
            "action_low": list(self.action_low),
            "action_high": list(self.action_high),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RunSpec:
        return cls(
            train=TrainConfig(**data["train"]),
            algo=CVPOConfig(**data["algo"]),
            env_id=data["env_id"],
            obs_size=int(data["obs_size"]),
            action_low=tuple(data["action_low"]),
            action_high=tuple(data["action_high"]),
        )


def write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True))
    os.replace(tmp, path)


def save_run_spec(run_dir: Path, spec: RunSpec) -> None:
    write_json_atomic(Path(run_dir) / RUN_FILE, spec.to_json())


def load_run_spec(run_dir: str | os.PathLike) -> RunSpec:
    path = Path(run_dir) / RUN_FILE
    if not path.is_file():
        raise NotARunError(
            f"{str(run_dir)!r} is not a cvpo-jax run directory: {RUN_FILE} not found "
            "(pass the run_dir of a training run)."
        )
    return RunSpec.from_json(json.loads(path.read_text()))


def _manager(run_dir: Path, keep: int) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, create=True, enable_async_checkpointing=False
    )
    return ocp.CheckpointManager(Path(run_dir).absolute() / CHECKPOINT_DIR, options=options)


def latest_step(run_dir: str | os.PathLike) -> int | None:
    """The env step of the newest complete checkpoint, or None."""
    directory = Path(run_dir) / CHECKPOINT_DIR
    if not directory.is_dir():
        return None
    return _manager(Path(run_dir), 1000).latest_step()


def save_checkpoint(
    run_dir: Path, step: int, state: TrainState, replay: dict, loop: dict, keep: int
) -> None:
    """Writes checkpoint `step` (atomically) and prunes to the newest `keep`."""
    manager = _manager(run_dir, keep)
    manager.save(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            replay=ocp.args.PyTreeSave(replay),
            loop=ocp.args.JsonSave(loop),
        ),
        force=True,
    )
    manager.wait_until_finished()
    manager.close()


def restore_checkpoint(
    run_dir: str | os.PathLike, like: TrainState, step: int | None = None, with_replay: bool = True
) -> tuple[int, TrainState, dict | None, dict]:
    """Restores (step, train state, replay contents or None, loop counters).

    `like` gives the train state's structure (e.g. a freshly initialised state).
    """
    run_dir = Path(run_dir)
    step = latest_step(run_dir) if step is None else step
    if step is None:
        raise NotARunError(f"{str(run_dir)!r} holds no complete checkpoint to restore.")
    manager = _manager(run_dir, 1000)
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
    items = {"state": ocp.args.StandardRestore(abstract), "loop": ocp.args.JsonRestore()}
    if with_replay:
        items["replay"] = ocp.args.PyTreeRestore()
    restored = manager.restore(step, args=ocp.args.Composite(**items))
    manager.close()
    replay = restored["replay"] if with_replay else None
    return step, restored["state"], replay, restored["loop"]


def save_tree_checkpoint(run_dir: Path, step: int, tree: Any, loop: dict, keep: int) -> None:
    """Writes one pytree (e.g. the on-device loop's runner) and loop counters, atomically."""
    manager = _manager(run_dir, keep)
    manager.save(
        step,
        args=ocp.args.Composite(tree=ocp.args.StandardSave(tree), loop=ocp.args.JsonSave(loop)),
        force=True,
    )
    manager.wait_until_finished()
    manager.close()


def restore_loop_counters(run_dir: str | os.PathLike, step: int) -> dict:
    manager = _manager(Path(run_dir), 1000)
    restored = manager.restore(step, args=ocp.args.Composite(loop=ocp.args.JsonRestore()))
    manager.close()
    return restored["loop"]


def restore_tree_checkpoint(run_dir: str | os.PathLike, like: Any, step: int) -> Any:
    """Restores the pytree saved by `save_tree_checkpoint`; `like` gives its structure."""
    manager = _manager(Path(run_dir), 1000)
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
    restored = manager.restore(
        step, args=ocp.args.Composite(tree=ocp.args.StandardRestore(abstract))
    )
    manager.close()
    return restored["tree"]
