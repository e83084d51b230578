"""The M-step: weighted maximum likelihood inside decoupled KL trust regions.

With pi_old = N(mu_old, S_old) (the target policy) and pi_theta = N(mu, S):

    L = -mean_s sum_k w[b,k] [log N(a_k; mu, S_old) + log N(a_k; mu_old, S)]
        + alpha_mean KL_mean + alpha_cov KL_cov
    KL_mean = mean_s KL(N(mu_old, S_old) || N(mu, S_old))
    KL_cov  = mean_s KL(N(mu_old, S_old) || N(mu_old, S))

The multipliers live in log space and take dual-ascent steps on
alpha (eps - KL). The stop-gradient split: the multiplier is a constant inside
the policy's loss and the KL is a constant inside the multiplier's loss, so one
gradient serves both with separate optimisers.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import optax

from cvpo_jax.config import CVPOConfig
from cvpo_jax.networks import Networks, policy_distribution
from cvpo_jax.types import MStepDuals, Params

_sg = jax.lax.stop_gradient


def gaussian_kl(mean_p, tril_p, mean_q, tril_q) -> chex.Array:
    """KL(N(mean_p, tril_p tril_p^T) || N(mean_q, tril_q tril_q^T)); [B, A], [B, A, A] -> [B]."""
    chex.assert_rank([mean_p, tril_p, mean_q, tril_q], [2, 3, 2, 3])
    chex.assert_equal_shape([mean_p, mean_q])
    chex.assert_equal_shape([tril_p, tril_q])
    return policy_distribution(mean_p, tril_p).kl_divergence(policy_distribution(mean_q, tril_q))


def decoupled_kl(mean, tril, mean_old, tril_old) -> tuple[chex.Array, chex.Array]:
    """(KL_mean [B], KL_cov [B]); gradients reach `mean` and `tril` only, one each."""
    mean_old, tril_old = _sg((mean_old, tril_old))
    kl_mean = gaussian_kl(mean_old, tril_old, mean, tril_old)
    kl_cov = gaussian_kl(mean_old, tril_old, mean_old, tril)
    return kl_mean, kl_cov


def decoupled_log_likelihood(
    actions: chex.Array,
    weights: chex.Array,
    mean: chex.Array,
    tril: chex.Array,
    mean_old: chex.Array,
    tril_old: chex.Array,
) -> tuple[chex.Array, chex.Array]:
    """Weighted log-likelihoods of the mean and covariance parts, each [].

    Args:
      actions: [B, K, A] samples from pi_old. weights: [B, K] (rows sum to 1).
      mean, tril: current policy [B, A], [B, A, A]. mean_old, tril_old: pi_old.

    Returns:
      (mean_s sum_k w log N(a_k; mean, S_old), mean_s sum_k w log N(a_k; mean_old, S)).
    """
    chex.assert_rank([actions, weights, mean, tril], [3, 2, 2, 3])
    chex.assert_equal_shape_prefix([actions, weights], 2)
    chex.assert_equal_shape_prefix([actions, mean, tril], 1)
    chex.assert_equal_shape([mean, mean_old])
    chex.assert_equal_shape([tril, tril_old])
    mean_old, tril_old, weights = _sg((mean_old, tril_old, weights))
    # distrax broadcasts sample dims in front of the batch: [K, B, A] -> [K, B].
    samples = jnp.swapaxes(actions, 0, 1)
    logp_mean = policy_distribution(mean, tril_old).log_prob(samples).T
    logp_cov = policy_distribution(mean_old, tril).log_prob(samples).T
    ll_mean = jnp.mean(jnp.sum(weights * logp_mean, axis=1))
    ll_cov = jnp.mean(jnp.sum(weights * logp_cov, axis=1))
    return ll_mean, ll_cov


def policy_optimizer(cfg: CVPOConfig) -> optax.GradientTransformation:
    adam = optax.adam(cfg.actor_lr)
    if cfg.actor_grad_clip > 0:
        return optax.chain(optax.clip_by_global_norm(cfg.actor_grad_clip), adam)
    return adam


def alpha_optimizer(cfg: CVPOConfig) -> optax.GradientTransformation:
    return optax.adam(cfg.alpha_lr)


def init_mstep_duals(cfg: CVPOConfig) -> MStepDuals:
    log_alpha = jnp.log(jnp.asarray(cfg.alpha_init, jnp.float32))
    params = {"log_alpha_mean": log_alpha, "log_alpha_cov": log_alpha}
    return MStepDuals(log_alpha, log_alpha, alpha_optimizer(cfg).init(params))


def mstep_loss(
    policy_params: Params,
    log_alphas: dict,
    networks: Networks,
    obs: chex.Array,
    actions: chex.Array,
    weights: chex.Array,
    mean_old: chex.Array,
    tril_old: chex.Array,
    cfg: CVPOConfig,
) -> tuple[chex.Array, dict]:
    """Policy loss plus multiplier loss (see module docstring); obs [B, O]."""
    mean, tril = networks.policy_apply(policy_params, obs)
    ll_mean, ll_cov = decoupled_log_likelihood(actions, weights, mean, tril, mean_old, tril_old)
    kl_mean, kl_cov = decoupled_kl(mean, tril, mean_old, tril_old)
    kl_mean, kl_cov = jnp.mean(kl_mean), jnp.mean(kl_cov)
    alpha_mean = jnp.exp(log_alphas["log_alpha_mean"])
    alpha_cov = jnp.exp(log_alphas["log_alpha_cov"])
    nll = -(ll_mean + ll_cov)
    policy_loss = nll + _sg(alpha_mean) * kl_mean + _sg(alpha_cov) * kl_cov
    alpha_loss = alpha_mean * (cfg.kl_mean_eps - _sg(kl_mean)) + alpha_cov * (
        cfg.kl_cov_eps - _sg(kl_cov)
    )
    aux = {
        "policy_nll": nll,
        "kl_mean": kl_mean,
        "kl_cov": kl_cov,
        "kl_mean_ratio": kl_mean / cfg.kl_mean_eps,
        "kl_cov_ratio": kl_cov / cfg.kl_cov_eps,
        "alpha_mean": alpha_mean,
        "alpha_cov": alpha_cov,
        "policy_std": jnp.mean(jnp.diagonal(tril, axis1=-2, axis2=-1)),
    }
    return policy_loss + alpha_loss, aux


def mstep(
    policy_params: Params,
    policy_opt_state: optax.OptState,
    duals: MStepDuals,
    networks: Networks,
    obs: chex.Array,
    actions: chex.Array,
    weights: chex.Array,
    mean_old: chex.Array,
    tril_old: chex.Array,
    cfg: CVPOConfig,
) -> tuple[Params, optax.OptState, MStepDuals, dict]:
    """`cfg.mstep_steps` gradient steps on the policy and its KL multipliers (lax.scan).

    Returns the new policy parameters and optimiser state, the new multipliers, and
    the diagnostics of the last step.
    """
    chex.assert_rank([obs, actions, weights], [2, 3, 2])
    p_opt, a_opt = policy_optimizer(cfg), alpha_optimizer(cfg)
    log_lo, log_hi = jnp.log(cfg.alpha_bounds[0]), jnp.log(cfg.alpha_bounds[1])
    grad_fn = jax.grad(mstep_loss, argnums=(0, 1), has_aux=True)

    def step(carry, _):
        params, p_state, log_alphas, a_state = carry
        (g_params, g_alphas), aux = grad_fn(
            params, log_alphas, networks, obs, actions, weights, mean_old, tril_old, cfg
        )
        updates, p_state = p_opt.update(g_params, p_state, params)
        params = optax.apply_updates(params, updates)
        a_updates, a_state = a_opt.update(g_alphas, a_state, log_alphas)
        log_alphas = jax.tree.map(
            lambda x: jnp.clip(x, log_lo, log_hi), optax.apply_updates(log_alphas, a_updates)
        )
        return (params, p_state, log_alphas, a_state), aux

    log_alphas = {"log_alpha_mean": duals.log_alpha_mean, "log_alpha_cov": duals.log_alpha_cov}
    carry = (policy_params, policy_opt_state, log_alphas, duals.opt_state)
    (params, p_state, log_alphas, a_state), aux = jax.lax.scan(
        step, carry, None, length=cfg.mstep_steps
    )
    new_duals = MStepDuals(log_alphas["log_alpha_mean"], log_alphas["log_alpha_cov"], a_state)
    return params, p_state, new_duals, jax.tree.map(lambda x: x[-1], aux)
