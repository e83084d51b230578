"""Action repeat for host envs: the agent decides every k physical steps.

`ActionRepeat(env, k)` holds each action for k steps of `env` and returns the sum of
their rewards and costs (and of every `cost_<name>` info entry); a decision ends
early when the episode does. Its time limit is ceil(limit / k) decisions, so the
episode (and the cost limit, which counts the episode's physical steps) is unchanged.

Why: on PointGoal1 one physical step moves the robot at most ~3 cm (a hazard is
0.4 m across); a 1-step change of action barely changes where it goes, so Q_c(s, a)
can hardly depend on a and the E-step's cost term has little to rank samples by. Held
for k steps, each action matters k times more, and gamma per decision reaches k times
further (measured: docs/results/pointgoal1-x4-1m).

The host loop applies it with `action_repeat=k` (counts stay in env steps). The
factories below name PointGoal1 with the repeat built in, as your own envs
(`env=cvpo_jax.envs.action_repeat:point_goal1_x4`, what `docs/results/pointgoal1-x4-1m`
ran before the key existed); through them the loop counts
decisions instead: total_steps, warmup_steps, log_every, update_every and the
metrics' env_steps are then in decisions (x k env steps), update_ratio per decision.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import gymnasium

from cvpo_jax.envs.custom import episode_length_of
from cvpo_jax.envs.safety_gymnasium import COST_PREFIX

# The repeat `action_repeat=null` chooses on Safety-Gymnasium's navigation tasks:
# measured best on PointGoal1 and CarGoal1 (docs/results/pointgoal1-x4-1m,
# docs/results/cargoal1-x4-1m).
NAVIGATION_REPEAT = 4


def default_repeat(env: str) -> int:
    """The action repeat `action_repeat=null` means for `env`: NAVIGATION_REPEAT on
    Safety-Gymnasium's navigation tasks, 1 elsewhere (velocity tasks, JAX envs, whose
    loop has no repeat, and your own envs, whose step is yours to size)."""
    from cvpo_jax.envs.custom import is_custom
    from cvpo_jax.envs.registry import is_navigation_id, resolve_env_id

    if is_custom(env):
        return 1
    return NAVIGATION_REPEAT if is_navigation_id(resolve_env_id(env)) else 1


def resolve_action_repeat(cfg, k: int | None = None):
    """`cfg` (a TrainConfig) with `action_repeat` None replaced by ``k`` (default:
    `default_repeat(cfg.env)`); a ValueError from the checks that k fails says where
    k came from. A `cfg` with its repeat set is returned as it is."""
    if cfg.action_repeat is not None:
        return cfg
    k = default_repeat(cfg.env) if k is None else k
    try:
        return dataclasses.replace(cfg, action_repeat=k)
    except ValueError as err:
        raise ValueError(
            f"{err} (action_repeat=null holds each action for {k} env step(s) here; "
            "set action_repeat explicitly to choose another repeat)"
        ) from err


def check_repeat(k: Any) -> None:
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"action repeat k={k!r} must be an integer >= 1.")


class ActionRepeat(gymnasium.Wrapper):
    """Repeats each action `k` times (see the module doc)."""

    def __init__(self, env: Any, k: int):
        check_repeat(k)
        super().__init__(env)
        self.k = k
        self.physical_episode_steps = episode_length_of(env, type(env).__name__)
        self.max_episode_steps = math.ceil(self.physical_episode_steps / k)

    @property
    def spec(self):
        # The inner spec's max_episode_steps counts physical steps; `max_episode_steps`
        # above is the limit in decisions.
        return None

    def step(self, action):
        reward = cost = 0.0
        summed: dict[str, float] = {}
        for _ in range(self.k):
            obs, r, c, terminated, truncated, info = self.env.step(action)
            reward += float(r)
            cost += float(c)
            for key, value in info.items():
                if key.startswith(COST_PREFIX):
                    summed[key] = summed.get(key, 0.0) + float(value)
            if terminated or truncated:
                break
        return obs, reward, cost, terminated, truncated, {**info, **summed}


def repeated(make_env: Callable[[], Any], k: int) -> ActionRepeat:
    """`make_env()` wrapped in ActionRepeat(k); module-level so that it pickles for
    subprocess envs."""
    return ActionRepeat(make_env(), k)


def _safety_gym(name: str, k: int) -> ActionRepeat:
    from cvpo_jax.envs.nav_task import make_safety_gym_env

    return ActionRepeat(make_safety_gym_env(name), k)


def point_goal1_x2() -> ActionRepeat:
    """SafetyPointGoal1-v0, each action held for 2 steps."""
    return _safety_gym("PointGoal1", 2)


def point_goal1_x4() -> ActionRepeat:
    """SafetyPointGoal1-v0, each action held for 4 steps."""
    return _safety_gym("PointGoal1", 4)
