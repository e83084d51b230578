"""Realised-cost feedback on the E-step's cost threshold.

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
"""

from __future__ import annotations

import numpy as np

from cvpo_jax.config import CVPOConfig

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
