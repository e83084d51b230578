"""Frozen, validated configuration of the CVPO algorithm.

Every field has the reference default (see the README's algorithm section) and is
checked in ``__post_init__``: a bad value raises ``ValueError`` naming the field,
the value and the allowed range, before anything is traced or compiled.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any


def _check(cond: bool, field: str, value: Any, allowed: str) -> None:
    if not cond:
        raise ValueError(f"CVPOConfig.{field}={value!r} is invalid: must be {allowed}.")


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


@dataclasses.dataclass(frozen=True)
class CVPOConfig:
    """Hyperparameters of one CVPO learner.

    Constraints: ``cost_limit`` is a tuple with one episodic limit per cost signal
    (M = len(cost_limit)); the E-step uses the per-step Q threshold
    ``qc_threshold`` derived from it and ``episode_length``.
    """

    # Networks.
    hidden_sizes: tuple[int, ...] = (256, 256)
    num_reward_critics: int = 2
    num_cost_critics: int = 2
    full_covariance: bool = True
    min_std: float = 1e-4  # Floor on the Cholesky diagonal: keeps log-probs finite.
    init_std: float = 0.5  # Policy std at initialisation (before any update).

    # Constraint.
    cost_limit: tuple[float, ...] = (25.0,)
    episode_length: int = 1000

    # Critics.
    gamma: float = 0.99
    tau: float = 0.005
    critic_lr: float = 1e-3

    # E-step.
    num_samples: int = 32  # K actions per state.
    estep_kl_eps: float = 0.1
    dual_lr: float = 0.05
    dual_steps: int = 20
    eta_init: float = 1.0
    lambda_init: float = 1.0
    eta_bounds: tuple[float, float] = (1e-6, 1e5)
    lambda_bounds: tuple[float, float] = (1e-8, 1e5)

    # M-step.
    mstep_steps: int = 5
    kl_mean_eps: float = 1e-3
    kl_cov_eps: float = 1e-3
    actor_lr: float = 1e-3
    actor_grad_clip: float = 1.0  # Global norm; 0 disables clipping.
    alpha_lr: float = 0.05  # Adam on log-multipliers (dual ascent).
    alpha_init: float = 1.0
    alpha_bounds: tuple[float, float] = (1e-6, 1e6)

    def __post_init__(self) -> None:
        # Normalise sequences given as lists (e.g. from a CLI/YAML) to tuples so the
        # config stays hashable and can be a static jit argument.
        for name in ("hidden_sizes", "cost_limit", "eta_bounds", "lambda_bounds", "alpha_bounds"):
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
        ):
            v = getattr(self, name)
            _check(_is_int(v) and v >= 1, name, v, "an integer >= 1")
        _check(self.num_samples >= 2, "num_samples", self.num_samples, "an integer >= 2")
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
    def qc_threshold(self) -> tuple[float, ...]:
        """Per-step Q_c threshold for each constraint (see `episodic_to_q_threshold`)."""
        return tuple(
            episodic_to_q_threshold(c, self.gamma, self.episode_length) for c in self.cost_limit
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
    if episode_length < 1:
        raise ValueError(f"episode_length={episode_length!r} must be an integer >= 1.")
    if not 0.0 < gamma < 1.0:
        raise ValueError(f"gamma={gamma!r} must be in (0, 1).")
    t = episode_length
    return cost_limit * (1.0 - gamma**t) / ((1.0 - gamma) * t)
