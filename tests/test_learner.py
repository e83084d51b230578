"""The composed update: shapes, compilation, determinism, numerics, and a toy problem."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cvpo_jax import learner as learner_lib
from cvpo_jax.config import CVPOConfig
from cvpo_jax.learner import make_learner, update_step
from cvpo_jax.networks import policy_distribution
from cvpo_jax.types import TrainState, Transition

SMALL = CVPOConfig(hidden_sizes=(32, 32), num_samples=8, dual_steps=5, mstep_steps=2)
OBS, ACT, B = 6, 2, 16


@pytest.fixture(scope="module")
def small_learner():
    """One compiled learner shared by the tests that only need the SMALL config."""
    return make_learner(SMALL, OBS, [-1.0] * ACT, [1.0] * ACT)


def random_batch(key, b=B, m=1, reward_scale=1.0, cost_scale=1.0):
    k = jax.random.split(key, 6)
    return Transition(
        obs=jax.random.normal(k[0], (b, OBS)),
        action=jax.random.uniform(k[1], (b, ACT), minval=-1, maxval=1),
        reward=reward_scale * jax.random.normal(k[2], (b,)),
        cost=cost_scale * jax.random.bernoulli(k[3], 0.3, (b, m)).astype(jnp.float32),
        next_obs=jax.random.normal(k[4], (b, OBS)),
        terminated=jax.random.bernoulli(k[5], 0.1, (b,)).astype(jnp.float32),
        truncated=jnp.zeros((b,)),
    )


def test_update_metrics_and_state_shapes():
    cfg = SMALL.replace(cost_limit=(25.0, 10.0))
    learner = make_learner(cfg, OBS, [-1.0] * ACT, [1.0] * ACT)
    state = learner.init(jax.random.PRNGKey(0))
    shapes_before = jax.tree.map(jnp.shape, state)
    state, metrics = learner.update(state, random_batch(jax.random.PRNGKey(1), m=2))
    assert jax.tree.map(jnp.shape, state) == shapes_before
    assert int(state.step) == 1
    per_constraint = {
        "lambda",
        "qc_weighted",
        "qc_ratio",
        "qc_policy",
        "qc_policy_ratio",
        "qc_data_gap",
        "q_cost",
        "qc_threshold",
        "qc_reachable",
        "estep_feasible",
        "lambda_at_upper",
        "lambda_at_lower",
    }
    expected = per_constraint | {
        "critic_loss_reward",
        "critic_loss_cost",
        "q_reward",
        "dual_objective",
        "dual_grad_norm",
        "eta",
        "weights_kl",
        "estep_kl_ratio",
        "ess_fraction",
        "policy_nll",
        "kl_mean",
        "kl_cov",
        "kl_mean_ratio",
        "kl_cov_ratio",
        "alpha_mean",
        "alpha_cov",
        "policy_std",
    }
    assert set(metrics) == expected
    for name, value in metrics.items():
        chex.assert_shape(value, (2,) if name in per_constraint else ())
        assert np.all(np.isfinite(np.asarray(value))), name


class UpdateVariantsTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_update_step_jitted_and_not(self):
        learner = make_learner(SMALL, OBS, [-1.0] * ACT, [1.0] * ACT)
        state = learner.init(jax.random.PRNGKey(0))
        fn = self.variant(lambda s, b: update_step(s, b, learner.networks, SMALL))
        new_state, metrics = fn(state, random_batch(jax.random.PRNGKey(1)))
        chex.assert_trees_all_equal_shapes(new_state, state)
        chex.assert_shape(metrics["lambda"], (1,))

    @chex.variants(with_jit=True, without_jit=True)
    def test_select_action(self):
        learner = make_learner(SMALL, OBS, [-0.5, 0.0], [0.5, 2.0])
        state = learner.init(jax.random.PRNGKey(0))
        obs = jax.random.normal(jax.random.PRNGKey(1), (64, OBS)) * 100
        act = self.variant(learner_lib.select_action, static_argnums=(1, 4))
        a = act(state.policy_params, learner.networks, obs, jax.random.PRNGKey(2), False)
        chex.assert_shape(a, (64, 2))
        assert np.all(np.asarray(a) >= [-0.5, 0.0]) and np.all(np.asarray(a) <= [0.5, 2.0])
        mean = act(state.policy_params, learner.networks, obs, jax.random.PRNGKey(2), True)
        expected, _ = learner.networks.policy.apply(state.policy_params, obs)
        # Under jit XLA fuses the tanh squash and the rescale, so the float32 results
        # may differ from the eager ones by round-off (~1e-7 near 0, where rtol alone
        # cannot absorb it); the bound is far below any real squashing error.
        np.testing.assert_allclose(np.asarray(mean), np.asarray(expected), rtol=1e-6, atol=1e-6)


def test_bad_batch_shapes_raise_with_the_field_name(small_learner):
    learner = small_learner
    state = learner.init(jax.random.PRNGKey(0))
    batch = random_batch(jax.random.PRNGKey(1))
    with pytest.raises(ValueError, match="Transition.cost"):
        learner.update(state, batch._replace(cost=batch.cost[:, 0]))
    state = learner.init(jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match="Transition.obs"):
        learner.update(state, batch._replace(obs=batch.obs[:, :3]))


def test_update_compiles_once(monkeypatch):
    traces = []
    original = learner_lib.update_step

    def counting(*args, **kwargs):
        traces.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(learner_lib, "update_step", counting)
    learner = make_learner(SMALL, OBS, [-1.0] * ACT, [1.0] * ACT)
    state = learner.init(jax.random.PRNGKey(0))
    for i in range(5):
        state, _ = learner.update(state, random_batch(jax.random.PRNGKey(i)))
    assert len(traces) == 1
    batches = jax.tree.map(
        lambda *x: jnp.stack(x), *[random_batch(jax.random.PRNGKey(i)) for i in range(3)]
    )
    for _ in range(3):
        state, metrics = learner.update_many(state, batches)
    assert len(traces) == 2  # One more trace, for the scanned variant, then none.
    chex.assert_shape(metrics["eta"], (3,))
    assert int(state.step) == 5 + 9


def test_update_many_equals_sequential_updates(small_learner):
    learner = small_learner
    batches = [random_batch(jax.random.PRNGKey(i)) for i in range(3)]
    state = learner.init(jax.random.PRNGKey(0))
    for b in batches:
        state, last = learner.update(state, b)
    scanned, metrics = learner.update_many(
        learner.init(jax.random.PRNGKey(0)), jax.tree.map(lambda *x: jnp.stack(x), *batches)
    )
    chex.assert_trees_all_close(scanned, state, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.asarray(metrics["eta"][-1]), np.asarray(last["eta"]), rtol=1e-4)


def test_same_seed_same_numbers_and_different_seed_different_numbers(small_learner):
    learner = small_learner

    def run(seed):
        state = learner.init(jax.random.PRNGKey(seed))
        for i in range(3):
            state, metrics = learner.update(state, random_batch(jax.random.PRNGKey(100 + i)))
        return state, metrics

    s1, m1 = run(0)
    s2, m2 = run(0)
    s3, _ = run(1)
    chex.assert_trees_all_equal(s1, s2)
    chex.assert_trees_all_equal(m1, m2)
    assert not np.allclose(
        np.asarray(jax.tree.leaves(s1.policy_params)[0]),
        np.asarray(jax.tree.leaves(s3.policy_params)[0]),
    )


def test_polyak_targets_move_by_tau():
    cfg = SMALL.replace(tau=0.25)
    learner = make_learner(cfg, OBS, [-1.0] * ACT, [1.0] * ACT)
    state = learner.init(jax.random.PRNGKey(0))
    old_target = jax.tree.map(np.asarray, state.target_critic_params)
    new, _ = learner.update(state, random_batch(jax.random.PRNGKey(1)))
    expected = jax.tree.map(
        lambda o, n: 0.75 * o + 0.25 * np.asarray(n), old_target, new.critic_params
    )
    chex.assert_trees_all_close(new.target_critic_params, expected, rtol=1e-5, atol=1e-7)


def test_no_nan_with_rewards_and_costs_in_the_1e4_range(small_learner):
    learner = small_learner
    state = learner.init(jax.random.PRNGKey(0))
    batches = jax.tree.map(
        lambda *x: jnp.stack(x),
        *[random_batch(jax.random.PRNGKey(i), reward_scale=1e4, cost_scale=1e4) for i in range(20)],
    )
    state, metrics = learner.update_many(state, batches)
    for leaf in jax.tree.leaves((state, metrics)):
        if jnp.issubdtype(leaf.dtype, jnp.floating):
            assert np.all(np.isfinite(np.asarray(leaf)))


def test_make_learner_rejects_bad_spaces():
    with pytest.raises(ValueError, match="finite"):
        make_learner(SMALL, OBS, [-np.inf, -1.0], [np.inf, 1.0])
    with pytest.raises(ValueError, match="obs_size"):
        make_learner(SMALL, 0, [-1.0], [1.0])


# ---------------------------------------------------------------- a toy constrained problem
def bandit_batch(key, u, b=256):
    """One-step bandit (every transition terminates): reward a, cost a^2, a in [-1, 1].

    With episodic limit d = 0.25 the constrained optimum is the deterministic a* = 0.5
    (E[a] subject to E[a^2] <= 0.25), whose Lagrange multiplier is lambda* = 1 (the
    maximiser of a - lambda a^2 is 1 / (2 lambda)); unconstrained, a* = 1.
    """
    a = jax.random.uniform(key, (u, b, 1), minval=-1, maxval=1)
    obs = jnp.ones((u, b, 2))
    return Transition(obs, a, a[..., 0], a**2, obs, jnp.ones((u, b)), jnp.zeros((u, b)))


@pytest.mark.slow
def test_cvpo_solves_a_constrained_bandit():
    cfg = CVPOConfig(
        hidden_sizes=(64, 64),
        cost_limit=(0.25,),
        episode_length=1,
        tau=0.05,
        kl_mean_eps=0.01,
        kl_cov_eps=0.001,
    )
    assert cfg.qc_threshold == pytest.approx((0.25,))  # T = 1: the limit itself.
    learner = make_learner(cfg, 2, [-1.0], [1.0])
    state = learner.init(jax.random.PRNGKey(0))
    key = jax.random.PRNGKey(1)
    for _ in range(15):
        key, k = jax.random.split(key)
        state, metrics = learner.update_many(state, bandit_batch(k, 100))
    mean, tril = learner.networks.policy.apply(state.policy_params, jnp.ones((1, 2)))
    actions = policy_distribution(mean, tril).sample(seed=key, sample_shape=20000)
    actions = np.clip(np.asarray(actions)[:, 0, 0], -1, 1)
    expected_cost = np.mean(actions**2)
    expected_reward = np.mean(actions)
    assert expected_cost <= 0.25 * 1.05, expected_cost  # Meets the limit.
    assert expected_reward >= 0.45, expected_reward  # Near the optimum 0.5.
    assert 0.45 <= float(mean[0, 0]) <= 0.53
    lam = float(metrics["lambda"][-1, 0])
    assert 0.8 <= lam <= 1.25, lam  # The KKT multiplier of the toy problem is 1.
    np.testing.assert_allclose(float(metrics["qc_weighted"][-1, 0]), 0.25, rtol=0.03)


def test_train_state_is_a_pytree_of_arrays(small_learner):
    learner = small_learner
    state = learner.init(jax.random.PRNGKey(0))
    assert isinstance(state, TrainState)
    assert state.step.dtype == jnp.int32
    leaves = jax.tree.leaves(state)
    assert leaves and all(isinstance(x, jax.Array) for x in leaves)


@pytest.mark.slow
@pytest.mark.parametrize("fit_clipped", [False, True])
def test_mstep_fits_clipped_samples_when_asked(monkeypatch, fit_clipped):
    """With init_std 3 most samples leave the [-1, 1] box: the M-step sees them
    clipped exactly when fit_clipped_actions is set, and the critics always do."""
    seen = {}
    original = learner_lib.mstep_lib.mstep

    def spy(params, opt_state, duals, networks, obs, actions, *rest):
        seen["mstep"] = actions
        return original(params, opt_state, duals, networks, obs, actions, *rest)

    monkeypatch.setattr(learner_lib.mstep_lib, "mstep", spy)
    cfg = SMALL.replace(init_std=3.0, fit_clipped_actions=fit_clipped)
    learner = make_learner(cfg, OBS, [-1.0] * ACT, [1.0] * ACT)
    state = learner.init(jax.random.PRNGKey(0))
    # Called eagerly (not under jit), so the spy sees concrete arrays.
    update_step(state, random_batch(jax.random.PRNGKey(1)), learner.networks, cfg)
    largest = float(jnp.max(jnp.abs(seen["mstep"])))
    assert (largest <= 1.0) if fit_clipped else (largest > 1.5)


def test_qc_data_gap_is_the_data_actions_value_less_the_policys():
    """Against an independent computation: the target cost critic at the batch's
    actions, minus its mean over K clipped samples of pi_old (the same keys)."""
    learner = make_learner(SMALL, OBS, [-1.0] * ACT, [1.0] * ACT)
    state = learner.init(jax.random.PRNGKey(3))
    batch = random_batch(jax.random.PRNGKey(4))
    _, metrics = learner.update(jax.tree.map(jnp.copy, state), batch)
    _, _, k_estep = jax.random.split(state.rng, 3)
    nets = learner.networks
    actions, _, _ = learner_lib.sample_actions(
        state.target_policy_params, nets, batch.obs, k_estep, SMALL.num_samples
    )
    clipped = learner_lib.clip_to_box(actions, nets)
    q_pi = nets.pessimistic_q(state.target_critic_params, batch.obs, clipped)[1]
    q_data = nets.pessimistic_q(state.target_critic_params, batch.obs, batch.action)[1]
    expected = np.mean(np.asarray(q_data, np.float64), axis=0) - np.mean(
        np.asarray(q_pi, np.float64), axis=(0, 1)
    )
    np.testing.assert_allclose(np.asarray(metrics["qc_data_gap"]), expected, rtol=1e-4, atol=1e-5)
