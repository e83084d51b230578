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
import jax.numpy as jnp
import numpy as np
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
    backend: str | None = None  # The physics backend of a JAX env; None on the host.
    # "host" for a JAX env trained in the host loop (`loop=host`); None: the env's own
    # loop (on device for JAX envs, the host for the others).
    loop: str | None = None

    @property
    def on_device(self) -> bool:
        """The run trained in the on-device loop (a JAX env not moved to the host)."""
        from cvpo_jax.envs.registry import is_jax_env

        return is_jax_env(self.env_id) and self.loop != "host"

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
            backend=getattr(env, "backend", None),
            loop=getattr(env, "loop", None),
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "train": dataclasses.asdict(self.train),
            "algo": dataclasses.asdict(self.algo),
            "env_id": self.env_id,
            "obs_size": self.obs_size,
            "action_low": list(self.action_low),
            "action_high": list(self.action_high),
            "backend": self.backend,
            "loop": self.loop,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RunSpec:
        return cls(
            # Runs saved before action_repeat existed held each action once.
            train=TrainConfig(**{"action_repeat": 1, **data["train"]}),
            algo=CVPOConfig(**data["algo"]),
            env_id=data["env_id"],
            obs_size=int(data["obs_size"]),
            action_low=tuple(data["action_low"]),
            action_high=tuple(data["action_high"]),
            backend=data.get("backend"),  # Absent in runs saved before it was recorded.
            loop=data.get("loop"),
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


def checkpoint_steps(run_dir: str | os.PathLike) -> list[int]:
    """The env steps of the complete checkpoints of a run, ascending.

    Read from the directory names, not through orbax: that would start the JAX
    runtime, and env subprocesses forked after it would warn of deadlocks. Orbax
    writes to `<step>.orbax-checkpoint-tmp-*` and renames on completion, so a purely
    numeric name is a complete checkpoint.
    """
    directory = Path(run_dir) / CHECKPOINT_DIR
    if not directory.is_dir():
        return []
    return sorted(int(p.name) for p in directory.iterdir() if p.is_dir() and p.name.isdigit())


def latest_step(run_dir: str | os.PathLike) -> int | None:
    """The env step of the newest complete checkpoint, or None."""
    steps = checkpoint_steps(run_dir)
    return steps[-1] if steps else None


class CheckpointError(RuntimeError):
    """A checkpoint could not be written; earlier checkpoints are untouched."""


# Orbax refuses arrays with a zero-size dimension (e.g. the MJX state's `act` of a
# robot without actuator activations). They hold no data, so they are saved as a
# one-element placeholder and rebuilt from the restore template's shape and dtype.
def _is_empty(x) -> bool:
    return hasattr(x, "shape") and int(np.prod(x.shape)) == 0


def _fill_empty(tree: Any) -> Any:
    return jax.tree.map(lambda x: np.zeros((1,), x.dtype) if _is_empty(x) else x, tree)


def _abstract(like: Any) -> Any:
    def leaf(x):
        if _is_empty(x):
            return jax.ShapeDtypeStruct((1,), x.dtype)
        return ocp.utils.to_shape_dtype_struct(x)

    return jax.tree.map(leaf, like)


def _unfill_empty(restored: Any, like: Any) -> Any:
    return jax.tree.map(
        lambda r, x: jnp.zeros(x.shape, x.dtype) if _is_empty(x) else r, restored, like
    )


def _save(run_dir: Path, step: int, keep: int, items: dict) -> None:
    """Saves `items` (orbax args) as checkpoint `step`; failures name the run and step
    (orbax's own message, kept in the error, names the leaf).

    Orbax writes into a temporary directory and renames it when complete, so a failed
    save leaves the earlier checkpoints as they were.
    """
    manager = _manager(run_dir, keep)
    try:
        manager.save(step, args=ocp.args.Composite(**items), force=True)
        manager.wait_until_finished()
    except Exception as err:  # noqa: BLE001 - re-raised with the context a user needs.
        raise CheckpointError(
            f"saving checkpoint {step} in {str(run_dir)!r} failed: {err}. Earlier checkpoints "
            f"are kept (newest: {manager.latest_step()})."
        ) from err
    finally:
        manager.close()


def save_checkpoint(
    run_dir: Path, step: int, state: TrainState, replay: dict, loop: dict, keep: int
) -> None:
    """Writes checkpoint `step` (atomically) and prunes to the newest `keep`."""
    items = {
        "state": ocp.args.StandardSave(_fill_empty(state)),
        "replay": ocp.args.PyTreeSave(replay),
        "loop": ocp.args.JsonSave(loop),
    }
    _save(run_dir, step, keep, items)


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
    items = {"state": ocp.args.StandardRestore(_abstract(like)), "loop": ocp.args.JsonRestore()}
    if with_replay:
        items["replay"] = ocp.args.PyTreeRestore()
    try:
        restored = manager.restore(step, args=ocp.args.Composite(**items))
    except ValueError as err:
        raise _older_format(err, run_dir, step) from err
    finally:
        manager.close()
    replay = restored["replay"] if with_replay else None
    return step, _unfill_empty(restored["state"], like), replay, restored["loop"]


def _older_format(err: ValueError, run_dir, step: int) -> Exception:
    """A clear error for a checkpoint whose train state lacks leaves added since."""
    message = str(err)
    if "do not match" in message and "realised_cost" in message:
        return NotARunError(
            f"checkpoint {step} in {str(run_dir)!r} was written before the train state "
            "gained estep_duals.realised_cost / realised_episodes (constraint_form, "
            "2026-12-01); this version cannot restore it. Use the cvpo-jax commit that "
            "wrote it (before 2f0e0e0) to evaluate or resume it."
        )
    return err


def save_tree_checkpoint(run_dir: Path, step: int, tree: Any, loop: dict, keep: int) -> None:
    """Writes one pytree (e.g. the on-device loop's runner) and loop counters, atomically.

    Leaves of zero size (which orbax refuses) are stored as placeholders and rebuilt
    by `restore_tree_checkpoint`.
    """
    items = {"tree": ocp.args.StandardSave(_fill_empty(tree)), "loop": ocp.args.JsonSave(loop)}
    _save(run_dir, step, keep, items)


def restore_loop_counters(run_dir: str | os.PathLike, step: int) -> dict:
    manager = _manager(Path(run_dir), 1000)
    restored = manager.restore(step, args=ocp.args.Composite(loop=ocp.args.JsonRestore()))
    manager.close()
    return restored["loop"]


def restore_tree_checkpoint(run_dir: str | os.PathLike, like: Any, step: int) -> Any:
    """Restores the pytree saved by `save_tree_checkpoint`; `like` gives its structure."""
    manager = _manager(Path(run_dir), 1000)
    try:
        restored = manager.restore(
            step, args=ocp.args.Composite(tree=ocp.args.StandardRestore(_abstract(like)))
        )
    except ValueError as err:
        raise _older_format(err, run_dir, step) from err
    finally:
        manager.close()
    return _unfill_empty(restored["tree"], like)
