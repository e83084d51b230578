"""Tests of `cvpo_jax.mstep`: KLs, decoupled likelihoods, the multiplier gradient and
the scanned M-step optimisation.

Reference values are computed independently with numpy / scipy in float64. The
precise comparisons run with float64 enabled (the `x64` fixture, which restores the
previous setting afterwards). Test data is made with numpy so that few eager jax
ops need compiling. Tolerances are stated at each comparison.
"""

from __future__ import annotations

import chex
import distrax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from cvpo_jax import mstep as ms
from cvpo_jax.config import CVPOConfig
from cvpo_jax.networks import make_networks
from cvpo_jax.types import MStepDuals

# float64 implementation against a float64 numpy/scipy reference.
F64 = dict(rtol=1e-9, atol=1e-12)


@pytest.fixture
def x64():
    """Enables float64 for one test and restores the previous setting afterwards."""
    with jax.enable_x64(True):
        yield


# ---------------------------------------------------------------------------
# Independent numpy references.
# ---------------------------------------------------------------------------


def _rand_tril(rng, b, a, off_scale=0.5):
    """Random lower-triangular scales with a positive diagonal, [B, A, A]."""
    tril = np.tril(off_scale * rng.normal(size=(b, a, a)), k=-1)
    idx = np.arange(a)
    tril[:, idx, idx] = np.exp(0.4 * rng.normal(size=(b, a)))
    return tril


def _cov(tril):
    return np.einsum("...ij,...kj->...ik", tril, tril)


def _kl_np(mean_p, tril_p, mean_q, tril_q):
    """KL(N_p || N_q) per row, from the closed form for multivariate normals."""
    out = []
    for mp, lp, mq, lq in zip(mean_p, tril_p, mean_q, tril_q, strict=True):
        sp, sq = lp @ lp.T, lq @ lq.T
        sq_inv = np.linalg.inv(sq)
        d = mq - mp
        a = len(mp)
        out.append(
            0.5
            * (
                np.trace(sq_inv @ sp)
                + d @ sq_inv @ d
                - a
                + np.linalg.slogdet(sq)[1]
                - np.linalg.slogdet(sp)[1]
            )
        )
    return np.asarray(out)


def _weighted_ll_np(actions, weights, mean, tril):
    """mean_b sum_k w[b,k] log N(a[b,k]; mean[b], tril[b] tril[b]^T), via scipy."""
    per_state = []
    for a_b, w_b, m_b, l_b in zip(actions, weights, mean, tril, strict=True):
        logp = stats.multivariate_normal.logpdf(a_b, mean=m_b, cov=l_b @ l_b.T)
        per_state.append(np.sum(w_b * np.atleast_1d(logp)))
    return float(np.mean(per_state))


def _softmax_rows(x):
    e = np.exp(x - x.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _gaussians(seed, b, a):
    """Two random Gaussians per row: (mean, tril, mean_old, tril_old), float64."""
    rng = np.random.default_rng(seed)
    return (
        rng.normal(size=(b, a)),
        _rand_tril(rng, b, a),
        rng.normal(size=(b, a)),
        _rand_tril(rng, b, a),
    )


_gaussian_kl = jax.jit(ms.gaussian_kl)
_decoupled_kl = jax.jit(ms.decoupled_kl)
_decoupled_ll = jax.jit(ms.decoupled_log_likelihood)


# ---------------------------------------------------------------------------
# gaussian_kl.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("a", [1, 2, 4])
def test_gaussian_kl_closed_form(x64, a):
    mp, lp, mq, lq = _gaussians(a, 6, a)
    got = np.asarray(_gaussian_kl(mp, lp, mq, lq))
    chex.assert_shape(got, (6,))
    np.testing.assert_allclose(got, _kl_np(mp, lp, mq, lq), **F64)
    # The direction matters: KL(p||q) != KL(q||p) for these random Gaussians.
    rev = np.asarray(_gaussian_kl(mq, lq, mp, lp))
    np.testing.assert_allclose(rev, _kl_np(mq, lq, mp, lp), **F64)
    assert np.all(np.abs(got - rev) > 1e-6)
    assert np.all(got > 0)
    # KL of a distribution with itself is zero.
    np.testing.assert_allclose(_gaussian_kl(mp, lp, mp, lp), 0.0, atol=1e-12)


@pytest.mark.parametrize("a", [1, 2, 4])
def test_gaussian_kl_float32_close_to_float64_reference(a):
    mp, lp, mq, lq = _gaussians(10 + a, 6, a)
    f32 = [x.astype(np.float32) for x in (mp, lp, mq, lq)]
    got = np.asarray(_gaussian_kl(*f32))
    assert got.dtype == np.float32
    # float32 arithmetic: relative error ~1e-5 on KLs of order 1.
    ref = _kl_np(*[x.astype(np.float64) for x in f32])
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5)


def test_gaussian_kl_equals_distrax_mean_and_scale_changed(x64):
    mean, tril, mean_old, tril_old = _gaussians(3, 5, 3)
    got = _gaussian_kl(mean_old, tril_old, mean, tril)
    want = distrax.MultivariateNormalTri(mean_old, tril_old).kl_divergence(
        distrax.MultivariateNormalTri(mean, tril)
    )
    np.testing.assert_allclose(got, want, **F64)
    np.testing.assert_allclose(got, _kl_np(mean_old, tril_old, mean, tril), **F64)


# ---------------------------------------------------------------------------
# decoupled_kl.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("a", [1, 2, 4])
def test_decoupled_kl_closed_forms(x64, a):
    mean, tril, mean_old, tril_old = _gaussians(20 + a, 7, a)
    kl_mean, kl_cov = map(np.asarray, _decoupled_kl(mean, tril, mean_old, tril_old))
    chex.assert_shape([kl_mean, kl_cov], (7,))
    want_mean, want_cov = [], []
    for mu, lo, mu_o, lo_o in zip(mean, tril, mean_old, tril_old, strict=True):
        s, s_old = lo @ lo.T, lo_o @ lo_o.T
        d = mu - mu_o
        want_mean.append(0.5 * d @ np.linalg.solve(s_old, d))
        want_cov.append(
            0.5
            * (
                np.trace(np.linalg.solve(s, s_old))
                - a
                + np.linalg.slogdet(s)[1]
                - np.linalg.slogdet(s_old)[1]
            )
        )
    np.testing.assert_allclose(kl_mean, want_mean, **F64)
    np.testing.assert_allclose(kl_cov, want_cov, **F64)
    assert np.all(kl_mean > 0) and np.all(kl_cov > 0)


def test_decoupled_kl_zero_when_new_equals_old(x64):
    mean, tril, _, _ = _gaussians(30, 5, 3)
    kl_mean, kl_cov = _decoupled_kl(mean, tril, mean, tril)
    np.testing.assert_allclose(kl_mean, 0.0, atol=1e-12)
    np.testing.assert_allclose(kl_cov, 0.0, atol=1e-12)


def test_decoupled_kl_gradients_split(x64):
    mean, tril, mean_old, tril_old = _gaussians(31, 4, 3)
    b = mean.shape[0]

    def total(i):
        return lambda *args: jnp.sum(ms.decoupled_kl(*args)[i])

    g_mean = jax.jit(jax.grad(total(0), argnums=(0, 1, 2, 3)))(mean, tril, mean_old, tril_old)
    g_cov = jax.jit(jax.grad(total(1), argnums=(0, 1, 2, 3)))(mean, tril, mean_old, tril_old)
    g_mean, g_cov = [list(map(np.asarray, g)) for g in (g_mean, g_cov)]
    # KL_mean reaches the mean only; KL_cov reaches the scale only. Exactly zero.
    for g in (g_mean[1], g_mean[2], g_mean[3], g_cov[0], g_cov[2], g_cov[3]):
        assert np.all(g == 0.0)
    # And the gradients that remain are the analytic ones:
    # d KL_mean / d mu = S_old^-1 (mu - mu_old).
    s, s_old = _cov(tril), _cov(tril_old)
    want = np.stack([np.linalg.solve(s_old[i], mean[i] - mean_old[i]) for i in range(b)])
    np.testing.assert_allclose(g_mean[0], want, **F64)
    # d KL_cov / d L = tril(S^-1 L - S^-1 S_old S^-1 L) (lower part of the full gradient).
    want = []
    for i in range(b):
        s_inv = np.linalg.inv(s[i])
        want.append(np.tril(s_inv @ tril[i] - s_inv @ s_old[i] @ s_inv @ tril[i]))
    np.testing.assert_allclose(g_cov[1], np.stack(want), **F64)
    assert np.abs(g_mean[0]).max() > 1e-3 and np.abs(g_cov[1]).max() > 1e-3


# ---------------------------------------------------------------------------
# decoupled_log_likelihood.
# ---------------------------------------------------------------------------


def _ll_problem(seed, b=5, k=6, a=3):
    mean, tril, mean_old, tril_old = _gaussians(seed, b, a)
    rng = np.random.default_rng(seed + 100)
    actions = mean_old[:, None] + 1.5 * rng.normal(size=(b, k, a))
    weights = _softmax_rows(2.0 * rng.normal(size=(b, k)))
    return actions, weights, mean, tril, mean_old, tril_old


@pytest.mark.parametrize("shape", [(5, 6, 3), (3, 4, 1), (2, 8, 2)])
def test_decoupled_log_likelihood_equals_scipy(x64, shape):
    b, k, a = shape
    actions, weights, mean, tril, mean_old, tril_old = _ll_problem(40 + a, b, k, a)
    ll_mean, ll_cov = _decoupled_ll(actions, weights, mean, tril, mean_old, tril_old)
    chex.assert_shape([ll_mean, ll_cov], ())
    np.testing.assert_allclose(ll_mean, _weighted_ll_np(actions, weights, mean, tril_old), **F64)
    np.testing.assert_allclose(ll_cov, _weighted_ll_np(actions, weights, mean_old, tril), **F64)


def test_decoupled_log_likelihood_gradients_split(x64):
    args = _ll_problem(50)
    actions, weights, mean, tril, mean_old, tril_old = args
    b = mean.shape[0]

    def part(i):
        return lambda *a: ms.decoupled_log_likelihood(*a)[i]

    g_mean = jax.jit(jax.grad(part(0), argnums=tuple(range(6))))(*args)
    g_cov = jax.jit(jax.grad(part(1), argnums=tuple(range(6))))(*args)
    g_mean, g_cov = [list(map(np.asarray, g)) for g in (g_mean, g_cov)]
    # Index: 0 actions, 1 weights, 2 mean, 3 tril, 4 mean_old, 5 tril_old.
    assert np.all(g_mean[3] == 0.0)  # d ll_mean / d tril
    assert np.all(g_cov[2] == 0.0)  # d ll_cov / d mean
    for g in (g_mean, g_cov):
        for i in (1, 4, 5):  # Weights and the old policy carry no gradient.
            assert np.all(g[i] == 0.0), i
    assert np.abs(g_mean[2]).max() > 1e-3
    # d ll_mean / d mu_b = (1/B) S_old^-1 sum_k w_k (a_k - mu_b).
    s_old, s = _cov(tril_old), _cov(tril)
    want = np.stack(
        [
            np.linalg.solve(s_old[i], (weights[i][:, None] * (actions[i] - mean[i])).sum(0)) / b
            for i in range(b)
        ]
    )
    np.testing.assert_allclose(g_mean[2], want, **F64)
    # d ll_cov / d L_b = (1/B) tril(S^-1 C S^-1 L - S^-1 L), C = sum_k w x x^T,
    # x = a_k - mu_old (rows of weights sum to one).
    want = []
    for i in range(b):
        x = actions[i] - mean_old[i]
        c = np.einsum("k,ki,kj->ij", weights[i], x, x)
        s_inv = np.linalg.inv(s[i])
        want.append(np.tril(s_inv @ c @ s_inv @ tril[i] - s_inv @ tril[i]) / b)
    np.testing.assert_allclose(g_cov[3], np.stack(want), **F64)


# ---------------------------------------------------------------------------
# mstep_loss: the multiplier gradient and the stop-gradient split.
# ---------------------------------------------------------------------------

B, K, OBS, A = 16, 8, 3, 2


def _problem(cfg, seed=0, b=B, k=K, o=OBS, a=A, shift_params=0.0):
    """A policy, a batch of states and K actions from pi_old weighted towards +x.

    pi_old is the current policy unless `shift_params` perturbs the current one.
    Everything returned is numpy (float32 policy parameters).
    """
    nets = make_networks(cfg, o, [-1.0] * a, [1.0] * a)
    rng = np.random.default_rng(seed)
    obs = rng.normal(size=(b, o)).astype(np.float32)
    params = jax.tree.map(np.asarray, nets.policy.init(jax.random.key(seed), obs))
    mean_old, tril_old = map(np.asarray, nets.policy.apply(params, obs))
    if shift_params:
        params = jax.tree.map(
            lambda x: (x + shift_params * rng.normal(size=x.shape)).astype(x.dtype), params
        )
    z = rng.normal(size=(b, k, a)).astype(np.float32)
    actions = mean_old[:, None] + np.einsum("bij,bkj->bki", tril_old, z)
    weights = _softmax_rows(4.0 * actions.sum(-1)).astype(np.float32)
    return nets, params, obs, actions.astype(np.float32), weights, mean_old, tril_old


def _f64(tree):
    return jax.tree.map(lambda x: np.asarray(x, np.float64), tree)


LOSS_CFG = CVPOConfig(hidden_sizes=(32, 32), num_samples=K, kl_mean_eps=0.02, kl_cov_eps=5e-3)


@pytest.fixture(scope="module")
def loss_inputs():
    """A problem where the policy differs from pi_old; float64 numpy (params included).

    Module-scoped and built before the x64 fixture switches float64 on, so the
    policy's initialisation is compiled once, in float32 mode.
    """
    nets, params, obs, actions, weights, mean_old, tril_old = _problem(LOSS_CFG, shift_params=0.05)
    return nets, _f64(params), *_f64((obs, actions, weights, mean_old, tril_old))


@pytest.mark.parametrize("alphas", [(0.3, 2.0), (1e-3, 50.0)])
def test_mstep_loss_multiplier_gradient(loss_inputs, x64, alphas):
    cfg = LOSS_CFG
    nets, params, obs, actions, weights, mean_old, tril_old = loss_inputs
    log_alphas = {"log_alpha_mean": np.log(alphas[0]), "log_alpha_cov": np.log(alphas[1])}

    @jax.jit
    def grad_alpha(params, log_alphas, weights):
        g, aux = jax.grad(ms.mstep_loss, argnums=1, has_aux=True)(
            params, log_alphas, nets, obs, actions, weights, mean_old, tril_old, cfg
        )
        return g, aux, nets.policy.apply(params, obs)

    g, aux, (mean, tril) = grad_alpha(params, log_alphas, weights)
    # Independent KLs of the current policy against pi_old.
    mean, tril = np.asarray(mean), np.asarray(tril)
    kl_mean = _kl_np(mean_old, tril_old, mean, tril_old).mean()
    kl_cov = _kl_np(mean_old, tril_old, mean_old, tril).mean()
    assert kl_mean > 1e-4 and kl_cov > 1e-4  # The policy really differs from pi_old.
    np.testing.assert_allclose(aux["kl_mean"], kl_mean, **F64)
    np.testing.assert_allclose(aux["kl_cov"], kl_cov, **F64)
    # d loss / d log_alpha = alpha * (eps - KL): nothing from the policy's part.
    np.testing.assert_allclose(g["log_alpha_mean"], alphas[0] * (cfg.kl_mean_eps - kl_mean), **F64)
    np.testing.assert_allclose(g["log_alpha_cov"], alphas[1] * (cfg.kl_cov_eps - kl_cov), **F64)
    # The weights enter the policy's likelihood only: the multiplier gradient ignores them.
    other = _softmax_rows(np.random.default_rng(9).normal(size=weights.shape))
    g2, aux2, _ = grad_alpha(params, log_alphas, other)
    assert not np.isclose(aux2["policy_nll"], aux["policy_nll"])
    np.testing.assert_array_equal(g2["log_alpha_mean"], g["log_alpha_mean"])
    np.testing.assert_array_equal(g2["log_alpha_cov"], g["log_alpha_cov"])
    # Other diagnostics.
    nll = -_weighted_ll_np(actions, weights, mean, tril_old) - _weighted_ll_np(
        actions, weights, mean_old, tril
    )
    np.testing.assert_allclose(aux["policy_nll"], nll, **F64)
    np.testing.assert_allclose(aux["kl_mean_ratio"], kl_mean / cfg.kl_mean_eps, **F64)
    np.testing.assert_allclose(aux["kl_cov_ratio"], kl_cov / cfg.kl_cov_eps, **F64)
    np.testing.assert_allclose(aux["alpha_mean"], alphas[0], **F64)
    np.testing.assert_allclose(aux["alpha_cov"], alphas[1], **F64)


def _reference_policy_loss(params, nets, obs, actions, weights, mean_old, tril_old, alphas):
    """-(ll_mean + ll_cov) + a_m KL_mean + a_c KL_cov, written from the formulas with
    pi_old and the multipliers as plain constants (jax.scipy densities, jnp.linalg)."""
    mean, tril = nets.policy.apply(params, obs)
    s_old = jnp.asarray(_cov(tril_old))
    s = jnp.einsum("bij,bkj->bik", tril, tril)
    mvn = jax.scipy.stats.multivariate_normal.logpdf
    logp_mean = jax.vmap(lambda a, m, c: mvn(a, m, c))(actions, mean, s_old)
    logp_cov = jax.vmap(lambda a, m, c: mvn(a, m, c))(actions, jnp.asarray(mean_old), s)
    ll = jnp.mean(jnp.sum(weights * (logp_mean + logp_cov), axis=1))
    d = mean - mean_old
    kl_mean = 0.5 * jnp.einsum("bi,bi->b", d, jnp.linalg.solve(s_old, d[..., None])[..., 0])
    a = mean.shape[-1]
    kl_cov = 0.5 * (
        jnp.trace(jnp.linalg.solve(s, s_old), axis1=-2, axis2=-1)
        - a
        + jnp.linalg.slogdet(s)[1]
        - jnp.linalg.slogdet(s_old)[1]
    )
    return -ll + alphas[0] * jnp.mean(kl_mean) + alphas[1] * jnp.mean(kl_cov)


def test_mstep_loss_policy_gradient_treats_multipliers_and_kl_budget_as_constants(loss_inputs, x64):
    nets, params, obs, actions, weights, mean_old, tril_old = loss_inputs
    alphas = (0.7, 3.0)
    log_alphas = {"log_alpha_mean": np.log(alphas[0]), "log_alpha_cov": np.log(alphas[1])}

    got, _ = jax.jit(jax.grad(ms.mstep_loss, has_aux=True), static_argnums=(2, 8))(
        params, log_alphas, nets, obs, actions, weights, mean_old, tril_old, LOSS_CFG
    )
    want = jax.jit(
        jax.grad(
            lambda p: _reference_policy_loss(
                p, nets, obs, actions, weights, mean_old, tril_old, alphas
            )
        )
    )(params)
    # The reference has no KL budgets eps and no gradient through the multipliers:
    # equality shows both enter the multipliers' loss only.
    chex.assert_trees_all_close(got, want, rtol=1e-8, atol=1e-10)


# ---------------------------------------------------------------------------
# mstep: the scanned optimisation.
# ---------------------------------------------------------------------------

MSTEP_CFG = CVPOConfig(
    hidden_sizes=(32, 32), mstep_steps=10, num_samples=K, kl_mean_eps=1e-3, kl_cov_eps=10.0
)
NUM_CALLS = 10


# Networks and config are hashable: one compilation per (networks, cfg, shapes).
_mstep_jit = jax.jit(ms.mstep, static_argnums=(3, 9))


def _run_mstep(cfg, num_calls, duals=None, seed=0):
    """Calls `mstep` repeatedly, carrying params, optimiser state and multipliers."""
    nets, params, obs, actions, weights, mean_old, tril_old = _problem(cfg, seed=seed)
    opt_state = ms.policy_optimizer(cfg).init(params)
    duals = ms.init_mstep_duals(cfg) if duals is None else duals
    history = []
    for _ in range(num_calls):
        params, opt_state, duals, aux = _mstep_jit(
            params, opt_state, duals, nets, obs, actions, weights, mean_old, tril_old, cfg
        )
        history.append(
            {
                "alpha_mean": float(np.exp(duals.log_alpha_mean)),
                "alpha_cov": float(np.exp(duals.log_alpha_cov)),
                "log_alpha_mean": float(duals.log_alpha_mean),
                "log_alpha_cov": float(duals.log_alpha_cov),
                "kl_mean": float(aux["kl_mean"]),
                "kl_cov": float(aux["kl_cov"]),
            }
        )
    mean, tril = map(lambda x: np.asarray(x, np.float64), nets.policy.apply(params, obs))
    problem = _f64((actions, weights, mean_old, tril_old))
    return params, opt_state, duals, history, (mean, tril), problem


@pytest.fixture(scope="module")
def mstep_run():
    return _run_mstep(MSTEP_CFG, NUM_CALLS)


def test_mstep_improves_weighted_likelihood(mstep_run):
    _, _, _, _, (mean, tril), (actions, weights, mean_old, tril_old) = mstep_run
    ll_old = _weighted_ll_np(actions, weights, mean_old, tril_old)
    ll_mean = _weighted_ll_np(actions, weights, mean, tril_old)
    ll_cov = _weighted_ll_np(actions, weights, mean_old, tril)
    ll_full = _weighted_ll_np(actions, weights, mean, tril)
    # Both decoupled parts and the full Gaussian fit the weighted actions better.
    assert ll_mean > ll_old + 1e-3, (ll_mean, ll_old)
    assert ll_cov > ll_old + 1e-3, (ll_cov, ll_old)
    assert ll_full > ll_old + 1e-3, (ll_full, ll_old)
    # The mean moved towards the weighted actions (weights favour large a_1 + a_2).
    target = np.einsum("bk,bka->ba", weights, actions)
    assert np.mean(np.sum((mean - target) ** 2, -1)) < np.mean(np.sum((mean_old - target) ** 2, -1))


def test_mstep_mean_multiplier_grows_while_kl_exceeds_eps(mstep_run):
    _, _, _, history, (mean, _), (_, _, mean_old, tril_old) = mstep_run
    eps = MSTEP_CFG.kl_mean_eps
    alphas = [MSTEP_CFG.alpha_init] + [h["alpha_mean"] for h in history]
    kls = [h["kl_mean"] for h in history]
    # The first calls overshoot the budget, and alpha_mean rises call after call.
    for i in range(3):
        assert kls[i] > eps, (i, kls)
        assert alphas[i + 1] > alphas[i], (i, alphas)
    assert alphas[-1] > 5.0 * MSTEP_CFG.alpha_init
    # The grown multiplier pulls the KL back towards the budget.
    final_kl = _kl_np(mean_old, tril_old, mean, tril_old).mean()
    assert final_kl < 0.2 * max(kls), (final_kl, max(kls))


def test_mstep_cov_multiplier_shrinks_while_kl_below_eps(mstep_run):
    _, _, _, history, _, _ = mstep_run
    eps = MSTEP_CFG.kl_cov_eps
    alphas = [MSTEP_CFG.alpha_init] + [h["alpha_cov"] for h in history]
    assert all(h["kl_cov"] < eps for h in history)
    # Every gradient alpha (eps - KL) is positive: log alpha falls at every call.
    assert all(b < a for a, b in zip(alphas[:-1], alphas[1:], strict=True)), alphas
    assert alphas[-1] < 0.5 * MSTEP_CFG.alpha_init


def test_mstep_multipliers_stay_inside_bounds():
    # Mean budget never binding (alpha_mean falls), cov budget binding (alpha_cov rises).
    cfg = MSTEP_CFG.replace(kl_mean_eps=10.0, kl_cov_eps=1e-3, alpha_bounds=(0.5, 2.0))
    *_, history, _, _ = _run_mstep(cfg, NUM_CALLS)
    lo, hi = np.log(0.5), np.log(2.0)
    for h in history:
        for name in ("log_alpha_mean", "log_alpha_cov"):
            # Clipped in float32 log space: within 1e-6 of the bounds.
            assert lo - 1e-6 <= h[name] <= hi + 1e-6, (name, h)
    # Both bounds are reached, so the clipping was exercised.
    np.testing.assert_allclose(history[-1]["alpha_mean"], 0.5, rtol=1e-5)
    np.testing.assert_allclose(history[-1]["alpha_cov"], 2.0, rtol=1e-5)


def test_mstep_large_multipliers_keep_the_policy_close():
    """The KL penalty acts: with huge multipliers the policy barely moves."""
    cfg = MSTEP_CFG
    results = {}
    for alpha in (1e-6, 1e4):
        log_alpha = jnp.log(jnp.float32(alpha))
        opt_state = ms.alpha_optimizer(cfg).init(
            {"log_alpha_mean": log_alpha, "log_alpha_cov": log_alpha}
        )
        duals = MStepDuals(log_alpha, log_alpha, opt_state)
        *_, (mean, tril), (_, _, mean_old, tril_old) = _run_mstep(cfg, 2, duals=duals)
        results[alpha] = (
            _kl_np(mean_old, tril_old, mean, tril_old).mean(),
            _kl_np(mean_old, tril_old, mean_old, tril).mean(),
        )
    assert results[1e4][0] < 0.1 * results[1e-6][0], results
    assert results[1e4][1] < 0.1 * results[1e-6][1], results


def test_mstep_scan_equals_repeated_single_steps():
    cfg = MSTEP_CFG
    one = _run_mstep(cfg, 1)
    many = _run_mstep(cfg.replace(mstep_steps=1), cfg.mstep_steps)
    # Same float32 operations in a scan or in separate calls: equal up to rounding.
    chex.assert_trees_all_close(one[0], many[0], rtol=1e-4, atol=1e-6)
    chex.assert_trees_all_close(one[2], many[2], rtol=1e-4, atol=1e-6)
    chex.assert_trees_all_close(one[1], many[1], rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------------------
# Shapes, jitted and not, and bad inputs.
# ---------------------------------------------------------------------------


class ShapeTest(chex.TestCase):
    """Every public function, run both jitted and un-jitted (chex variants)."""

    b, k, o, a = 3, 4, 5, 2

    def _data(self):
        rng = np.random.default_rng(0)
        mean, tril, mean_old, tril_old = [
            x.astype(np.float32) for x in _gaussians(1, self.b, self.a)
        ]
        actions = rng.normal(size=(self.b, self.k, self.a)).astype(np.float32)
        weights = _softmax_rows(rng.normal(size=(self.b, self.k))).astype(np.float32)
        obs = rng.normal(size=(self.b, self.o)).astype(np.float32)
        return obs, actions, weights, mean, tril, mean_old, tril_old

    @chex.variants(with_jit=True, without_jit=True)
    def test_kl_and_likelihood_shapes(self):
        _, actions, weights, mean, tril, mean_old, tril_old = self._data()
        kl = self.variant(ms.gaussian_kl)(mean, tril, mean_old, tril_old)
        chex.assert_shape(kl, (self.b,))
        chex.assert_tree_all_finite(kl)
        kl_mean, kl_cov = self.variant(ms.decoupled_kl)(mean, tril, mean_old, tril_old)
        chex.assert_shape([kl_mean, kl_cov], (self.b,))
        ll = self.variant(ms.decoupled_log_likelihood)(
            actions, weights, mean, tril, mean_old, tril_old
        )
        chex.assert_shape(list(ll), ())
        ref = _weighted_ll_np(actions, weights, mean, tril_old)
        np.testing.assert_allclose(ll[0], ref, rtol=1e-5)  # float32.

    @chex.variants(with_jit=True, without_jit=True)
    def test_mstep_loss_and_mstep_shapes(self):
        # The M-step problem of the optimisation tests (shares their compilations).
        cfg = MSTEP_CFG
        nets, params, obs, actions, weights, mean_old, tril_old = _problem(cfg)
        duals = ms.init_mstep_duals(cfg)
        log_alphas = {"log_alpha_mean": duals.log_alpha_mean, "log_alpha_cov": duals.log_alpha_cov}

        loss, aux = self.variant(ms.mstep_loss, static_argnums=(2, 8))(
            params, log_alphas, nets, obs, actions, weights, mean_old, tril_old, cfg
        )
        chex.assert_shape(loss, ())
        chex.assert_shape(list(aux.values()), ())
        # At pi = pi_old both KLs vanish (float32).
        np.testing.assert_allclose([aux["kl_mean"], aux["kl_cov"]], 0.0, atol=1e-6)

        opt_state = ms.policy_optimizer(cfg).init(params)
        new_params, new_opt, new_duals, aux = self.variant(ms.mstep, static_argnums=(3, 9))(
            params, opt_state, duals, nets, obs, actions, weights, mean_old, tril_old, cfg
        )
        chex.assert_trees_all_equal_shapes_and_dtypes(new_params, params)
        chex.assert_trees_all_equal_shapes_and_dtypes(new_opt, opt_state)
        chex.assert_trees_all_equal_shapes_and_dtypes(new_duals, duals)
        chex.assert_shape(list(aux.values()), ())
        chex.assert_tree_all_finite((new_params, new_duals, aux))
        # The parameters moved.
        assert not np.allclose(
            new_params["params"]["mean"]["bias"], params["params"]["mean"]["bias"]
        )

    @chex.variants(with_jit=True, without_jit=True)
    def test_wrong_ranks_raise(self):
        obs, actions, weights, mean, tril, mean_old, tril_old = self._data()
        with self.assertRaises(AssertionError):
            self.variant(ms.gaussian_kl)(mean[0], tril, mean_old, tril_old)
        with self.assertRaises(AssertionError):
            self.variant(ms.gaussian_kl)(mean, tril[:, 0], mean_old, tril_old)
        with self.assertRaises(AssertionError):
            self.variant(ms.decoupled_kl)(mean, tril, mean_old[None], tril_old)
        ll = self.variant(ms.decoupled_log_likelihood)
        with self.assertRaises(AssertionError):  # actions [B, A]
            ll(actions[:, 0], weights, mean, tril, mean_old, tril_old)
        with self.assertRaises(AssertionError):  # weights [B, K, 1]
            ll(actions, weights[..., None], mean, tril, mean_old, tril_old)
        with self.assertRaises(AssertionError):  # weights [B, K - 1]
            ll(actions, weights[:, 1:], mean, tril, mean_old, tril_old)
        with self.assertRaises(AssertionError):  # mean_old [B - 1, A]
            ll(actions, weights, mean, tril, mean_old[1:], tril_old)
        with self.assertRaises(AssertionError):  # tril_old [B, A, A + 1]
            ll(actions, weights, mean, tril, mean_old, np.pad(tril_old, ((0, 0), (0, 0), (0, 1))))

        cfg = MSTEP_CFG
        nets, params, obs, actions, weights, mean_old, tril_old = _problem(cfg)
        opt_state = ms.policy_optimizer(cfg).init(params)
        duals = ms.init_mstep_duals(cfg)
        step = self.variant(
            lambda o, ac, w: ms.mstep(
                params, opt_state, duals, nets, o, ac, w, mean_old, tril_old, cfg
            )
        )
        with self.assertRaises(AssertionError):  # obs [O]
            step(obs[0], actions, weights)
        with self.assertRaises(AssertionError):  # actions [B*K, A]
            step(obs, actions.reshape(-1, A), weights)
        with self.assertRaises(AssertionError):  # weights [B*K]
            step(obs, actions, weights.reshape(-1))


def test_init_mstep_duals():
    cfg = CVPOConfig(alpha_init=3.0)
    duals = ms.init_mstep_duals(cfg)
    np.testing.assert_allclose(np.exp(duals.log_alpha_mean), 3.0, rtol=1e-6)
    np.testing.assert_allclose(np.exp(duals.log_alpha_cov), 3.0, rtol=1e-6)
    chex.assert_shape([duals.log_alpha_mean, duals.log_alpha_cov], ())


def test_decoupled_log_likelihood_rejects_policy_batch_mismatch():
    actions, weights, mean, tril, mean_old, tril_old = [
        x.astype(np.float32) for x in _ll_problem(60, b=4)
    ]
    with pytest.raises(AssertionError):
        ms.decoupled_log_likelihood(
            actions, weights, mean[:1], tril[:1], mean_old[:1], tril_old[:1]
        )
