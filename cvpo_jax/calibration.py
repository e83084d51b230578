"""Critic calibration: the critics' Q at visited (s, a) against what was realised.

For each finished training episode the discounted Monte Carlo return and cost-to-go
G_t = sum_j gamma^j x_{t+j} are computed at a subsample of its steps and compared
with the (target, aggregated) critics the E-step uses, Q_r(s_t, a_t) and
Q_c(s_t, a_t). A time-limit truncation cuts the sum, so for truncated episodes only
steps with at least H steps left are used, H the smallest horizon with
gamma^H <= `tail_tol` (the missing tail then weighs at most tail_tol of the
bootstrap value); terminated episodes are exact at every step.

Per logging interval: bias = mean(Q - G), the correlation of Q and G, and the mean
G (`calib_qr_*`, `calib_qc_*`). A constraint is only judged on true numbers when
the cost bias is small next to the threshold.
"""

from __future__ import annotations

import math

import jax
import numpy as np

CALIBRATION_KEYS = ("bias", "corr", "mc")


def discounted_to_go(x: np.ndarray, gamma: float) -> np.ndarray:
    """G_t = sum_{j>=0} gamma^j x_{t+j} over the rest of the episode; x [T, ...] -> [T, ...]."""
    x = np.asarray(x, np.float64)
    out = np.empty_like(x)
    acc = np.zeros_like(x[0]) if len(x) else None
    for t in range(len(x) - 1, -1, -1):
        acc = x[t] + gamma * acc
        out[t] = acc
    return out


def tail_horizon(gamma: float, tail_tol: float) -> int:
    """Smallest H with gamma^H <= tail_tol."""
    return int(math.ceil(math.log(tail_tol) / math.log(gamma)))


def calibration_points(
    length: int, terminated: bool, gamma: float, tail_tol: float, max_points: int
) -> np.ndarray:
    """Indices of the steps of an episode of `length` steps that are compared (evenly spaced)."""
    usable = length if terminated else length - tail_horizon(gamma, tail_tol)
    if usable <= 0:
        return np.zeros((0,), np.int64)
    stride = max(1, math.ceil(usable / max_points))
    return np.arange(0, usable, stride, dtype=np.int64)


def calibration_stats(q: np.ndarray, g: np.ndarray) -> dict[str, float]:
    """bias = mean(q - g), Pearson corr(q, g) (NaN if either is constant), mc = mean(g)."""
    q, g = np.asarray(q, np.float64), np.asarray(g, np.float64)
    if q.size == 0:
        return {k: math.nan for k in CALIBRATION_KEYS}
    sq, sg = np.std(q), np.std(g)
    corr = (
        float(np.mean((q - q.mean()) * (g - g.mean())) / (sq * sg))
        if sq > 0 and sg > 0
        else math.nan
    )
    return {"bias": float(np.mean(q - g)), "corr": corr, "mc": float(np.mean(g))}


def _names(prefix: str, num_constraints: int) -> list[str]:
    """Column names of a per-constraint statistic, as `run_logging.flat_metric_names`
    names [M] metrics: `prefix` when M = 1, else `prefix_i`."""
    if num_constraints == 1:
        return [prefix]
    return [f"{prefix}_{m}" for m in range(num_constraints)]


def calibration_columns(num_constraints: int) -> list[str]:
    names = [f"calib_qr_{k}" for k in CALIBRATION_KEYS]
    for k in CALIBRATION_KEYS:
        names += _names(f"calib_qc_{k}", num_constraints)
    return names


class CalibrationTracker:
    """Keeps the current episode of each env and compares critics with its realised sums.

    record(obs [n, O], action [n, A], reward [n], cost [n, M]) every vector step, then
    finish(done [n], terminated [n], critic_params) evaluates the critics on the
    episodes that just ended. interval_stats() returns the interval's columns and
    starts a new interval.
    """

    def __init__(
        self,
        q_fn,
        num_envs: int,
        num_constraints: int,
        gamma: float,
        tail_tol: float = 0.01,
        max_points: int = 64,
        cost_gamma: float | None = None,
    ):
        self._q_fn = jax.jit(q_fn)  # (critic_params, obs [P, O], action [P, A]) -> ([P], [P, M])
        self.num_constraints = num_constraints
        self.gamma = gamma
        self.cost_gamma = gamma if cost_gamma is None else cost_gamma
        self.tail_tol = tail_tol
        self.max_points = max_points
        self._episodes = [[] for _ in range(num_envs)]
        self._pairs: list[tuple[np.ndarray, ...]] = []

    def record(self, obs, action, reward, cost) -> None:
        for i, episode in enumerate(self._episodes):
            episode.append((obs[i].copy(), action[i].copy(), float(reward[i]), np.array(cost[i])))

    def finish(self, done, terminated, critic_params) -> None:
        for i in np.flatnonzero(np.asarray(done)):
            episode, self._episodes[i] = self._episodes[i], []
            idx = calibration_points(
                len(episode),
                bool(terminated[i]),
                max(self.gamma, self.cost_gamma),  # The longer horizon decides the tail.
                self.tail_tol,
                self.max_points,
            )
            if idx.size == 0:
                continue
            g_r = discounted_to_go(np.asarray([e[2] for e in episode]), self.gamma)[idx]
            costs = np.stack([e[3] for e in episode])  # [T, M]
            g_c = discounted_to_go(costs, self.cost_gamma)[idx]
            obs = np.zeros((self.max_points, *episode[0][0].shape), np.float32)
            act = np.zeros((self.max_points, *episode[0][1].shape), np.float32)
            obs[: idx.size] = np.stack([episode[t][0] for t in idx])
            act[: idx.size] = np.stack([episode[t][1] for t in idx])
            q_r, q_c = jax.device_get(self._q_fn(critic_params, obs, act))
            self._pairs.append((q_r[: idx.size], g_r, q_c[: idx.size], g_c))

    def interval_stats(self) -> dict[str, float]:
        pairs, self._pairs = self._pairs, []
        m = self.num_constraints
        empty = (np.zeros((0,)), np.zeros((0,)), np.zeros((0, m)), np.zeros((0, m)))
        q_r, g_r, q_c, g_c = (
            np.concatenate([p[j] for p in pairs]) if pairs else empty[j] for j in range(4)
        )
        out = {f"calib_qr_{k}": v for k, v in calibration_stats(q_r, g_r).items()}
        per_constraint = [calibration_stats(q_c[:, i], g_c[:, i]) for i in range(m)]
        for k in CALIBRATION_KEYS:
            out.update(zip(_names(f"calib_qc_{k}", m), (s[k] for s in per_constraint), strict=True))
        return out
