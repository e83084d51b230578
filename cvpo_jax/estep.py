"""The E-step: CVPO's convex dual over (eta, lambda), its in-jit solver, the weights.

For Q tables q_r [B, K] and q_c [B, K, M] of K actions sampled from pi_old at B
states, the optimal variational policy is

    q*(a_k|s) ∝ exp((Q_r - lambda . Q_c) / eta)   (relative to pi_old's samples)

with (eta, lambda) minimising the convex dual

    g(eta, lambda) = eta eps + lambda . qc_thres
                     + eta mean_s [logsumexp_k((Q_r - lambda . Q_c) / eta) - log K].

The solver takes Adam steps on (log eta, log lambda) inside `lax.scan`, warm-started
from the previous solution and optimiser state, and projects onto the configured
bounds after each step (a projection, not a clip inside the objective, so the
gradient never vanishes at a bound). Everything here is a pure function of arrays
and vmaps over independent problems.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import optax

from cvpo_jax.config import CVPOConfig
from cvpo_jax.types import EStepDuals


def _check_q(q_r: chex.Array, q_c: chex.Array) -> None:
    chex.assert_rank([q_r, q_c], [2, 3])
    chex.assert_equal_shape_prefix([q_r, q_c], 2)


def _advantage(q_r: chex.Array, q_c: chex.Array, lam: chex.Array) -> chex.Array:
    """Q_r - lambda . Q_c, [B, K]; lambda is applied exactly once."""
    return q_r - jnp.einsum("bkm,m->bk", q_c, lam)


def dual_objective(
    log_eta: chex.Array,
    log_lambda: chex.Array,
    q_r: chex.Array,
    q_c: chex.Array,
    eps: float,
    qc_threshold: chex.Array,
) -> chex.Array:
    """g(eta, lambda) at eta = exp(log_eta) [], lambda = exp(log_lambda) [M]; returns []."""
    _check_q(q_r, q_c)
    chex.assert_rank([log_eta, log_lambda, qc_threshold], [0, 1, 1])
    chex.assert_shape([log_lambda, qc_threshold], (q_c.shape[-1],))
    eta = jnp.exp(log_eta)
    lam = jnp.exp(log_lambda)
    num_samples = q_r.shape[1]
    logits = _advantage(q_r, q_c, lam) / eta
    log_mean_exp = jax.nn.logsumexp(logits, axis=1) - jnp.log(num_samples)
    return eta * eps + jnp.dot(lam, qc_threshold) + eta * jnp.mean(log_mean_exp)


def estep_weights(q_r: chex.Array, q_c: chex.Array, eta: chex.Array, lam: chex.Array):
    """w[b, k] = softmax_k((Q_r - lambda . Q_c) / eta), [B, K], with no gradient."""
    _check_q(q_r, q_c)
    chex.assert_shape(lam, (q_c.shape[-1],))
    weights = jax.nn.softmax(_advantage(q_r, q_c, lam) / eta, axis=1)
    return jax.lax.stop_gradient(weights)


def dual_optimizer(cfg: CVPOConfig) -> optax.GradientTransformation:
    """Adam with a short second-moment memory (b2=0.9).

    In log space a vanishing multiplier has a gradient that shrinks with it; with the
    usual b2=0.999 Adam remembers the large early gradients and log-lambda crawls
    towards its floor. A short memory keeps the step near dual_lr until the bound.
    """
    return optax.adam(cfg.dual_lr, b1=0.9, b2=0.9)


def init_estep_duals(cfg: CVPOConfig, dtype=jnp.float32) -> EStepDuals:
    """Duals at (eta_init, lambda_init) with a fresh optimiser state."""
    params = {
        "log_eta": jnp.log(jnp.asarray(cfg.eta_init, dtype)),
        "log_lambda": jnp.full((cfg.num_constraints,), jnp.log(cfg.lambda_init), dtype),
    }
    return EStepDuals(
        log_eta=params["log_eta"],
        log_lambda=params["log_lambda"],
        opt_state=dual_optimizer(cfg).init(params),
        log_threshold_scale=jnp.zeros((cfg.num_constraints,), dtype),
        realised_cost=jnp.zeros((cfg.num_constraints,), dtype),
        realised_episodes=jnp.zeros((), dtype),
    )


def solve_dual(
    duals: EStepDuals,
    q_r: chex.Array,
    q_c: chex.Array,
    qc_threshold: chex.Array,
    cfg: CVPOConfig,
) -> tuple[EStepDuals, dict]:
    """Takes `cfg.dual_steps` projected Adam steps on the dual from `duals`.

    With `cfg.constraint_form == "lagrangian"` only eta moves: lambda is the
    multiplier the train loop sets from the realised cost
    (`constraint.lagrangian_update`). With `cfg.lambda_max_log_step` > 0 the change
    of log-lambda over the whole solve is clipped to that size: lambda then moves at
    a bounded rate instead of jumping between its bounds when the constraint flips
    between slack and infeasible (see the README's algorithm section).

    Args:
      duals: current (warm-start) duals; log_lambda [M].
      q_r: [B, K]; q_c: [B, K, M]; qc_threshold: [M].
      cfg: supplies eps, the step count, learning rate and bounds.

    Returns:
      New duals, and info with the objective and its gradient norm at the solution.
    """
    _check_q(q_r, q_c)
    q_r, q_c = jax.lax.stop_gradient((q_r, q_c))
    optimizer = dual_optimizer(cfg)
    log_lo = jnp.log(jnp.asarray([cfg.eta_bounds[0], cfg.lambda_bounds[0]], jnp.float32))
    log_hi = jnp.log(jnp.asarray([cfg.eta_bounds[1], cfg.lambda_bounds[1]], jnp.float32))

    def objective(params):
        return dual_objective(
            params["log_eta"], params["log_lambda"], q_r, q_c, cfg.estep_kl_eps, qc_threshold
        )

    fixed_lambda = cfg.constraint_form == "lagrangian"  # set from the realised cost

    def project(params):
        log_lambda = jnp.clip(params["log_lambda"], log_lo[1], log_hi[1])
        return {
            "log_eta": jnp.clip(params["log_eta"], log_lo[0], log_hi[0]),
            "log_lambda": duals.log_lambda if fixed_lambda else log_lambda,
        }

    def step(carry, _):
        params, opt_state = carry
        grads = jax.grad(objective)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return (project(optax.apply_updates(params, updates)), opt_state), None

    params = {"log_eta": duals.log_eta, "log_lambda": duals.log_lambda}
    (params, opt_state), _ = jax.lax.scan(
        step, (params, duals.opt_state), None, length=cfg.dual_steps
    )
    if cfg.lambda_max_log_step > 0:
        step_size = cfg.lambda_max_log_step
        change = jnp.clip(params["log_lambda"] - duals.log_lambda, -step_size, step_size)
        params = {**params, "log_lambda": duals.log_lambda + change}
    value, grads = jax.value_and_grad(objective)(params)
    info = {"dual_objective": value, "dual_grad_norm": optax.global_norm(grads)}
    new = duals.replace(
        log_eta=params["log_eta"], log_lambda=params["log_lambda"], opt_state=opt_state
    )
    return new, info


REACHABLE_STATES = 64  # states of the batch on which `qc_reachable` is estimated


def min_reachable_cost(q_c: chex.Array, eps: float, iterations: int = 40) -> chex.Array:
    """The lowest E_q[Q_c] the E-step can reach inside its KL ball, per constraint [M].

    The minimiser of E_q[Q_c] subject to mean_s KL(q || pi_old) <= eps is the tilt
    q ∝ pi_old exp(-Q_c / t) at the smallest temperature t that keeps the KL within
    eps (one t for all states: the Lagrangian of the mean-KL constraint). The KL falls
    monotonically with t, so t is found by bisection on log t over [1e-3, 1e3] times
    the spread of Q_c; the value returned is feasible (the upper end of the final
    bracket) and, if it is above the threshold, the constraint is infeasible for this
    batch whatever lambda is.

    Args:
      q_c: [B, K, M] cost values of K samples from pi_old at B states.
      eps: the E-step KL bound.
      iterations: bisection steps (40 resolve t to ~1e-11 relative).
    """
    chex.assert_rank(q_c, 3)
    num_samples = q_c.shape[1]
    spread = jnp.maximum(jnp.std(q_c, axis=(0, 1)), 1e-6)  # [M]

    def tilt(log_t):  # [M] -> (KL [M], E_q[Q_c] [M])
        logits = -q_c / jnp.exp(log_t)
        w = jax.nn.softmax(logits, axis=1)
        log_w = jax.nn.log_softmax(logits, axis=1)
        kl = jnp.mean(jnp.sum(w * (log_w + jnp.log(num_samples)), axis=1), axis=0)
        return kl, jnp.mean(jnp.sum(w * q_c, axis=1), axis=0)

    def bisect(_, bracket):
        lo, hi = bracket  # KL(lo) > eps >= KL(hi)
        mid = 0.5 * (lo + hi)
        too_far = tilt(mid)[0] > eps
        return jnp.where(too_far, mid, lo), jnp.where(too_far, hi, mid)

    log_spread = jnp.log(spread)
    lo, hi = log_spread + jnp.log(1e-3), log_spread + jnp.log(1e3)
    lo, hi = jax.lax.fori_loop(0, iterations, bisect, (lo, hi))
    kl_lo, expected_lo = tilt(lo)
    _, expected_hi = tilt(hi)
    # The lower end is only kept when even the sharpest tilt tried is within eps.
    best = jnp.where(kl_lo <= eps, expected_lo, expected_hi)
    return jnp.minimum(best, jnp.mean(q_c, axis=(0, 1)))


def weight_diagnostics(weights: chex.Array, q_c: chex.Array, qc_threshold: chex.Array) -> dict:
    """Readable summaries of E-step weights [B, K] (see README, Metrics).

    weights_kl: mean_s KL(q || uniform), to compare with eps; ess_fraction: the
    effective sample size 1 / sum_k w^2 as a fraction of K; qc_weighted [M]: E_q[Q_c]
    and qc_ratio [M] = qc_weighted / qc_threshold.
    """
    num_samples = weights.shape[1]
    kl = jnp.sum(weights * (jnp.log(jnp.maximum(weights, 1e-30)) + jnp.log(num_samples)), axis=1)
    ess = 1.0 / jnp.sum(jnp.square(weights), axis=1)
    qc_weighted = jnp.mean(jnp.einsum("bk,bkm->bm", weights, q_c), axis=0)
    return {
        "weights_kl": jnp.mean(kl),
        "ess_fraction": jnp.mean(ess) / num_samples,
        "qc_weighted": qc_weighted,
        "qc_ratio": qc_weighted / jnp.maximum(qc_threshold, 1e-8),
    }


def estep(
    duals: EStepDuals,
    q_r: chex.Array,
    q_c: chex.Array,
    qc_threshold: chex.Array,
    cfg: CVPOConfig,
    reachable: chex.Array | None = None,
) -> tuple[EStepDuals, chex.Array, dict]:
    """Solves the dual (warm start) and returns (new duals, weights [B, K], info).

    `reachable` [M] is `min_reachable_cost` of q_c's first REACHABLE_STATES states if
    the caller has it (computed here otherwise), for the feasibility diagnostics.
    """
    integrated = duals.log_lambda
    if cfg.constraint_form == "lagrangian":
        duals = duals.replace(log_lambda=lagrangian_log_lambda(duals, cfg))
    duals, info = solve_dual(duals, q_r, q_c, qc_threshold, cfg)
    eta = jnp.exp(duals.log_eta)
    lam = jnp.exp(duals.log_lambda)
    weights = estep_weights(q_r, q_c, eta, lam)
    diagnostics = weight_diagnostics(weights, q_c, qc_threshold)
    # A diagnostic only: the batch's states are in random order, so its first
    # REACHABLE_STATES estimate it from a random subset at a fraction of the cost.
    if reachable is None:
        subset = jax.lax.stop_gradient(q_c[:REACHABLE_STATES])
        reachable = min_reachable_cost(subset, cfg.estep_kl_eps)
    log_lam_hi = jnp.log(cfg.lambda_bounds[1])
    log_lam_lo = jnp.log(cfg.lambda_bounds[0])
    info = {
        **info,
        **diagnostics,
        "eta": eta,
        "lambda": lam,
        "estep_kl_ratio": diagnostics["weights_kl"] / cfg.estep_kl_eps,
        # Fractions once averaged over a logging interval's updates.
        "lambda_at_upper": (duals.log_lambda >= log_lam_hi - 1e-3).astype(jnp.float32),
        "lambda_at_lower": (duals.log_lambda <= log_lam_lo + 1e-3).astype(jnp.float32),
        "qc_reachable": reachable,
        "estep_feasible": (reachable <= qc_threshold).astype(jnp.float32),
    }
    if cfg.constraint_form == "lagrangian":  # the state keeps the integrator alone
        duals = duals.replace(log_lambda=integrated)
    return duals, weights, info


def lagrangian_log_lambda(duals: EStepDuals, cfg: CVPOConfig) -> chex.Array:
    """log lambda [M] the Lagrangian form's E-step uses: the integrated log lambda
    plus `cfg.lagrangian_kp` * clip((C_real - limit) / max(limit, 1), -1, 1), C_real
    the running mean of the realised episode costs (no term before the first
    episode), clipped to lambda_bounds. With kp = 0 it is the integrator itself."""
    if cfg.lagrangian_kp == 0:
        return duals.log_lambda
    limits = jnp.asarray(cfg.cost_limit, duals.log_lambda.dtype)
    error = jnp.clip((duals.realised_cost - limits) / jnp.maximum(limits, 1.0), -1.0, 1.0)
    error = jnp.where(duals.realised_episodes > 0, error, 0.0)
    lo, hi = jnp.log(cfg.lambda_bounds[0]), jnp.log(cfg.lambda_bounds[1])
    return jnp.clip(duals.log_lambda + cfg.lagrangian_kp * error, lo, hi)
