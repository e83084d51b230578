"""n-step TD targets: the fold of n transitions, the sampler over a vector env's
items, cuts at termination, truncation and auto-reset, and the resume cut."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cvpo_jax import replay as R
from cvpo_jax.critic import td_targets
from cvpo_jax.types import Transition


def _seq(rewards, costs, terminated, truncated, next_obs):
    """One window [1, n] from per-step lists."""
    n = len(rewards)
    f = lambda x: jnp.asarray(np.asarray(x, np.float32)[None])  # noqa: E731
    return Transition(
        obs=f(np.arange(n, dtype=np.float32)[:, None]),
        action=f(np.zeros((n, 1))),
        reward=f(rewards),
        cost=f(np.asarray(costs)[:, None]),
        next_obs=f(np.asarray(next_obs)[:, None]),
        terminated=f(terminated),
        truncated=f(truncated),
    )


def test_full_window_sums_n_discounted_steps():
    g = 0.9
    out = R.nstep_transition(_seq([1, 2, 3], [0, 1, 1], [0, 0, 0], [0, 0, 0], [10, 11, 12]), g)
    np.testing.assert_allclose(out.reward, [1 + g * 2 + g * g * 3], rtol=1e-6)
    np.testing.assert_allclose(out.cost, [[g + g * g]], rtol=1e-6)
    np.testing.assert_allclose(out.next_obs, [[12.0]])
    np.testing.assert_allclose(out.discount, [g**3], rtol=1e-6)
    np.testing.assert_allclose(out.obs, [[0.0]])


def test_termination_stops_the_sum_and_the_bootstrap():
    g = 0.9
    # Step 1 terminates; step 2 belongs to the next episode and must not count.
    out = R.nstep_transition(_seq([1, 2, 100], [1, 0, 100], [0, 1, 0], [0, 0, 0], [10, 11, 99]), g)
    np.testing.assert_allclose(out.reward, [1 + g * 2], rtol=1e-6)
    np.testing.assert_allclose(out.cost, [[1.0]], rtol=1e-6)
    np.testing.assert_allclose(out.discount, [0.0])
    np.testing.assert_allclose(out.terminated, [1.0])


def test_truncation_stops_the_sum_and_bootstraps_from_the_final_observation():
    g = 0.9
    out = R.nstep_transition(_seq([1, 2, 100], [0, 1, 100], [0, 0, 0], [0, 1, 0], [10, 11, 99]), g)
    np.testing.assert_allclose(out.reward, [1 + g * 2], rtol=1e-6)
    np.testing.assert_allclose(out.cost, [[g]], rtol=1e-6)
    np.testing.assert_allclose(out.next_obs, [[11.0]])  # The true final obs, not the reset.
    np.testing.assert_allclose(out.discount, [g**2], rtol=1e-6)


def test_one_step_window_equals_the_one_step_target():
    g = 0.9
    seq = _seq([1.5], [1], [0], [0], [3])
    out = R.nstep_transition(seq, g)
    one = jax.tree.map(lambda x: x[:, 0], seq)
    nq_r, nq_c = jnp.array([[4.0]]), jnp.array([[[2.0]]])
    y1 = td_targets(one.reward, one.cost, one.terminated, nq_r, nq_c, g)
    yn = td_targets(out.reward, out.cost, out.terminated, nq_r, nq_c, g, discount=out.discount)
    np.testing.assert_allclose(y1[0], yn[0], rtol=1e-6)
    np.testing.assert_allclose(y1[1], yn[1], rtol=1e-6)


def _hand_nstep(episodes, t, n, g):
    """Reference: the n-step return of step t of a list-of-dicts episode, by hand."""
    r = c = 0.0
    for j in range(n):
        step = episodes[t + j]
        r += g**j * step["r"]
        c += g**j * step["c"]
        if step["term"] or step["trunc"]:
            return r, c, (0.0 if step["term"] else g ** (j + 1)), step["next"]
    return r, c, g**n, episodes[t + n - 1]["next"]


@pytest.mark.parametrize("num_envs, capacity", [(1, 64), (3, 64), (2, 37)])
def test_sampler_over_a_vector_env_matches_hand_n_step_returns(num_envs, capacity):
    """Items are added one vector step at a time; every sampled window equals the hand
    computation on that env's own stream, across auto-resets and buffer wrap-around."""
    n, g, steps = 4, 0.8, 40
    rng = np.random.default_rng(0)
    replay = R.make_replay(capacity, 16, 1, 1, 1, n_step=n, stride=num_envs, gamma=g)
    state = replay.init()
    streams = [[] for _ in range(num_envs)]
    uid = 0
    for _ in range(steps):
        rows = []
        for e in range(num_envs):
            term = bool(rng.random() < 0.1)
            trunc = (not term) and bool(rng.random() < 0.1)
            step = dict(
                uid=uid,
                r=float(rng.normal()),
                c=float(rng.random() < 0.3),
                term=term,
                trunc=trunc,
                next=float(uid) + 0.5,
            )
            uid += 1
            streams[e].append(step)
            rows.append(step)
        batch = Transition(
            obs=jnp.asarray([[s["uid"]] for s in rows], jnp.float32),
            action=jnp.zeros((num_envs, 1)),
            reward=jnp.asarray([s["r"] for s in rows], jnp.float32),
            cost=jnp.asarray([[s["c"]] for s in rows], jnp.float32),
            next_obs=jnp.asarray([[s["next"]] for s in rows], jnp.float32),
            terminated=jnp.asarray([s["term"] for s in rows], jnp.float32),
            truncated=jnp.asarray([s["trunc"] for s in rows], jnp.float32),
        )
        state = replay.add(state, batch)
    by_uid = {}
    for e, stream in enumerate(streams):
        for t, step in enumerate(stream):
            by_uid[step["uid"]] = (e, t)
    oldest = steps * num_envs - capacity
    newest_start = steps * num_envs - (n - 1) * num_envs
    seen = set()
    for k in range(20):
        out = jax.jit(replay.sample)(state, jax.random.PRNGKey(k))
        for b in range(16):
            u = int(out.obs[b, 0])
            assert oldest <= u < newest_start, (u, oldest, newest_start)
            seen.add(u)
            e, t = by_uid[u]
            r, c, d, nxt = _hand_nstep(streams[e], t, n, g)
            np.testing.assert_allclose(float(out.reward[b]), r, rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(float(out.cost[b, 0]), c, rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(float(out.discount[b]), d, rtol=1e-5, atol=1e-7)
            np.testing.assert_allclose(float(out.next_obs[b, 0]), nxt)
    assert len(seen) > 20  # The sampler covers the buffer, not a few items.


def test_cut_last_steps_marks_the_newest_vector_step_truncated():
    replay = R.make_replay(10, 2, 1, 1, 1, n_step=2, stride=2, gamma=0.9)
    state = replay.init()
    for t in range(6):  # 12 items into capacity 10: wraps.
        state = replay.add(
            state,
            Transition(
                obs=jnp.full((2, 1), float(t)),
                action=jnp.zeros((2, 1)),
                reward=jnp.ones(2),
                cost=jnp.zeros((2, 1)),
                next_obs=jnp.zeros((2, 1)),
                terminated=jnp.zeros(2),
                truncated=jnp.zeros(2),
            ),
        )
    cut = R.cut_last_steps(state, 2)
    trunc = np.asarray(cut.experience.truncated[0])
    obs = np.asarray(cut.experience.obs[0, :, 0])
    assert set(np.flatnonzero(trunc)) == set(np.flatnonzero(obs == 5.0))
    assert trunc.sum() == 2


def test_make_replay_rejects_bad_n_step():
    with pytest.raises(ValueError, match="n_step=0"):
        R.make_replay(100, 8, 1, 1, 1, n_step=0)
    with pytest.raises(ValueError, match="too small"):
        R.make_replay(10, 8, 1, 1, 1, n_step=6, stride=2)


def test_cost_gamma_weights_the_cost_sum_and_its_bootstrap():
    g, gc = 0.9, 0.5
    out = R.nstep_transition(
        _seq([1, 2, 3], [1, 1, 1], [0, 0, 0], [0, 0, 0], [10, 11, 12]), g, cost_gamma=gc
    )
    np.testing.assert_allclose(out.reward, [1 + g * 2 + g * g * 3], rtol=1e-6)
    np.testing.assert_allclose(out.cost, [[1 + gc + gc * gc]], rtol=1e-6)
    np.testing.assert_allclose(out.discount, [g**3], rtol=1e-6)
    np.testing.assert_allclose(out.cost_discount, [gc**3], rtol=1e-6)
    # Without cost_gamma both factors are gamma's.
    out = R.nstep_transition(_seq([1, 2], [1, 1], [0, 1], [0, 0], [10, 11]), g)
    np.testing.assert_allclose(out.cost_discount, [0.0])
    np.testing.assert_allclose(out.cost, [[1 + g]], rtol=1e-6)
