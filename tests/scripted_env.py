"""A tiny scripted vector environment with the SafetyGymVectorEnv interface.

Deterministic: observation [t / T, sin t, cos t, 1] at step t of an episode of T
steps (time limit: truncated, never terminated); reward -(a0 - 0.3)^2; cost 1 when
a0 > 0.5. Reset ignores the seed, so a run resumed at an episode boundary sees the
same data as an uninterrupted one. Hooks let a test inject NaN rewards or a SIGINT.
"""

from __future__ import annotations

import os
import signal

import numpy as np

from cvpo_jax.envs.safety_gymnasium import StepResult, accumulate_episodes, init_episode_accumulator


class ScriptedVectorEnv:
    env_id = "Scripted-v0"
    observation_size = 4
    action_size = 2

    def __init__(self, num_envs=1, episode_length=10, nan_after=None, sigint_after=None):
        self.num_envs = num_envs
        self.episode_length = episode_length
        self.action_low = -np.ones(2, np.float32)
        self.action_high = np.ones(2, np.float32)
        self.nan_after = nan_after
        self.sigint_after = sigint_after
        self.total_steps = 0
        self.closed = False
        self.reset_seeds = []

    def _obs(self):
        t = self.t.astype(np.float32)
        return np.stack(
            [t / self.episode_length, np.sin(t), np.cos(t), np.ones_like(t)], axis=1
        ).astype(np.float32)

    def reset(self, seed=None):
        self.reset_seeds.append(seed)
        self.t = np.zeros(self.num_envs, np.int64)
        self.acc = init_episode_accumulator(self.num_envs)
        return self._obs()

    def step(self, actions):
        actions = np.asarray(actions, np.float32)
        assert actions.shape == (self.num_envs, 2)
        assert np.all(actions >= -1) and np.all(actions <= 1)
        self.total_steps += self.num_envs
        if self.sigint_after is not None and self.total_steps >= self.sigint_after:
            self.sigint_after = None
            os.kill(os.getpid(), signal.SIGINT)
        reward = -((actions[:, 0] - 0.3) ** 2)
        if self.nan_after is not None and self.total_steps > self.nan_after:
            reward = reward * np.nan
        cost = (actions[:, 0] > 0.5).astype(np.float32)
        self.t += 1
        truncated = self.t >= self.episode_length
        terminated = np.zeros(self.num_envs, bool)
        next_obs = self._obs()
        self.acc, episode = accumulate_episodes(self.acc, reward, cost, truncated)
        self.t = np.where(truncated, 0, self.t)
        return StepResult(
            obs=self._obs(),
            next_obs=next_obs,
            reward=reward.astype(np.float32),
            cost=cost,
            terminated=terminated,
            truncated=truncated,
            episode=episode,
        )

    def close(self):
        self.closed = True
