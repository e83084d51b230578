"""Raw env rate of the JAX navigation tasks (`mjx/...`) against Safety-Gymnasium, one run.

    python -m benchmarks.nav_env_rate                      # PointGoal1, 1-256 envs
    python -m benchmarks.nav_env_rate --envs 1 16 --quick  # smoke run

1. JAX: `step_autoreset` vmapped over N envs inside one jitted `lax.scan` of
   `--scan` steps, uniform random actions, float32; compile time apart; timed
   `--repeats` times after a warm-up (resets happen inside: every step computes the
   reset branch, which is what a vmapped auto-reset costs).
2. Safety-Gymnasium: one process, one env, uniform random actions, `--sg-steps` steps
   with a reset at every episode end (a world rebuild each), timed before and after
   the JAX measurements; steps/s pooled.
3. Ratio JAX / Safety-Gymnasium for each N (the issue's CPU goal: >= 10 at some N).
"""

from __future__ import annotations

import time

import jax
import numpy as np

from benchmarks import common


def jax_rate(env, num_envs: int, scan: int, repeats: int) -> dict:
    def run(states, key):
        def body(carry, k):
            states = carry
            k_act, k_reset = jax.random.split(k)
            actions = jax.random.uniform(k_act, (num_envs, env.action_size), minval=-1, maxval=1)
            states = jax.vmap(env.step_autoreset)(
                states, actions, jax.random.split(k_reset, num_envs)
            )
            return states, states.cost.sum()

        return jax.lax.scan(body, states, jax.random.split(key, scan))

    run = jax.jit(run)
    states = jax.jit(jax.vmap(env.reset))(jax.random.split(jax.random.PRNGKey(0), num_envs))
    t0 = time.perf_counter()
    states, _ = common.block(run(states, jax.random.PRNGKey(1)))
    compile_s = time.perf_counter() - t0
    keys = iter(jax.random.split(jax.random.PRNGKey(2), repeats + 2))
    holder = {"states": states}

    def call():
        holder["states"], out = common.block(run(holder["states"], next(keys)))
        return out

    seconds = common.measure(call, warmup=1, repeats=repeats)
    stats = common.summarize(seconds)
    return {
        "num_envs": num_envs,
        "compile_s": compile_s,
        "steps_per_s": num_envs * scan / stats["median_s"],
        "stats": stats,
    }


def safety_gym_rate(name: str, steps: int) -> float:
    from cvpo_jax.envs.nav_task import make_safety_gym_env

    env = make_safety_gym_env(name)
    rng = np.random.default_rng(0)
    env.reset(seed=0)
    t0 = time.perf_counter()
    for _ in range(steps):
        _, _, _, terminated, truncated, _ = env.step(rng.uniform(-1, 1, 2))
        if terminated or truncated:
            env.reset()
    rate = steps / (time.perf_counter() - t0)
    env.close()
    return rate


def parse_args(argv=None):
    """The command line, with --quick's sizes and the default of 3 timed repeats."""
    parser = common.base_parser(__doc__)
    parser.add_argument("--task", default="PointGoal1")
    parser.add_argument("--envs", type=int, nargs="+", default=[1, 16, 64, 256])
    parser.add_argument("--scan", type=int, default=100)
    parser.add_argument("--sg-steps", type=int, default=3000)
    args = parser.parse_args(argv)
    if args.quick:
        args.envs, args.scan, args.sg_steps, args.repeats = [1, 4], 5, 200, 1
    if args.repeats is None:
        args.repeats = 3
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    from cvpo_jax.envs.nav_env import SafeNavEnv

    info = common.machine_info()
    sg_before = safety_gym_rate(args.task, args.sg_steps)
    env = SafeNavEnv.from_name(args.task)
    rows = [jax_rate(env, n, args.scan, args.repeats) for n in args.envs]
    sg_after = safety_gym_rate(args.task, args.sg_steps)
    sg = float(np.mean([sg_before, sg_after]))
    table = common.print_table(
        f"{args.task}: raw env steps/s (random actions, resets included), JAX on "
        f"{jax.default_backend()} vs Safety-Gymnasium (1 process: {sg:,.0f}/s)",
        ["envs", "compile s", "JAX steps/s", "x Safety-Gymnasium"],
        [
            [
                r["num_envs"],
                f"{r['compile_s']:.0f}",
                f"{r['steps_per_s']:,.0f}",
                f"{r['steps_per_s'] / sg:.1f}",
            ]
            for r in rows
        ],
    )
    payload = {
        "machine": info,
        "settings": vars(args),
        "safety_gym_steps_per_s": {"before": sg_before, "after": sg_after},
        "jax": rows,
        "load_average_end": common.load_average(),
        "table": table,
    }
    path = common.write_json(common.output_path("nav_env_rate", args.out, args.quick), payload)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
