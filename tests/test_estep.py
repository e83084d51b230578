"""The E-step: dual objective, in-jit solver against SciPy, weights, numerics, vmap."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.optimize import minimize
from scipy.special import logsumexp, softmax

from cvpo_jax import estep as E
from cvpo_jax.config import CVPOConfig

EPS = 0.1


# ---------------------------------------------------------------- independent references
def np_dual(eta, lam, q_r, q_c, eps, thr):
    """g(eta, lambda) in float64 numpy, written from the paper's formula."""
    k = q_r.shape[1]
    adv = q_r - np.einsum("bkm,m->bk", q_c, lam)
    return eta * eps + lam @ thr + eta * np.mean(logsumexp(adv / eta, axis=1) - np.log(k))


def scipy_dual(q_r, q_c, eps, thr):
    """The original implementation's method: SLSQP on (eta, lambda) with box bounds,
    polished by L-BFGS-B, in float64."""
    m = q_c.shape[-1]
    bounds = [(1e-6, 1e5)] + [(0.0, 1e5)] * m
    fun = lambda x: np_dual(x[0], x[1:], q_r, q_c, eps, thr)  # noqa: E731
    res = minimize(
        fun, np.ones(1 + m), method="SLSQP", bounds=bounds, options=dict(ftol=1e-15, maxiter=2000)
    )
    res = minimize(
        fun,
        res.x,
        method="L-BFGS-B",
        bounds=bounds,
        options=dict(ftol=1e-16, gtol=1e-12, maxiter=5000),
    )
    return res.x[0], res.x[1:], res.fun


def np_weights(q_r, q_c, eta, lam):
    return softmax((q_r - np.einsum("bkm,m->bk", q_c, lam)) / eta, axis=1)


def _solve(q_r, q_c, thr, steps=1000, lr=0.05):
    """Cold-start solve in float64 with the library's solver."""
    m = q_c.shape[-1]
    cfg = CVPOConfig(cost_limit=(1.0,) * m, dual_steps=steps, dual_lr=lr, estep_kl_eps=EPS)
    duals = E.init_estep_duals(cfg, dtype=jnp.float64)
    duals, info = jax.jit(E.solve_dual, static_argnums=4)(
        duals, jnp.asarray(q_r), jnp.asarray(q_c), jnp.asarray(thr), cfg
    )
    return float(jnp.exp(duals.log_eta)), np.exp(np.asarray(duals.log_lambda)), info


@pytest.fixture
def x64():
    with jax.enable_x64(True):
        yield


def binding_problem(seed, m, b=128, k=32):
    """Reward and cost correlated (the safe actions pay less), threshold set so every
    constraint binds but is feasible within the KL budget."""
    rng = np.random.default_rng(seed)
    q_r = rng.normal(size=(b, k)) * 2.0 + 5.0
    q_c = rng.uniform(0, 2, size=(b, k, m)) + 0.5 * (q_r[..., None] - 5.0) + 3.0
    thr = q_c.mean(axis=(0, 1)) - 0.15 * q_c.std(axis=(0, 1))
    return q_r, q_c, thr


def slack_problem(seed, m, b=128, k=32):
    rng = np.random.default_rng(seed)
    q_r = rng.normal(size=(b, k)) * 3.0 + 10.0
    q_c = rng.uniform(0, 1, size=(b, k, m))
    return q_r, q_c, np.full(m, 5.0)


# ---------------------------------------------------------------- the objective
def test_dual_objective_matches_numpy(x64):
    q_r, q_c, thr = binding_problem(0, 2)
    for eta, lam in [(0.3, [0.0, 0.0]), (1.0, [0.5, 2.0]), (50.0, [3.0, 0.1])]:
        ours = E.dual_objective(
            jnp.log(eta),
            jnp.log(jnp.asarray(lam) + 1e-300),
            jnp.asarray(q_r),
            jnp.asarray(q_c),
            EPS,
            jnp.asarray(thr),
        )
        np.testing.assert_allclose(
            float(ours), np_dual(eta, np.asarray(lam), q_r, q_c, EPS, thr), rtol=1e-12
        )


def test_dual_gradient_is_eps_minus_kl_and_threshold_minus_weighted_qc(x64):
    """dg/deta = eps - KL(w || uniform) and dg/dlambda_m = thr_m - E_w[Q_c,m]: the
    analytic gradient, so at an interior optimum KL = eps and E_w[Q_c] = thr."""
    q_r, q_c, thr = binding_problem(1, 2)
    eta, lam = 0.7, np.array([0.4, 1.3])
    g_log_eta, g_log_lam = jax.grad(E.dual_objective, argnums=(0, 1))(
        jnp.log(eta), jnp.log(lam), jnp.asarray(q_r), jnp.asarray(q_c), EPS, jnp.asarray(thr)
    )
    w = np_weights(q_r, q_c, eta, lam)
    kl = np.mean(np.sum(w * np.log(w * q_r.shape[1]), axis=1))
    wqc = np.mean(np.einsum("bk,bkm->bm", w, q_c), axis=0)
    # Chain rule through the log parameterisation: dg/dlog x = x dg/dx.
    np.testing.assert_allclose(float(g_log_eta), eta * (EPS - kl), rtol=1e-9)
    np.testing.assert_allclose(np.asarray(g_log_lam), lam * (thr - wqc), rtol=1e-9)


# ---------------------------------------------------------------- the solver against SciPy
@pytest.mark.parametrize("m", [1, 2, 3])
@pytest.mark.parametrize("seed", [0, 1])
def test_solver_matches_scipy_when_constraints_bind(x64, m, seed):
    q_r, q_c, thr = binding_problem(seed, m)
    eta_ref, lam_ref, g_ref = scipy_dual(q_r, q_c, EPS, thr)
    assert 1e-3 < eta_ref < 1e4 and np.all(lam_ref > 1e-2), "test problem must be interior"
    eta, lam, info = _solve(q_r, q_c, thr)
    # Tolerances: the objective to 1e-6 relative; the variables to 1% (the dual is
    # flat along some directions, so the objective is the sharper measure).
    np.testing.assert_allclose(float(info["dual_objective"]), g_ref, rtol=1e-6)
    np.testing.assert_allclose(eta, eta_ref, rtol=1e-2)
    np.testing.assert_allclose(lam, lam_ref, rtol=1e-2)
    # The binding constraints are met by the weighted Q_c, and the KL bound holds.
    w = np.asarray(E.estep_weights(jnp.asarray(q_r), jnp.asarray(q_c), eta, jnp.asarray(lam)))
    wqc = np.mean(np.einsum("bk,bkm->bm", w, q_c), axis=0)
    np.testing.assert_allclose(wqc, thr, rtol=1e-3)
    kl = np.mean(np.sum(w * np.log(w * q_r.shape[1]), axis=1))
    assert kl <= EPS + 1e-3


@pytest.mark.parametrize("m", [1, 3])
def test_slack_constraint_drives_lambda_to_zero(x64, m):
    q_r, q_c, thr = slack_problem(3, m)
    eta_ref, lam_ref, g_ref = scipy_dual(q_r, q_c, EPS, thr)
    assert np.all(lam_ref < 1e-8)
    eta, lam, info = _solve(q_r, q_c, thr)
    assert np.all(lam < 1e-4), lam
    np.testing.assert_allclose(float(info["dual_objective"]), g_ref, rtol=1e-6)
    np.testing.assert_allclose(eta, eta_ref, rtol=1e-2)
    w = np_weights(q_r, q_c, eta, lam)
    kl = np.mean(np.sum(w * np.log(w * q_r.shape[1]), axis=1))
    np.testing.assert_allclose(kl, EPS, atol=2e-3)


@pytest.mark.parametrize(
    "name",
    ["scale_1e4", "one_state_dominates", "heavy_tails", "mixed_binding_and_slack"],
)
def test_solver_matches_scipy_on_adversarial_tables(x64, name):
    rng = np.random.default_rng(7)
    b, k = 64, 32
    if name == "scale_1e4":
        q_r = rng.normal(size=(b, k)) * 300 + 1e4
        q_c = rng.uniform(0, 500, size=(b, k, 1)) + 0.3 * (q_r[..., None] - 1e4)
        thr = np.array([q_c.mean() - 0.1 * q_c.std()])
    elif name == "one_state_dominates":
        q_r = rng.normal(size=(b, k))
        q_r[0] *= 1000.0
        q_c = rng.uniform(0, 1, size=(b, k, 1)) + 0.2 * q_r[..., None] / np.abs(q_r).max()
        thr = np.array([q_c.mean() - 0.05 * q_c.std()])
    elif name == "heavy_tails":
        q_r = rng.standard_cauchy(size=(b, k))
        q_c = rng.exponential(size=(b, k, 1))
        thr = np.array([0.9])
    else:
        q_r = rng.normal(size=(b, k)) * 2
        q_c = np.stack([rng.uniform(0, 1, (b, k)) + 0.3 * q_r, rng.uniform(0, 1, (b, k))], -1)
        thr = np.array([q_c[..., 0].mean() - 0.1 * q_c[..., 0].std(), 10.0])
    eta_ref, lam_ref, g_ref = scipy_dual(q_r, q_c, EPS, thr)
    eta, lam, info = _solve(q_r, q_c, thr, steps=3000)
    np.testing.assert_allclose(float(info["dual_objective"]), g_ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(lam, lam_ref, rtol=2e-2, atol=1e-4)


# ---------------------------------------------------------------- the weights
def test_weights_are_an_independent_softmax_and_subtract_lambda_qc_once():
    rng = np.random.default_rng(0)
    q_r = rng.normal(size=(16, 8)).astype(np.float32)
    q_c = rng.uniform(0, 3, size=(16, 8, 2)).astype(np.float32)
    eta, lam = 0.8, np.array([0.7, 1.9], np.float32)
    w = np.asarray(E.estep_weights(jnp.asarray(q_r), jnp.asarray(q_c), eta, jnp.asarray(lam)))
    expected = np_weights(q_r.astype(np.float64), q_c.astype(np.float64), eta, lam)
    np.testing.assert_allclose(w, expected, rtol=1e-5, atol=1e-7)
    twice = np_weights(q_r, q_c, eta, 2 * lam)  # The known defect: lambda Q_c subtracted twice.
    assert np.max(np.abs(w - twice)) > 1e-2
    np.testing.assert_allclose(w.sum(axis=1), 1.0, rtol=1e-6)


def test_weights_carry_no_gradient():
    q_r = jnp.arange(12.0).reshape(3, 4)
    q_c = jnp.ones((3, 4, 1))
    grad = jax.grad(lambda q: jnp.sum(E.estep_weights(q, q_c, 1.0, jnp.ones(1)) * q))(q_r)
    # Only the explicit factor q contributes; d(weights)/dq is cut.
    expected = E.estep_weights(q_r, q_c, 1.0, jnp.ones(1))
    np.testing.assert_allclose(np.asarray(grad), np.asarray(expected), rtol=1e-6)


# ---------------------------------------------------------------- numerics in float32
@pytest.mark.parametrize("case", ["q_1e4", "all_equal", "huge_cost", "tiny_spread"])
def test_estep_has_no_nan_on_extreme_q(case):
    rng = np.random.default_rng(1)
    b, k = 64, 32
    if case == "q_1e4":
        q_r = rng.normal(size=(b, k)) * 1e4
        q_c = rng.normal(size=(b, k, 1)) * 1e4
    elif case == "all_equal":
        q_r = np.full((b, k), 3.0)
        q_c = np.full((b, k, 1), 3.0)
    elif case == "huge_cost":
        q_r = rng.normal(size=(b, k))
        q_c = 1e4 + rng.normal(size=(b, k, 1))
    else:
        q_r = 1e4 + rng.normal(size=(b, k)) * 1e-3
        q_c = rng.normal(size=(b, k, 1)) * 1e-3
    cfg = CVPOConfig()
    duals = E.init_estep_duals(cfg)
    step = jax.jit(E.estep, static_argnums=4)
    thr = jnp.asarray(cfg.qc_threshold)
    for _ in range(50):  # Many warm-started updates, as in training.
        duals, w, info = step(
            duals, jnp.asarray(q_r, jnp.float32), jnp.asarray(q_c, jnp.float32), thr, cfg
        )
    for leaf in jax.tree.leaves((duals, w, info)):
        assert np.all(np.isfinite(np.asarray(leaf))), case
    eta = float(jnp.exp(duals.log_eta))
    lam = np.exp(np.asarray(duals.log_lambda))
    assert cfg.eta_bounds[0] * 0.999 <= eta <= cfg.eta_bounds[1] * 1.001
    assert np.all((lam >= cfg.lambda_bounds[0] * 0.999) & (lam <= cfg.lambda_bounds[1] * 1.001))
    np.testing.assert_allclose(np.asarray(w).sum(axis=1), 1.0, rtol=1e-5)
    if case == "all_equal":
        np.testing.assert_allclose(np.asarray(w), 1.0 / k, rtol=1e-5)


# ---------------------------------------------------------------- warm start and vmap
def test_warm_start_from_the_solution_stays_there(x64):
    q_r, q_c, thr = binding_problem(4, 1)
    cfg = CVPOConfig(cost_limit=(1.0,), dual_steps=1000, estep_kl_eps=EPS)
    solve = jax.jit(E.solve_dual, static_argnums=4)
    args = (jnp.asarray(q_r), jnp.asarray(q_c), jnp.asarray(thr))
    solved, info = solve(E.init_estep_duals(cfg, jnp.float64), *args, cfg)
    short = cfg.replace(dual_steps=20)
    _, warm = solve(solved, *args, short)
    _, cold = solve(E.init_estep_duals(cfg, jnp.float64), *args, short)
    g_opt = float(info["dual_objective"])
    assert float(warm["dual_objective"]) - g_opt < 1e-6 * abs(g_opt)
    assert float(cold["dual_objective"]) - g_opt > 100 * (float(warm["dual_objective"]) - g_opt)


def test_estep_vmaps_over_independent_problems():
    problems = [binding_problem(s, 2, b=32, k=16) for s in range(4)]
    q_r = jnp.asarray(np.stack([p[0] for p in problems]), jnp.float32)
    q_c = jnp.asarray(np.stack([p[1] for p in problems]), jnp.float32)
    thr = jnp.asarray(np.stack([p[2] for p in problems]), jnp.float32)
    cfg = CVPOConfig(cost_limit=(1.0, 1.0), dual_steps=50)
    duals = jax.vmap(lambda _: E.init_estep_duals(cfg))(jnp.arange(4))
    fn = lambda d, a, b, c: E.estep(d, a, b, c, cfg)  # noqa: E731
    v_duals, v_w, v_info = jax.jit(jax.vmap(fn))(duals, q_r, q_c, thr)
    chex.assert_shape(v_w, (4, 32, 16))
    chex.assert_shape(v_info["lambda"], (4, 2))
    for i in range(4):
        d_i, w_i, info_i = jax.jit(fn)(E.init_estep_duals(cfg), q_r[i], q_c[i], thr[i])
        np.testing.assert_allclose(np.asarray(v_w[i]), np.asarray(w_i), rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(float(v_info["eta"][i]), float(info_i["eta"]), rtol=1e-4)
    # Independent problems get different solutions.
    assert len({round(float(x), 4) for x in v_info["eta"]}) == 4


# ---------------------------------------------------------------- shapes, jitted and not
class EStepShapeTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_shapes(self):
        b, k, m = 8, 5, 3
        cfg = CVPOConfig(cost_limit=(1.0,) * m, dual_steps=3)
        q_r = jnp.zeros((b, k))
        q_c = jnp.ones((b, k, m))
        thr = jnp.ones((m,))
        duals, w, info = self.variant(lambda d: E.estep(d, q_r, q_c, thr, cfg))(
            E.init_estep_duals(cfg)
        )
        chex.assert_shape(w, (b, k))
        chex.assert_shape([duals.log_eta, info["eta"], info["weights_kl"]], ())
        chex.assert_shape([duals.log_lambda, info["lambda"], info["qc_ratio"]], (m,))
        g = self.variant(E.dual_objective, static_argnums=4)(
            duals.log_eta, duals.log_lambda, q_r, q_c, 0.1, thr
        )
        chex.assert_shape(g, ())

    def test_bad_shapes_fail_early(self):
        with self.assertRaises(AssertionError):
            E.estep_weights(jnp.zeros((4, 5)), jnp.zeros((4, 6, 1)), 1.0, jnp.ones(1))
        with self.assertRaises(AssertionError):
            E.dual_objective(
                0.0, jnp.zeros(2), jnp.zeros((4, 5)), jnp.zeros((4, 5, 1)), 0.1, jnp.ones(1)
            )


# ------------------------------------------------------- bounded lambda, feasibility
def test_lambda_change_per_update_is_bounded(x64):
    """With lambda_max_log_step the solve moves log-lambda at most that far, in both
    directions; without it the same problem moves it much further."""
    for q_r, q_c, thr in (binding_problem(0, 1), slack_problem(0, 1)):
        free = CVPOConfig(cost_limit=(1.0,), dual_steps=200, estep_kl_eps=EPS)
        bounded = free.replace(lambda_max_log_step=0.05)
        moved = {}
        for name, cfg in (("free", free), ("bounded", bounded)):
            duals = E.init_estep_duals(cfg, dtype=jnp.float64)
            new, _ = E.solve_dual(duals, jnp.asarray(q_r), jnp.asarray(q_c), jnp.asarray(thr), cfg)
            moved[name] = float(jnp.abs(new.log_lambda - duals.log_lambda)[0])
        assert moved["bounded"] == pytest.approx(0.05, rel=1e-9)
        assert moved["free"] > 0.5


def scipy_min_cost(q_c, eps):
    """min_q mean_s E_q[Q_c] s.t. mean_s KL(q_s || uniform) <= eps, as a generic NLP
    over the per-state weights (softmax of free logits), in float64."""
    b, k = q_c.shape

    def unpack(x):
        return softmax(x.reshape(b, k), axis=1)

    def cost(x):
        return np.mean(np.sum(unpack(x) * q_c, axis=1))

    def kl(x):
        w = unpack(x)
        return np.mean(np.sum(w * (np.log(np.maximum(w, 1e-300)) + np.log(k)), axis=1))

    res = minimize(
        cost,
        np.zeros(b * k),
        method="SLSQP",
        constraints=[{"type": "ineq", "fun": lambda x: eps - kl(x)}],
        options=dict(maxiter=500, ftol=1e-12),
    )
    return res.fun, kl(res.x)


@pytest.mark.parametrize("seed", [0, 1])
def test_min_reachable_cost_matches_a_generic_solver(x64, seed):
    rng = np.random.default_rng(seed)
    q_c = rng.gamma(2.0, 1.0, size=(6, 8))
    ref, ref_kl = scipy_min_cost(q_c, EPS)
    assert ref_kl <= EPS + 1e-6
    got = float(E.min_reachable_cost(jnp.asarray(q_c)[..., None], EPS)[0])
    # The bisection's value is feasible, so it cannot beat the true minimum, and it
    # attains it up to the solver's tolerance.
    assert got >= ref - 1e-6
    assert got <= ref + 1e-3 * (q_c.mean() - ref)


def test_estep_reports_feasibility_and_lambda_at_bounds(x64):
    q_r, q_c, _ = binding_problem(0, 1)
    cfg = CVPOConfig(cost_limit=(1.0,), lambda_bounds=(1e-8, 20.0), estep_kl_eps=EPS)
    duals = E.init_estep_duals(cfg, dtype=jnp.float64)
    impossible = jnp.asarray([q_c.min() - 1.0])  # Below every sampled cost.
    _, _, info = E.estep(duals, jnp.asarray(q_r), jnp.asarray(q_c), impossible, cfg)
    assert float(info["estep_feasible"][0]) == 0.0
    easy = jnp.asarray([q_c.max() + 1.0])
    _, _, info = E.estep(duals, jnp.asarray(q_r), jnp.asarray(q_c), easy, cfg)
    assert float(info["estep_feasible"][0]) == 1.0
    assert float(info["qc_reachable"][0]) < q_c.mean()
    many = cfg.replace(dual_steps=2000)
    new, _, info = E.estep(duals, jnp.asarray(q_r), jnp.asarray(q_c), impossible, many)
    assert float(info["lambda_at_upper"][0]) == 1.0 and float(info["lambda_at_lower"][0]) == 0.0
