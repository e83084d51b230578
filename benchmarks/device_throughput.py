"""On-device training throughput on brax/HalfCheetahVelocity, against the raw on-device env
rate and the host loop on the comparable Safety-Gymnasium task, in one run.

    python -m benchmarks.device_throughput                  # seeds {1,2,4} x envs {4,16}, mjx
    python -m benchmarks.device_throughput --backend spring # brax's fastest CPU backend
    python -m benchmarks.device_throughput --quick          # smoke test: tiny sizes

1. On device, for each grid point (seeds S x envs per seed N): the jitted
   `jax.vmap(trainer.run_chunk)` of `cvpo_jax.device_loop` (as `train_on_device` runs
   it), default CVPO algorithm and update ratio 0.2. Compile time is reported
   separately; the chunks holding the short random-action warm-up and the first burst
   of updates run untimed; then `--repeats` chunks are timed, each blocking on its
   results. Env steps/s are summed over seeds. The updates counter must grow during
   the timed chunks, or the run stops with an error.
   Beside it, the raw on-device env rate of the same S*N envs: `step_autoreset`
   vmapped over all of them inside `lax.scan`, uniform random actions, timed
   round-robin with the training chunks so that a change of load hits both alike.
   At the first grid point the same chunk is also timed without `vmap` (one seed,
   plain `jax.jit(trainer.run_chunk)`): under `vmap`, a `lax.cond` whose predicate is
   batched (computed from each seed's own step counter) becomes a `select` that runs
   both branches, so a no-vmap / vmap ratio far above 1 means the updates are
   computed on every vector step and mostly thrown away.
2. The host loop (`cvpo_jax.train_loop.train`) on SafetyHalfCheetahVelocity-v1 with
   the same algorithm, update ratio and update period, measured over its learning
   phase like `benchmarks.throughput` (metrics.csv intervals; the interval holding
   the first update and the next one, which holds the policy's first compile, are
   left out), and the raw rate of its vector env (random actions), before and after.
3. Ratios from the same run: on-device training / host training, training / raw env,
   and the speed-up of each grid point over 1 seed x the fewest envs.

Both sides use update_every = 80 env steps (16 updates per burst; 80 is a multiple
of every envs-per-seed count here, as the on-device loop requires; the host
default is 50 with the same ratio). The two tasks have the same robot and cost
threshold (3.2096), the same observation (17) and action (6) sizes and episode length
(1000), but different simulators (brax's MJX port of MuJoCo, or another brax backend,
against MuJoCo itself).
"""

from __future__ import annotations

import math
import tempfile
import time
from pathlib import Path

from benchmarks import common

NAME = "device_throughput"
DEVICE_ENV = "brax/HalfCheetahVelocity"
HOST_ENV = "HalfCheetahVelocity"  # -> SafetyHalfCheetahVelocity-v1
HOST_NUM_ENVS = 2  # The host loop's default.

FULL = dict(
    algo={},  # CVPOConfig() defaults: [256, 256], K = 32, B = 256.
    seeds=(1, 2, 4),
    envs=(4, 16),
    batch_size=256,
    update_every=80,
    warmup_steps=320,  # Per seed; >= batch size, a multiple of update_every.
    chunk_steps=160,  # Env steps per seed per chunk: two update bursts (32 updates).
    repeats=3,
    raw_vector_steps=100,
    buffer_size=100_000,
    host_log_every=320,
    host_intervals=4,  # Learning-phase intervals; the first is dropped (policy compile).
    host_raw_steps=2000,
    matmul_n=1024,
    matmul_repeats=5,
)
QUICK = dict(
    algo=dict(hidden_sizes=(16, 16), num_samples=4, dual_steps=2, mstep_steps=1),
    seeds=(1, 2),
    envs=(2,),
    batch_size=32,
    update_every=20,
    warmup_steps=40,
    chunk_steps=40,
    repeats=1,
    raw_vector_steps=10,
    buffer_size=2000,
    host_log_every=40,
    host_intervals=3,
    host_raw_steps=100,
    matmul_n=256,
    matmul_repeats=1,
)


def _int_list(text: str) -> tuple[int, ...]:
    values = tuple(int(v) for v in text.split(",") if v.strip())
    if not values or any(v < 1 for v in values):
        raise ValueError(f"expected a comma-separated list of positive integers, got {text!r}")
    return values


# ---------------------------------------------------------------- on device
def device_train_config(spec: dict, num_envs: int, repeats: int):
    from cvpo_jax.config import TrainConfig

    chunk = spec["chunk_steps"]
    chunks = warmup_chunks(spec) + repeats
    return TrainConfig(
        env=DEVICE_ENV,
        num_envs=num_envs,
        warmup_steps=spec["warmup_steps"],
        batch_size=spec["batch_size"],
        buffer_size=spec["buffer_size"],
        update_every=spec["update_every"],
        log_every=chunk,
        total_steps=chunk * chunks,
        checkpoint_every=chunk * chunks,
    )


def warmup_chunks(spec: dict) -> int:
    """Untimed chunks run before timing: the random-action warm-up and the first burst."""
    return max(1, math.ceil(spec["warmup_steps"] / spec["chunk_steps"]))


def make_raw_rollout(env, num_envs: int, length: int):
    """(state, key) -> (state, key): `length` vector steps of `num_envs` envs, random actions."""
    import jax
    import jax.numpy as jnp

    low = jnp.asarray(env.action_low, jnp.float32)
    high = jnp.asarray(env.action_high, jnp.float32)

    def body(carry, _):
        state, key = carry
        key, k_act, k_env = jax.random.split(key, 3)
        action = jax.random.uniform(k_act, (num_envs, env.action_size), jnp.float32, low, high)
        state = jax.vmap(env.step_autoreset)(state, action, jax.random.split(k_env, num_envs))
        return (state, key), None

    def rollout(state, key):
        (state, key), _ = jax.lax.scan(body, (state, key), None, length=length)
        return state, key

    return rollout


class RawEnv:
    """The compiled random-action rollout of `total_envs` envs, with its state."""

    def __init__(self, env, total_envs: int, length: int):
        import jax

        self.total_envs, self.length = total_envs, length
        keys = jax.random.split(jax.random.PRNGKey(1), total_envs)
        self.state = common.block(jax.jit(jax.vmap(env.reset))(keys))
        self.key = jax.random.PRNGKey(2)
        fn = jax.jit(make_raw_rollout(env, total_envs, length), donate_argnums=0)
        lowered, self.lower_s = common.timed(lambda: fn.lower(self.state, self.key))
        self.compiled, self.compile_s = common.timed(lowered.compile)

    def __call__(self) -> None:
        self.state, self.key = common.block(self.compiled(self.state, self.key))

    @property
    def env_steps_per_call(self) -> int:
        return self.total_envs * self.length


def run_grid_point(env, algo, spec, num_seeds, num_envs, repeats, raw: RawEnv) -> dict:
    """Compile, one untimed chunk, then `repeats` timed chunks interleaved with raw rollouts."""
    import jax
    import numpy as np

    from cvpo_jax.device_loop import make_device_trainer
    from cvpo_jax.device_train import seed_keys, seed_sharding

    cfg = device_train_config(spec, num_envs, repeats)
    trainer = make_device_trainer(cfg, algo, env)
    sharding = seed_sharding(num_seeds)
    init = jax.jit(jax.vmap(trainer.init), out_shardings=sharding)
    runner = common.block(init(seed_keys(cfg.seed, num_seeds)))
    # Exactly as train_on_device jits it.
    run_chunk = jax.jit(
        jax.vmap(trainer.run_chunk),
        in_shardings=(sharding,),
        out_shardings=(sharding, sharding),
        donate_argnums=0,
    )
    lowered, lower_s = common.timed(lambda: run_chunk.lower(runner))
    compiled, compile_s = common.timed(lowered.compile)
    state = {"runner": runner}

    def chunk():
        state["runner"], state["log"] = common.block(compiled(state["runner"]))

    t0 = time.perf_counter()
    for _ in range(warmup_chunks(spec)):
        chunk()
    raw()
    untimed_s = time.perf_counter() - t0
    updates_before = int(np.asarray(state["log"].updates)[0])
    times = common.measure_interleaved({"train": chunk, "raw": raw}, warmup=0, repeats=repeats)
    log = jax.device_get(state["log"])
    updates_after = int(log.updates[0])
    expected = repeats * (cfg.log_every // cfg.update_every) * cfg.updates_per_chunk
    if updates_after - updates_before != expected or int(log.env_steps[0]) != cfg.total_steps:
        raise RuntimeError(
            f"{num_seeds} seeds x {num_envs} envs: {updates_after - updates_before} updates ran "
            f"in the timed chunks, expected {expected} (env steps {int(log.env_steps[0])})."
        )
    finite = all(bool(np.all(np.isfinite(v))) for v in log.metrics.values())
    train_stats = common.summarize(times["train"])
    raw_stats = common.summarize(times["raw"])
    train_rate = num_seeds * cfg.log_every / train_stats["median_s"]
    raw_rate = raw.env_steps_per_call / raw_stats["median_s"]
    return {
        "seeds": num_seeds,
        "envs_per_seed": num_envs,
        "compile": {"lower_s": lower_s, "compile_s": compile_s},
        "untimed_chunks": warmup_chunks(spec),
        "untimed_s": untimed_s,
        "train": {
            "chunk_env_steps_per_seed": cfg.log_every,
            "vector_steps_per_chunk": trainer.steps_per_chunk,
            "time": train_stats,
            "times_s": times["train"],
            "steps_per_s": train_rate,
            "per_seed_steps_per_s": train_rate / num_seeds,
            "updates_before_timed": updates_before,
            "updates_after_timed": updates_after,
            "updates_in_timed_chunks_per_seed": updates_after - updates_before,
            "updates_per_s_per_seed": (updates_after - updates_before) / sum(times["train"]),
            "metrics_finite": finite,
            "episodes_in_last_chunk": log.episodes.tolist(),
        },
        "raw_env": {
            "total_envs": raw.total_envs,
            "vector_steps_per_call": raw.length,
            "compile": {"lower_s": raw.lower_s, "compile_s": raw.compile_s},
            "time": raw_stats,
            "times_s": times["raw"],
            "steps_per_s": raw_rate,
        },
        "ratio_train_to_raw": train_rate / raw_rate,
    }


def plain_chunk_rate(env, algo, spec, num_envs, repeats) -> dict:
    """One seed's chunk jitted without vmap: the reference for the cost of vmapping."""
    import jax

    from cvpo_jax.device_loop import make_device_trainer

    cfg = device_train_config(spec, num_envs, repeats)
    trainer = make_device_trainer(cfg, algo, env)
    runner = common.block(jax.jit(trainer.init)(jax.random.PRNGKey(cfg.seed)))
    fn = jax.jit(trainer.run_chunk, donate_argnums=0)
    lowered, lower_s = common.timed(lambda: fn.lower(runner))
    compiled, compile_s = common.timed(lowered.compile)
    state = {"runner": runner}

    def chunk():
        state["runner"], state["log"] = common.block(compiled(state["runner"]))

    for _ in range(warmup_chunks(spec)):
        chunk()
    before = int(state["log"].updates)
    times = common.measure(chunk, warmup=0, repeats=repeats)
    stats = common.summarize(times)
    return {
        "seeds": 1,
        "envs_per_seed": num_envs,
        "compile": {"lower_s": lower_s, "compile_s": compile_s},
        "time": stats,
        "times_s": times,
        "steps_per_s": cfg.log_every / stats["median_s"],
        "updates_in_timed_chunks": int(state["log"].updates) - before,
    }


# ---------------------------------------------------------------- on the host
def host_rates(algo, spec: dict) -> dict:
    """The host loop's learning-phase rate and its vector env's raw rate (before and after)."""
    from benchmarks.throughput import raw_env_rate, training_rate
    from cvpo_jax.config import TrainConfig

    log_every = spec["host_log_every"]
    warmup = spec["warmup_steps"]
    cfg = TrainConfig(
        env=HOST_ENV,
        num_envs=HOST_NUM_ENVS,
        warmup_steps=warmup,
        batch_size=spec["batch_size"],
        buffer_size=spec["buffer_size"],
        update_every=spec["update_every"],
        log_every=log_every,
        total_steps=max(warmup, log_every) + log_every * spec["host_intervals"],
        checkpoint_every=100_000_000,
    )
    raw_before = raw_env_rate(HOST_ENV, HOST_NUM_ENVS, spec["host_raw_steps"])
    with tempfile.TemporaryDirectory(prefix="cvpo_device_throughput_") as tmp:
        trained = training_rate(cfg, algo, Path(tmp) / "run")
    raw_after = raw_env_rate(HOST_ENV, HOST_NUM_ENVS, spec["host_raw_steps"])
    # training_rate leaves out the interval holding the first update (the update's
    # compile); the next one holds the policy's first compile: leave it out too.
    intervals = trained["intervals_s"][1:] or trained["intervals_s"]
    steps = log_every * len(intervals)
    rate = steps / sum(intervals)
    raw = (raw_before["steps_per_s"] + raw_after["steps_per_s"]) / 2
    return {
        "env": HOST_ENV,
        "num_envs": HOST_NUM_ENVS,
        "train_config": cfg.__dict__,
        "raw_env": {"before": raw_before, "after": raw_after, "steps_per_s": raw},
        "training": {
            **trained,
            "intervals_used_s": intervals,
            "env_steps": steps,
            "seconds": sum(intervals),
            "steps_per_s": rate,
        },
        "ratio_train_to_raw": rate / raw,
    }


# ---------------------------------------------------------------- report
def print_report(payload: dict) -> str:
    """The scaling table and, with the host measured, the device-vs-host table."""
    grid, host = payload["device"], payload["host"]
    load = payload["machine"]["load_average_1_5_15"]
    backend = payload["settings"]["backend"]
    rows = [
        [
            f"{p['seeds']} x {p['envs_per_seed']}",
            p["train"]["steps_per_s"],
            p["raw_env"]["steps_per_s"],
            p["ratio_train_to_raw"],
            p["train"]["per_seed_steps_per_s"],
            p["speedup_vs_reference"],
            p["ratio_to_host_train"],
            p["compile"]["compile_s"],
        ]
        for p in grid
    ]
    ref = grid[0]
    texts = [
        common.print_table(
            f"On-device training on {DEVICE_ENV} ({backend}; update ratio "
            f"{payload['settings']['update_ratio']}; env steps/s summed over seeds; load "
            f"{load} -> {payload['load_average_end']})",
            [
                "seeds x envs",
                "train steps/s",
                "raw env steps/s",
                "train / raw",
                "per-seed steps/s",
                f"speed-up vs {ref['seeds']} x {ref['envs_per_seed']}",
                "train / host train",
                "compile s",
            ],
            rows,
        )
    ]
    plain = payload.get("plain_run_chunk")
    if host is None:
        if plain:
            ratio = plain["steps_per_s"] / ref["train"]["steps_per_s"]
            print(
                f"1 seed x {plain['envs_per_seed']} envs, run_chunk without vmap: "
                f"{plain['steps_per_s']:.1f} steps/s ({ratio:.2f} x the vmapped rate)",
                flush=True,
            )
        return texts[0]
    best = max(grid, key=lambda p: p["train"]["steps_per_s"])
    host_rows = [
        ["host: raw vector env, random actions", host["raw_env"]["steps_per_s"], "", ""],
        ["host: training loop (learning phase)", host["training"]["steps_per_s"], 1.0, ""],
        [
            f"device: training, {ref['seeds']} x {ref['envs_per_seed']}",
            ref["train"]["steps_per_s"],
            ref["ratio_to_host_train"],
            "",
        ],
        [
            f"device: training, {best['seeds']} x {best['envs_per_seed']} (fastest)",
            best["train"]["steps_per_s"],
            best["ratio_to_host_train"],
            "",
        ],
    ]
    if plain:
        host_rows.append(
            [
                f"device: 1 seed x {plain['envs_per_seed']}, run_chunk without vmap",
                plain["steps_per_s"],
                plain["steps_per_s"] / host["training"]["steps_per_s"],
                plain["steps_per_s"] / ref["train"]["steps_per_s"],
            ]
        )
    texts.append(
        common.print_table(
            f"Device vs host ({HOST_ENV}: SafetyHalfCheetahVelocity-v1, {host['num_envs']} "
            "async envs)",
            ["measure", "env steps/s", "ratio to host training", "no-vmap / vmap"],
            host_rows,
        )
    )
    return "\n".join(texts)


def main(argv: list[str] | None = None) -> dict:
    parser = common.base_parser(__doc__.splitlines()[0])
    parser.add_argument(
        "--backend",
        default=None,
        help="brax physics backend (mjx, generalized, positional, spring); default the task's",
    )
    parser.add_argument("--seeds", type=_int_list, default=None, help="e.g. 1,2,4")
    parser.add_argument("--envs", type=_int_list, default=None, help="envs per seed, e.g. 4,16")
    parser.add_argument(
        "--no-plain", action="store_true", help="skip the 1-seed run_chunk timed without vmap"
    )
    parser.add_argument("--no-host", action="store_true", help="skip the host-loop measurements")
    parser.add_argument(
        "--no-xla-workaround",
        action="store_true",
        help="do not add " + common.XLA_CPU_WORKAROUND_FLAG + " to XLA_FLAGS",
    )
    args = parser.parse_args(argv)
    workaround = common.apply_xla_cpu_workaround(not args.no_xla_workaround)

    from cvpo_jax.config import CVPOConfig
    from cvpo_jax.envs.brax_velocity import make_brax_velocity_env

    started = time.perf_counter()
    spec = dict(QUICK if args.quick else FULL)
    seeds = args.seeds or spec["seeds"]
    envs = args.envs or spec["envs"]
    repeats = args.repeats or spec["repeats"]
    algo = CVPOConfig(**spec["algo"])
    for n in envs:
        if spec["update_every"] % n:
            raise ValueError(f"envs per seed must divide update_every={spec['update_every']}")

    machine = common.machine_info()
    print(
        f"{machine['cpu_model']}, {machine['usable_cores']} cores, load "
        f"{machine['load_average_1_5_15']}, jax {machine['versions']['jax']} on "
        f"{machine['jax_backend']}",
        flush=True,
    )
    ref_start = common.matmul_reference(spec["matmul_n"], repeats=spec["matmul_repeats"])
    env = make_brax_velocity_env(DEVICE_ENV, backend=args.backend)
    print(f"{env!r}", flush=True)

    grid, raws = [], {}
    for n in envs:
        for s in seeds:
            total = s * n
            if total not in raws:  # The same S*N envs in lockstep: one rollout serves.
                raws[total] = RawEnv(env, total, spec["raw_vector_steps"])
            point = run_grid_point(env, algo, spec, s, n, repeats, raws[total])
            grid.append(point)
            print(
                f"{s} seeds x {n} envs: train {point['train']['steps_per_s']:.1f} steps/s, raw "
                f"{point['raw_env']['steps_per_s']:.0f} steps/s, "
                f"{point['train']['updates_in_timed_chunks_per_seed']} updates per seed timed "
                f"(compile {point['compile']['compile_s']:.1f} s; "
                f"{time.perf_counter() - started:.0f} s so far)",
                flush=True,
            )
    plain = None
    if not args.no_plain:
        plain = plain_chunk_rate(env, algo, spec, envs[0], repeats)
        print(
            f"1 seed x {envs[0]} envs without vmap: {plain['steps_per_s']:.1f} steps/s",
            flush=True,
        )
    host = None
    if not args.no_host:
        host = host_rates(algo, spec)
        print(
            f"host: train {host['training']['steps_per_s']:.1f} steps/s, raw "
            f"{host['raw_env']['steps_per_s']:.0f} steps/s",
            flush=True,
        )
    ref_end = common.matmul_reference(spec["matmul_n"], warmup=1, repeats=spec["matmul_repeats"])

    reference = next(p for p in grid if p["seeds"] == min(seeds) and p["envs_per_seed"] == envs[0])
    for p in grid:
        p["speedup_vs_reference"] = p["train"]["steps_per_s"] / reference["train"]["steps_per_s"]
        p["ratio_to_host_train"] = (
            p["train"]["steps_per_s"] / host["training"]["steps_per_s"] if host else math.nan
        )
    grid.sort(key=lambda p: (p is not reference, p["seeds"], p["envs_per_seed"]))
    cfg0 = device_train_config(spec, envs[0], repeats)
    payload = {
        "benchmark": NAME,
        "quick": args.quick,
        "machine": machine,
        "xla_cpu_workaround": workaround,
        "load_average_end": common.load_average(),
        "matmul_reference": common.pool_references(ref_start, ref_end),
        "settings": {
            "device_env": env.env_id,
            "backend": env.backend,
            "observation_size": env.observation_size,
            "action_size": env.action_size,
            "seeds": list(seeds),
            "envs_per_seed": list(envs),
            "timed_chunks": repeats,
            "chunk_env_steps_per_seed": spec["chunk_steps"],
            "warmup_steps": spec["warmup_steps"],
            "update_every": spec["update_every"],
            "update_ratio": cfg0.update_ratio,
            "updates_per_burst": cfg0.updates_per_chunk,
            "raw_vector_steps_per_call": spec["raw_vector_steps"],
            "device_train_config_first_point": cfg0.__dict__,
            "algo": algo.__dict__,
            "host_env": HOST_ENV,
        },
        "device": grid,
        "plain_run_chunk": plain,
        "host": host,
        "wall_s": time.perf_counter() - started,
    }
    if host and plain:
        payload["plain_ratio_to_host_train"] = (
            plain["steps_per_s"] / host["training"]["steps_per_s"]
        )
    payload["tables"] = print_report(payload)
    path = common.write_json(common.output_path(NAME, args.out, args.quick), payload)
    print(f"\nwrote {path} ({payload['wall_s']:.0f} s)", flush=True)
    return payload


if __name__ == "__main__":
    main()
