"""A tiny environment with a cost, to show (and test) `env=module:factory`.

    python -m experiments.train env=cvpo_jax.envs.examples:hazard_point total_steps=20000

A point on the plane starts at a random spot and is rewarded for closing in on a
goal at the origin; a circular hazard sits between them, and every step inside it
costs 1. The action is the point's velocity (clipped to the unit box), the
observation its position and the hazard's centre. Episodes last 100 steps.
"""

from __future__ import annotations

import gymnasium as gym
import numpy as np

HAZARD_CENTRE = np.array([0.5, 0.0], np.float32)
HAZARD_RADIUS = 0.3
STEP_SIZE = 0.1


class HazardPoint(gym.Env):
    """See the module doc. `max_episode_steps` is the time limit the loop reads."""

    max_episode_steps = 100

    def __init__(self) -> None:
        self.observation_space = gym.spaces.Box(-np.inf, np.inf, (4,), np.float32)
        self.action_space = gym.spaces.Box(-1.0, 1.0, (2,), np.float32)
        self._pos = np.zeros(2, np.float32)
        self._t = 0

    def _obs(self) -> np.ndarray:
        return np.concatenate([self._pos, HAZARD_CENTRE]).astype(np.float32)

    def reset(self, *, seed: int | None = None, options=None):
        super().reset(seed=seed)
        angle = self.np_random.uniform(-0.5, 0.5)
        self._pos = (1.0 * np.array([np.cos(angle), np.sin(angle)])).astype(np.float32)
        self._t = 0
        return self._obs(), {}

    def step(self, action):
        before = float(np.linalg.norm(self._pos))
        move = np.clip(np.asarray(action, np.float32), -1.0, 1.0) * STEP_SIZE
        self._pos = (self._pos + move).astype(np.float32)
        self._t += 1
        reward = before - float(np.linalg.norm(self._pos))
        cost = float(np.linalg.norm(self._pos - HAZARD_CENTRE) <= HAZARD_RADIUS)
        truncated = self._t >= self.max_episode_steps
        return self._obs(), reward, cost, False, truncated, {}


def hazard_point() -> HazardPoint:
    """The factory `env=cvpo_jax.envs.examples:hazard_point` names."""
    return HazardPoint()
