"""Policy evaluation: TD targets on hand-made transitions, and the critic loss."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cvpo_jax.config import CVPOConfig
from cvpo_jax.critic import make_critic_loss, td_targets
from cvpo_jax.networks import make_networks
from cvpo_jax.types import Transition


def test_td_targets_on_hand_made_transitions():
    gamma = 0.9
    # Three transitions: ordinary, terminated, truncated (time limit).
    reward = jnp.array([1.0, 2.0, 3.0])
    cost = jnp.array([[0.0, 1.0], [1.0, 0.0], [1.0, 1.0]])
    terminated = jnp.array([False, True, False])
    next_q_r = jnp.array([[10.0, 20.0, 30.0], [12.0, 18.0, 31.0]])  # [N_r=2, B]
    next_q_c = jnp.array(  # [N_c=2, M=2, B]
        [[[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]], [[1.5, 1.0, 3.5], [3.0, 7.0, 5.0]]]
    )
    y_r, y_c = td_targets(reward, cost, terminated, next_q_r, next_q_c, gamma)
    # min over reward critics: [10, 18, 30]; the terminated one does not bootstrap.
    np.testing.assert_allclose(y_r, [1 + 0.9 * 10, 2.0, 3 + 0.9 * 30], rtol=1e-6)
    # max over cost critics per constraint: m=0: [1.5, 2, 3.5]; m=1: [4, 7, 6].
    expected_c = [[0 + 0.9 * 1.5, 1 + 0.9 * 4], [1.0, 0.0], [1 + 0.9 * 3.5, 1 + 0.9 * 6]]
    np.testing.assert_allclose(y_c, expected_c, rtol=1e-6)


def test_truncation_bootstraps_and_termination_does_not():
    kwargs = dict(
        reward=jnp.zeros(2),
        cost=jnp.zeros((2, 1)),
        next_q_r=jnp.full((1, 2), 5.0),
        next_q_c=jnp.full((1, 1, 2), 2.0),
        gamma=0.5,
    )
    y_r, y_c = td_targets(terminated=jnp.array([1.0, 0.0]), **kwargs)
    np.testing.assert_allclose(y_r, [0.0, 2.5])
    np.testing.assert_allclose(y_c[:, 0], [0.0, 1.0])


def test_td_targets_reject_mismatched_shapes():
    with pytest.raises(AssertionError):
        td_targets(
            jnp.zeros(3),
            jnp.zeros((3, 2)),
            jnp.zeros(3),
            jnp.zeros((2, 3)),
            jnp.zeros((2, 1, 3)),
            0.9,
        )  # M=2 costs but M=1 cost critics.


def _setup(num_constraints=2):
    cfg = CVPOConfig(
        hidden_sizes=(16,),
        num_reward_critics=2,
        num_cost_critics=2,
        cost_limit=(1.0,) * num_constraints,
    )
    nets = make_networks(cfg, 3, [-1.0, -1.0], [1.0, 1.0])
    k = jax.random.split(jax.random.PRNGKey(0), 8)
    critic = nets.critic.init(k[0], jnp.zeros((1, 3)), jnp.zeros((1, 2)))
    target = nets.critic.init(k[1], jnp.zeros((1, 3)), jnp.zeros((1, 2)))
    policy = nets.policy.init(k[2], jnp.zeros((1, 3)))
    b = 5
    batch = Transition(
        obs=jax.random.normal(k[3], (b, 3)),
        action=jax.random.uniform(k[4], (b, 2), minval=-1, maxval=1),
        reward=jax.random.normal(k[5], (b,)),
        cost=jax.random.uniform(k[6], (b, num_constraints)),
        next_obs=jax.random.normal(k[7], (b, 3)),
        terminated=jnp.array([0.0, 1.0, 0.0, 0.0, 1.0]),
        truncated=jnp.array([0.0, 0.0, 1.0, 0.0, 0.0]),
    )
    return cfg, nets, critic, target, policy, batch


def test_critic_loss_equals_an_independent_computation():
    cfg, nets, critic, target, policy, batch = _setup()
    key = jax.random.PRNGKey(3)
    loss, aux = make_critic_loss(nets, cfg.gamma)(critic, target, policy, batch, key)
    # Recompute by hand: same next actions (same key), per-member evaluation.
    from cvpo_jax.networks import policy_distribution

    mean, tril = nets.policy.apply(policy, batch.next_obs)
    a_next = jnp.clip(policy_distribution(mean, tril).sample(seed=key), -1.0, 1.0)
    q_next = np.asarray(nets.critic.apply(target, batch.next_obs, a_next))  # [N, B]
    q_now = np.asarray(nets.critic.apply(critic, batch.obs, batch.action))
    cont = 1.0 - np.asarray(batch.terminated)
    y_r = np.asarray(batch.reward) + cfg.gamma * cont * np.minimum(q_next[0], q_next[1])
    loss_r = np.mean([(q_now[i] - y_r) ** 2 for i in range(2)])
    loss_c = 0.0
    for m in range(2):
        members = [2 + j * 2 + m for j in range(2)]  # Cost member j of constraint m.
        y_c = np.asarray(batch.cost[:, m]) + cfg.gamma * cont * np.maximum(*q_next[members])
        loss_c += np.mean([(q_now[i] - y_c) ** 2 for i in members]) / 2
    np.testing.assert_allclose(float(aux["critic_loss_reward"]), loss_r, rtol=1e-5)
    np.testing.assert_allclose(float(aux["critic_loss_cost"]), loss_c, rtol=1e-5)
    np.testing.assert_allclose(float(loss), loss_r + loss_c, rtol=1e-5)


def test_nonnegative_cost_q_clamps_the_target_and_the_estep_view():
    """With nonnegative_cost_q the bootstrapped Q_c is max(Q_c, 0) (hand computation
    with the target's cost outputs pushed below 0), and `pessimistic` clamps too."""
    cfg, _, critic, target, policy, batch = _setup(num_constraints=1)
    cfg = cfg.replace(nonnegative_cost_q=True)
    nets = make_networks(cfg, 3, [-1.0, -1.0], [1.0, 1.0])
    # The ensemble's last layer bias, lowered for the cost members only (2 and 3).
    params = jax.tree.map(lambda x: x, target)
    out = params["params"]["members"]["out"]
    out["bias"] = out["bias"].at[2:].add(-5.0)
    key = jax.random.PRNGKey(3)
    loss, aux = make_critic_loss(nets, cfg.gamma)(critic, params, policy, batch, key)
    from cvpo_jax.networks import policy_distribution

    mean, tril = nets.policy.apply(policy, batch.next_obs)
    a_next = jnp.clip(policy_distribution(mean, tril).sample(seed=key), -1.0, 1.0)
    q_next = np.asarray(nets.critic.apply(params, batch.next_obs, a_next))
    assert np.any(q_next[2:] < 0)  # the clamp matters
    q_now = np.asarray(nets.critic.apply(critic, batch.obs, batch.action))
    cont = 1.0 - np.asarray(batch.terminated)
    y_c = np.asarray(batch.cost[:, 0]) + cfg.gamma * cont * np.maximum(
        np.maximum(q_next[2], q_next[3]), 0.0
    )
    loss_c = np.mean([(q_now[i] - y_c) ** 2 for i in (2, 3)])
    np.testing.assert_allclose(float(aux["critic_loss_cost"]), loss_c, rtol=1e-5)
    q = jnp.array([[5.0], [6.0], [-1.0], [-3.0]])  # [N = 2 + 2, B=1]
    np.testing.assert_allclose(nets.pessimistic(q)[1], [[0.0]])
    plain = make_networks(cfg.replace(nonnegative_cost_q=False), 3, [-1.0, -1.0], [1.0, 1.0])
    np.testing.assert_allclose(plain.pessimistic(q)[1], [[-1.0]])
    with pytest.raises(ValueError, match="nonnegative_cost_q"):
        CVPOConfig(nonnegative_cost_q=1)


def test_critic_gradient_reaches_only_the_online_critic():
    cfg, nets, critic, target, policy, batch = _setup()
    loss_fn = make_critic_loss(nets, cfg.gamma)
    g_critic, g_target, g_policy = jax.grad(
        lambda c, t, p: loss_fn(c, t, p, batch, jax.random.PRNGKey(0))[0], argnums=(0, 1, 2)
    )(critic, target, policy)
    assert any(np.abs(np.asarray(x)).max() > 0 for x in jax.tree.leaves(g_critic))
    for g in jax.tree.leaves((g_target, g_policy)):
        np.testing.assert_array_equal(np.asarray(g), 0.0)


class CriticLossShapeTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_shapes(self):
        cfg, nets, critic, target, policy, batch = _setup(num_constraints=2)
        loss_fn = self.variant(make_critic_loss(nets, cfg.gamma))
        loss, aux = loss_fn(critic, target, policy, batch, jax.random.PRNGKey(0))
        chex.assert_shape([loss, aux["critic_loss_reward"], aux["q_reward"]], ())
        chex.assert_shape(aux["q_cost"], (2,))
        y_r, y_c = self.variant(td_targets, static_argnums=5)(
            batch.reward, batch.cost, batch.terminated, jnp.zeros((2, 5)), jnp.zeros((2, 2, 5)), 0.9
        )
        chex.assert_shape([y_r, y_c], [(5,), (5, 2)])


@pytest.mark.parametrize(
    "how, expected", [("max", 3.0), ("mean", 2.0), ("min", 1.0), ("first", 1.0)]
)
def test_cost_aggregate_chooses_how_cost_members_combine(how, expected):
    next_q_c = jnp.array([[[1.0]], [[3.0]], [[2.0]]])  # [N_c=3, M=1, B=1]
    _, y_c = td_targets(
        jnp.zeros(1),
        jnp.zeros((1, 1)),
        jnp.zeros(1),
        jnp.zeros((1, 1)),
        next_q_c,
        0.5,
        aggregate=how,
    )
    np.testing.assert_allclose(y_c, [[0.5 * expected]])
    cfg = CVPOConfig(
        num_reward_critics=1, num_cost_critics=3, cost_aggregate=how, hidden_sizes=(4,)
    )
    nets = make_networks(cfg, 2, [-1.0], [1.0])
    q = jnp.array([[5.0], [1.0], [3.0], [2.0]])  # [N = 1 + 3, B=1]
    _, q_c = nets.pessimistic(q)
    np.testing.assert_allclose(q_c, [[expected]])


def test_n_step_discount_replaces_the_one_step_bootstrap():
    y_r, y_c = td_targets(
        jnp.array([1.0, 1.0]),
        jnp.zeros((2, 1)),
        jnp.zeros(2),
        jnp.full((1, 2), 10.0),
        jnp.full((1, 1, 2), 4.0),
        0.9,
        discount=jnp.array([0.9**3, 0.0]),
    )
    np.testing.assert_allclose(y_r, [1 + 0.729 * 10, 1.0], rtol=1e-6)
    np.testing.assert_allclose(y_c, [[0.729 * 4], [0.0]], rtol=1e-6)


def test_cost_gamma_discounts_only_the_cost_bootstrap():
    # One ordinary and one terminated transition; reward at gamma 0.9, cost at 0.5.
    args = (
        jnp.array([1.0, 1.0]),
        jnp.array([[2.0], [2.0]]),
        jnp.array([0.0, 1.0]),
        jnp.full((1, 2), 10.0),
        jnp.full((1, 1, 2), 4.0),
        0.9,
    )
    y_r, y_c = td_targets(*args, cost_gamma=0.5)
    np.testing.assert_allclose(y_r, [1 + 0.9 * 10, 1.0], rtol=1e-6)
    np.testing.assert_allclose(y_c, [[2 + 0.5 * 4], [2.0]], rtol=1e-6)
    # n-step samples carry their own factors; cost_discount wins over cost_gamma.
    y_r, y_c = td_targets(
        *args,
        discount=jnp.array([0.81, 0.0]),
        cost_gamma=0.5,
        cost_discount=jnp.array([0.25, 0.0]),
    )
    np.testing.assert_allclose(y_r, [1 + 0.81 * 10, 1.0], rtol=1e-6)
    np.testing.assert_allclose(y_c, [[2 + 0.25 * 4], [2.0]], rtol=1e-6)


def test_critic_loss_uses_the_configured_cost_gamma():
    _, nets, critic, target, policy, batch = _setup(num_constraints=1)
    key = jax.random.PRNGKey(3)
    losses = {}
    for gc in (0.5, None):
        _, aux = make_critic_loss(nets, 0.9, gc)(critic, target, policy, batch, key)
        losses[gc] = (float(aux["critic_loss_reward"]), float(aux["critic_loss_cost"]))
    assert losses[0.5][0] == losses[None][0]  # The reward part does not see cost_gamma.
    assert losses[0.5][1] != losses[None][1]


def test_threshold_uses_the_cost_discount():
    cfg = CVPOConfig(gamma=0.99, cost_gamma=0.95, cost_limit=(25.0,), episode_length=1000)
    assert cfg.gamma_cost == 0.95
    np.testing.assert_allclose(cfg.qc_threshold, [25 * (1 - 0.95**1000) / (0.05 * 1000)])
    assert CVPOConfig(gamma=0.9).gamma_cost == 0.9
    with pytest.raises(ValueError, match="cost_gamma"):
        CVPOConfig(cost_gamma=1.0)


def test_cost_target_aggregate_sets_the_target_and_leaves_the_estep_view():
    """max for the E-step with mean in the target: the loss equals that of mean
    everywhere, while `pessimistic` still takes the max."""
    cfg, _, critic, target, policy, batch = _setup(num_constraints=1)
    variants = {
        "s": cfg.replace(cost_aggregate="max", cost_target_aggregate="mean"),
        "mn": cfg.replace(cost_aggregate="mean"),
        "mx": cfg.replace(cost_aggregate="max"),
    }
    nets = {n: make_networks(c, 3, [-1.0, -1.0], [1.0, 1.0]) for n, c in variants.items()}
    key = jax.random.PRNGKey(3)
    loss = {
        n: float(make_critic_loss(v, 0.9)(critic, target, policy, batch, key)[0])
        for n, v in nets.items()
    }
    assert loss["s"] == pytest.approx(loss["mn"], rel=1e-6)
    assert loss["s"] != pytest.approx(loss["mx"], rel=1e-6)
    q = jnp.array([[5.0], [6.0], [1.0], [3.0]])  # [N = 2 + 2, B=1]
    np.testing.assert_allclose(nets["s"].pessimistic(q)[1], [[3.0]])
    with pytest.raises(ValueError, match="cost_target_aggregate"):
        CVPOConfig(cost_target_aggregate="median")


def test_cross_fitted_cost_members_bootstrap_from_each_other_on_their_own_rows():
    """cost_target_aggregate=cross against a hand computation: member j's target is
    c + gamma * (member 1 - j at the next action), and member j is fitted only on
    the rows b with b % 2 == j; the reward part is unchanged."""
    cfg, _, critic, target, policy, batch = _setup()
    cross_cfg = cfg.replace(cost_aggregate="first", cost_target_aggregate="cross")
    nets = make_networks(cross_cfg, 3, [-1.0, -1.0], [1.0, 1.0])
    key = jax.random.PRNGKey(3)
    loss, aux = make_critic_loss(nets, cfg.gamma)(critic, target, policy, batch, key)
    from cvpo_jax.networks import policy_distribution

    mean, tril = nets.policy.apply(policy, batch.next_obs)
    a_next = jnp.clip(policy_distribution(mean, tril).sample(seed=key), -1.0, 1.0)
    q_next = np.asarray(nets.critic.apply(target, batch.next_obs, a_next), np.float64)
    q_now = np.asarray(nets.critic.apply(critic, batch.obs, batch.action), np.float64)
    cont = 1.0 - np.asarray(batch.terminated, np.float64)
    cost = np.asarray(batch.cost, np.float64)
    errors = []
    for b in range(5):
        j = b % 2
        for m in range(2):
            other = 2 + (1 - j) * 2 + m  # Cost member 1 - j of constraint m.
            y = cost[b, m] + cfg.gamma * cont[b] * q_next[other, b]
            errors.append((q_now[2 + j * 2 + m, b] - y) ** 2)
    np.testing.assert_allclose(float(aux["critic_loss_cost"]), np.mean(errors), rtol=1e-5)
    y_r = np.asarray(batch.reward) + cfg.gamma * cont * np.minimum(q_next[0], q_next[1])
    loss_r = np.mean([(q_now[i] - y_r) ** 2 for i in range(2)])
    np.testing.assert_allclose(float(aux["critic_loss_reward"]), loss_r, rtol=1e-5)
    # The E-step's view with cost_aggregate=first is member 0 alone.
    q_r, q_c = nets.pessimistic(jnp.asarray(q_now, jnp.float32))
    np.testing.assert_allclose(np.asarray(q_c), q_now[[2, 3]].T, rtol=1e-6)


def test_cross_fitting_needs_two_cost_members():
    with pytest.raises(ValueError, match="num_cost_critics"):
        CVPOConfig(num_cost_critics=3, cost_target_aggregate="cross")
    with pytest.raises(ValueError, match="cost_aggregate"):
        CVPOConfig(cost_aggregate="cross")  # Only the target may cross.
