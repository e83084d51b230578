"""Speed of one CVPO update: compile time, time per update, FLOPs, and where the time goes.

For each setting (CarGoal1's shapes: obs 72, action 2, one constraint):
- compile time of the jitted update (lowering and XLA compilation, separately);
- median / p90 time per update and updates per second;
- FLOPs of the update by XLA's cost analysis (corrected for loop bodies, which XLA
  counts once) and by hand (matmuls only), the achieved FLOP/s as a fraction of a
  float32 matmul measured in the same run, and the time the update would take at
  that matmul speed;
- the update broken into critic update, E-step (sampling + target critics on the
  B*K pairs, then dual solve + weights) and M-step, each jitted separately with the
  same shapes, timed round-robin with the whole update;
- `update_many` (U updates in one lax.scan) against U separate `update` calls.

    python -m benchmarks.update_step [--quick] [--repeats N] [--out PATH]
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from benchmarks import common
from cvpo_jax import estep as estep_lib
from cvpo_jax import learner as learner_lib
from cvpo_jax import mstep as mstep_lib
from cvpo_jax.config import CVPOConfig
from cvpo_jax.networks import Critic
from cvpo_jax.types import Transition

NAME = "update_step"
OBS_SIZE, ACTION_SIZE, NUM_CONSTRAINTS = 72, 2, 1  # SafetyCarGoal1's shapes.
LOW, HIGH = [-1.0] * ACTION_SIZE, [1.0] * ACTION_SIZE
U = 10  # Updates per update_many call.

SETTINGS = {
    "B256_K32": dict(batch=256, num_samples=32, repeats=20, many_repeats=5),
    "B1024_K64": dict(batch=1024, num_samples=64, repeats=10, many_repeats=3),
}
QUICK_SETTINGS = {
    "quick": dict(
        batch=16,
        num_samples=4,
        repeats=1,
        many_repeats=1,
        hidden_sizes=(16, 16),
        dual_steps=3,
        mstep_steps=2,
    ),
}


def random_batch(rng: np.random.Generator, b: int, m: int = NUM_CONSTRAINTS) -> Transition:
    f32 = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731
    return Transition(
        obs=f32(rng.normal(size=(b, OBS_SIZE))),
        action=f32(rng.uniform(-1, 1, size=(b, ACTION_SIZE))),
        reward=f32(rng.normal(size=(b,))),
        cost=f32(rng.binomial(1, 0.2, size=(b, m))),
        next_obs=f32(rng.normal(size=(b, OBS_SIZE))),
        terminated=f32(rng.binomial(1, 0.01, size=(b,))),
        truncated=jnp.zeros((b,), jnp.float32),
    )


# ---------------------------------------------------------------- FLOPs by hand
def analytic_flops(cfg: CVPOConfig, b: int) -> dict:
    """Matmul FLOPs of one update (2 per multiply-add; elementwise work not counted).

    `naive` evaluates the critic's first layer on every (s, a_k) pair; `shared` (the
    library's Critic) projects each state once and adds the action's projection.
    """
    o, a, k = OBS_SIZE, ACTION_SIZE, cfg.num_samples
    hs = cfg.hidden_sizes
    n = cfg.num_reward_critics + cfg.num_cost_critics * cfg.num_constraints
    rest = sum(hs[i] * hs[i + 1] for i in range(len(hs) - 1)) + hs[-1]  # Layers 2.. + head.
    pair_naive = 2 * ((o + a) * hs[0] + rest)
    pair_shared = 2 * (a * hs[0] + rest)
    state_proj = 2 * o * hs[0]
    heads = a + a + a * (a - 1) // 2
    policy_fwd = 2 * (
        o * hs[0] + sum(hs[i] * hs[i + 1] for i in range(len(hs) - 1)) + hs[-1] * heads
    )
    critic = policy_fwd * b + n * b * pair_naive * (1 + 3)  # target fwd; online fwd + bwd.
    estep_naive = policy_fwd * b + n * b * k * pair_naive
    estep_shared = policy_fwd * b + n * (b * state_proj + b * k * pair_shared)
    mstep = cfg.mstep_steps * 3 * policy_fwd * b
    return {
        "critic_update": float(critic),
        "estep_naive": float(estep_naive),
        "estep_shared": float(estep_shared),
        "mstep": float(mstep),
        "total_naive": float(critic + estep_naive + mstep),
        "total_shared": float(critic + estep_shared + mstep),
    }


# ---------------------------------------------------------------- the update in parts
def make_parts(learner: learner_lib.Learner):
    """The update's stages as separate functions with the library's own pieces."""
    cfg, networks = learner.cfg, learner.networks
    critic_loss = learner_lib.critic_lib.make_critic_loss(networks, cfg.gamma)
    critic_opt = learner_lib.critic_optimizer(cfg)
    qc_threshold = jnp.asarray(cfg.qc_threshold, jnp.float32)

    def critic_update(state, batch, key):
        (_, aux), grads = jax.value_and_grad(critic_loss, has_aux=True)(
            state.critic_params,
            state.target_critic_params,
            state.target_policy_params,
            batch,
            key,
        )
        updates, opt_state = critic_opt.update(grads, state.critic_opt_state, state.critic_params)
        return optax.apply_updates(state.critic_params, updates), opt_state, aux

    def sample_and_q(state, obs, key):
        actions, mean, tril = learner_lib.sample_actions(
            state.target_policy_params, networks, obs, key, cfg.num_samples
        )
        q_r, q_c = networks.pessimistic_q(
            state.target_critic_params, obs, learner_lib.clip_to_box(actions, networks)
        )
        return actions, mean, tril, q_r, q_c

    def dual_and_weights(duals, q_r, q_c):
        return estep_lib.estep(duals, q_r, q_c, qc_threshold, cfg)

    def estep(state, obs, key):
        actions, mean, tril, q_r, q_c = sample_and_q(state, obs, key)
        duals, weights, info = dual_and_weights(state.estep_duals, q_r, q_c)
        return actions, mean, tril, duals, weights, info

    def mstep(state, obs, actions, weights, mean_old, tril_old):
        return mstep_lib.mstep(
            state.policy_params,
            state.policy_opt_state,
            state.mstep_duals,
            networks,
            obs,
            actions,
            weights,
            mean_old,
            tril_old,
            cfg,
        )

    def targets(state):
        return (
            optax.incremental_update(state.policy_params, state.target_policy_params, cfg.tau),
            optax.incremental_update(state.critic_params, state.target_critic_params, cfg.tau),
        )

    return {
        "critic_update": critic_update,
        "estep": estep,
        "estep.sample_and_q": sample_and_q,
        "estep.dual_and_weights": dual_and_weights,
        "mstep": mstep,
        "targets": targets,
    }


def loop_bodies(learner: learner_lib.Learner):
    """One iteration of each lax.scan in the update (XLA's cost analysis counts it once)."""
    cfg, networks = learner.cfg, learner.networks
    qc_threshold = jnp.asarray(cfg.qc_threshold, jnp.float32)
    dual_opt = estep_lib.dual_optimizer(cfg)
    p_opt, a_opt = mstep_lib.policy_optimizer(cfg), mstep_lib.alpha_optimizer(cfg)

    def dual_step(duals, q_r, q_c):
        def objective(p):
            return estep_lib.dual_objective(
                p["log_eta"], p["log_lambda"], q_r, q_c, cfg.estep_kl_eps, qc_threshold
            )

        params = {"log_eta": duals.log_eta, "log_lambda": duals.log_lambda}
        grads = jax.grad(objective)(params)
        updates, opt_state = dual_opt.update(grads, duals.opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    def mstep_step(state, obs, actions, weights, mean_old, tril_old):
        log_alphas = {
            "log_alpha_mean": state.mstep_duals.log_alpha_mean,
            "log_alpha_cov": state.mstep_duals.log_alpha_cov,
        }
        (g_p, g_a), aux = jax.grad(mstep_lib.mstep_loss, argnums=(0, 1), has_aux=True)(
            state.policy_params,
            log_alphas,
            networks,
            obs,
            actions,
            weights,
            mean_old,
            tril_old,
            cfg,
        )
        updates, p_state = p_opt.update(g_p, state.policy_opt_state, state.policy_params)
        a_updates, a_state = a_opt.update(g_a, state.mstep_duals.opt_state, log_alphas)
        return (
            optax.apply_updates(state.policy_params, updates),
            p_state,
            optax.apply_updates(log_alphas, a_updates),
            a_state,
            aux,
        )

    return dual_step, mstep_step


# ---------------------------------------------------------------- one setting
def run_setting(name: str, spec: dict, repeats: int | None) -> dict:
    batch_size, k = spec["batch"], spec["num_samples"]
    overrides = {
        key: spec[key] for key in ("hidden_sizes", "dual_steps", "mstep_steps") if key in spec
    }
    cfg = CVPOConfig(num_samples=k, **overrides)
    reps = repeats if repeats is not None else spec["repeats"]
    many_reps = max(1, min(reps, spec["many_repeats"])) if repeats is None else max(1, reps // 4)
    print(
        f"\n== {name}: B={batch_size} K={k} hidden={cfg.hidden_sizes} critics "
        f"{cfg.num_reward_critics}+{cfg.num_cost_critics} dual_steps={cfg.dual_steps} "
        f"mstep_steps={cfg.mstep_steps}",
        flush=True,
    )
    rng = np.random.default_rng(0)
    learner = learner_lib.make_learner(cfg, OBS_SIZE, LOW, HIGH)
    state = learner.init(jax.random.PRNGKey(0))
    batch = random_batch(rng, batch_size)

    # -- compile time (ahead of time: trace + lower, then XLA compile).
    lowered, t_lower = common.timed(lambda: learner.update.lower(state, batch))
    compiled, t_compile = common.timed(lowered.compile)
    xla_flops_loops_once = common.compiled_flops(compiled)

    # -- FLOPs: the update with one iteration per loop, plus the missing iterations.
    one_iter = learner_lib.make_learner(
        cfg.replace(dual_steps=1, mstep_steps=1), OBS_SIZE, LOW, HIGH
    )
    flops_one_iter = common.compiled_flops(one_iter.update.lower(state, batch).compile())
    parts = make_parts(learner)
    dual_step, mstep_step = loop_bodies(learner)
    part_state = jax.tree.map(jnp.copy, state)  # Never donated.
    key = jax.random.PRNGKey(1)
    actions, mean, tril, q_r, q_c = jax.jit(parts["estep.sample_and_q"])(part_state, batch.obs, key)
    _, weights, _ = jax.jit(parts["estep.dual_and_weights"])(part_state.estep_duals, q_r, q_c)
    dual_body = common.jit_flops(dual_step, part_state.estep_duals, q_r, q_c)
    mstep_body = common.jit_flops(mstep_step, part_state, batch.obs, actions, weights, mean, tril)
    # The E-step evaluates the critic members one after another (lax.map): another
    # loop whose body XLA counts once.
    members = part_state.target_critic_params["params"]["members"]
    n_members = jax.tree.leaves(members)[0].shape[0]
    member = Critic(learner.networks.critic.hidden_sizes, learner.networks.critic.layer_norm)
    member_body = common.jit_flops(
        lambda p, o, a: member.apply({"params": p}, o, a),
        jax.tree.map(lambda x: x[0], members),
        batch.obs,
        actions,
    )
    missing_members = (n_members - 1) * member_body
    xla_flops = (
        flops_one_iter
        + (cfg.dual_steps - 1) * dual_body
        + (cfg.mstep_steps - 1) * mstep_body
        + missing_members
    )
    # The same count from the full-length compile (loop bodies once) plus the missing
    # iterations: a check that XLA did count each loop body once (ratio 1).
    loops_check = (
        xla_flops_loops_once
        + (cfg.dual_steps - 1) * dual_body
        + (cfg.mstep_steps - 1) * mstep_body
        + missing_members
    ) / xla_flops
    hand = analytic_flops(cfg, batch_size)

    # -- the parts, jitted separately, and the whole update, timed round-robin.
    part_args = {
        "critic_update": (part_state, batch, key),
        "estep": (part_state, batch.obs, key),
        "estep.sample_and_q": (part_state, batch.obs, key),
        "estep.dual_and_weights": (part_state.estep_duals, q_r, q_c),
        "mstep": (part_state, batch.obs, actions, weights, mean, tril),
        "targets": (part_state,),
    }
    jitted = {n: jax.jit(parts[n]) for n in parts}
    # Compiling ahead of time also fills the jit cache that the timed calls then use.
    part_flops = {n: common.compiled_flops(jitted[n].lower(*part_args[n]).compile()) for n in parts}
    # Loop corrections (the dual solve's and the M-step's scans).
    for n in ("estep", "estep.dual_and_weights"):
        part_flops[n] += (cfg.dual_steps - 1) * dual_body
    part_flops["mstep"] += (cfg.mstep_steps - 1) * mstep_body
    for n in ("estep", "estep.sample_and_q"):
        part_flops[n] += missing_members
    # The scans in these parts were compiled with full trip counts: XLA counted one
    # iteration, so the correction above adds the rest.

    holder = {"state": state}

    def run_update():
        holder["state"], metrics = learner.update(holder["state"], batch)
        common.block((holder["state"], metrics))

    calls = {"update": run_update}
    for n in parts:
        fn, args = jitted[n], part_args[n]
        calls[n] = lambda fn=fn, args=args: common.block(fn(*args))
    times = common.measure_interleaved(calls, warmup=2, repeats=reps)
    stats = {n: common.summarize(t) for n, t in times.items()}

    # -- update_many (U updates in one scan) against U separate update calls.
    batches = [random_batch(rng, batch_size) for _ in range(U)]
    stacked = jax.tree.map(lambda *x: jnp.stack(x), *batches)

    def run_separate():
        for b in batches:
            holder["state"], metrics = learner.update(holder["state"], b)
        common.block((holder["state"], metrics))

    def run_many():
        holder["state"], metrics = learner.update_many(holder["state"], stacked)
        common.block((holder["state"], metrics))

    t0 = time.perf_counter()
    run_many()  # Compiles update_many.
    compile_many_s = time.perf_counter() - t0
    many_times = common.measure_interleaved(
        {"separate": run_separate, "update_many": run_many}, warmup=1, repeats=many_reps
    )
    many_stats = {n: common.summarize(t) for n, t in many_times.items()}
    per_update_separate = many_stats["separate"]["median_s"] / U
    per_update_many = many_stats["update_many"]["median_s"] / U

    median = stats["update"]["median_s"]
    result = {
        "settings": {
            "batch": batch_size,
            "num_samples": k,
            "obs_size": OBS_SIZE,
            "action_size": ACTION_SIZE,
            "num_constraints": NUM_CONSTRAINTS,
            "hidden_sizes": list(cfg.hidden_sizes),
            "num_reward_critics": cfg.num_reward_critics,
            "num_cost_critics": cfg.num_cost_critics,
            "dual_steps": cfg.dual_steps,
            "mstep_steps": cfg.mstep_steps,
            "repeats": reps,
            "update_many_repeats": many_reps,
            "U": U,
        },
        "compile": {
            "lower_s": t_lower,
            "compile_s": t_compile,
            "total_s": t_lower + t_compile,
            "update_many_first_call_s": compile_many_s,
        },
        "update": {
            **stats["update"],
            "updates_per_s": 1.0 / median,
        },
        "flops": {
            "xla": xla_flops,
            "xla_loop_bodies_counted_once": xla_flops_loops_once,
            "xla_dual_step_body": dual_body,
            "xla_mstep_step_body": mstep_body,
            "loop_correction_check": loops_check,
            "by_hand_matmul": hand,
        },
        "achieved_flops_per_s": xla_flops / median,
        "breakdown": {
            n: {
                **stats[n],
                "fraction_of_update": stats[n]["median_s"] / median,
                "flops_xla": part_flops[n],
            }
            for n in parts
        },
        "sum_of_parts_over_update": sum(
            stats[n]["median_s"] for n in ("critic_update", "estep", "mstep", "targets")
        )
        / median,
        "update_many": {
            "separate": many_stats["separate"],
            "update_many": many_stats["update_many"],
            "per_update_separate_s": per_update_separate,
            "per_update_many_s": per_update_many,
            "speedup": per_update_separate / per_update_many,
        },
    }
    return result


def add_ratios(result: dict, ref_flops_per_s: float) -> None:
    """Adds the figures relative to the same-run matmul speed (FLOP/s)."""
    scale = 1.0 / ref_flops_per_s
    hand = result["flops"]["by_hand_matmul"]
    result["fraction_of_matmul"] = result["achieved_flops_per_s"] * scale
    result["time_at_matmul_speed_s"] = {
        "xla_flops": result["flops"]["xla"] * scale,
        "naive_matmul_flops": hand["total_naive"] * scale,
        "shared_first_layer_matmul_flops": hand["total_shared"] * scale,
    }
    result["update_over_naive_floor"] = (
        result["update"]["median_s"] / result["time_at_matmul_speed_s"]["naive_matmul_flops"]
    )
    for part in result["breakdown"].values():
        part["fraction_of_matmul"] = part["flops_xla"] / part["median_s"] * scale


def print_report(results: dict, ref: dict) -> str:
    texts = []
    rows = []
    for name, r in results.items():
        rows.append(
            [
                name,
                r["compile"]["lower_s"],
                r["compile"]["compile_s"],
                r["update"]["median_s"] * 1e3,
                r["update"]["p90_s"] * 1e3,
                r["update"]["updates_per_s"],
                r["flops"]["xla"] / 1e9,
                r["achieved_flops_per_s"] / 1e9,
                r["fraction_of_matmul"],
                r["time_at_matmul_speed_s"]["naive_matmul_flops"] * 1e3,
            ]
        )
    texts.append(
        common.print_table(
            f"Update step (same-run matmul {ref['n']}^3: {ref['flops_per_s'] / 1e9:.0f} GFLOP/s)",
            [
                "setting",
                "lower s",
                "compile s",
                "median ms",
                "p90 ms",
                "updates/s",
                "GFLOP",
                "GFLOP/s",
                "frac matmul",
                "naive floor ms",
            ],
            rows,
        )
    )
    for name, r in results.items():
        rows = []
        for part, p in r["breakdown"].items():
            rows.append(
                [
                    part,
                    p["median_s"] * 1e3,
                    p["p90_s"] * 1e3,
                    p["fraction_of_update"],
                    p["flops_xla"] / 1e9,
                    p["fraction_of_matmul"],
                ]
            )
        rows.append(
            [
                "update (whole)",
                r["update"]["median_s"] * 1e3,
                r["update"]["p90_s"] * 1e3,
                1.0,
                r["flops"]["xla"] / 1e9,
                r["fraction_of_matmul"],
            ]
        )
        texts.append(
            common.print_table(
                f"Breakdown, {name} (parts jitted separately; critic + estep + mstep + targets "
                f"= {r['sum_of_parts_over_update']:.2f} x update)",
                ["part", "median ms", "p90 ms", "frac of update", "GFLOP", "frac matmul"],
                rows,
            )
        )
    rows = [
        [
            name,
            r["update_many"]["per_update_separate_s"] * 1e3,
            r["update_many"]["per_update_many_s"] * 1e3,
            r["update_many"]["speedup"],
        ]
        for name, r in results.items()
    ]
    texts.append(
        common.print_table(
            f"update_many (U={U} per call) vs {U} separate update calls",
            ["setting", "separate ms/update", "update_many ms/update", "speedup"],
            rows,
        )
    )
    return "\n".join(texts)


def main(argv: list[str] | None = None) -> dict:
    parser = common.base_parser(__doc__.splitlines()[0])
    parser.add_argument(
        "--no-xla-workaround",
        action="store_true",
        help="do not add " + common.XLA_CPU_WORKAROUND_FLAG + " to XLA_FLAGS (without it the "
        "B=1024, K=64 update deadlocks on a 2-core machine with jaxlib 0.10.2)",
    )
    args = parser.parse_args(argv)
    workaround = common.apply_xla_cpu_workaround(not args.no_xla_workaround)
    settings = QUICK_SETTINGS if args.quick else SETTINGS
    ref_n, ref_reps = (256, 1) if args.quick else (2048, 10)
    machine_start = common.machine_info()
    print(
        f"{machine_start['cpu_model']}, {machine_start['usable_cores']} cores, "
        f"load {machine_start['load_average_1_5_15']}, jax {machine_start['versions']['jax']} "
        f"on {machine_start['jax_backend']}",
        flush=True,
    )
    ref_start = common.matmul_reference(ref_n, warmup=1 if args.quick else 2, repeats=ref_reps)
    print(f"matmul reference: {ref_start['flops_per_s'] / 1e9:.1f} GFLOP/s", flush=True)
    results = {}
    for name, spec in settings.items():
        results[name] = run_setting(name, spec, args.repeats)
    ref_end = common.matmul_reference(ref_n, warmup=1, repeats=ref_reps)
    ref = common.pool_references(ref_start, ref_end)
    # Fractions use the pooled reference (start and end of the run).
    for r in results.values():
        add_ratios(r, ref["flops_per_s"])
    tables = print_report(results, ref)
    payload = {
        "benchmark": NAME,
        "quick": args.quick,
        "machine": machine_start,
        "xla_cpu_workaround": workaround,
        "load_average_end": common.load_average(),
        "matmul_reference": ref,
        "results": results,
        "tables": tables,
    }
    path = common.write_json(common.output_path(NAME, args.out, args.quick), payload)
    print(f"\nwrote {path}")
    return payload


if __name__ == "__main__":
    main()
