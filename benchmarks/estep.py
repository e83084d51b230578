"""The E-step's dual solve: the in-jit optax solver against SciPy's SLSQP.

On the same Q tables (feasible problems whose constraints bind: reward and cost
correlated, threshold slightly below the mean of Q_c), for batch sizes B and 1-3
constraints M (K = 32 samples per state):

- `jax_warm`: `estep.solve_dual` with the default 20 Adam steps, warm-started from the
  solution (duals and optimiser state) of another batch from the same distribution,
  as in training where each update starts from the previous one's duals;
- `jax_cold`: the same solver from the initial duals with enough steps to converge;
- `slsqp`: the original implementation's method, `scipy.optimize.minimize(
  method="SLSQP")` on (eta, lambda) with bounds [(1e-6, 1e5)] + [(0, 1e5)] * M, SciPy's
  default tolerances and finite-difference gradients, from (1, ..., 1), in float64;
- `slsqp_warm`: the same from the previous batch's SLSQP solution;
- `slsqp_jac`: SLSQP given the analytic gradient (what a careful port would do).

Each solution is scored with one float64 NumPy objective written from the formula,
    g = eta eps + lambda . thr + eta mean_b(logsumexp_k((Q_r - lambda . Q_c) / eta) - log K),
against a tightly converged reference optimum g*. Also many problems at once:
`jax.vmap` of the solver over P problems against a Python loop of P SLSQP solves.

    python -m benchmarks.estep [--quick] [--repeats N] [--out PATH]
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
from scipy.optimize import minimize
from scipy.special import logsumexp, softmax

from benchmarks import common
from cvpo_jax import estep as estep_lib
from cvpo_jax.config import CVPOConfig

NAME = "estep"
EPS = CVPOConfig().estep_kl_eps


# ---------------------------------------------------------------- problems
def binding_problem(seed: int, b: int, k: int, m: int):
    """Float32 tables q_r [B, K], q_c [B, K, M] and threshold [M]; every constraint binds.

    Reward and cost are correlated (the safer actions pay less) and the threshold sits
    slightly below the mean of Q_c, so the problem is feasible within the KL budget.
    """
    rng = np.random.default_rng(seed)
    q_r = rng.normal(size=(b, k)) * 2.0 + 5.0
    q_c = rng.uniform(0, 2, size=(b, k, m)) + 0.5 * (q_r[..., None] - 5.0) + 3.0
    thr = q_c.mean(axis=(0, 1)) - 0.15 * q_c.std(axis=(0, 1))
    return q_r.astype(np.float32), q_c.astype(np.float32), thr.astype(np.float32)


# ---------------------------------------------------------------- the float64 reference
def np_dual(x: np.ndarray, q_r: np.ndarray, q_c: np.ndarray, eps: float, thr: np.ndarray):
    """g(eta = x[0], lambda = x[1:]) in float64, from the formula."""
    eta, lam = x[0], x[1:]
    adv = q_r - np.einsum("bkm,m->bk", q_c, lam)
    lme = logsumexp(adv / eta, axis=1) - np.log(q_r.shape[1])
    return eta * eps + lam @ thr + eta * np.mean(lme)


def np_dual_grad(x: np.ndarray, q_r: np.ndarray, q_c: np.ndarray, eps: float, thr: np.ndarray):
    """(dg/deta, dg/dlambda): eps - KL(w || uniform) and thr - E_w[Q_c]."""
    eta, lam = x[0], x[1:]
    adv = q_r - np.einsum("bkm,m->bk", q_c, lam)
    z = adv / eta
    w = softmax(z, axis=1)
    lme = logsumexp(z, axis=1) - np.log(q_r.shape[1])
    d_eta = eps + np.mean(lme) - np.mean(np.sum(w * z, axis=1))
    d_lam = thr - np.mean(np.einsum("bk,bkm->bm", w, q_c), axis=0)
    return np.concatenate([[d_eta], d_lam])


def bounds(m: int):
    return [(1e-6, 1e5)] + [(0.0, 1e5)] * m


def slsqp(q_r, q_c, thr, x0, jac: bool = False):
    """SciPy SLSQP with default tolerances; returns (x, nfev, nit, success)."""
    fun = lambda x: np_dual(x, q_r, q_c, EPS, thr)  # noqa: E731
    grad = (lambda x: np_dual_grad(x, q_r, q_c, EPS, thr)) if jac else None  # noqa: E731
    res = minimize(fun, x0, jac=grad, method="SLSQP", bounds=bounds(len(thr)))
    return res.x, int(res.nfev), int(res.nit), bool(res.success)


def reference_optimum(q_r, q_c, thr) -> tuple[np.ndarray, float]:
    """A tightly converged optimum: SLSQP (tight tolerances) then L-BFGS-B polish."""
    fun = lambda x: np_dual(x, q_r, q_c, EPS, thr)  # noqa: E731
    jac = lambda x: np_dual_grad(x, q_r, q_c, EPS, thr)  # noqa: E731
    m = len(thr)
    res = minimize(
        fun,
        np.ones(1 + m),
        jac=jac,
        method="SLSQP",
        bounds=bounds(m),
        options=dict(ftol=1e-15, maxiter=2000),
    )
    res2 = minimize(
        fun,
        res.x,
        jac=jac,
        method="L-BFGS-B",
        bounds=bounds(m),
        options=dict(ftol=1e-16, gtol=1e-12, maxiter=5000),
    )
    return (res2.x, float(res2.fun)) if res2.fun <= res.fun else (res.x, float(res.fun))


def duals_to_x(duals) -> np.ndarray:
    return np.concatenate(
        [[float(jnp.exp(duals.log_eta))], np.exp(np.asarray(duals.log_lambda, np.float64))]
    ).astype(np.float64)


# ---------------------------------------------------------------- one problem size
def run_case(b, k, m, warm_steps, cold_steps, reps, seed):
    q_r, q_c, thr = binding_problem(seed, b, k, m)
    p_r, p_c, p_thr = binding_problem(seed + 1000, b, k, m)  # "The previous batch".
    f64 = lambda *xs: [x.astype(np.float64) for x in xs]  # noqa: E731
    q_r64, q_c64, thr64 = f64(q_r, q_c, thr)
    p_r64, p_c64, p_thr64 = f64(p_r, p_c, p_thr)

    cfg_warm = CVPOConfig(cost_limit=(1.0,) * m, dual_steps=warm_steps)
    cfg_cold = cfg_warm.replace(dual_steps=cold_steps)
    solve = jax.jit(estep_lib.solve_dual, static_argnums=4)
    args = (jnp.asarray(q_r), jnp.asarray(q_c), jnp.asarray(thr))
    init = estep_lib.init_estep_duals(cfg_warm)
    warm_start, _ = solve(init, jnp.asarray(p_r), jnp.asarray(p_c), jnp.asarray(p_thr), cfg_cold)
    x_prev_slsqp, *_ = slsqp(p_r64, p_c64, p_thr64, np.ones(1 + m))

    solutions = {}

    def jax_call(duals, cfg, key):
        def call():
            out, _ = solve(duals, *args, cfg)
            common.block(out)
            solutions[key] = out

        return call

    def scipy_call(x0, jac, key):
        def call():
            solutions[key] = slsqp(q_r64, q_c64, thr64, x0, jac=jac)

        return call

    calls = {
        "jax_warm": jax_call(warm_start, cfg_warm, "jax_warm"),
        "jax_cold": jax_call(init, cfg_cold, "jax_cold"),
        "slsqp": scipy_call(np.ones(1 + m), False, "slsqp"),
        "slsqp_warm": scipy_call(x_prev_slsqp, False, "slsqp_warm"),
        "slsqp_jac": scipy_call(np.ones(1 + m), True, "slsqp_jac"),
    }
    times = common.measure_interleaved(calls, warmup=1, repeats=reps)
    stats = {n: common.summarize(t) for n, t in times.items()}

    x_star, g_star = reference_optimum(q_r64, q_c64, thr64)
    xs = {
        "jax_warm": duals_to_x(solutions["jax_warm"]),
        "jax_cold": duals_to_x(solutions["jax_cold"]),
        "slsqp": solutions["slsqp"][0],
        "slsqp_warm": solutions["slsqp_warm"][0],
        "slsqp_jac": solutions["slsqp_jac"][0],
    }
    g = {n: float(np_dual(x, q_r64, q_c64, EPS, thr64)) for n, x in xs.items()}
    t_slsqp = stats["slsqp"]["median_s"]
    solvers = {}
    for n in calls:
        solvers[n] = {
            "time": stats[n],
            "speedup_vs_slsqp": t_slsqp / stats[n]["median_s"],
            "objective": g[n],
            "rel_gap_vs_slsqp": (g[n] - g["slsqp"]) / abs(g["slsqp"]),
            "rel_gap_vs_optimum": (g[n] - g_star) / abs(g_star),
            "eta": float(xs[n][0]),
            "lambda": xs[n][1:].tolist(),
        }
        if n.startswith("slsqp"):
            _, nfev, nit, ok = solutions[n]
            solvers[n].update({"nfev": nfev, "nit": nit, "success": ok})
    return {
        "batch": b,
        "num_samples": k,
        "num_constraints": m,
        "optimum": {"objective": g_star, "eta": float(x_star[0]), "lambda": x_star[1:].tolist()},
        "solvers": solvers,
    }


# ---------------------------------------------------------------- many problems at once
def run_vmap(p, b, k, m, warm_steps, cold_steps, reps):
    problems = [binding_problem(10_000 + i, b, k, m) for i in range(p)]
    previous = [binding_problem(20_000 + i, b, k, m) for i in range(p)]
    stack = lambda ps, j: jnp.asarray(np.stack([x[j] for x in ps]))  # noqa: E731
    q_r, q_c, thr = (stack(problems, j) for j in range(3))
    p_r, p_c, p_thr = (stack(previous, j) for j in range(3))
    cfg_warm = CVPOConfig(cost_limit=(1.0,) * m, dual_steps=warm_steps)
    cfg_cold = cfg_warm.replace(dual_steps=cold_steps)

    def vsolve(cfg):
        return jax.jit(jax.vmap(lambda d, a, c, t: estep_lib.solve_dual(d, a, c, t, cfg)[0]))

    init = jax.vmap(lambda _: estep_lib.init_estep_duals(cfg_warm))(jnp.arange(p))
    solve_warm, solve_cold = vsolve(cfg_warm), vsolve(cfg_cold)
    warm_start = common.block(solve_cold(init, p_r, p_c, p_thr))
    f64 = [[x.astype(np.float64) for x in prob] for prob in problems]
    prev64 = [[x.astype(np.float64) for x in prob] for prob in previous]
    x_prev = [slsqp(*prob, np.ones(1 + m))[0] for prob in prev64]

    out = {}

    def run_jax(solver, duals, key):
        def call():
            out[key] = common.block(solver(duals, q_r, q_c, thr))

        return call

    def run_scipy(warm, key):
        def call():
            out[key] = [
                slsqp(*prob, x_prev[i] if warm else np.ones(1 + m))[0] for i, prob in enumerate(f64)
            ]

        return call

    calls = {
        "jax_vmap_warm": run_jax(solve_warm, warm_start, "jax_vmap_warm"),
        "jax_vmap_cold": run_jax(solve_cold, init, "jax_vmap_cold"),
        "slsqp_loop": run_scipy(False, "slsqp_loop"),
        "slsqp_loop_warm": run_scipy(True, "slsqp_loop_warm"),
    }
    times = common.measure_interleaved(calls, warmup=1, repeats=reps)
    stats = {n: common.summarize(t) for n, t in times.items()}

    def objectives(key):
        res = out[key]
        if key.startswith("jax"):
            xs = [
                np.concatenate(
                    [
                        [np.exp(float(res.log_eta[i]))],
                        np.exp(np.asarray(res.log_lambda[i], np.float64)),
                    ]
                )
                for i in range(p)
            ]
        else:
            xs = res
        return np.array([np_dual(x, *f64[i][:2], EPS, f64[i][2]) for i, x in enumerate(xs)])

    g = {n: objectives(n) for n in calls}
    g_star = np.array([reference_optimum(*prob)[1] for prob in f64])
    t_loop = stats["slsqp_loop"]["median_s"]
    solvers = {}
    for n in calls:
        gap_ref = (g[n] - g["slsqp_loop"]) / np.abs(g["slsqp_loop"])
        gap_opt = (g[n] - g_star) / np.abs(g_star)
        solvers[n] = {
            "time": stats[n],
            "time_per_problem_s": stats[n]["median_s"] / p,
            "speedup_vs_slsqp_loop": t_loop / stats[n]["median_s"],
            "rel_gap_vs_slsqp": {
                "median": float(np.median(gap_ref)),
                "max": float(np.max(gap_ref)),
                "min": float(np.min(gap_ref)),
            },
            "rel_gap_vs_optimum": {
                "median": float(np.median(gap_opt)),
                "max": float(np.max(gap_opt)),
            },
        }
    return {"problems": p, "batch": b, "num_samples": k, "num_constraints": m, "solvers": solvers}


def main(argv: list[str] | None = None) -> dict:
    parser = common.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--cold-steps", type=int, default=None, help="steps of the cold solve")
    args = parser.parse_args(argv)
    if args.quick:
        batches, constraints, k, p, vmap_b = (64,), (1,), 8, 4, 32
        warm_steps, cold_steps, reps, vmap_reps = 20, 50, 1, 1
    else:
        batches, constraints, k, p, vmap_b = (256, 1024, 4096), (1, 2, 3), 32, 64, 256
        warm_steps, cold_steps, reps, vmap_reps = 20, 300, 7, 3
    cold_steps = args.cold_steps or cold_steps
    if args.repeats is not None:
        reps = vmap_reps = args.repeats
    machine = common.machine_info()
    print(
        f"{machine['cpu_model']}, {machine['usable_cores']} cores, load "
        f"{machine['load_average_1_5_15']}, jax {machine['versions']['jax']} on "
        f"{machine['jax_backend']}",
        flush=True,
    )
    ref_n = 256 if args.quick else 2048
    ref_start = common.matmul_reference(ref_n, warmup=1, repeats=1 if args.quick else 5)

    cases = []
    for b in batches:
        for m in constraints:
            t0 = time.perf_counter()
            cases.append(run_case(b, k, m, warm_steps, cold_steps, reps, seed=b + m))
            print(f"  B={b} M={m}: {time.perf_counter() - t0:.1f} s", flush=True)
    vmap_results = [
        run_vmap(p, vmap_b, k, m, warm_steps, cold_steps, vmap_reps)
        for m in ((1,) if args.quick else (1, 2))
    ]
    ref_end = common.matmul_reference(ref_n, warmup=1, repeats=1 if args.quick else 5)
    ref = common.pool_references(ref_start, ref_end)

    texts = []
    rows = []
    for c in cases:
        s = c["solvers"]
        rows.append(
            [
                c["batch"],
                c["num_constraints"],
                s["slsqp"]["time"]["median_s"] * 1e3,
                s["slsqp"]["nfev"],
                s["jax_warm"]["time"]["median_s"] * 1e3,
                s["jax_warm"]["speedup_vs_slsqp"],
                s["jax_warm"]["rel_gap_vs_slsqp"],
                s["jax_cold"]["time"]["median_s"] * 1e3,
                s["jax_cold"]["speedup_vs_slsqp"],
                s["jax_cold"]["rel_gap_vs_slsqp"],
                s["slsqp"]["rel_gap_vs_optimum"],
            ]
        )
    texts.append(
        common.print_table(
            f"Dual solve, K={k}: JAX ({warm_steps} warm / {cold_steps} cold Adam steps, float32) "
            "vs SciPy SLSQP (float64, finite differences). gap = (g - g_slsqp) / |g_slsqp|",
            [
                "B",
                "M",
                "slsqp ms",
                "nfev",
                "warm ms",
                "warm speedup",
                "warm gap",
                "cold ms",
                "cold speedup",
                "cold gap",
                "slsqp gap to g*",
            ],
            rows,
        )
    )
    rows = []
    for c in cases:
        s = c["solvers"]
        rows.append(
            [
                c["batch"],
                c["num_constraints"],
                s["slsqp_warm"]["time"]["median_s"] * 1e3,
                s["slsqp_warm"]["rel_gap_vs_optimum"],
                s["slsqp_jac"]["time"]["median_s"] * 1e3,
                s["slsqp_jac"]["rel_gap_vs_optimum"],
                s["jax_warm"]["rel_gap_vs_optimum"],
                s["jax_cold"]["rel_gap_vs_optimum"],
            ]
        )
    texts.append(
        common.print_table(
            "Other SLSQP variants and every solver's gap to the converged optimum g*",
            [
                "B",
                "M",
                "slsqp warm ms",
                "slsqp warm gap*",
                "slsqp+jac ms",
                "slsqp+jac gap*",
                "jax warm gap*",
                "jax cold gap*",
            ],
            rows,
        )
    )
    rows = []
    for v in vmap_results:
        for n, s in v["solvers"].items():
            rows.append(
                [
                    v["num_constraints"],
                    n,
                    s["time"]["median_s"] * 1e3,
                    s["time_per_problem_s"] * 1e3,
                    s["speedup_vs_slsqp_loop"],
                    s["rel_gap_vs_slsqp"]["median"],
                    s["rel_gap_vs_slsqp"]["max"],
                ]
            )
    texts.append(
        common.print_table(
            f"P={p} problems at once (B={vmap_b}, K={k}): jax.vmap vs a Python loop of SLSQP",
            ["M", "solver", "total ms", "ms/problem", "speedup", "median gap", "max gap"],
            rows,
        )
    )
    payload = {
        "benchmark": NAME,
        "quick": args.quick,
        "machine": machine,
        "load_average_end": common.load_average(),
        "matmul_reference": ref,
        "settings": {
            "eps": EPS,
            "num_samples": k,
            "batches": list(batches),
            "constraints": list(constraints),
            "warm_steps": warm_steps,
            "cold_steps": cold_steps,
            "dual_lr": CVPOConfig().dual_lr,
            "repeats": reps,
            "vmap_problems": p,
            "vmap_batch": vmap_b,
            "vmap_repeats": vmap_reps,
            "jax_dtype": "float32",
            "scipy_dtype": "float64",
        },
        "cases": cases,
        "vmap": vmap_results,
        "tables": "\n".join(texts),
    }
    path = common.write_json(common.output_path(NAME, args.out, args.quick), payload)
    print(f"\nwrote {path}")
    return payload


if __name__ == "__main__":
    main()
