"""Refitting fresh critics to a frozen policy: where does a critic's bias come from?

During training the policy is fitted to the actions its critics value best, and the
TD target bootstraps at the policy's actions, so a critic can settle on values the
policy "believes" rather than the returns it gets. Rollout calibration
(`rollout_calibration.py`) measures the bias; this module tells its sources apart.
The trained policy is frozen and its sampled actions run in one env past the time
limit (so every decision of the episode proper has its realised discounted to-go).
On those on-policy transitions two fresh critics of the run's architecture are fitted:

- ``td``: the training's own critic update (`Learner.update_critics_many`: the same
  loss, targets, optimiser and polyak averaging) with the frozen policy as the
  bootstrap policy. On-policy data and a policy that no longer moves against the
  critic: if this critic is calibrated where the trained one is not, the trained
  one's bias comes from the training dynamics (the policy exploiting the critic, or
  the replay's older data); if it is as biased, TD itself misstates this signal.
- ``mc``: regression of the same network on the realised to-go sums (Monte Carlo
  targets, no bootstrap). What the architecture can represent from these states:
  its correlation bounds what any TD critic can reach.

All three (the trained target critics and the two fresh ones; aggregated as the
E-step uses them) are compared on held-out episodes of the same policy
(`calibration_stats`: bias, correlation, realised mean), over every decision of the
episode proper.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from cvpo_jax.calibration import calibration_stats, discounted_to_go
from cvpo_jax.networks import OBS_NORM
from cvpo_jax.rollout_calibration import lift_for_rollouts, run_past_limit, sampled_actor
from cvpo_jax.types import Transition


@dataclasses.dataclass(frozen=True)
class OnPolicyData:
    """Transitions of a frozen policy, one row per decision (D rows).

    obs [D, O], action [D, A], reward [D], cost [D, M], next_obs [D, O],
    terminated [D] and truncated [D] (0/1; the last decision of each run is truncated
    unless it terminated), reward_to_go [D] and cost_to_go [D, M] (the realised
    discounted sums, exact to the tail tolerance), valid [D] (1 where the to-go is
    exact: the decisions of the episode proper), episode [D] (its index).
    """

    obs: np.ndarray
    action: np.ndarray
    reward: np.ndarray
    cost: np.ndarray
    next_obs: np.ndarray
    terminated: np.ndarray
    truncated: np.ndarray
    reward_to_go: np.ndarray
    cost_to_go: np.ndarray
    valid: np.ndarray
    episode: np.ndarray

    @property
    def size(self) -> int:
        return int(self.reward.shape[0])

    def transitions(self, idx: np.ndarray) -> Transition:
        """The one-step transitions at rows idx [..., B], float32."""
        f = lambda x: jnp.asarray(x[idx], jnp.float32)  # noqa: E731
        return Transition(
            obs=f(self.obs),
            action=f(self.action),
            reward=f(self.reward),
            cost=f(self.cost),
            next_obs=f(self.next_obs),
            terminated=f(self.terminated),
            truncated=f(self.truncated),
        )


def collect_on_policy(
    env,
    act_fn: Callable[[np.ndarray, int], np.ndarray],
    *,
    episodes: int,
    seed: int,
    gamma: float,
    cost_gamma: float | None = None,
    action_repeat: int = 1,
    cost_names: Sequence[str] | None = None,
    tail_tol: float = 0.01,
    progress: Callable[[int], None] | None = None,
) -> OnPolicyData:
    """Runs ``episodes`` episodes (reset with seed, seed + 1, ...) past the lifted time
    limit and keeps every decision as a transition (the tail's too: they are the
    policy's data as well), with the realised to-go where it is exact.

    ``act_fn`` (obs [O], t) -> action [A] as in `rollout_calibration`; the env's limits
    are raised (`lift_time_limit`) and it is not closed. ``progress`` is called with the
    number of episodes done after each one.
    """
    if not (isinstance(episodes, int) and episodes >= 1):
        raise ValueError(f"episodes={episodes!r} must be an integer >= 1.")
    lifted = lift_for_rollouts(env, gamma, cost_gamma, action_repeat, cost_names, tail_tol)
    cost_gamma, cost_names, k, tail, limit, proper = lifted
    parts: dict[str, list] = {f.name: [] for f in dataclasses.fields(OnPolicyData)}
    t_global = 0
    for ep in range(episodes):
        run, t_global = run_past_limit(
            env, act_fn, seed + ep, t_global, limit=limit, tail=tail, k=k, cost_names=cost_names
        )
        d = len(run.reward)
        end = np.zeros(d)
        end[-1] = 1.0
        # A terminated run's to-go is exact at every decision; a cut one's only in
        # the episode proper (the tail's sums are missing their continuation).
        valid = np.ones(d) if run.terminated else (np.arange(d) < proper).astype(np.float64)
        for name, value in [
            ("obs", run.obs),
            ("action", run.action),
            ("reward", run.reward),
            ("cost", run.cost),
            ("next_obs", run.next_obs),
            ("terminated", end * run.terminated),
            ("truncated", end * (not run.terminated)),
            ("reward_to_go", discounted_to_go(run.reward, gamma)),
            ("cost_to_go", discounted_to_go(run.cost, cost_gamma)),
            ("valid", valid),
            ("episode", np.full(d, ep)),
        ]:
            parts[name].append(value)
        if progress is not None:
            progress(ep + 1)
    return OnPolicyData(**{name: np.concatenate(v) for name, v in parts.items()})


def fresh_critic_state(learner, state, key: jax.Array):
    """A copy of ``state`` with newly initialised critics (online = target, new
    optimiser state) and the target policy set to the policy, so that a critic-only
    update bootstraps at the actions the frozen policy samples. Observation
    statistics, if any, are kept."""
    fresh = learner.init(key)
    critic = fresh.critic_params
    if OBS_NORM in state.critic_params:
        critic = {**critic, OBS_NORM: state.critic_params[OBS_NORM]}
    new = state.replace(
        critic_params=critic,
        target_critic_params=critic,
        critic_opt_state=fresh.critic_opt_state,
        target_policy_params=state.policy_params,
    )
    # Own buffers throughout: the critic update donates its state, and online and
    # target copies (and the caller's state) must not share one.
    return jax.tree.map(lambda x: jnp.array(x, copy=True), new)


def _batch_indices(rng: np.random.Generator, rows: np.ndarray, chunk: int, batch_size: int):
    return rows[rng.integers(0, rows.size, size=(chunk, batch_size))]


def fit_td(
    learner,
    state,
    data: OnPolicyData,
    *,
    updates: int,
    batch_size: int,
    seed: int,
    chunk: int = 1000,
    progress: Callable[[int], None] | None = None,
):
    """Fresh critics fitted by the training's critic update on ``data`` with the policy
    frozen: ``updates`` steps of ``batch_size`` transitions drawn uniformly. Returns
    the train state (its target critics are what the E-step would read)."""
    _check_fit_args(updates, batch_size, chunk)
    state = fresh_critic_state(learner, state, jax.random.PRNGKey(seed))
    rng = np.random.default_rng(seed)
    rows = np.arange(data.size)
    for n in _chunks(updates, chunk, progress):
        state, _ = learner.update_critics_many(
            state, data.transitions(_batch_indices(rng, rows, n, batch_size))
        )
    return state


def fit_mc(
    learner,
    state,
    data: OnPolicyData,
    *,
    updates: int,
    batch_size: int,
    seed: int,
    chunk: int = 1000,
    progress: Callable[[int], None] | None = None,
):
    """Fresh critics regressed on the realised to-go (rows with ``valid``): the mean
    squared error of every reward member against reward_to_go and every cost member
    against cost_to_go, with the training's critic optimiser. Returns the critic params."""
    _check_fit_args(updates, batch_size, chunk)
    networks = learner.networks
    params = fresh_critic_state(learner, state, jax.random.PRNGKey(seed)).critic_params
    optimiser = optax.adam(learner.cfg.critic_lr)
    opt_state = optimiser.init(params)

    def loss_fn(p, obs, action, g_r, g_c):
        q_r, q_c = networks.split_critic_values(networks.critic_values(p, obs, action))
        # q_r [N_r, B], q_c [N_c, M, B]; g_r [B], g_c [B, M].
        return jnp.mean((q_r - g_r) ** 2) + jnp.mean((q_c - g_c.T[None]) ** 2)

    def step(carry, batch):
        p, o = carry
        grads = jax.grad(loss_fn)(p, *batch)
        updates_, o = optimiser.update(grads, o, p)
        return (optax.apply_updates(p, updates_), o), None

    run = jax.jit(lambda carry, batches: jax.lax.scan(step, carry, batches)[0])
    rng = np.random.default_rng(seed)
    rows = np.flatnonzero(data.valid > 0)
    for n in _chunks(updates, chunk, progress):
        idx = _batch_indices(rng, rows, n, batch_size)
        batches = tuple(
            jnp.asarray(x[idx], jnp.float32)
            for x in (data.obs, data.action, data.reward_to_go, data.cost_to_go)
        )
        params, opt_state = run((params, opt_state), batches)
    return params


def _chunks(updates: int, chunk: int, progress: Callable[[int], None] | None):
    """Yields the sizes of the chunks that make up ``updates``; after each one the
    caller has run, ``progress`` gets the updates done so far."""
    done = 0
    while done < updates:
        n = min(chunk, updates - done)
        yield n
        done += n
        if progress is not None:
            progress(done)


def _check_fit_args(updates, batch_size, chunk) -> None:
    for name, value in [("updates", updates), ("batch_size", batch_size), ("chunk", chunk)]:
        if not (isinstance(value, int) and value >= 1):
            raise ValueError(f"{name}={value!r} must be an integer >= 1.")


def compare_critics(learner, critics: dict, data: OnPolicyData) -> dict:
    """Each named critic params' aggregated Q (as the E-step reads them) against the
    realised to-go on ``data``'s valid rows: {name: {"reward": stats, "cost": [stats
    per constraint]}} with `calibration_stats` (bias, corr, mc)."""
    rows = np.flatnonzero(data.valid > 0)
    q_fn = jax.jit(learner.networks.pessimistic_q)
    obs = jnp.asarray(data.obs[rows], jnp.float32)
    action = jnp.asarray(data.action[rows], jnp.float32)
    g_r, g_c = data.reward_to_go[rows], data.cost_to_go[rows]
    out = {}
    for name, params in critics.items():
        q_r, q_c = (np.asarray(x, np.float64) for x in jax.device_get(q_fn(params, obs, action)))
        out[name] = {
            "reward": calibration_stats(q_r, g_r),
            "cost": [calibration_stats(q_c[:, i], g_c[:, i]) for i in range(g_c.shape[1])],
        }
    return out


def refit_report(
    run_dir,
    *,
    step: int | None = None,
    episodes: int = 100,
    eval_episodes: int = 20,
    updates: int = 50_000,
    batch_size: int = 256,
    seed: int = 1000,
    env_id: str | None = None,
    action_repeat: int | None = None,
    log: Callable[[str], None] | None = None,
) -> dict:
    """Freezes a host run's sampled policy (checkpoint ``step``, the newest by default),
    collects ``episodes`` training and ``eval_episodes`` held-out episodes (seeds
    ``seed + i``; the held-out ones follow the training ones), fits the ``td`` and
    ``mc`` critics (``updates`` steps of ``batch_size``) and compares them with the
    run's trained target critics on the held-out episodes (and on the training ones,
    to show over-fitting). ``env_id`` and ``action_repeat`` replace the run's (for a
    run trained through a factory that repeats actions itself). Returns a JSON-ready
    dict.
    """
    from cvpo_jax.envs.action_repeat import check_repeat
    from cvpo_jax.envs.registry import is_jax_env, resolve_env_id
    from cvpo_jax.evaluation import check_policy_fits, load_train_state, make_eval_env

    log = log or (lambda msg: None)
    if not (isinstance(eval_episodes, int) and eval_episodes >= 1):
        raise ValueError(f"eval_episodes={eval_episodes!r} must be an integer >= 1.")
    learner, state, spec, step = load_train_state(run_dir, step)
    env_id = resolve_env_id(env_id or spec.env_id)
    if is_jax_env(env_id):
        raise ValueError(
            f"{env_id!r} is a JAX env: the refit runs the policy in one in-process "
            "Safety-Gymnasium or own env."
        )
    k = spec.train.repeat if action_repeat is None else action_repeat
    check_repeat(k)
    cfg = learner.cfg
    env = make_eval_env(env_id)
    try:
        check_policy_fits(learner, env_id, env.observation_space.shape, env.action_space.low.shape)
        collect = dict(
            gamma=cfg.gamma,
            cost_gamma=cfg.gamma_cost,
            action_repeat=k,
            cost_names=spec.train.costs,
        )
        log(f"collecting {episodes} + {eval_episodes} episodes of the frozen policy (k = {k})")
        train = collect_on_policy(
            env,
            sampled_actor(learner, state.policy_params, env, seed),
            episodes=episodes,
            seed=seed,
            progress=lambda done: done % 10 or log(f"{done} of {episodes} episodes"),
            **collect,
        )
        held_out = collect_on_policy(
            env,
            sampled_actor(learner, state.policy_params, env, seed + episodes),
            episodes=eval_episodes,
            seed=seed + episodes,
            **collect,
        )
    finally:
        env.close()
    trained = state.target_critic_params
    fit = dict(updates=updates, batch_size=batch_size, seed=seed)
    log(f"fitting the td critic ({updates} updates on {train.size} transitions)")
    td_state = fit_td(learner, state, train, **fit)
    log("fitting the mc critic")
    mc_params = fit_mc(learner, td_state, train, **fit)
    critics = {"trained": trained, "td": td_state.target_critic_params, "mc": mc_params}
    return {
        "run_dir": str(run_dir),
        "step": step,
        "env_id": env_id,
        "action_repeat": k,
        "episodes": episodes,
        "eval_episodes": eval_episodes,
        "updates": updates,
        "batch_size": batch_size,
        "seed": seed,
        "transitions": train.size,
        "qc_threshold": list(cfg.qc_threshold),
        "held_out": compare_critics(learner, critics, held_out),
        "train": compare_critics(learner, critics, train),
        "held_out_episode_costs": _episode_sums(held_out),
        "rates_by_decision": rates_by_decision(train),
        "level": level_decomposition(learner, state.policy_params, critics, train, seed),
    }


def level_decomposition(
    learner, policy_params, critics: dict, data: OnPolicyData, seed: int = 0
) -> dict:
    """What sets each critic's cost level on ``data`` (all rows, first constraint).

    A TD critic with a bias unit satisfies, on its training data, mean TD error 0:
    E[Q(s, a)] = E[c] + gamma E[Q(s', a')] (terminal rows without the bootstrap). So
    E[Q] = (E[c] - gamma gap) / (1 - gamma), with gap = E[Q(s, a)] - E[Q(s', a')]:
    a gap of the bootstrap values below the values at the data's actions lowers the
    level 1 / (1 - gamma) times (100x at gamma 0.99). On a frozen policy's own data the
    gap is only noise; a policy fitted to the actions one critic values lowest makes
    it systematic. Per critic: q (E[Q(s, a)] at the data's actions), next_q
    (E[alive Q(s', a')], a' ~ the policy ``policy_params`` that ran the data, sampled
    with ``seed``), td_error (mean
    c + gamma_c alive Q(s', a') - Q(s, a)), and stationary (E[c] / (1 - gamma_c): the
    level if the gap were 0).
    """
    from cvpo_jax.learner import clip_to_box
    from cvpo_jax.networks import policy_distribution

    networks = learner.networks
    gamma = learner.cfg.gamma_cost
    obs, action, next_obs = (
        jnp.asarray(x, jnp.float32) for x in (data.obs, data.action, data.next_obs)
    )
    mean, tril = networks.policy_apply(policy_params, next_obs)
    next_action = clip_to_box(
        policy_distribution(mean, tril).sample(seed=jax.random.PRNGKey(seed)), networks
    )
    q_fn = jax.jit(networks.pessimistic_q)
    alive = 1.0 - np.asarray(data.terminated, np.float64)
    c = np.asarray(data.cost[:, 0], np.float64)
    out = {}
    for name, params in critics.items():
        q = np.asarray(q_fn(params, obs, action)[1][:, 0], np.float64)
        q_next = alive * np.asarray(q_fn(params, next_obs, next_action)[1][:, 0], np.float64)
        out[name] = {
            "q": float(q.mean()),
            "next_q": float(q_next.mean()),
            "td_error": float(np.mean(c + gamma * q_next - q)),
            "stationary": float(c.mean() / (1.0 - gamma)),
        }
    return out


def rates_by_decision(data: OnPolicyData, width: int = 100) -> list[dict]:
    """Mean reward and cost [M] per decision over the rows whose decision index within
    their run lies in [lo, lo + width), for lo = 0, width, ...: whether the process is
    stationary along an episode and past its time limit (a TD critic that cannot tell
    early from late states values both at a mixture of their rates)."""
    if not (isinstance(width, int) and width >= 1):
        raise ValueError(f"width={width!r} must be an integer >= 1.")
    starts = np.flatnonzero(np.r_[True, data.episode[1:] != data.episode[:-1]])
    index = np.arange(data.size) - np.repeat(starts, np.diff(np.r_[starts, data.size]))
    out = []
    for lo in range(0, int(index.max()) + 1, width):
        rows = (index >= lo) & (index < lo + width)
        out.append(
            {
                "decisions": [lo, lo + width],
                "rows": int(rows.sum()),
                "reward": float(data.reward[rows].mean()),
                "cost": data.cost[rows].mean(axis=0).tolist(),
            }
        )
    return out


def _episode_sums(data: OnPolicyData) -> list[float]:
    """Each episode's undiscounted cost over its valid (episode proper) rows, first constraint."""
    n = int(data.episode.max()) + 1
    mask = data.valid > 0
    return [float(data.cost[(data.episode == e) & mask, 0].sum()) for e in range(n)]
