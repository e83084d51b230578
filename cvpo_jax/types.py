"""The data that flows through a CVPO update, and the shape letters used everywhere.

Shape letters (used in every docstring of the package):
    B  batch of states (transitions)
    K  actions sampled per state in the E-step
    O  observation size
    A  action size
    M  number of cost constraints
    N  critic ensemble members (N_r reward, N_c cost)
    U  updates run back to back inside one jitted call
"""

from __future__ import annotations

from typing import Any, NamedTuple

import chex
import flax.struct
import jax
import optax

Params = Any  # A flax parameter pytree.


class Transition(NamedTuple):
    """A batch of whole transitions.

    obs [B, O], action [B, A], reward [B], cost [B, M], next_obs [B, O],
    terminated [B] (a true terminal state: no bootstrap), truncated [B] (time limit:
    bootstrap as usual). Booleans may be stored as float32 0/1.

    discount [B] is set on n-step samples only (see `replay.nstep_transition`): the
    factor gamma^m (1 - terminated) of the bootstrap value after the m steps summed
    into reward and cost. None means a one-step transition: gamma (1 - terminated).
    cost_discount [B] is the same factor for the cost (cost_gamma^m (1 - terminated)),
    set on n-step samples only.
    next_action [B, A] and has_next_action [B] (0/1) are set only when the replay
    samples the data's next action (`cost_bootstrap="data"`): the action the behaviour
    policy took at the bootstrap observation, valid where has_next_action is 1 (no
    episode end inside the sampled window).
    """

    obs: chex.Array
    action: chex.Array
    reward: chex.Array
    cost: chex.Array
    next_obs: chex.Array
    terminated: chex.Array
    truncated: chex.Array
    discount: chex.Array | None = None
    cost_discount: chex.Array | None = None
    next_action: chex.Array | None = None
    has_next_action: chex.Array | None = None


@flax.struct.dataclass
class EStepDuals:
    """The E-step's dual variables in log space, and their optax state.

    log_eta [] (temperature), log_lambda [M] (one multiplier per constraint),
    log_threshold_scale [M]: the realised-cost feedback on the E-step threshold
    (0 unless `cost_feedback_gain` > 0; see `constraint.feedback_threshold_scale`);
    realised_cost [M] and realised_episodes []: the running mean of the finished
    training episodes' costs and how many it has seen (used by
    `constraint_form="advantage"`; see `constraint.realised_cost_update`).
    """

    log_eta: chex.Array
    log_lambda: chex.Array
    opt_state: optax.OptState
    log_threshold_scale: chex.Array
    realised_cost: chex.Array
    realised_episodes: chex.Array


@flax.struct.dataclass
class MStepDuals:
    """The M-step's KL multipliers in log space, and their optax state.

    log_alpha_mean [] and log_alpha_cov [] weight the decoupled mean and covariance
    KL terms.
    """

    log_alpha_mean: chex.Array
    log_alpha_cov: chex.Array
    opt_state: optax.OptState


@flax.struct.dataclass
class TrainState:
    """Everything a CVPO learner carries from one update to the next (immutable).

    The critic parameters hold all N_r + N_c * M critic members stacked on a
    leading axis (reward members first), so one batched call evaluates them all.
    """

    policy_params: Params
    target_policy_params: Params
    critic_params: Params
    target_critic_params: Params
    policy_opt_state: optax.OptState
    critic_opt_state: optax.OptState
    estep_duals: EStepDuals
    mstep_duals: MStepDuals
    step: chex.Array  # int32 [] number of updates taken.
    rng: jax.Array  # PRNG key.
