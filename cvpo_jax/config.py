"""Frozen, validated configuration of the CVPO algorithm.

Every field has the reference default (see the README's algorithm section) and is
checked in ``__post_init__``: a bad value raises ``ValueError`` naming the field,
the value and the allowed range, before anything is traced or compiled.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

COST_AGGREGATES = ("max", "mean", "min", "first")  # How cost critic members are combined.
# In the TD target also "cross": two cost members, each bootstrapping from the other.
COST_TARGET_AGGREGATES = (*COST_AGGREGATES, "cross")


def _check(cond: bool, field: str, value: Any, allowed: str) -> None:
    if not cond:
        raise ValueError(f"CVPOConfig.{field}={value!r} is invalid: must be {allowed}.")


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


COST_BOOTSTRAPS = ("policy", "data")
CONSTRAINT_FORMS = ("level", "advantage", "lagrangian")
LAGRANGIAN_SCALES = ("linear", "log")
LAGRANGIAN_SIGNALS = ("episode", "mean")


@dataclasses.dataclass(frozen=True)
class CVPOConfig:
    """Hyperparameters of one CVPO learner.

    Constraints: ``cost_limit`` is a tuple with one episodic limit per cost signal
    (M = len(cost_limit)); the E-step uses the per-step Q threshold
    ``qc_threshold`` derived from it and ``episode_length``.
    """

    # Networks.
    hidden_sizes: tuple[int, ...] = (128, 128)
    num_reward_critics: int = 1
    num_cost_critics: int = 1
    critic_layer_norm: bool = False  # LayerNorm before each hidden ReLU of the critics.
    # Standardise observations with the mean and std of the warm-up data (fixed for the
    # run, stored with the parameters). Safety-Gymnasium's accelerometer varies ~35x more
    # than its lidar rings; raw, it can drown them in the first layer (measured: no gain).
    normalize_obs: bool = False
    full_covariance: bool = True
    min_std: float = 1e-4  # Floor on the Cholesky diagonal: keeps log-probs finite.
    init_std: float = 0.5  # Policy std at initialisation (before any update).
    # Ceiling on each action's policy std (null: none). Under a heavy cost weight the
    # E-step favours samples beyond the action box, which the env clips to its edge,
    # and the fitted std grows without bound (seen: 0.45 -> 1.6 of a [-1, 1] box).
    max_std: float | None = None

    # Constraint.
    cost_limit: tuple[float, ...] = (25.0,)
    episode_length: int = 1000

    # Critics.
    gamma: float = 0.99
    # Discount of the cost critics and of the Q_c threshold (None: gamma). A shorter
    # cost horizon keeps the constraint on the same average cost per step (the
    # threshold is converted with this discount) while the cost critic only has to
    # predict the next ~1/(1 - cost_gamma) steps.
    cost_gamma: float | None = None
    tau: float = 0.05
    critic_lr: float = 1e-3
    n_step: int = 1  # n-step TD targets, cut at episode ends (see replay.nstep_transition).
    cost_aggregate: str = "max"  # How cost members combine: max (pessimistic), mean, min.
    # How they combine in the TD target (None: cost_aggregate). "mean" here with "max"
    # above keeps the E-step pessimistic without compounding the max through the
    # bootstrap.
    # "cross" (two cost members) cross-fits them: member j learns from every other
    # row of each batch (rows b with b % 2 == j) and bootstraps from member 1 - j at
    # the next action. With cost_aggregate "first" the E-step chooses by member 0
    # only, so the member that member 0 bootstraps from never had its errors chosen
    # for; an underestimate at the chosen actions then enters the level once instead
    # of being carried 1 / (1 - gamma_c) times through the bootstrap.
    cost_target_aggregate: str | None = None
    # Costs are >= 0, so is every Q_c: clamp the cost critics' values at 0 in the TD
    # target, the E-step and the diagnostics. Without it the E-step, which weights
    # the K sampled actions by exp(-lambda Q_c / eta), favours actions whose Q_c is
    # extrapolated below 0 (seen: E_pi[Q_c] -2 while the realised cost-to-go was 2-4).
    nonnegative_cost_q: bool = False
    # The next action of the cost critics' TD target: "policy" samples it from the
    # target policy (as for the reward critics); "data" takes the action the data took
    # at the bootstrap observation (the policy's where the episode ended there), so
    # the cost target follows costs actually paid and never bootstraps from actions
    # the E-step chose because their Q_c was extrapolated low.
    cost_bootstrap: str = "policy"
    # A conservative term in the cost critics' loss (CQL-style, with the E-step's
    # weights as the action distribution): weight * mean_s(Q_c(s, a_data) -
    # sum_k q(a_k|s) Q_c(s, a_k)) lowers Q_c at the replay's actions and raises it
    # where the E-step is about to move the policy, so the E-step cannot meet its
    # threshold on actions whose Q_c is extrapolated low (`qc_data_gap`). 0: off.
    cost_conservative_weight: float = 0.0
    # States of each batch on which the term is estimated (its K actions each add a
    # forward and backward pass of the critics: B' * K pairs).
    cost_conservative_states: int = 64

    # E-step.
    num_samples: int = 16  # K actions per state.
    estep_kl_eps: float = 0.1
    dual_lr: float = 0.05
    dual_steps: int = 20
    eta_init: float = 1.0
    lambda_init: float = 1.0
    eta_bounds: tuple[float, float] = (1e-6, 1e5)
    lambda_bounds: tuple[float, float] = (1e-8, 20.0)
    # Largest change of log-lambda per update (0: the dual solve moves it freely).
    lambda_max_log_step: float = 0.0
    # Realised-cost feedback on the E-step threshold: after each training episode,
    # log(scale) -= gain * min((cost - limit) / max(limit, 1), 10), the scale
    # kept inside cost_feedback_bounds; the E-step uses scale * qc_threshold.
    # 0 disables it (the threshold stays the converted limit).
    cost_feedback_gain: float = 0.0
    cost_feedback_bounds: tuple[float, float] = (0.1, 10.0)
    # What the E-step bounds. "level": E_q[Q_c] <= qc_threshold, so the cost critic's
    # level decides. "advantage": E_q[Q_c] - E_pi_old[Q_c] <= qc_threshold - C_real,
    # with C_real the realised episode cost (a running mean over the last
    # realised_cost_episodes finished training episodes) in the same per-step units,
    # so the critic only ranks actions and the level comes from the costs paid (the
    # first-order constraint of CPO, J_c(pi) + A_c <= d). Host loop only.
    # "lagrangian": lambda is not solved per batch but is a Lagrange multiplier on the
    # realised episode cost, lambda <- clip(lambda + lagrangian_lr * min((C - limit) /
    # max(limit, 1), 10), lambda_bounds) after each finished training episode; the
    # E-step then solves only eta for the weights exp((Q_r - lambda . Q_c) / eta) inside
    # its KL ball (constrained MPO's Lagrangian form). Host loop only.
    constraint_form: str = "level"
    realised_cost_episodes: int = 20
    lagrangian_lr: float = 0.05
    # "linear": the step above; "log": log lambda moves by lagrangian_lr * clip((C -
    # limit) / limit, -1, 1) per episode, so early costly episodes cannot wind it up
    # (constraint.lagrangian_update).
    lagrangian_scale: str = "linear"
    # The cost in the error: "episode" (each finished episode's own) or "mean" (the
    # running mean over about the last realised_cost_episodes after each of them).
    lagrangian_signal: str = "episode"
    # Top of the per-episode error clip on the log scale: 1 clips (C - limit) / limit
    # to [-1, 1], so lambda's drift is zero where the *median* episode cost is at the
    # limit; a larger cap (errors are >= -1 anyway) moves it to where the mean of the
    # episode costs is, costs above (1 + cap) * limit counted as that.
    lagrangian_error_cap: float = 1.0
    # Proportional term on the log scale: the E-step uses lambda = lambda_I *
    # exp(kp * clip(e_mean, -1, 1)), lambda_I the integrated multiplier above and
    # e_mean = (C_real - limit) / limit with C_real the running mean of the last
    # realised_cost_episodes episodes (a PI multiplier, Stooke et al. 2020). 0: none.
    lagrangian_kp: float = 0.0
    # Recovery from an infeasible E-step: when the threshold lies below what the KL
    # ball can reach, the E-step is asked instead for this fraction of the largest
    # reachable decrease of E[Q_c] from pi_old (threshold raised to
    # E_pi_old[Q_c] - f * (E_pi_old[Q_c] - qc_reachable)), so lambda settles where
    # reward still counts. 0 disables it: the threshold stays, lambda runs to its
    # ceiling and the E-step is pure cost descent.
    estep_recovery: float = 0.0

    # M-step.
    mstep_steps: int = 1
    # Fit the policy to the E-step's samples clipped to the action box (the actions
    # the critics scored and the env would see). Unclipped, samples beyond the box
    # score as the boundary, a tanh mean cannot follow them there, and the covariance
    # part of the fit grows to cover them.
    fit_clipped_actions: bool = False
    # FSRL's bounds: the mean may move 5x further per update than the covariance's
    # 1e-3 of before, the covariance half as far (docs/results/pointgoal1-300k-fsrl-mstep).
    kl_mean_eps: float = 5e-3
    kl_cov_eps: float = 5e-4
    actor_lr: float = 1e-3
    actor_grad_clip: float = 1.0  # Global norm; 0 disables clipping.
    alpha_lr: float = 0.05  # Adam on log-multipliers (dual ascent).
    alpha_init: float = 1.0
    alpha_bounds: tuple[float, float] = (1e-6, 1e6)

    def __post_init__(self) -> None:
        # Normalise sequences given as lists (e.g. from a CLI/YAML) to tuples so the
        # config stays hashable and can be a static jit argument.
        for name in (
            "hidden_sizes",
            "cost_limit",
            "eta_bounds",
            "lambda_bounds",
            "alpha_bounds",
            "cost_feedback_bounds",
        ):
            value = getattr(self, name)
            if isinstance(value, (list, tuple)):
                object.__setattr__(self, name, tuple(value))
            elif name == "cost_limit" and _is_number(value):
                object.__setattr__(self, name, (float(value),))
        self._validate()

    def _validate(self) -> None:
        hs = self.hidden_sizes
        _check(
            isinstance(hs, tuple) and len(hs) >= 1 and all(_is_int(h) and h > 0 for h in hs),
            "hidden_sizes",
            hs,
            "a non-empty sequence of positive integers",
        )
        for name in (
            "num_reward_critics",
            "num_cost_critics",
            "num_samples",
            "dual_steps",
            "mstep_steps",
            "episode_length",
            "n_step",
            "realised_cost_episodes",
            "cost_conservative_states",
        ):
            v = getattr(self, name)
            _check(_is_int(v) and v >= 1, name, v, "an integer >= 1")
        _check(self.num_samples >= 2, "num_samples", self.num_samples, "an integer >= 2")
        _check(self.n_step <= 1000, "n_step", self.n_step, "an integer in [1, 1000]")
        _check(
            self.cost_aggregate in COST_AGGREGATES,
            "cost_aggregate",
            self.cost_aggregate,
            f"one of {', '.join(COST_AGGREGATES)}",
        )
        _check(
            self.cost_target_aggregate is None
            or self.cost_target_aggregate in COST_TARGET_AGGREGATES,
            "cost_target_aggregate",
            self.cost_target_aggregate,
            f"null (as cost_aggregate) or one of {', '.join(COST_TARGET_AGGREGATES)}",
        )
        _check(
            self.cost_target_aggregate != "cross" or self.num_cost_critics == 2,
            "num_cost_critics",
            self.num_cost_critics,
            "2 with cost_target_aggregate=cross (each member bootstraps from the other)",
        )
        _check(
            _is_number(self.lagrangian_lr) and self.lagrangian_lr > 0,
            "lagrangian_lr",
            self.lagrangian_lr,
            "a finite number > 0",
        )
        _check(
            self.lagrangian_scale in LAGRANGIAN_SCALES,
            "lagrangian_scale",
            self.lagrangian_scale,
            f"one of {LAGRANGIAN_SCALES}",
        )
        _check(
            self.lagrangian_signal in LAGRANGIAN_SIGNALS,
            "lagrangian_signal",
            self.lagrangian_signal,
            f"one of {LAGRANGIAN_SIGNALS}",
        )
        _check(
            _is_number(self.lagrangian_error_cap) and self.lagrangian_error_cap >= 1.0,
            "lagrangian_error_cap",
            self.lagrangian_error_cap,
            "a finite number >= 1 (1: the median-tracking clip to [-1, 1])",
        )
        _check(
            self.lagrangian_error_cap == 1.0 or self.lagrangian_scale == "log",
            "lagrangian_error_cap",
            self.lagrangian_error_cap,
            "1 unless lagrangian_scale=log (the linear scale caps the error at 10)",
        )
        _check(
            self.lagrangian_kp == 0 or self.lagrangian_scale == "log",
            "lagrangian_kp",
            self.lagrangian_kp,
            "0 unless lagrangian_scale=log (the proportional term multiplies lambda)",
        )
        for name in (
            "lambda_max_log_step",
            "cost_feedback_gain",
            "lagrangian_kp",
            "cost_conservative_weight",
        ):
            v = getattr(self, name)
            _check(_is_number(v) and v >= 0, name, v, "a finite number >= 0 (0 disables it)")
        fb = self.cost_feedback_bounds
        _check(
            isinstance(fb, tuple)
            and len(fb) == 2
            and all(_is_number(x) for x in fb)
            and 0 < fb[0] <= 1.0 <= fb[1],
            "cost_feedback_bounds",
            fb,
            "a pair (low, high) with 0 < low <= 1 <= high",
        )
        _check(
            _is_number(self.estep_recovery) and 0.0 <= self.estep_recovery <= 1.0,
            "estep_recovery",
            self.estep_recovery,
            "a number in [0, 1] (0 disables it)",
        )
        _check(
            self.constraint_form in CONSTRAINT_FORMS,
            "constraint_form",
            self.constraint_form,
            f"one of {CONSTRAINT_FORMS}",
        )
        _check(
            self.constraint_form == "level" or self.cost_feedback_gain == 0,
            "cost_feedback_gain",
            self.cost_feedback_gain,
            f"0 with constraint_form={self.constraint_form} (the realised cost already "
            "drives the constraint)",
        )
        _check(
            self.constraint_form != "lagrangian" or self.estep_recovery == 0,
            "estep_recovery",
            self.estep_recovery,
            "0 with constraint_form=lagrangian (there is no threshold to recover)",
        )
        _check(
            self.cost_bootstrap in COST_BOOTSTRAPS,
            "cost_bootstrap",
            self.cost_bootstrap,
            f"one of {COST_BOOTSTRAPS}",
        )
        _check(
            isinstance(self.nonnegative_cost_q, bool),
            "nonnegative_cost_q",
            self.nonnegative_cost_q,
            "a bool",
        )
        _check(
            isinstance(self.normalize_obs, bool),
            "normalize_obs",
            self.normalize_obs,
            "a bool",
        )
        _check(
            isinstance(self.critic_layer_norm, bool),
            "critic_layer_norm",
            self.critic_layer_norm,
            "a bool",
        )
        _check(
            isinstance(self.fit_clipped_actions, bool),
            "fit_clipped_actions",
            self.fit_clipped_actions,
            "a bool",
        )
        _check(
            isinstance(self.full_covariance, bool),
            "full_covariance",
            self.full_covariance,
            "a bool",
        )
        cl = self.cost_limit
        _check(
            isinstance(cl, tuple) and len(cl) >= 1 and all(_is_number(c) and c >= 0 for c in cl),
            "cost_limit",
            cl,
            "a non-empty sequence of finite numbers >= 0",
        )
        _check(
            _is_number(self.gamma) and 0.0 < self.gamma < 1.0,
            "gamma",
            self.gamma,
            "in the open interval (0, 1)",
        )
        _check(
            self.cost_gamma is None
            or (_is_number(self.cost_gamma) and 0.0 < self.cost_gamma < 1.0),
            "cost_gamma",
            self.cost_gamma,
            "null (use gamma) or in the open interval (0, 1)",
        )
        _check(_is_number(self.tau) and 0.0 < self.tau <= 1.0, "tau", self.tau, "in (0, 1]")
        for name in (
            "critic_lr",
            "dual_lr",
            "actor_lr",
            "alpha_lr",
            "estep_kl_eps",
            "kl_mean_eps",
            "kl_cov_eps",
            "min_std",
            "init_std",
            "eta_init",
            "lambda_init",
            "alpha_init",
        ):
            v = getattr(self, name)
            _check(_is_number(v) and v > 0, name, v, "a finite number > 0")
        _check(
            _is_number(self.actor_grad_clip) and self.actor_grad_clip >= 0,
            "actor_grad_clip",
            self.actor_grad_clip,
            "a finite number >= 0 (0 disables clipping)",
        )
        _check(
            self.init_std > self.min_std,
            "init_std",
            self.init_std,
            f"greater than min_std={self.min_std}",
        )
        _check(
            self.max_std is None or (_is_number(self.max_std) and self.max_std >= self.init_std),
            "max_std",
            self.max_std,
            f"null or a number >= init_std={self.init_std}",
        )
        for name, init in (
            ("eta_bounds", self.eta_init),
            ("lambda_bounds", self.lambda_init),
            ("alpha_bounds", self.alpha_init),
        ):
            b = getattr(self, name)
            _check(
                isinstance(b, tuple)
                and len(b) == 2
                and all(_is_number(x) for x in b)
                and 0 < b[0] < b[1],
                name,
                b,
                "a pair (low, high) with 0 < low < high",
            )
            init_name = name.replace("_bounds", "_init")
            _check(b[0] <= init <= b[1], init_name, init, f"inside {name}={b}")

    @property
    def num_constraints(self) -> int:
        return len(self.cost_limit)

    @property
    def gamma_cost(self) -> float:
        """The cost critics' discount: `cost_gamma`, or `gamma` when that is None."""
        return self.gamma if self.cost_gamma is None else float(self.cost_gamma)

    @property
    def qc_threshold(self) -> tuple[float, ...]:
        """Per-step Q_c threshold for each constraint (see `episodic_to_q_threshold`)."""
        return tuple(
            episodic_to_q_threshold(c, self.gamma_cost, self.episode_length)
            for c in self.cost_limit
        )

    def replace(self, **changes: Any) -> CVPOConfig:
        """A validated copy with some fields changed; unknown names raise ValueError."""
        unknown = sorted(set(changes) - {f.name for f in dataclasses.fields(self)})
        if unknown:
            allowed = ", ".join(f.name for f in dataclasses.fields(self))
            raise ValueError(f"Unknown CVPOConfig field(s) {unknown}; allowed: {allowed}.")
        return dataclasses.replace(self, **changes)


def episodic_to_q_threshold(cost_limit: float, gamma: float, episode_length: int) -> float:
    """Converts an episodic cost limit to the per-step discounted Q_c threshold.

    A policy spending the budget uniformly pays ``cost_limit / T`` per step, whose
    discounted sum over T steps is ``cost_limit * (1 - gamma^T) / ((1 - gamma) * T)``.
    """
    if not _is_int(episode_length) or episode_length < 1:
        raise ValueError(f"episode_length={episode_length!r} must be an integer >= 1.")
    if not 0.0 < gamma < 1.0:
        raise ValueError(f"gamma={gamma!r} must be in (0, 1).")
    t = episode_length
    return cost_limit * (1.0 - gamma**t) / ((1.0 - gamma) * t)


def _check_train(cond: bool, field: str, value: Any, allowed: str) -> None:
    if not cond:
        raise ValueError(f"TrainConfig.{field}={value!r} is invalid: must be {allowed}.")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """What the host training loop needs: budget, data collection, update cadence, I/O.

    All counts are in environment steps (one step of one environment). Updates run in
    chunks: every `update_every` env steps, round(update_every * update_ratio) updates
    run back to back in one jitted call. With `action_repeat` k the agent decides every
    k env steps (`cvpo_jax.envs.action_repeat`): the counts stay in env steps, one
    transition (and `buffer_size`, `batch_size`) spans k of them. `action_repeat` None
    is chosen per env when training starts (`resolve_action_repeat`: 4 on
    Safety-Gymnasium's navigation tasks, 1 elsewhere); the checks below then use 1
    and run again with the chosen k.
    """

    env: str = "CarGoal1"
    seed: int = 0
    total_steps: int = 20_000
    num_envs: int = 2
    async_envs: bool = True
    warmup_steps: int = 10_000
    batch_size: int = 256
    buffer_size: int = 200_000
    update_ratio: float = 0.2
    update_every: int = 40  # A multiple of num_envs * action_repeat (2 * 4).
    log_every: int = 2_000
    checkpoint_every: int = 20_000
    keep_checkpoints: int = 2
    critic_pretrain_updates: int = 0  # Critic-only updates on the warm-up data, once.
    action_repeat: int | None = None  # Env steps each action is held for; None: per env.
    # The constrained cost signals (Safety-Gymnasium's `cost_<name>` entries, e.g.
    # ("hazards", "vases_contact")), one cost limit each; ("sum",) is the env's cost.
    costs: tuple[str, ...] = ("sum",)

    def __post_init__(self) -> None:
        if isinstance(self.costs, (list, str)):
            object.__setattr__(
                self, "costs", (self.costs,) if isinstance(self.costs, str) else tuple(self.costs)
            )
        _check_train(
            isinstance(self.costs, tuple)
            and len(self.costs) >= 1
            and all(isinstance(c, str) and c for c in self.costs)
            and len(set(self.costs)) == len(self.costs),
            "costs",
            self.costs,
            "a non-empty list of distinct cost signal names, e.g. [hazards, vases_contact]",
        )
        _check_train(
            isinstance(self.env, str) and bool(self.env),
            "env",
            self.env,
            "a non-empty environment name",
        )
        _check_train(_is_int(self.seed) and self.seed >= 0, "seed", self.seed, "an integer >= 0")
        for name in (
            "total_steps",
            "num_envs",
            "batch_size",
            "buffer_size",
            "update_every",
            "log_every",
            "checkpoint_every",
            "keep_checkpoints",
        ):
            v = getattr(self, name)
            _check_train(_is_int(v) and v >= 1, name, v, "an integer >= 1")
        for name in ("warmup_steps", "critic_pretrain_updates"):
            v = getattr(self, name)
            _check_train(_is_int(v) and v >= 0, name, v, "an integer >= 0")
        _check_train(
            self.action_repeat is None or (_is_int(self.action_repeat) and self.action_repeat >= 1),
            "action_repeat",
            self.action_repeat,
            "null (chosen per env) or an integer >= 1",
        )
        k = self.repeat
        _check_train(isinstance(self.async_envs, bool), "async_envs", self.async_envs, "a bool")
        _check_train(
            _is_number(self.update_ratio) and self.update_ratio > 0,
            "update_ratio",
            self.update_ratio,
            "a finite number > 0",
        )
        _check_train(
            self.update_every % (self.num_envs * k) == 0,
            "update_every",
            self.update_every,
            f"a multiple of num_envs * action_repeat={self.num_envs * k} "
            "(updates run between vector steps)",
        )
        _check_train(
            self.updates_per_chunk >= 1,
            "update_ratio",
            self.update_ratio,
            f"large enough that update_every * update_ratio >= 0.5 "
            f"(update_every={self.update_every})",
        )
        for name in ("total_steps", "warmup_steps", "log_every", "checkpoint_every"):
            v = getattr(self, name)
            _check_train(
                v % self.update_every == 0,
                name,
                v,
                f"a multiple of update_every={self.update_every}",
            )
        _check_train(
            self.buffer_size >= self.batch_size,
            "buffer_size",
            self.buffer_size,
            f">= batch_size={self.batch_size}",
        )
        _check_train(
            self.warmup_steps == 0 or self.warmup_steps >= self.batch_size * k,
            "warmup_steps",
            self.warmup_steps,
            f"0 or >= batch_size * action_repeat={self.batch_size * k} "
            "(the first batch needs data)",
        )

    @property
    def repeat(self) -> int:
        """The action repeat k (1 while `action_repeat` is None, not yet chosen)."""
        return 1 if self.action_repeat is None else self.action_repeat

    @property
    def updates_per_chunk(self) -> int:
        return int(round(self.update_every * self.update_ratio))

    @property
    def learning_starts(self) -> int:
        """The env step after which updates run: after warm-up and a first full batch."""
        return max(self.warmup_steps, self.batch_size * self.repeat)
