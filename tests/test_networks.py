"""Tests of `cvpo_jax.networks`: the Gaussian policy, the critics and the ensemble.

Reference values are computed independently in numpy float64 from the flax
parameters. Tolerances are stated at each comparison.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cvpo_jax.config import CVPOConfig
from cvpo_jax.networks import Critic, CriticEnsemble, GaussianPolicy, make_networks

# float32 network evaluated against a float64 numpy reference.
F32_TOL = dict(rtol=1e-5, atol=1e-5)
# float64 network (x64 on, float64 inputs) against the float64 numpy reference.
F64_TOL = dict(rtol=1e-10, atol=1e-12)


@pytest.fixture
def x64():
    """Enables float64 for one test and restores the previous setting afterwards."""
    with jax.enable_x64(True):
        yield


def _perturb(params, scale, seed):
    """Adds numpy noise to every leaf so that biases and heads are not ~0.

    Test data is made with numpy (not jax.random) so that no eager jax op has to
    be compiled: only the jitted network functions are.
    """
    rng = np.random.default_rng(seed)
    return jax.tree.map(
        lambda x: (np.asarray(x) + scale * rng.normal(size=x.shape)).astype(x.dtype), params
    )


def _normal(seed, shape, scale=1.0, dtype=np.float32):
    return (scale * np.random.default_rng(seed).normal(size=shape)).astype(dtype)


def _np(tree):
    return jax.tree.map(lambda x: np.asarray(x, np.float64), tree)


def _relu(x):
    return np.maximum(x, 0.0)


def _softplus(x):
    return np.logaddexp(0.0, x)


def _policy_numpy(params, obs, low, high, hidden, full_cov, min_std, init_std):
    """The policy's forward pass in numpy float64, from its docstring's formulas."""
    p = _np(params)["params"]
    x = np.asarray(obs, np.float64)
    for i in range(len(hidden)):
        x = _relu(x @ p[f"Dense_{i}"]["kernel"] + p[f"Dense_{i}"]["bias"])
    low, high = np.asarray(low, np.float64), np.asarray(high, np.float64)
    raw_mean = x @ p["mean"]["kernel"] + p["mean"]["bias"]
    mean = (high + low) / 2 + (high - low) / 2 * np.tanh(raw_mean)
    shift = np.log(np.expm1(init_std - min_std))
    diag = _softplus(x @ p["diag"]["kernel"] + p["diag"]["bias"] + shift) + min_std
    a = len(low)
    tril = np.zeros(diag.shape + (a,))
    idx = np.arange(a)
    tril[..., idx, idx] = diag
    if full_cov and a > 1:
        off = x @ p["off_diag"]["kernel"] + p["off_diag"]["bias"]
        rows, cols = np.tril_indices(a, k=-1)
        tril[..., rows, cols] = off
    return mean, tril


def _layer_norm_numpy(x, p, eps=1e-6):
    """(x - mean) / sqrt(var + eps) * scale + bias over the last axis (flax's default eps)."""
    centred = x - x.mean(axis=-1, keepdims=True)
    var = (centred**2).mean(axis=-1, keepdims=True)
    return centred / np.sqrt(var + eps) * p["scale"] + p["bias"]


def _critic_numpy(params, obs, action):
    """A plain MLP on concat([obs, action]); the first kernel is obs_in over act_in.

    With norm_<i> parameters present, hidden layer i is layer-normalised before its ReLU.
    """
    p = _np(params)["params"]

    def act(x, i):
        return _relu(_layer_norm_numpy(x, p[f"norm_{i}"]) if f"norm_{i}" in p else x)

    w_first = np.concatenate([p["obs_in"]["kernel"], p["act_in"]["kernel"]], axis=0)
    x = np.concatenate([np.asarray(obs, np.float64), np.asarray(action, np.float64)], axis=-1)
    x = act(x @ w_first + p["obs_in"]["bias"], 0)
    i = 0
    while f"Dense_{i}" in p:
        x = act(x @ p[f"Dense_{i}"]["kernel"] + p[f"Dense_{i}"]["bias"], i + 1)
        i += 1
    return (x @ p["out"]["kernel"] + p["out"]["bias"])[..., 0]


LOW, HIGH = (-2.0, 0.0), (1.0, 3.0)  # Asymmetric box.
NB = 64  # Batch of states in the policy tests (shared shapes: fewer compilations).


def _policy(full_cov=True, min_std=1e-4, init_std=0.5, low=LOW, high=HIGH, hidden=(32, 32)):
    return GaussianPolicy(
        action_low=tuple(low),
        action_high=tuple(high),
        hidden_sizes=hidden,
        full_covariance=full_cov,
        min_std=min_std,
        init_std=init_std,
    )


# ---------------------------------------------------------------------------
# GaussianPolicy.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("full_cov", [True, False])
def test_max_std_shrinks_only_the_rows_above_it(full_cov):
    """With max_std, each row of L is the unbounded row scaled to norm <= max_std (the
    NumPy forward, rows shrunk by hand); rows below it are unchanged."""
    pol = _policy(full_cov=full_cov, min_std=1e-3, init_std=0.7)
    bounded = GaussianPolicy(
        action_low=LOW,
        action_high=HIGH,
        hidden_sizes=(32, 32),
        full_covariance=full_cov,
        min_std=1e-3,
        init_std=0.7,
        max_std=0.8,
    )
    obs = _normal(0, (NB, 5))
    params = _perturb(pol.init(jax.random.key(1), obs), 0.6, 2)
    _, tril = bounded.apply(params, obs)
    _, want = _policy_numpy(params, obs, LOW, HIGH, (32, 32), full_cov, 1e-3, 0.7)
    norms = np.linalg.norm(want, axis=-1, keepdims=True)
    assert (norms > 0.8).any() and (norms < 0.8).any()  # both cases occur
    np.testing.assert_allclose(tril, want * np.minimum(1.0, 0.8 / norms), **F32_TOL)
    std = np.sqrt(np.einsum("bij,bij->bi", np.asarray(tril), np.asarray(tril)))
    assert std.max() <= 0.8 + 1e-6
    with pytest.raises(ValueError, match="max_std"):
        CVPOConfig(max_std=0.3)  # below init_std


@pytest.mark.parametrize("full_cov", [True, False])
def test_policy_matches_numpy_forward(full_cov):
    pol = _policy(full_cov=full_cov, min_std=1e-3, init_std=0.7)
    obs = _normal(0, (NB, 5))
    params = _perturb(pol.init(jax.random.key(1), obs), 0.3, 2)
    mean, tril = pol.apply(params, obs)
    chex.assert_shape(mean, (NB, 2))
    chex.assert_shape(tril, (NB, 2, 2))
    want_mean, want_tril = _policy_numpy(params, obs, LOW, HIGH, (32, 32), full_cov, 1e-3, 0.7)
    np.testing.assert_allclose(mean, want_mean, **F32_TOL)
    np.testing.assert_allclose(tril, want_tril, **F32_TOL)


@pytest.mark.parametrize("full_cov", [True, False])
def test_policy_mean_in_box_for_extreme_inputs(full_cov):
    min_std = 0.05
    pol = _policy(full_cov=full_cov, min_std=min_std)
    obs = 1e6 * np.sign(_normal(0, (NB, 5)))
    params = pol.init(jax.random.key(1), obs[:1])
    mean, tril = map(np.asarray, pol.apply(params, obs))
    low = np.asarray(LOW, np.float32)
    high = np.asarray(HIGH, np.float32)
    assert np.all(np.isfinite(mean)) and np.all(np.isfinite(tril))
    assert np.all(mean >= low) and np.all(mean <= high), (mean.min(0), mean.max(0))
    # The inputs really saturate the squashing: some means sit on the bounds, so
    # an unbounded mean would have failed the check above.
    at_bound = np.isclose(mean, low, atol=1e-5) | np.isclose(mean, high, atol=1e-5)
    assert at_bound.mean() > 0.5
    diag = np.diagonal(np.asarray(tril), axis1=-2, axis2=-1)
    assert np.all(diag >= np.float32(min_std))
    # The std floor is reached for some extreme input (softplus -> 0).
    assert np.isclose(diag.min(), min_std, rtol=1e-5)


@pytest.mark.parametrize("full_cov", [True, False])
@pytest.mark.parametrize("num_actions", [1, 3])
def test_policy_scale_tril_structure(full_cov, num_actions):
    low, high = (-1.0,) * num_actions, (2.0,) * num_actions
    pol = _policy(full_cov=full_cov, min_std=1e-2, low=low, high=high)
    obs = _normal(0, (NB, 5), 3.0)
    params = _perturb(pol.init(jax.random.key(1), obs), 0.5, 3)
    _, tril = pol.apply(params, obs)
    tril = np.asarray(tril)
    chex.assert_shape(tril, (NB, num_actions, num_actions))
    upper = np.triu(np.ones((num_actions, num_actions), bool), k=1)
    assert np.all(tril[:, upper] == 0.0)  # Exactly lower triangular.
    diag = np.diagonal(tril, axis1=-2, axis2=-1)
    assert np.all(diag >= np.float32(1e-2))
    lower = np.tril(np.ones((num_actions, num_actions), bool), k=-1)
    if full_cov:
        if num_actions > 1:  # Off-diagonal entries are actually used.
            assert np.all(np.abs(tril[:, lower]) > 0.0)
    else:
        # Diagonal: equal to diag(diag) exactly.
        np.testing.assert_array_equal(tril, diag[..., None] * np.eye(num_actions))
        assert "off_diag" not in params["params"]


@pytest.mark.parametrize("min_std", [1e-4, 0.05])
@pytest.mark.parametrize("init_std", [0.1, 0.5, 1.0])
def test_policy_std_is_init_std_when_heads_are_zero(init_std, min_std):
    """The softplus shift alone sets the std: with zero std heads, L = init_std * I."""
    pol = _policy(full_cov=True, min_std=min_std, init_std=init_std)
    obs = _normal(0, (NB, 5), 5.0)
    params = pol.init(jax.random.key(4), obs)
    params = jax.tree_util.tree_map_with_path(
        lambda path, x: np.zeros_like(x) if path[1].key in ("diag", "off_diag") else x, params
    )
    _, tril = pol.apply(params, obs)
    # float32 softplus(log(expm1(s - min_std))) + min_std: a few ulps from s.
    want = np.broadcast_to(init_std * np.eye(2), (NB, 2, 2))
    np.testing.assert_allclose(tril, want, rtol=1e-5, atol=1e-7)


# With the heads' variance-scaling(1e-2) init, the head outputs have a std of about
# 0.1 * rms(hidden activations): the std of one state can be off by ~20%, the mean
# over a batch of states by a few percent.
INIT_STD_CASES = [
    (0.1, False),
    (0.5, False),
    (1.0, False),
    (0.1, True),
    (0.5, True),
    (1.0, True),
]


@pytest.mark.parametrize("init_std, full_cov", INIT_STD_CASES)
def test_policy_initial_std_close_to_init_std(init_std, full_cov):
    box = dict(low=(-1.0,) * 3, high=(1.0,) * 3)
    pol = _policy(full_cov=full_cov, min_std=1e-4, init_std=init_std, **box)
    obs = _normal(0, (4 * NB, 5))
    params = pol.init(jax.random.key(4), obs)
    _, tril = pol.apply(params, obs)
    tril = np.asarray(tril, np.float64)
    diag = np.diagonal(tril, axis1=-2, axis2=-1)
    # Diagonal: batch mean within 5%, every state within 25%.
    np.testing.assert_allclose(diag.mean(), init_std, rtol=0.05)
    np.testing.assert_allclose(diag, init_std, rtol=0.25)
    # Marginal std of each action dim, sqrt(diag(L L^T)): mean within 5%.
    std = np.sqrt(np.einsum("bij,bij->bi", tril, tril))
    np.testing.assert_allclose(std.mean(), init_std, rtol=0.05)


def test_policy_batch_dims():
    pol = _policy()
    obs = _normal(0, (3, 4, 5))
    params = pol.init(jax.random.key(1), obs[0])
    apply = pol.apply
    mean, tril = map(np.asarray, apply(params, obs))
    chex.assert_shape(mean, (3, 4, 2))
    chex.assert_shape(tril, (3, 4, 2, 2))
    flat_mean, flat_tril = apply(params, obs.reshape(12, 5))
    np.testing.assert_allclose(mean.reshape(12, 2), flat_mean, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(tril.reshape(12, 2, 2), flat_tril, rtol=1e-6, atol=1e-6)
    # No batch dims at all.
    m1, l1 = apply(params, obs[1, 2])
    chex.assert_shape(m1, (2,))
    chex.assert_shape(l1, (2, 2))
    np.testing.assert_allclose(m1, mean[1, 2], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(l1, tril[1, 2], rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------
# Critic.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("hidden", [(16,), (8, 16, 4)])
def test_critic_split_layer_equals_dense_on_concat(x64, hidden):
    critic = Critic(hidden_sizes=hidden)
    obs = _normal(0, (10, 5), dtype=np.float64)
    act = _normal(1, (10, 3), dtype=np.float64)
    params = jax.jit(critic.init)(jax.random.key(2), obs, act)
    # Non-zero biases so that a missing bias would show.
    params = _perturb(params, 0.1, 3)
    assert "bias" not in params["params"]["act_in"]  # The bias lives in obs_in only.
    q = jax.jit(critic.apply)(params, obs, act)
    chex.assert_shape(q, (10,))
    np.testing.assert_allclose(q, _critic_numpy(params, obs, act), **F64_TOL)


def test_critic_layer_norm_equals_numpy_and_is_scale_free(x64):
    hidden = (8, 16, 4)
    critic = Critic(hidden_sizes=hidden, layer_norm=True)
    obs = _normal(0, (10, 5), dtype=np.float64)
    act = _normal(1, (10, 3), dtype=np.float64)
    params = _perturb(jax.jit(critic.init)(jax.random.key(2), obs, act), 0.1, 3)
    assert sorted(k for k in params["params"] if k.startswith("norm_")) == [
        "norm_0",
        "norm_1",
        "norm_2",
    ]
    apply = jax.jit(critic.apply)
    q = apply(params, obs, act)
    np.testing.assert_allclose(q, _critic_numpy(params, obs, act), **F64_TOL)
    # The K-sample path agrees with the pairwise one with the norm too.
    acts = _normal(4, (10, 6, 3), dtype=np.float64)
    flat = apply(params, np.repeat(obs, 6, axis=0), acts.reshape(60, 3))
    np.testing.assert_allclose(apply(params, obs, acts), np.reshape(flat, (10, 6)), **F64_TOL)
    # The first layer is normalised: scaling its weights and bias (as a large
    # observation scale would) leaves Q unchanged, which it would not without the norm.
    scaled = jax.tree.map(lambda x: x, params)
    for name in ("obs_in", "act_in"):
        scaled["params"][name] = jax.tree.map(lambda x: 50.0 * x, params["params"][name])
    np.testing.assert_allclose(apply(scaled, obs, act), q, rtol=1e-6, atol=1e-8)
    plain = Critic(hidden_sizes=hidden)
    plain_params = {"params": {k: v for k, v in params["params"].items() if "norm" not in k}}
    plain_scaled = {"params": {k: v for k, v in scaled["params"].items() if "norm" not in k}}
    assert not np.allclose(plain.apply(plain_scaled, obs, act), plain.apply(plain_params, obs, act))


def test_networks_pass_critic_layer_norm_to_every_path(x64):
    cfg = CVPOConfig(hidden_sizes=(8, 8), num_reward_critics=2, critic_layer_norm=True)
    nets = make_networks(cfg, 5, (-1.0, -1.0), (1.0, 1.0))
    obs = _normal(0, (4, 5), dtype=np.float64)
    acts = _normal(1, (4, 3, 2), dtype=np.float64)
    params = nets.critic.init(jax.random.key(0), obs, acts[:, 0])
    assert "norm_0" in params["params"]["members"]
    # lax.map over members (K actions) equals the vmapped ensemble on each pair.
    q = nets.critic_values(params, obs, acts)
    for j in range(3):
        np.testing.assert_allclose(
            q[:, :, j], nets.critic_values(params, obs, acts[:, j]), **F64_TOL
        )


def test_critic_sampled_actions_path_equals_pairwise(x64):
    critic = Critic(hidden_sizes=(8, 16, 4))
    b, k_, o, a = 4, 6, 5, 3
    obs = _normal(0, (b, o), dtype=np.float64)
    acts = _normal(1, (b, k_, a), dtype=np.float64)
    params = _perturb(jax.jit(critic.init)(jax.random.key(2), obs, acts[:, 0]), 0.1, 3)
    apply = jax.jit(critic.apply)
    q = np.asarray(apply(params, obs, acts))
    chex.assert_shape(q, (b, k_))
    # The same pairs as one flat batch with the state repeated.
    flat = np.asarray(apply(params, np.repeat(obs, k_, axis=0), acts.reshape(b * k_, a)))
    np.testing.assert_allclose(q, flat.reshape(b, k_), **F64_TOL)
    # And one pair at a time, against the independent numpy MLP.
    for i in range(b):
        for j in range(k_):
            one = apply(params, obs[i], acts[i, j])
            chex.assert_shape(one, ())
            np.testing.assert_allclose(one, q[i, j], **F64_TOL)
            np.testing.assert_allclose(
                q[i, j], _critic_numpy(params, obs[i], acts[i, j]), **F64_TOL
            )


# ---------------------------------------------------------------------------
# CriticEnsemble.
# ---------------------------------------------------------------------------


# One ensemble and set of shapes for every ensemble test (N = N_r + N_c * M of
# `_networks()` below), jitted once: the compilations are shared between the tests.
ENS_SHAPES = (8, 5, 4, 4, 2)  # N, B, K, O, A
ENS = CriticEnsemble(num_members=ENS_SHAPES[0], hidden_sizes=(16, 16))
_ens_init = jax.jit(ENS.init)
_ens_apply = jax.jit(ENS.apply)
_member_apply = jax.jit(Critic(hidden_sizes=(16, 16)).apply)


def _member(params, i):
    return {"params": jax.tree.map(lambda x: np.asarray(x)[i], params["params"]["members"])}


def test_ensemble_shapes_and_members_differ(x64):
    n, b, k_, o, a = ENS_SHAPES
    obs = _normal(0, (b, o), dtype=np.float64)
    acts = _normal(1, (b, k_, a), dtype=np.float64)
    params = jax.tree.map(np.asarray, _ens_init(jax.random.key(2), obs, acts[:, 0]))
    apply = _ens_apply
    q1 = np.asarray(apply(params, obs, acts[:, 0]))
    qk = np.asarray(apply(params, obs, acts))
    chex.assert_shape(q1, (n, b))
    chex.assert_shape(qk, (n, b, k_))
    # Each stacked leaf has the member axis first and differs between members.
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        assert leaf.shape[0] == n, path
        if np.asarray(leaf).any():  # Zero-initialised biases are equal by design.
            for i in range(n):
                for j in range(i + 1, n):
                    assert not np.allclose(leaf[i], leaf[j]), (path, i, j)
    for i in range(n):
        for j in range(i + 1, n):
            assert np.max(np.abs(qk[i] - qk[j])) > 1e-4


def test_ensemble_equals_members_evaluated_separately(x64):
    n, b, k_, o, a = ENS_SHAPES
    obs = _normal(10, (b, o), dtype=np.float64)
    acts = _normal(11, (b, k_, a), dtype=np.float64)
    params = _perturb(_ens_init(jax.random.key(12), obs, acts[:, 0]), 0.1, 13)
    apply = _ens_apply
    q1 = np.asarray(apply(params, obs, acts[:, 0]))
    qk = np.asarray(apply(params, obs, acts))
    single = _member_apply
    for i in range(n):
        p_i = _member(params, i)
        np.testing.assert_allclose(q1[i], single(p_i, obs, acts[:, 0]), **F64_TOL)
        np.testing.assert_allclose(qk[i], single(p_i, obs, acts), **F64_TOL)
        np.testing.assert_allclose(q1[i], _critic_numpy(p_i, obs, acts[:, 0]), **F64_TOL)


# ---------------------------------------------------------------------------
# Networks: critic index mapping and pessimistic values.
# ---------------------------------------------------------------------------

N_R, N_C, M = 2, 3, 2


def _networks():
    cfg = CVPOConfig(
        hidden_sizes=(16, 16), num_reward_critics=N_R, num_cost_critics=N_C, cost_limit=(25, 10)
    )
    return make_networks(cfg, 4, (-1.0, -1.0), (1.0, 1.0))


def test_make_networks_sizes():
    nets = _networks()
    assert nets.critic.num_members == N_R + N_C * M
    assert nets.num_reward_critics == N_R and nets.num_cost_critics == N_C
    assert nets.num_constraints == M and nets.obs_size == 4 and nets.action_size == 2


def test_split_critic_values_index_mapping():
    nets = _networks()
    b, k_ = 3, 4
    n = N_R + N_C * M
    # Member n's values are n * 1000 + position, so every entry is traceable.
    q = np.arange(n)[:, None, None] * 1000.0 + np.arange(b * k_).reshape(b, k_)
    q_r, q_c = nets.split_critic_values(jnp.asarray(q))
    chex.assert_shape(q_r, (N_R, b, k_))
    chex.assert_shape(q_c, (N_C, M, b, k_))
    for i in range(N_R):
        np.testing.assert_array_equal(q_r[i], q[i])
    for j in range(N_C):
        for m in range(M):
            np.testing.assert_array_equal(q_c[j, m], q[N_R + j * M + m])
    # Also with a single-action [N, B] input.
    q_r1, q_c1 = nets.split_critic_values(jnp.asarray(q[:, :, 0]))
    chex.assert_shape(q_r1, (N_R, b))
    chex.assert_shape(q_c1, (N_C, M, b))
    np.testing.assert_array_equal(q_c1[2, 1], q[N_R + 2 * M + 1, :, 0])


@pytest.mark.parametrize("with_k", [True, False])
def test_pessimistic_q_min_reward_max_cost(with_k):
    nets = _networks()
    n = N_R + N_C * M
    b, k_ = 3, 5
    shape = (n, b, k_) if with_k else (n, b)
    q = np.random.default_rng(0).normal(size=shape).astype(np.float32)
    q_r, q_c = nets.pessimistic(q)
    out = (b, k_) if with_k else (b,)
    chex.assert_shape(q_r, out)
    chex.assert_shape(q_c, out + (M,))
    want_r = np.minimum(q[0], q[1])
    np.testing.assert_array_equal(q_r, want_r)
    for m in range(M):
        members = [q[N_R + j * M + m] for j in range(N_C)]
        want_c = np.maximum.reduce(members)
        np.testing.assert_array_equal(q_c[..., m], want_c)
    # Cost members are not mixed across constraints: constraint 0 only sees 2, 4, 6.
    assert not np.array_equal(q_c[..., 0], q_c[..., 1])


def test_pessimistic_q_with_real_ensemble(x64):
    nets = _networks()
    n, b, k_, o, a = ENS_SHAPES
    assert nets.critic.num_members == n and nets.obs_size == o and nets.action_size == a
    obs = _normal(20, (b, o), dtype=np.float64)
    acts = _normal(21, (b, k_, a), dtype=np.float64)
    assert nets.critic == ENS
    params = _ens_init(jax.random.key(22), obs, acts[:, 0])
    all_q = np.asarray(_ens_apply(params, obs, acts))
    q_r, q_c = jax.jit(nets.pessimistic_q)(params, obs, acts)
    chex.assert_shape(q_r, (b, k_))
    chex.assert_shape(q_c, (b, k_, M))
    np.testing.assert_allclose(q_r, all_q[:N_R].min(0), rtol=0, atol=0)
    for m in range(M):
        idx = [N_R + j * M + m for j in range(N_C)]
        np.testing.assert_allclose(q_c[..., m], all_q[idx].max(0), rtol=0, atol=0)


# ---------------------------------------------------------------------------
# make_networks errors.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "obs_size, low, high, fragment",
    [
        (3, (-np.inf, 0.0), (1.0, 1.0), "-inf"),
        (3, (0.0, 0.0), (1.0, np.inf), "inf"),
        (3, (0.0, np.nan), (1.0, 1.0), "nan"),
        (3, (0.0, 2.0), (1.0, 2.0), "2.0"),  # low == high.
        (3, (0.0, 5.0), (1.0, 2.0), "5.0"),  # low > high.
        (3, (0.0, 0.0, 0.0), (1.0, 1.0), "size 3"),
        (3, (), (), "size 0"),
        (0, (0.0,), (1.0,), "obs_size=0"),
        (-2, (0.0,), (1.0,), "obs_size=-2"),
        (2.5, (0.0,), (1.0,), "obs_size=2.5"),
        ("3", (0.0,), (1.0,), "obs_size='3'"),
    ],
)
def test_make_networks_errors(obs_size, low, high, fragment):
    cfg = CVPOConfig(hidden_sizes=(8,))
    with pytest.raises(ValueError) as info:
        make_networks(cfg, obs_size, low, high)
    assert fragment in str(info.value), str(info.value)


def test_make_networks_accepts_arrays_and_numpy_ints():
    cfg = CVPOConfig(hidden_sizes=(8,))
    nets = make_networks(cfg, np.int64(3), np.array([[-1.0, 0.0]]), np.array([1.0, 2.0]))
    assert nets.obs_size == 3 and nets.action_size == 2
    assert nets.policy.action_low == (-1.0, 0.0) and nets.policy.action_high == (1.0, 2.0)


def test_make_networks_rejects_bool_obs_size():
    with pytest.raises(ValueError):
        make_networks(CVPOConfig(hidden_sizes=(8,)), True, (0.0,), (1.0,))
