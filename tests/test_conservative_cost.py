"""The conservative cost term: its value, its place in the loss, the direction it
moves Q_c, and its wiring into the update (against independent computations)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_learner import OBS as LEARNER_OBS
from test_learner import random_batch

from cvpo_jax import learner as learner_lib
from cvpo_jax.config import CVPOConfig
from cvpo_jax.critic import conservative_cost_gap, make_critic_loss
from cvpo_jax.learner import make_learner
from cvpo_jax.networks import make_networks
from cvpo_jax.types import Transition

OBS, ACT = 3, 2


def test_gap_equals_a_float64_computation():
    rng = np.random.default_rng(0)
    n_c, m, b, k = 2, 3, 5, 4
    q_data = rng.normal(size=(n_c, m, b))
    q_samples = rng.normal(size=(n_c, m, b, k))
    w = rng.uniform(size=(b, k))
    w /= w.sum(axis=1, keepdims=True)
    expected = np.mean(
        [
            q_data[i, j, s] - sum(w[s, a] * q_samples[i, j, s, a] for a in range(k))
            for i in range(n_c)
            for j in range(m)
            for s in range(b)
        ]
    )
    got = conservative_cost_gap(
        jnp.asarray(q_data, jnp.float32),
        jnp.asarray(q_samples, jnp.float32),
        jnp.asarray(w, jnp.float32),
    )
    np.testing.assert_allclose(float(got), expected, rtol=1e-5, atol=1e-6)


def test_gap_rejects_mismatched_shapes():
    with pytest.raises(AssertionError):
        conservative_cost_gap(jnp.zeros((1, 1, 4)), jnp.zeros((1, 1, 5, 3)), jnp.zeros((5, 3)))
    with pytest.raises(AssertionError):
        conservative_cost_gap(jnp.zeros((1, 1, 5)), jnp.zeros((1, 1, 5, 3)), jnp.zeros((5, 2)))


def _setup(b=6, k=4, num_constraints=2):
    cfg = CVPOConfig(hidden_sizes=(16,), num_cost_critics=2, cost_limit=(1.0,) * num_constraints)
    nets = make_networks(cfg, OBS, [-1.0] * ACT, [1.0] * ACT)
    keys = jax.random.split(jax.random.PRNGKey(0), 10)
    critic = nets.critic.init(keys[0], jnp.zeros((1, OBS)), jnp.zeros((1, ACT)))
    target = nets.critic.init(keys[1], jnp.zeros((1, OBS)), jnp.zeros((1, ACT)))
    policy = nets.policy.init(keys[2], jnp.zeros((1, OBS)))
    batch = Transition(
        obs=jax.random.normal(keys[3], (b, OBS)),
        action=jax.random.uniform(keys[4], (b, ACT), minval=-1, maxval=1),
        reward=jax.random.normal(keys[5], (b,)),
        cost=jax.random.uniform(keys[6], (b, num_constraints)),
        next_obs=jax.random.normal(keys[7], (b, OBS)),
        terminated=jnp.zeros((b,)),
        truncated=jnp.zeros((b,)),
    )
    n = b // 2  # The term on the first half of the states only.
    actions = jax.random.uniform(keys[8], (n, k, ACT), minval=-1, maxval=1)
    weights = jax.nn.softmax(jax.random.normal(keys[9], (n, k)), axis=1)
    return cfg, nets, critic, target, policy, batch, (actions, weights)


def test_loss_adds_weight_times_the_gap_of_the_online_cost_members():
    cfg, nets, critic, target, policy, batch, conservative = _setup()
    actions, weights = conservative
    key = jax.random.PRNGKey(1)
    base, base_aux = make_critic_loss(nets, cfg.gamma)(critic, target, policy, batch, key)
    loss, aux = make_critic_loss(nets, cfg.gamma, conservative_weight=0.7)(
        critic, target, policy, batch, key, conservative
    )
    # Independently: every cost member (indices 1.. after the one reward member)
    # applied one state at a time, in float64.
    q_data = np.asarray(nets.critic.apply(critic, batch.obs, batch.action), np.float64)[1:]
    per_state = [
        np.asarray(
            nets.critic.apply(
                critic, jnp.repeat(batch.obs[s][None], actions.shape[1], 0), actions[s]
            ),
            np.float64,
        )[1:]
        for s in range(actions.shape[0])  # The batch's first B' states.
    ]  # [B'] of [N_c * M, K]
    w = np.asarray(weights, np.float64)
    gaps = [
        q_data[i, s] - np.dot(w[s], per_state[s][i])
        for i in range(q_data.shape[0])
        for s in range(len(per_state))
    ]
    expected_gap = np.mean(gaps)
    np.testing.assert_allclose(
        float(aux["qc_conservative_gap"]), expected_gap, rtol=1e-4, atol=1e-5
    )
    np.testing.assert_allclose(float(loss), float(base) + 0.7 * expected_gap, rtol=1e-5, atol=1e-5)
    # The TD part's metric stays the TD loss alone (comparable across runs).
    assert float(aux["critic_loss_cost"]) == float(base_aux["critic_loss_cost"])
    # Off (weight 0, or no samples given): the plain TD loss, no extra metric.
    off, off_aux = make_critic_loss(nets, cfg.gamma)(
        critic, target, policy, batch, key, conservative
    )
    assert float(off) == float(base) and "qc_conservative_gap" not in off_aux


def test_a_step_on_the_term_narrows_the_gap_and_leaves_the_reward_member():
    """A small gradient step on the term alone (SGD, weight 1, no TD part) lowers the
    gap between Q_c at the data and at the weighted samples by lr * |grad|^2 to first
    order; the reward member gets no gradient."""
    cfg, nets, critic, target, policy, batch, conservative = _setup()
    loss_fn = make_critic_loss(nets, cfg.gamma, conservative_weight=1.0)
    key = jax.random.PRNGKey(2)

    def gap(params):
        return loss_fn(params, target, policy, batch, key, conservative)[1]["qc_conservative_gap"]

    grads = jax.grad(gap)(critic)
    lr = 1e-3
    stepped = jax.tree.map(lambda p, g: p - lr * g, critic, grads)
    sq_norm = sum(float(jnp.sum(jnp.square(g))) for g in jax.tree.leaves(grads))
    change = float(gap(stepped)) - float(gap(critic))
    assert change < 0
    np.testing.assert_allclose(change, -lr * sq_norm, rtol=0.05)
    reward_grads = jax.tree.map(lambda g: g[0], grads["params"]["members"])
    assert all(float(jnp.max(jnp.abs(g))) == 0.0 for g in jax.tree.leaves(reward_grads))
    # And the whole loss's gradient is the TD gradient plus the term's.
    plain = make_critic_loss(nets, cfg.gamma)
    g_all = jax.grad(lambda p: loss_fn(p, target, policy, batch, key, conservative)[0])(critic)
    g_td = jax.grad(lambda p: plain(p, target, policy, batch, key)[0])(critic)
    for a, b_, c in zip(*(jax.tree.leaves(t) for t in (g_all, g_td, grads)), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b_ + c), rtol=1e-4, atol=1e-6)


def test_update_with_the_term_reports_it_at_the_estep_samples():
    """The update's metric equals the gap of the pre-update online cost critic at the
    E-step's clipped samples and weights (recomputed from the same keys)."""
    cfg = CVPOConfig(
        hidden_sizes=(32, 32),
        num_samples=8,
        dual_steps=5,
        cost_conservative_weight=0.5,
        cost_conservative_states=5,
    )
    learner = make_learner(cfg, LEARNER_OBS, [-1.0] * ACT, [1.0] * ACT)
    state = learner.init(jax.random.PRNGKey(3))
    batch = random_batch(jax.random.PRNGKey(4), b=16)
    seen = {}
    original = learner_lib.estep_lib.estep

    def spy(*args, **kwargs):
        out = original(*args, **kwargs)
        seen["weights"] = out[1]
        return out

    nets = learner.networks
    _, _, k_estep = jax.random.split(state.rng, 3)
    actions, _, _ = learner_lib.sample_actions(
        state.target_policy_params, nets, batch.obs, k_estep, cfg.num_samples
    )
    clipped = learner_lib.clip_to_box(actions, nets)
    learner_lib.estep_lib.estep = spy
    try:
        _, metrics = learner_lib.update_step(jax.tree.map(jnp.copy, state), batch, nets, cfg)
    finally:
        learner_lib.estep_lib.estep = original
    w = np.asarray(seen["weights"], np.float64)[:5]
    q = np.asarray(nets.critic_values(state.critic_params, batch.obs[:5], clipped[:5]), np.float64)
    q_data = np.asarray(
        nets.critic_values(state.critic_params, batch.obs, batch.action), np.float64
    )
    expected = np.mean(q_data[1, :5] - np.sum(w * q[1], axis=1))
    np.testing.assert_allclose(
        float(metrics["qc_conservative_gap"]), expected, rtol=1e-4, atol=1e-5
    )


def test_the_term_off_leaves_the_update_as_it_was():
    """Weight 0 adds no metric and gives the same state as the term never computed."""
    base = CVPOConfig(hidden_sizes=(16,), num_samples=4, dual_steps=2)
    learner = make_learner(base, LEARNER_OBS, [-1.0] * ACT, [1.0] * ACT)
    learner_on = make_learner(
        base.replace(cost_conservative_weight=1.0), LEARNER_OBS, [-1.0] * ACT, [1.0] * ACT
    )
    state = learner.init(jax.random.PRNGKey(5))
    batch = random_batch(jax.random.PRNGKey(6), b=8)
    off_state, off_metrics = learner.update(jax.tree.map(jnp.copy, state), batch)
    on_state, on_metrics = learner_on.update(jax.tree.map(jnp.copy, state), batch)
    assert "qc_conservative_gap" not in off_metrics and "qc_conservative_gap" in on_metrics
    # The policy step does not read the online critic, so it is the same either way;
    # the critics differ only through the term.
    leaves = {
        name: [jax.tree.leaves(getattr(st, name)) for st in (off_state, on_state)]
        for name in ("policy_params", "critic_params")
    }
    for a, b_ in zip(*leaves["policy_params"], strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b_))
    diffs = [
        float(jnp.max(jnp.abs(a - b_))) for a, b_ in zip(*leaves["critic_params"], strict=True)
    ]
    assert max(diffs) > 0


def test_cost_values_are_the_cost_members_of_the_whole_ensemble():
    cfg, nets, critic, *_ = _setup()
    obs = jax.random.normal(jax.random.PRNGKey(7), (4, OBS))
    actions = jax.random.uniform(jax.random.PRNGKey(8), (4, 3, ACT), minval=-1, maxval=1)
    whole = nets.split_critic_values(nets.critic_values(critic, obs, actions))[1]
    got = nets.cost_values(critic, obs, actions)
    assert got.shape == (cfg.num_cost_critics, 2, 4, 3)
    np.testing.assert_allclose(np.asarray(got), np.asarray(whole), rtol=1e-6, atol=1e-6)
