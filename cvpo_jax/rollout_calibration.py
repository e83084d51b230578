"""Critic calibration by rollouts that run on past the time limit.

The training-time calibration (`calibration.py`) can only use steps that have H
decisions of the episode after them (gamma^H <= tail_tol), because the time limit
cuts the realised sum. With gamma 0.99 that is 459 decisions; a Safety-Gymnasium
episode with action repeat 4 has 250, so such runs log no calibration at all.

Here one env is stepped with the policy's sampled actions (the policy the critics
evaluate), and its time limit is lifted so that each episode runs H decisions past
it. Every decision t of the episode proper (its first T env steps) then has its
discounted to-go G_t = sum_j gamma^j x_{t+j} with a missing tail of at most tail_tol,
compared with the aggregated target critics the E-step uses, Q_r(s_t, a_t) and
Q_c(s_t, a_t). Running on past the limit is the right reference: the TD target
bootstraps at a truncation, so the critics value the continuation, not a cut sum.

Reported over all compared decisions and at t = 0 alone (the start state, whose
cost-to-go the episodic cost limit is about): bias = mean(Q - G), correlation, mean G.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence

import numpy as np

from cvpo_jax.calibration import (
    calibration_points,
    calibration_stats,
    discounted_to_go,
    tail_horizon,
)


@dataclasses.dataclass(frozen=True)
class RolloutCalibration:
    """Critics against realised to-go sums; stats are dicts {bias, corr, mc}.

    ``cost`` and ``start_cost`` hold one dict per constraint (M). ``episode_returns``
    [E] and ``episode_costs`` [E, M] are the sampled policy's sums over the episode
    proper (the first ``time_limit`` env steps).
    """

    episodes: int
    seed: int
    time_limit: int
    tail_decisions: int
    action_repeat: int
    points: int
    reward: dict
    cost: list
    start_reward: dict
    start_cost: list
    episode_returns: np.ndarray
    episode_costs: np.ndarray

    def to_json(self) -> dict:
        data = dataclasses.asdict(self)
        data["episode_returns"] = self.episode_returns.tolist()
        data["episode_costs"] = self.episode_costs.tolist()
        return data


def lift_time_limit(env, extra_steps: int) -> int:
    """Sets each time limit of ``env`` to T + ``extra_steps`` env steps, T the smallest
    one it had (the episode proper's length); returns T.

    Limits found: gymnasium TimeLimit-style wrappers' ``_max_episode_steps``,
    Safety-Gymnasium's ``task.num_steps`` and an own env's ``max_episode_steps``
    attribute (what the training loop reads). ValueError if there is none. Lifting an
    env again sets its limits from the original T (not from the lifted one).
    """
    holders = []
    layer = env
    while layer is not None:
        if isinstance(getattr(layer, "_max_episode_steps", None), int):
            holders.append((layer, "_max_episode_steps"))
        layer = getattr(layer, "env", None)
    base = env.unwrapped
    task = getattr(base, "task", None)
    if isinstance(getattr(task, "num_steps", None), int):
        holders.append((task, "num_steps"))
    if isinstance(getattr(base, "max_episode_steps", None), int):
        holders.append((base, "max_episode_steps"))
    if not holders:
        raise ValueError(
            f"{env!r} has no time limit this can lift (a TimeLimit wrapper, "
            "Safety-Gymnasium's task.num_steps or a max_episode_steps attribute)."
        )
    # A second lift of the same env starts from the limit it had before the first.
    limit = getattr(base, "_unlifted_time_limit", None)
    if limit is None:
        limit = min(getattr(obj, name) for obj, name in holders)
        base._unlifted_time_limit = int(limit)
    for obj, name in holders:
        setattr(obj, name, limit + int(extra_steps))
    return int(limit)


def lift_for_rollouts(env, gamma, cost_gamma, action_repeat, cost_names, tail_tol):
    """Lifts ``env``'s time limit for rollouts that run H decisions past it (H from
    the larger discount and ``tail_tol``); returns (cost_gamma, cost_names, k, H, T,
    decisions of the episode proper), the first two with their defaults filled in."""
    cost_gamma = gamma if cost_gamma is None else cost_gamma
    if cost_names is not None and tuple(cost_names) == ("sum",):
        cost_names = None
    k = int(action_repeat)
    tail = tail_horizon(max(gamma, cost_gamma), tail_tol)
    limit = lift_time_limit(env, k * tail)
    return cost_gamma, cost_names, k, tail, limit, math.ceil(limit / k)


def _step_costs(cost: float, info: dict, cost_names: Sequence[str] | None) -> np.ndarray:
    if cost_names is None:
        return np.array([float(cost)])
    return np.array([float(info[f"cost_{name}"]) for name in cost_names])


@dataclasses.dataclass(frozen=True)
class EpisodeRun:
    """One episode run past its time limit, per decision (D decisions).

    obs [D, O], action [D, A], reward [D], cost [D, M] (summed over the k env steps of
    each decision), next_obs [D, O]; ``terminated`` says whether the last decision
    ended in a terminal state (else the run stopped at the lifted limit).
    ``proper_return`` and ``proper_cost`` [M] are the sums over the episode proper.
    """

    obs: np.ndarray
    action: np.ndarray
    reward: np.ndarray
    cost: np.ndarray
    next_obs: np.ndarray
    terminated: bool
    proper_return: float
    proper_cost: np.ndarray


def run_past_limit(
    env,
    act_fn: Callable[[np.ndarray, int], np.ndarray],
    seed: int,
    t_global: int,
    *,
    limit: int,
    tail: int,
    k: int,
    cost_names: Sequence[str] | None,
) -> tuple[EpisodeRun, int]:
    """Runs one episode (reset with ``seed``) of an env whose time limit `lift_time_limit`
    raised from ``limit`` to limit + k * tail env steps, for ceil(limit / k) + tail
    decisions or until it terminates; returns the run and ``t_global`` advanced by its
    env steps (``act_fn``'s noise key)."""
    proper = math.ceil(limit / k)
    obs, _ = env.reset(seed=seed)
    observations, actions, rewards, costs, next_obs = [], [], [], [], []
    steps, ep_return, ep_cost = 0, 0.0, 0.0
    end = False
    while not end and len(rewards) < proper + tail:
        action = np.asarray(act_fn(np.asarray(obs, np.float32), t_global), np.float32)
        observations.append(np.asarray(obs, np.float32))
        actions.append(action)
        reward, cost = 0.0, 0.0
        for _ in range(k):
            obs, r, c, terminated, truncated, info = env.step(action)
            x = _step_costs(c, info, cost_names)
            reward, cost = reward + float(r), cost + x
            if steps < limit:
                ep_return += float(r)
                ep_cost = ep_cost + x
            steps += 1
            t_global += 1
            if terminated:
                end = True
                break
            if truncated and steps < limit + k * tail:
                raise RuntimeError(
                    f"the env truncated its episode at env step {steps}, before the "
                    f"lifted limit {limit + k * tail}: it has a time limit that "
                    "lift_time_limit does not know."
                )
        rewards.append(reward)
        costs.append(cost)
        next_obs.append(np.asarray(obs, np.float32))
    run = EpisodeRun(
        obs=np.stack(observations),
        action=np.stack(actions),
        reward=np.asarray(rewards, np.float64),
        cost=np.stack(costs).astype(np.float64),
        next_obs=np.stack(next_obs),
        terminated=end,
        proper_return=ep_return,
        proper_cost=np.asarray(ep_cost, np.float64).reshape(-1),
    )
    return run, t_global


def rollout_calibration(
    env,
    act_fn: Callable[[np.ndarray, int], np.ndarray],
    q_fn: Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]],
    *,
    episodes: int,
    seed: int,
    gamma: float,
    cost_gamma: float | None = None,
    action_repeat: int = 1,
    cost_names: Sequence[str] | None = None,
    tail_tol: float = 0.01,
    max_points: int = 64,
) -> RolloutCalibration:
    """Rolls ``episodes`` episodes past the time limit and compares the critics.

    Args:
      env: one gymnasium-style env with a time limit `lift_time_limit` finds; it is
        changed (its limits raised) and not closed.
      act_fn: (obs [O], t) -> action [A] in the box; t counts the env steps taken
        before this decision over the whole calibration (a key for the policy's noise).
      q_fn: (obs [P, O], action [P, A]) -> (Q_r [P], Q_c [P, M]).
      gamma, cost_gamma: the critics' discounts per decision (cost_gamma None: gamma).
      action_repeat: env steps each action is held for; rewards and costs are summed
        over them, as the training transitions are.
      cost_names: None for the env's cost, else the `cost_<name>` info entries (M).
      tail_tol, max_points: the tail weight allowed and the decisions compared per
        episode (evenly spaced over the episode proper, the first always included).
    """
    for name, value, ok, allowed in [
        ("episodes", episodes, isinstance(episodes, int) and episodes >= 1, "an integer >= 1"),
        ("tail_tol", tail_tol, 0 < tail_tol < 1, "in (0, 1)"),
        ("max_points", max_points, isinstance(max_points, int) and max_points >= 1, ">= 1"),
    ]:
        if not ok:
            raise ValueError(f"{name}={value!r} must be {allowed}.")
    lifted = lift_for_rollouts(env, gamma, cost_gamma, action_repeat, cost_names, tail_tol)
    cost_gamma, cost_names, k, tail, limit, proper = lifted
    pairs = []
    returns, ep_costs = np.zeros(episodes), []
    t_global = 0  # Env steps so far, over all episodes.
    for ep in range(episodes):
        run, t_global = run_past_limit(
            env, act_fn, seed + ep, t_global, limit=limit, tail=tail, k=k, cost_names=cost_names
        )
        returns[ep] = run.proper_return
        ep_costs.append(run.proper_cost)
        idx = calibration_points(min(proper, len(run.reward)), True, gamma, tail_tol, max_points)
        g_r = discounted_to_go(run.reward, gamma)[idx]
        g_c = discounted_to_go(run.cost, cost_gamma)[idx]
        q_r, q_c = q_fn(run.obs[idx], run.action[idx])
        pairs.append((np.asarray(q_r, np.float64), g_r, np.asarray(q_c, np.float64), g_c))
    q_r, g_r, q_c, g_c = (np.concatenate([p[j] for p in pairs]) for j in range(4))
    first = np.cumsum([0] + [len(p[0]) for p in pairs[:-1]])  # Each episode's t = 0.
    m = q_c.shape[1]
    return RolloutCalibration(
        episodes=episodes,
        seed=seed,
        time_limit=limit,
        tail_decisions=tail,
        action_repeat=k,
        points=int(q_r.size),
        reward=calibration_stats(q_r, g_r),
        cost=[calibration_stats(q_c[:, i], g_c[:, i]) for i in range(m)],
        start_reward=calibration_stats(q_r[first], g_r[first]),
        start_cost=[calibration_stats(q_c[first, i], g_c[first, i]) for i in range(m)],
        episode_returns=returns,
        episode_costs=np.asarray(ep_costs, np.float64).reshape(episodes, -1),
    )


def calibrate_critics(
    learner,
    state,
    env_id: str,
    *,
    episodes: int,
    seed: int,
    action_repeat: int = 1,
    cost_names: Sequence[str] | None = None,
    tail_tol: float = 0.01,
    max_points: int = 64,
) -> RolloutCalibration:
    """`rollout_calibration` of a learner's sampled policy and its target critics
    (aggregated as the E-step and the training-time calibration use them) on one
    in-process ``env_id`` (a Safety-Gymnasium task or an own factory's env).

    Episode i is reset with seed + i and the policy's noise of a decision taken after
    t env steps is ``fold_in(PRNGKey(seed), t)``, as in a stochastic `evaluate_policy`:
    the first episode's ``episode_returns``/``episode_costs`` are the ones a stochastic
    `evaluate_policy` with the same seed reports (later episodes differ, as these
    run past the time limit).
    """
    import jax

    from cvpo_jax.envs.registry import resolve_env_id
    from cvpo_jax.evaluation import check_episodes_and_seed, check_policy_fits, make_eval_env

    check_episodes_and_seed(episodes, seed)
    env_id = resolve_env_id(env_id)
    q_fn = jax.jit(learner.networks.pessimistic_q)
    env = make_eval_env(env_id)
    try:
        check_policy_fits(learner, env_id, env.observation_space.shape, env.action_space.low.shape)
        act = sampled_actor(learner, state.policy_params, env, seed)

        def q(obs, action):
            return jax.device_get(q_fn(state.target_critic_params, obs, action))

        return rollout_calibration(
            env,
            act,
            q,
            episodes=episodes,
            seed=seed,
            gamma=learner.cfg.gamma,
            cost_gamma=learner.cfg.gamma_cost,
            action_repeat=action_repeat,
            cost_names=cost_names,
            tail_tol=tail_tol,
            max_points=max_points,
        )
    finally:
        env.close()


def sampled_actor(
    learner, policy_params, env, seed: int
) -> Callable[[np.ndarray, int], np.ndarray]:
    """act(obs [O], t) -> the policy's sampled action [A], clipped to ``env``'s box; the
    noise of a decision after t env steps is ``fold_in(PRNGKey(seed), t)`` (as in a
    stochastic `evaluate_policy`)."""
    import jax

    key = jax.random.PRNGKey(seed)
    low = np.asarray(env.action_space.low, np.float32)
    high = np.asarray(env.action_space.high, np.float32)

    def act(obs, t):
        a = learner.act(policy_params, obs[None], jax.random.fold_in(key, t), False)
        return np.clip(np.asarray(a, np.float32)[0], low, high).astype(env.action_space.dtype)

    return act
