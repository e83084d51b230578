"""Policy evaluation: TD targets and the critic loss for reward and cost ensembles.

Reward targets take the min over reward critics, cost targets the max over cost
critics by default (pessimistic on both; `cost_target_aggregate` may choose mean, min,
member 0, or "cross": two cost members each fitted on half of the batch and
bootstrapped from the other).
Termination stops the bootstrap; truncation (a time limit) does not. n-step samples
carry their own bootstrap factor (`Transition.discount`).
"""

from __future__ import annotations

from collections.abc import Callable

import chex
import jax
import jax.numpy as jnp

from cvpo_jax.networks import Networks, cost_aggregate, policy_distribution
from cvpo_jax.types import Params, Transition


def td_targets(
    reward: chex.Array,
    cost: chex.Array,
    terminated: chex.Array,
    next_q_r: chex.Array,
    next_q_c: chex.Array,
    gamma: float,
    discount: chex.Array | None = None,
    aggregate: str = "max",
    cost_gamma: float | None = None,
    cost_discount: chex.Array | None = None,
) -> tuple[chex.Array, chex.Array]:
    """TD targets (one-step, or n-step when `discount` is given).

    Args:
      reward: [B]. cost: [B, M]. terminated: [B] (bool or 0/1).
      next_q_r: [N_r, B] target reward critics at (s', a').
      next_q_c: [N_c, M, B] target cost critics at (s', a').
      gamma: discount.
      discount: [B] bootstrap factor of n-step transitions (gamma^m (1 - term)); None
        for one-step transitions, where it is gamma (1 - term).
      aggregate: how the cost members combine (`networks.cost_aggregate`).
      cost_gamma: the cost discount (None: gamma).
      cost_discount: [B] the cost's n-step bootstrap factor (None: one-step, or
        `discount` when cost_gamma is None).

    Returns:
      y_r [B] = r + d min_i Q_r_i;  y_c [B, M] = c + d_c agg_j Q_c_j, d and d_c the
      bootstrap factors.
    """
    chex.assert_rank([reward, cost, terminated, next_q_r, next_q_c], [1, 2, 1, 2, 3])
    batch = reward.shape[0]
    chex.assert_shape([cost, terminated], [(batch, next_q_c.shape[1]), (batch,)])
    chex.assert_equal_shape_suffix([next_q_r, next_q_c, reward], 1)
    alive = 1.0 - terminated.astype(reward.dtype)
    if discount is None:
        discount = gamma * alive
    if cost_discount is None:
        cost_discount = discount if cost_gamma is None else cost_gamma * alive
    chex.assert_shape([discount, cost_discount], (batch,))
    y_r = reward + discount * jnp.min(next_q_r, axis=0)
    y_c = cost + cost_discount[:, None] * cost_aggregate(next_q_c, aggregate).T
    return y_r, y_c


def conservative_cost_gap(
    q_c_data: chex.Array, q_c_samples: chex.Array, weights: chex.Array
) -> chex.Array:
    """Mean of Q_c(s, a_data) - sum_k w_k Q_c(s, a_k) over members, constraints, states.

    Args:
      q_c_data: [N_c, M, B] cost members at the replay's actions.
      q_c_samples: [N_c, M, B, K] cost members at K sampled actions per state.
      weights: [B, K] a distribution over the samples per state (the E-step's q).

    Returns:
      [] the gap; minimising it lowers Q_c at the data's actions and raises it at
      the weighted samples.
    """
    chex.assert_rank([q_c_data, q_c_samples, weights], [3, 4, 2])
    chex.assert_equal_shape_prefix([q_c_data, q_c_samples], 3)
    chex.assert_equal_shape_suffix([q_c_samples, weights], 2)
    weighted = jnp.einsum("nmbk,bk->nmb", q_c_samples, weights)
    return jnp.mean(q_c_data - weighted)


def make_critic_loss(
    networks: Networks,
    gamma: float,
    cost_gamma: float | None = None,
    cost_bootstrap: str = "policy",
    conservative_weight: float = 0.0,
) -> Callable:
    """Returns loss(critic_params, target_critic_params, target_policy_params, batch, key,
    conservative=None).

    The loss is the mean squared TD error, averaged over members and batch, of the
    reward members plus that of the cost members; aux holds both parts and mean Qs.
    With cost_bootstrap "data" the cost members bootstrap at the batch's
    `next_action` where `has_next_action` is 1 (the target policy's sample elsewhere).
    With `networks.nonnegative_cost_q` the bootstrapped Q_c is clamped at 0.
    With conservative_weight > 0 and `conservative` = (actions [B', K, A], weights
    [B', K]) at the batch's first B' states, the cost part adds conservative_weight *
    `conservative_cost_gap` of the online cost members there (aux
    "qc_conservative_gap"); with conservative None it adds nothing.
    """

    def loss_fn(
        critic_params: Params,
        target_critic_params: Params,
        target_policy_params: Params,
        batch: Transition,
        key: chex.PRNGKey,
        conservative: tuple[chex.Array, chex.Array] | None = None,
    ) -> tuple[chex.Array, dict]:
        next_mean, next_tril = networks.policy_apply(target_policy_params, batch.next_obs)
        next_action = policy_distribution(next_mean, next_tril).sample(seed=key)
        low = jnp.asarray(networks.policy.action_low)
        high = jnp.asarray(networks.policy.action_high)
        # The environment only ever sees clipped actions, so evaluate those.
        next_action = jnp.clip(next_action, low, high)
        next_q = networks.critic_values(target_critic_params, batch.next_obs, next_action)
        next_q_r, next_q_c = networks.split_critic_values(next_q)
        if cost_bootstrap == "data":
            if batch.next_action is None:
                raise ValueError(
                    "cost_bootstrap='data' needs batches with next_action (a replay made "
                    "with next_action=True)."
                )
            taken = jnp.where(batch.has_next_action[:, None] > 0, batch.next_action, next_action)
            next_q_data = networks.critic_values(target_critic_params, batch.next_obs, taken)
            next_q_c = networks.split_critic_values(next_q_data)[1]
        if networks.nonnegative_cost_q:
            next_q_c = jnp.maximum(next_q_c, 0.0)
        aggregate = networks.cost_target_aggregate
        cross = aggregate == "cross"
        if cross:  # Row b is member b % 2's, bootstrapped from member 1 - b % 2: [1, M, B].
            b = jnp.arange(batch.reward.shape[0])
            member = b % 2
            next_q_c, aggregate = next_q_c[1 - member, :, b].T[None], "first"
        y_r, y_c = td_targets(
            batch.reward,
            batch.cost,
            batch.terminated,
            next_q_r,
            next_q_c,
            gamma,
            discount=batch.discount,
            aggregate=aggregate,
            cost_gamma=cost_gamma,
            cost_discount=batch.cost_discount,
        )
        y_r, y_c = jax.lax.stop_gradient((y_r, y_c))
        q_r, q_c = networks.split_critic_values(
            networks.critic_values(critic_params, batch.obs, batch.action)
        )
        loss_r = jnp.mean(jnp.square(q_r - y_r[None]))
        fitted = q_c[member, :, b].T[None] if cross else q_c  # Each row's own member(s).
        loss_c = jnp.mean(jnp.square(fitted - y_c.T[None]))
        aux = {
            "critic_loss_reward": loss_r,
            "critic_loss_cost": loss_c,
            "q_reward": jnp.mean(q_r),
            "q_cost": jnp.mean(q_c, axis=(0, 2)),
        }
        if conservative_weight > 0 and conservative is not None:
            actions, weights = conservative
            n = actions.shape[0]
            q_samples = networks.cost_values(critic_params, batch.obs[:n], actions)
            gap = conservative_cost_gap(q_c[:, :, :n], q_samples, weights)
            aux["qc_conservative_gap"] = gap
            loss_c = loss_c + conservative_weight * gap
        return loss_r + loss_c, aux

    return loss_fn
