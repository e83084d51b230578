"""Realised-cost feedback on the E-step's cost threshold, and its advantage form.

The E-step constrains E_q[Q_c] <= qc_threshold on replayed states, so it is only
as good as the cost critic and as the replay's state distribution is like the
current policy's. Both were seen to be off by a factor ~2 (see the README's
algorithm section). The feedback closes the loop on what is actually paid: after
each finished training episode the threshold scale moves against the episode's
cost error,

    log s <- clip(log s - gain * min((C - limit) / max(limit, 1), ERROR_CAP), log lo, log hi),

so a critic that understates the cost is corrected by a lower threshold, one that
overstates it by a higher one. The drift is gain * E[error], which is zero exactly
when the mean episode cost is at the limit: single-episode costs are heavy-tailed
(0 to several hundred on the navigation tasks, a few episodes stuck in a hazard
carrying most of the mean), so a symmetric clip of the error would track a
quantile instead and settle above the limit. Only errors beyond ERROR_CAP (costs
over 11x the limit) are cut, to bound the step of one episode.

The advantage form (`constraint_form="advantage"`) takes the level from the costs
paid instead of the critic: the E-step bounds E_q[Q_c] - E_pi_old[Q_c] by the budget
qc_threshold - to_q(C_real), where C_real is the running mean of the finished
episodes' costs and to_q the same per-step conversion as the limit's. That is CPO's
first-order constraint J_c(pi) + E[A_c] <= d with J_c measured on the episodes and
only the critic's differences between actions at a state used, so a critic that is
wrong by a constant (seen: ~-2 in Q units where the realised level is ~4.5) cannot
move the constraint.

The Lagrangian form (`constraint_form="lagrangian"`) drops the per-batch solve for
lambda altogether: lambda is a multiplier on the episode cost actually paid,
integrated after each finished episode with the same capped relative error as the
feedback above, and the E-step solves only eta for the fixed trade-off Q_r - lambda
Q_c. The per-batch dual asks the KL ball for a level the replayed states cannot show
(it is infeasible for about half the updates, whatever lambda is); a multiplier on
the realised cost settles where the episodes cost the limit, whatever the critic's
level, and the KL ball still bounds each step.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np

from cvpo_jax.config import CVPOConfig, episodic_to_q_threshold
from cvpo_jax.estep import REACHABLE_STATES, min_reachable_cost

ERROR_CAP = 10.0


def feedback_threshold_scale(
    log_scale: np.ndarray, episode_costs: np.ndarray, cfg: CVPOConfig
) -> np.ndarray:
    """The threshold scale after a sequence of finished episodes.

    Args:
      log_scale: [M] current log threshold scale.
      episode_costs: [E, M] episodic costs of the finished episodes, in the order
        they ended (E may be 0).
      cfg: supplies cost_limit [M], cost_feedback_gain and cost_feedback_bounds.

    Returns:
      The new log scale [M] (float32); unchanged when the gain is 0.
    """
    log_scale = np.asarray(log_scale, np.float64)
    costs = np.asarray(episode_costs, np.float64).reshape(-1, cfg.num_constraints)
    if cfg.cost_feedback_gain == 0 or costs.shape[0] == 0:
        return log_scale.astype(np.float32)
    limits = np.asarray(cfg.cost_limit, np.float64)
    lo, hi = np.log(cfg.cost_feedback_bounds[0]), np.log(cfg.cost_feedback_bounds[1])
    for cost in costs:
        error = np.minimum((cost - limits) / np.maximum(limits, 1.0), ERROR_CAP)
        log_scale = np.clip(log_scale - cfg.cost_feedback_gain * error, lo, hi)
    return log_scale.astype(np.float32)


def realised_cost_update(
    mean: np.ndarray, count: float, episode_costs: np.ndarray, cfg: CVPOConfig
) -> tuple[np.ndarray, float]:
    """The running mean of episode costs after a sequence of finished episodes.

    Each episode moves the mean by (C - mean) * max(1 / (count + 1), 1 / N), N =
    cfg.realised_cost_episodes: the plain mean of the first N episodes, then an
    exponential average over about the last N.

    Args:
      mean: [M] current running mean; count: episodes seen so far.
      episode_costs: [E, M] episodic costs in the order the episodes ended (E may be 0).

    Returns:
      (new mean [M] float32, new count).
    """
    mean = np.asarray(mean, np.float64)
    costs = np.asarray(episode_costs, np.float64).reshape(-1, cfg.num_constraints)
    for cost in costs:
        rate = max(1.0 / (count + 1.0), 1.0 / cfg.realised_cost_episodes)
        mean = mean + rate * (cost - mean)
        count += 1.0
    return mean.astype(np.float32), float(count)


def realised_cost_trace(
    mean: np.ndarray, count: float, episode_costs: np.ndarray, cfg: CVPOConfig
) -> np.ndarray:
    """The running mean [E, M] after each of E finished episodes, in order (float64),
    by the same rule as `realised_cost_update`."""
    costs = np.asarray(episode_costs, np.float64).reshape(-1, cfg.num_constraints)
    out = np.zeros_like(costs)
    for i, cost in enumerate(costs):
        mean, count = realised_cost_update(mean, count, cost[None], cfg)
        out[i] = mean
    return out


def advantage_threshold(
    q_c: chex.Array, realised_cost: chex.Array, realised_episodes: chex.Array, cfg: CVPOConfig
) -> chex.Array:
    """The E-step threshold [M] of the advantage form: E_pi_old[Q_c] + budget.

    Args:
      q_c: [B, K, M] cost values of the K samples from pi_old at B states.
      realised_cost: [M] running mean of the episodes' costs (episodic units).
      realised_episodes: [] how many episodes it has seen; before the first the budget
        is 0 (the E-step may not raise the expected cost).
    """
    chex.assert_rank(q_c, 3)
    to_q = episodic_to_q_threshold(1.0, cfg.gamma_cost, cfg.episode_length)  # linear in C
    budget = jnp.asarray(cfg.qc_threshold, q_c.dtype) - to_q * realised_cost
    budget = jnp.where(realised_episodes > 0, budget, 0.0)
    return jnp.mean(q_c, axis=(0, 1)) + budget


def recovery_threshold(
    q_c: chex.Array, qc_threshold: chex.Array, cfg: CVPOConfig, reachable: chex.Array | None = None
) -> chex.Array:
    """The threshold [M] raised, where the KL ball cannot reach it, to ask for a fraction
    `cfg.estep_recovery` of the largest reachable decrease of E[Q_c] from pi_old.

    The decrease is measured on the batch's first REACHABLE_STATES states (a random
    subset: the batch is in random order) with `estep.min_reachable_cost` and applied to
    the whole batch's mean. A reachable threshold is left as it is.

    Args:
      q_c: [B, K, M] cost values of the K samples from pi_old at B states.
      qc_threshold: [M] the threshold the E-step would use.
      reachable: [M] `min_reachable_cost` of that subset, if already computed.
    """
    chex.assert_rank(q_c, 3)
    subset = jax.lax.stop_gradient(q_c[:REACHABLE_STATES])
    if reachable is None:
        reachable = min_reachable_cost(subset, cfg.estep_kl_eps)
    largest_decrease = jnp.mean(subset, axis=(0, 1)) - reachable
    floor = jnp.mean(q_c, axis=(0, 1)) - cfg.estep_recovery * largest_decrease
    return jnp.maximum(qc_threshold, floor)


def lagrangian_update(
    log_lambda: np.ndarray,
    episode_costs: np.ndarray,
    cfg: CVPOConfig,
    running_means: np.ndarray | None = None,
) -> np.ndarray:
    """log lambda [M] after a sequence of finished episodes (the Lagrangian form).

    Per episode, in the order they ended, with e = (C - limit) / max(limit, 1), C the
    episode's cost (`lagrangian_signal="episode"`) or the running mean of the
    realised cost after it (`"mean"`, `running_means`; the clipped error of single
    episodes settles above the limit when the costs are skewed, many near 0 and a few
    far above, that of the mean where the mean is at the limit):
    - `lagrangian_scale="linear"`: lambda <- clip(lambda + lagrangian_lr * min(e,
      ERROR_CAP), lambda_bounds), dual ascent on the episode cost, linear in lambda
      so that it returns from its floor at the rate it left it;
    - `lagrangian_scale="log"`: log lambda <- clip(log lambda + lagrangian_lr *
      clip(e, -1, lagrangian_error_cap), log lambda_bounds), a multiplicative step of
      at most exp(lagrangian_lr * cap) per episode. With cap 1 the costly first
      episodes (cost 2-8x the limit) cannot wind lambda up by more than exp(lr), and
      a lambda that overshot is undone in as many episodes as it took to overshoot,
      at any level; but the drift is then zero where half the episodes cost more
      than the limit (the median), which lies well below the mean when a few
      episodes stuck in a hazard carry most of the cost. A larger cap tracks the
      mean.

    Args:
      log_lambda: [M] current log multipliers.
      episode_costs: [E, M] episodic costs of the finished episodes (E may be 0).
      cfg: supplies cost_limit [M], lagrangian_lr, lagrangian_scale,
        lagrangian_signal, lambda_bounds.
      running_means: [E, M] the realised-cost running mean after each of those
        episodes (`realised_cost_trace`); required with lagrangian_signal="mean".

    Returns:
      The new log lambda [M] (float32).
    """
    log_lam = np.asarray(log_lambda, np.float64)
    costs = np.asarray(episode_costs, np.float64).reshape(-1, cfg.num_constraints)
    if cfg.lagrangian_signal == "mean":
        if running_means is None:
            raise ValueError("lagrangian_signal='mean' needs the running means")
        costs = np.asarray(running_means, np.float64).reshape(costs.shape)
    limits = np.asarray(cfg.cost_limit, np.float64)
    lo, hi = cfg.lambda_bounds
    for cost in costs:
        error = (cost - limits) / np.maximum(limits, 1.0)
        if cfg.lagrangian_scale == "log":
            step = cfg.lagrangian_lr * np.clip(error, -1.0, cfg.lagrangian_error_cap)
            log_lam = np.clip(log_lam + step, np.log(lo), np.log(hi))
        else:
            lam = np.exp(log_lam) + cfg.lagrangian_lr * np.minimum(error, ERROR_CAP)
            log_lam = np.log(np.clip(lam, lo, hi))
    return log_lam.astype(np.float32)
