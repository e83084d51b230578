"""Tests of `cvpo_jax.config`: defaults, derived thresholds and validation.

Every numeric expectation is computed independently in plain Python floats
(float64); tolerances are stated at each comparison.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import pytest

from cvpo_jax.config import CVPOConfig, episodic_to_q_threshold

# Relative tolerance for float64 formulas evaluated in two different orders.
RTOL = 1e-12


def _discounted_uniform_budget(cost_limit: float, gamma: float, horizon: int) -> float:
    """sum_{t=0}^{T-1} gamma^t * cost_limit / T, summed term by term."""
    total, discount = 0.0, 1.0
    for _ in range(horizon):
        total += discount * (cost_limit / horizon)
        discount *= gamma
    return total


# ---------------------------------------------------------------------------
# Defaults and derived values.
# ---------------------------------------------------------------------------


def test_defaults_validate_and_match_reference():
    cfg = CVPOConfig()
    # Reference defaults of the design table ("our default" column).
    # The lean sizes and capped lambda chosen by the PointGoal1 ablation
    # (docs/results/README.md).
    assert cfg.hidden_sizes == (128, 128)
    assert cfg.num_reward_critics == 1 and cfg.num_cost_critics == 1
    assert cfg.lambda_bounds == (1e-8, 20.0) and cfg.n_step == 1
    assert cfg.full_covariance is True
    assert cfg.cost_limit == (25.0,)
    assert cfg.gamma == 0.99 and cfg.tau == 0.05
    assert cfg.num_samples == 16 and cfg.estep_kl_eps == 0.1
    assert cfg.kl_mean_eps == 5e-3 and cfg.kl_cov_eps == 5e-4  # FSRL's (docs/results)
    assert cfg.mstep_steps == 1 and cfg.critic_lr == 1e-3
    assert cfg.num_constraints == 1
    # Re-validating the defaults explicitly does not raise.
    cfg._validate()


def test_default_qc_threshold_closed_form():
    cfg = CVPOConfig()
    expected = 25 * (1 - 0.99**1000) / (0.01 * 1000)
    assert len(cfg.qc_threshold) == 1
    assert math.isclose(cfg.qc_threshold[0], expected, rel_tol=1e-12)
    # Sanity of the number itself (about 2.49989), so a wrong formula cannot hide.
    assert math.isclose(cfg.qc_threshold[0], 2.4998921, rel_tol=1e-6)


def test_several_constraints_give_one_threshold_each():
    cfg = CVPOConfig(cost_limit=(25, 10), gamma=0.95, episode_length=500)
    assert cfg.num_constraints == 2
    thr = cfg.qc_threshold
    assert isinstance(thr, tuple) and len(thr) == 2
    for limit, got in zip((25.0, 10.0), thr, strict=True):
        want = limit * (1 - 0.95**500) / (0.05 * 500)
        assert math.isclose(got, want, rel_tol=RTOL)
    # Thresholds are linear in the limit.
    assert math.isclose(thr[0] / thr[1], 2.5, rel_tol=RTOL)


def test_scalar_cost_limit_becomes_one_tuple():
    cfg = CVPOConfig(cost_limit=10)
    assert cfg.cost_limit == (10.0,)
    assert isinstance(cfg.cost_limit, tuple)
    assert isinstance(cfg.cost_limit[0], float)
    assert cfg.num_constraints == 1
    cfg_f = CVPOConfig(cost_limit=7.5)
    assert cfg_f.cost_limit == (7.5,)


def test_lists_become_tuples():
    cfg = CVPOConfig(
        hidden_sizes=[64, 32],
        cost_limit=[25.0, 5.0],
        eta_bounds=[1e-3, 10.0],
        lambda_bounds=[1e-4, 100.0],
        alpha_bounds=[1e-3, 1e3],
    )
    for name in ("hidden_sizes", "cost_limit", "eta_bounds", "lambda_bounds", "alpha_bounds"):
        assert isinstance(getattr(cfg, name), tuple), name
    assert cfg.hidden_sizes == (64, 32)
    assert cfg.cost_limit == (25.0, 5.0)
    assert cfg.eta_bounds == (1e-3, 10.0)
    # A config built from lists equals (and hashes like) the one built from tuples.
    same = CVPOConfig(
        hidden_sizes=(64, 32),
        cost_limit=(25.0, 5.0),
        eta_bounds=(1e-3, 10.0),
        lambda_bounds=(1e-4, 100.0),
        alpha_bounds=(1e-3, 1e3),
    )
    assert cfg == same and hash(cfg) == hash(same)


def test_hashable_and_usable_as_static_jit_argument():
    cfg = CVPOConfig()
    assert hash(cfg) == hash(CVPOConfig())
    assert {cfg: 1}[CVPOConfig()] == 1
    assert cfg != CVPOConfig(gamma=0.98)

    def f(x, c):
        return x * c.gamma

    out = jax.jit(f, static_argnums=1)(jnp.float32(2.0), cfg)
    assert math.isclose(float(out), 1.98, rel_tol=1e-6)  # float32 result.


def test_frozen():
    cfg = CVPOConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.gamma = 0.5  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.cost_limit = (1.0,)  # type: ignore[misc]
    assert cfg.gamma == 0.99


def test_replace_validates_and_copies():
    cfg = CVPOConfig()
    new = cfg.replace(gamma=0.95, cost_limit=[5, 6])
    assert new.gamma == 0.95 and new.cost_limit == (5, 6)
    assert cfg.gamma == 0.99  # Original untouched.
    with pytest.raises(ValueError, match="gamma"):
        cfg.replace(gamma=1.0)


def test_replace_unknown_field_lists_allowed_names():
    with pytest.raises(ValueError) as info:
        CVPOConfig().replace(unknown_field=1)
    msg = str(info.value)
    assert "unknown_field" in msg
    for f in dataclasses.fields(CVPOConfig):
        assert f.name in msg, f.name


# ---------------------------------------------------------------------------
# episodic_to_q_threshold.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "cost_limit, gamma, horizon",
    [(25.0, 0.99, 1000), (10.0, 0.9, 50), (3.0, 0.5, 1), (1.0, 0.999, 200), (0.0, 0.99, 10)],
)
def test_threshold_equals_explicit_discounted_sum(cost_limit, gamma, horizon):
    got = episodic_to_q_threshold(cost_limit, gamma, horizon)
    want = _discounted_uniform_budget(cost_limit, gamma, horizon)
    # Term-by-term summation accumulates ~T ulps of error.
    assert math.isclose(got, want, rel_tol=1e-11, abs_tol=1e-15)


def test_threshold_of_one_step_episode_is_the_limit():
    assert math.isclose(episodic_to_q_threshold(7.0, 0.3, 1), 7.0, rel_tol=RTOL)


@pytest.mark.parametrize("horizon", [0, -3])
def test_threshold_rejects_bad_horizon(horizon):
    with pytest.raises(ValueError, match="episode_length"):
        episodic_to_q_threshold(25.0, 0.99, horizon)


@pytest.mark.parametrize("gamma", [0.0, 1.0, 1.5, -0.1, float("nan")])
def test_threshold_rejects_bad_gamma(gamma):
    with pytest.raises(ValueError, match="gamma"):
        episodic_to_q_threshold(25.0, gamma, 100)


# ---------------------------------------------------------------------------
# Validation: every bad value raises ValueError naming the field.
# ---------------------------------------------------------------------------

NAN = float("nan")
INF = float("inf")

BAD_VALUES = [
    # (field to set, bad value, field named in the message)
    ("gamma", 0, "gamma"),
    ("gamma", 1, "gamma"),
    ("gamma", 1.5, "gamma"),
    ("gamma", NAN, "gamma"),
    ("gamma", -0.5, "gamma"),
    ("gamma", True, "gamma"),
    ("gamma", "0.99", "gamma"),
    ("tau", 0, "tau"),
    ("tau", 2, "tau"),
    ("tau", -0.1, "tau"),
    ("tau", INF, "tau"),
    ("critic_lr", -1e-3, "critic_lr"),
    ("critic_lr", 0.0, "critic_lr"),
    ("actor_lr", -1.0, "actor_lr"),
    ("actor_lr", NAN, "actor_lr"),
    ("dual_lr", -0.05, "dual_lr"),
    ("alpha_lr", -0.05, "alpha_lr"),
    ("alpha_lr", INF, "alpha_lr"),
    ("estep_kl_eps", 0.0, "estep_kl_eps"),
    ("kl_mean_eps", -1e-3, "kl_mean_eps"),
    ("kl_cov_eps", 0, "kl_cov_eps"),
    ("min_std", 0.0, "min_std"),
    ("min_std", -1e-4, "min_std"),
    ("init_std", 1e-4, "init_std"),  # Equal to the default min_std.
    ("init_std", 5e-5, "init_std"),  # Below min_std.
    ("init_std", -0.5, "init_std"),
    ("actor_grad_clip", -1.0, "actor_grad_clip"),
    ("actor_grad_clip", NAN, "actor_grad_clip"),
    ("num_samples", 1, "num_samples"),
    ("num_samples", 0, "num_samples"),
    ("num_samples", 32.0, "num_samples"),
    ("num_samples", True, "num_samples"),
    ("num_reward_critics", 0, "num_reward_critics"),
    ("num_reward_critics", True, "num_reward_critics"),
    ("num_reward_critics", 2.0, "num_reward_critics"),
    ("num_cost_critics", 0, "num_cost_critics"),
    ("num_cost_critics", False, "num_cost_critics"),
    ("dual_steps", 0, "dual_steps"),
    ("dual_steps", True, "dual_steps"),
    ("mstep_steps", 0, "mstep_steps"),
    ("mstep_steps", 2.5, "mstep_steps"),
    ("episode_length", 0, "episode_length"),
    ("episode_length", True, "episode_length"),
    ("episode_length", 1000.0, "episode_length"),
    ("hidden_sizes", (), "hidden_sizes"),
    ("hidden_sizes", (0,), "hidden_sizes"),
    ("hidden_sizes", (256, -1), "hidden_sizes"),
    ("hidden_sizes", (256.0,), "hidden_sizes"),
    ("hidden_sizes", (True,), "hidden_sizes"),
    ("hidden_sizes", 256, "hidden_sizes"),
    ("full_covariance", 1, "full_covariance"),
    ("full_covariance", "yes", "full_covariance"),
    ("critic_layer_norm", 1, "critic_layer_norm"),
    ("cost_bootstrap", "sampled", "cost_bootstrap"),
    ("cost_conservative_weight", -0.1, "cost_conservative_weight"),
    ("cost_conservative_weight", NAN, "cost_conservative_weight"),
    ("cost_conservative_states", 0, "cost_conservative_states"),
    ("cost_conservative_states", 8.0, "cost_conservative_states"),
    ("fit_clipped_actions", "yes", "fit_clipped_actions"),
    ("cost_limit", (-1,), "cost_limit"),
    ("cost_limit", (), "cost_limit"),
    ("cost_limit", (NAN,), "cost_limit"),
    ("cost_limit", (INF,), "cost_limit"),
    ("cost_limit", (25.0, -0.5), "cost_limit"),
    ("cost_limit", (True,), "cost_limit"),
    ("cost_limit", -5, "cost_limit"),
    ("cost_limit", True, "cost_limit"),
    ("cost_limit", "25", "cost_limit"),
    ("eta_bounds", (1, 0.5), "eta_bounds"),
    ("eta_bounds", (0, 1), "eta_bounds"),
    ("eta_bounds", (1e-6,), "eta_bounds"),
    ("eta_bounds", (1e-6, INF), "eta_bounds"),
    ("eta_bounds", (1.0, 1.0), "eta_bounds"),
    ("lambda_bounds", (2.0, 1.0), "lambda_bounds"),
    ("lambda_bounds", (-1.0, 1.0), "lambda_bounds"),
    ("alpha_bounds", (1e6, 1e-6), "alpha_bounds"),
    ("alpha_bounds", (1e-6, 1e6, 1e7), "alpha_bounds"),
    ("eta_init", 1e6, "eta_init"),  # Above eta_bounds[1] = 1e5.
    ("eta_init", 1e-7, "eta_init"),  # Below eta_bounds[0] = 1e-6.
    ("eta_init", 0.0, "eta_init"),
    ("lambda_init", 1e6, "lambda_init"),
    ("lambda_init", -1.0, "lambda_init"),
    ("alpha_init", 1e7, "alpha_init"),
    ("alpha_init", 1e-7, "alpha_init"),
]


@pytest.mark.parametrize(
    "field, value, named", BAD_VALUES, ids=[f"{f}={v!r}" for f, v, _ in BAD_VALUES]
)
def test_bad_value_raises_naming_field(field, value, named):
    with pytest.raises(ValueError) as info:
        CVPOConfig(**{field: value})
    msg = str(info.value)
    assert f"CVPOConfig.{named}=" in msg, msg
    # The same check goes through `replace` on a valid config.
    with pytest.raises(ValueError) as info2:
        CVPOConfig().replace(**{field: value})
    assert f"CVPOConfig.{named}=" in str(info2.value)


@pytest.mark.parametrize(
    "kwargs, named",
    [
        # Bounds changed so that the default init falls outside them.
        ({"eta_bounds": (2.0, 3.0)}, "eta_init"),
        ({"lambda_bounds": (1e-8, 0.5)}, "lambda_init"),
        ({"alpha_bounds": (10.0, 100.0)}, "alpha_init"),
        # min_std raised above the default init_std: init_std is named, with min_std.
        ({"min_std": 0.6}, "init_std"),
    ],
)
def test_inconsistent_pairs_name_the_dependent_field(kwargs, named):
    with pytest.raises(ValueError) as info:
        CVPOConfig(**kwargs)
    assert f"CVPOConfig.{named}=" in str(info.value)


def test_message_contains_value_and_allowed_range():
    with pytest.raises(ValueError) as info:
        CVPOConfig(gamma=1.5)
    msg = str(info.value)
    assert "1.5" in msg and "(0, 1)" in msg
    with pytest.raises(ValueError) as info:
        CVPOConfig(cost_limit=(25.0, -3.0))
    assert "-3.0" in str(info.value)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"actor_grad_clip": 0.0},  # 0 disables clipping: allowed.
        {"cost_limit": (0.0,)},  # A zero budget is allowed.
        {"num_samples": 2},
        {"gamma": 0.5, "tau": 1.0},
        {"init_std": 0.1, "min_std": 0.01},
        {"eta_init": 1e-6, "lambda_init": 20.0},  # Inits on the bounds are allowed.
        {"full_covariance": False},
    ],
)
def test_edge_values_are_accepted(kwargs):
    cfg = CVPOConfig(**kwargs)
    for k, v in kwargs.items():
        assert getattr(cfg, k) == v


@pytest.mark.parametrize("horizon", [10.5, True])
def test_threshold_rejects_non_integer_horizon(horizon):
    with pytest.raises(ValueError, match="episode_length"):
        episodic_to_q_threshold(25.0, 0.99, horizon)
