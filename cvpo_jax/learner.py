"""One CVPO learner: `init(key) -> TrainState` and `update(state, batch) -> (state, metrics)`.

`update_step` is the pure function; `make_learner` closes it over the networks and
config and jits it once (with the train state donated). `update_many` runs U
updates back to back in one `lax.scan`, so dispatch costs nothing at small sizes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp
import optax

from cvpo_jax import constraint as constraint_lib
from cvpo_jax import critic as critic_lib
from cvpo_jax import estep as estep_lib
from cvpo_jax import mstep as mstep_lib
from cvpo_jax.config import CVPOConfig
from cvpo_jax.networks import OBS_NORM, Networks, make_networks, policy_distribution
from cvpo_jax.types import Params, TrainState, Transition


def critic_optimizer(cfg: CVPOConfig) -> optax.GradientTransformation:
    return optax.adam(cfg.critic_lr)


def init_train_state(key: chex.PRNGKey, networks: Networks, cfg: CVPOConfig) -> TrainState:
    """Fresh parameters (targets equal to online copies), optimisers and duals."""
    k_policy, k_critic, k_state = jax.random.split(key, 3)
    obs = jnp.zeros((1, networks.obs_size), jnp.float32)
    action = jnp.zeros((1, networks.action_size), jnp.float32)
    policy_params = networks.policy.init(k_policy, obs)
    critic_params = networks.critic.init(k_critic, obs, action)
    if cfg.normalize_obs:
        # Identity statistics until the warm-up data sets them (`with_obs_statistics`).
        identity = {
            "mean": jnp.zeros((networks.obs_size,), jnp.float32),
            "std": jnp.ones((networks.obs_size,), jnp.float32),
        }
        policy_params = {**policy_params, OBS_NORM: identity}
        critic_params = {**critic_params, OBS_NORM: identity}
    return TrainState(
        policy_params=policy_params,
        target_policy_params=policy_params,
        critic_params=critic_params,
        target_critic_params=critic_params,
        policy_opt_state=mstep_lib.policy_optimizer(cfg).init(policy_params),
        critic_opt_state=critic_optimizer(cfg).init(critic_params),
        estep_duals=estep_lib.init_estep_duals(cfg),
        mstep_duals=mstep_lib.init_mstep_duals(cfg),
        step=jnp.zeros((), jnp.int32),
        rng=k_state,
    )


def with_obs_statistics(state: TrainState, stats: dict) -> TrainState:
    """The state with observation statistics {"mean": [O], "std": [O]} in the policy's
    and the critics' variables (online and target copies alike).

    Raises:
      ValueError: the state was made without `normalize_obs`, or the shapes differ.
    """
    if OBS_NORM not in state.policy_params:
        raise ValueError(
            "This train state has no observation statistics to set: it was made with "
            "normalize_obs=false."
        )
    current = state.policy_params[OBS_NORM]
    stats = {k: jnp.asarray(stats[k], jnp.float32) for k in ("mean", "std")}
    for k in ("mean", "std"):
        if stats[k].shape != current[k].shape:
            raise ValueError(
                f"obs statistics {k!r} has shape {stats[k].shape}; expected {current[k].shape}."
            )
    if not bool(jnp.all(stats["std"] > 0)):
        raise ValueError("obs statistics 'std' must be > 0 everywhere.")

    def put(variables):
        # A copy each: the update donates the state, and one buffer may not be donated twice.
        return {**variables, OBS_NORM: {k: jnp.array(v, copy=True) for k, v in stats.items()}}

    return state.replace(
        policy_params=put(state.policy_params),
        target_policy_params=put(state.target_policy_params),
        critic_params=put(state.critic_params),
        target_critic_params=put(state.target_critic_params),
    )


def polyak(online: Params, target: Params, tau: float) -> Params:
    """target <- tau * online + (1 - tau) * target, the observation statistics (equal in
    both) copied exactly rather than averaged, so they cannot drift by rounding."""
    new = optax.incremental_update(online, target, tau)
    if OBS_NORM in online:
        new = {**new, OBS_NORM: online[OBS_NORM]}
    return new


def check_batch(batch: Transition, networks: Networks) -> None:
    """Raises ValueError (at trace time) if a batch does not have the expected shapes."""
    o, a, m = networks.obs_size, networks.action_size, networks.num_constraints
    b = batch.reward.shape[0] if batch.reward.ndim == 1 else None
    expected = {
        "obs": (b, o),
        "action": (b, a),
        "reward": (b,),
        "cost": (b, m),
        "next_obs": (b, o),
        "terminated": (b,),
        "truncated": (b,),
    }
    for name, shape in expected.items():
        got = getattr(batch, name).shape
        if b is None or got != shape:
            raise ValueError(
                f"Transition.{name} has shape {got}; expected {shape} "
                f"(B=batch, O={o}, A={a}, M={m} constraints; reward must be [B])."
            )


def sample_actions(
    policy_params: Params, networks: Networks, obs: chex.Array, key: chex.PRNGKey, num: int
):
    """Draws `num` actions per state: returns actions [B, K, A], mean [B, A], tril [B, A, A]."""
    mean, tril = networks.policy_apply(policy_params, obs)
    actions = policy_distribution(mean, tril).sample(seed=key, sample_shape=num)
    return jnp.swapaxes(actions, 0, 1), mean, tril


def clip_to_box(action: chex.Array, networks: Networks) -> chex.Array:
    low = jnp.asarray(networks.policy.action_low, action.dtype)
    high = jnp.asarray(networks.policy.action_high, action.dtype)
    return jnp.clip(action, low, high)


def _critic_step(
    state: TrainState,
    batch: Transition,
    networks: Networks,
    cfg: CVPOConfig,
    key,
    conservative=None,
):
    """One gradient step of both critic ensembles: (critic params, optimiser state, aux).

    `conservative`: (actions, weights) for the conservative cost term (see
    `critic.make_critic_loss`), or None.
    """
    critic_loss = critic_lib.make_critic_loss(
        networks, cfg.gamma, cfg.gamma_cost, cfg.cost_bootstrap, cfg.cost_conservative_weight
    )
    (_, critic_aux), grads = jax.value_and_grad(critic_loss, has_aux=True)(
        state.critic_params,
        state.target_critic_params,
        state.target_policy_params,
        batch,
        key,
        conservative,
    )
    updates, critic_opt_state = critic_optimizer(cfg).update(
        grads, state.critic_opt_state, state.critic_params
    )
    return optax.apply_updates(state.critic_params, updates), critic_opt_state, critic_aux


def critic_update_step(
    state: TrainState, batch: Transition, networks: Networks, cfg: CVPOConfig
) -> tuple[TrainState, dict]:
    """Policy evaluation only (critics and their targets; the policy is unchanged).

    Used to pre-train the critics on the warm-up data before the policy acts, as the
    original implementation does, so the first E-steps see informed Q values.
    """
    check_batch(batch, networks)
    rng, k_critic = jax.random.split(state.rng)
    critic_params, critic_opt_state, aux = _critic_step(state, batch, networks, cfg, k_critic)
    new_state = state.replace(
        critic_params=critic_params,
        target_critic_params=polyak(critic_params, state.target_critic_params, cfg.tau),
        critic_opt_state=critic_opt_state,
        rng=rng,
    )
    return new_state, aux


def update_step(
    state: TrainState, batch: Transition, networks: Networks, cfg: CVPOConfig
) -> tuple[TrainState, dict]:
    """One CVPO update (critics, E-step, M-step, polyak) on a batch of B transitions."""
    check_batch(batch, networks)
    rng, k_critic, k_estep = jax.random.split(state.rng, 3)

    # 1. E-step on K samples from pi_old (the target policy) and the target critics
    # (it reads no online parameter, so it may come before the critics' step).
    actions, mean_old, tril_old = sample_actions(
        state.target_policy_params, networks, batch.obs, k_estep, cfg.num_samples
    )
    clipped = clip_to_box(actions, networks)
    q_r, q_c = networks.pessimistic_q(state.target_critic_params, batch.obs, clipped)
    duals = state.estep_duals
    if cfg.constraint_form == "advantage":
        qc_threshold = constraint_lib.advantage_threshold(
            q_c, duals.realised_cost, duals.realised_episodes, cfg
        )
    else:
        qc_threshold = jnp.asarray(cfg.qc_threshold, jnp.float32) * jnp.exp(
            duals.log_threshold_scale
        )
    # Once per update: the recovery threshold and the feasibility diagnostics share it.
    subset = jax.lax.stop_gradient(q_c[: estep_lib.REACHABLE_STATES])
    reachable = estep_lib.min_reachable_cost(subset, cfg.estep_kl_eps)
    if cfg.estep_recovery > 0:
        qc_threshold = constraint_lib.recovery_threshold(q_c, qc_threshold, cfg, reachable)
    estep_duals, weights, estep_info = estep_lib.estep(
        duals, q_r, q_c, qc_threshold, cfg, reachable
    )

    # 2. Policy evaluation (the conservative cost term at the E-step's samples).
    conservative = None
    if cfg.cost_conservative_weight > 0:
        n = min(cfg.cost_conservative_states, batch.obs.shape[0])
        conservative = (clipped[:n], weights[:n])
    critic_params, critic_opt_state, critic_aux = _critic_step(
        state, batch, networks, cfg, k_critic, conservative
    )

    # 3. M-step: fit pi_theta to the weighted samples inside the KL trust region.
    policy_params, policy_opt_state, mstep_duals, mstep_info = mstep_lib.mstep(
        state.policy_params,
        state.policy_opt_state,
        state.mstep_duals,
        networks,
        batch.obs,
        clipped if cfg.fit_clipped_actions else actions,
        weights,
        mean_old,
        tril_old,
        cfg,
    )

    # 4. Targets.
    new_state = TrainState(
        policy_params=policy_params,
        target_policy_params=polyak(policy_params, state.target_policy_params, cfg.tau),
        critic_params=critic_params,
        target_critic_params=polyak(critic_params, state.target_critic_params, cfg.tau),
        policy_opt_state=policy_opt_state,
        critic_opt_state=critic_opt_state,
        estep_duals=estep_duals,
        mstep_duals=mstep_duals,
        step=state.step + 1,
        rng=rng,
    )
    qc_policy = jnp.mean(q_c, axis=(0, 1))
    # The replay's actions valued against pi_old's at the same states: the bootstrap
    # gap that, times 1 / (1 - gamma_c), sets the cost critic's level below the cost
    # paid when the policy moves toward actions the critic values lowest.
    qc_data = networks.pessimistic_q(state.target_critic_params, batch.obs, batch.action)[1]
    metrics = {
        **critic_aux,
        **estep_info,
        **mstep_info,
        "qc_policy": qc_policy,
        "qc_policy_ratio": qc_policy / jnp.maximum(qc_threshold, 1e-8),
        "qc_data_gap": jnp.mean(qc_data, axis=0) - qc_policy,
        "qc_threshold": qc_threshold,
    }
    return new_state, metrics


def select_action(
    policy_params: Params,
    networks: Networks,
    obs: chex.Array,
    key: chex.PRNGKey,
    deterministic: bool = False,
) -> chex.Array:
    """Actions [B, A] for observations [B, O]: the mean, or a sample clipped to the box."""
    mean, tril = networks.policy_apply(policy_params, obs)
    if deterministic:
        return mean
    return clip_to_box(policy_distribution(mean, tril).sample(seed=key), networks)


class Learner(NamedTuple):
    """A configured learner: pure functions closed over networks and config.

    init(key) -> TrainState
    update(state, batch) -> (state, metrics)            jitted, state donated
    update_many(state, batches[U]) -> (state, metrics[U])  U updates in one lax.scan
    update_critics_many(state, batches[U]) -> (state, aux[U])  critic-only updates
    act(policy_params, obs [B, O], key, deterministic) -> actions [B, A]
    """

    cfg: CVPOConfig
    networks: Networks
    init: Callable[[chex.PRNGKey], TrainState]
    update: Callable[[TrainState, Transition], tuple[TrainState, dict]]
    update_many: Callable[[TrainState, Transition], tuple[TrainState, dict]]
    act: Callable[..., chex.Array]
    update_critics_many: Callable[[TrainState, Transition], tuple[TrainState, dict]]


def make_learner(
    cfg: CVPOConfig,
    obs_size: int,
    action_low: Sequence[float],
    action_high: Sequence[float],
) -> Learner:
    networks = make_networks(cfg, obs_size, action_low, action_high)

    def update(state, batch):
        return update_step(state, batch, networks, cfg)

    def update_many(state, batches):
        return jax.lax.scan(update, state, batches)

    def act(policy_params, obs, key, deterministic=False):
        return select_action(policy_params, networks, obs, key, deterministic)

    def update_critics_many(state, batches):
        return jax.lax.scan(lambda s, b: critic_update_step(s, b, networks, cfg), state, batches)

    return Learner(
        cfg=cfg,
        networks=networks,
        init=jax.jit(lambda key: init_train_state(key, networks, cfg)),
        update=jax.jit(update, donate_argnums=0),
        update_many=jax.jit(update_many, donate_argnums=0),
        act=jax.jit(act, static_argnames="deterministic"),
        update_critics_many=jax.jit(update_critics_many, donate_argnums=0),
    )
