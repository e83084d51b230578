"""cost_bootstrap="data": the replay's next action and the cost critics' TD target.

The sampler must hand back the action the same env took at the bootstrap
observation, and only where that action belongs to the same episode; the cost
target must then be c + gamma Q_c(s', a_data), computed here by hand.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cvpo_jax import replay as R
from cvpo_jax.config import CVPOConfig
from cvpo_jax.critic import make_critic_loss
from cvpo_jax.learner import make_learner
from cvpo_jax.types import Transition


def _fill(replay, num_envs, steps, seed=0):
    """Adds `steps` vector steps; item uid u has obs [u], action [u + 0.25]. Returns the
    per-env streams of dicts (uid, term, trunc)."""
    rng = np.random.default_rng(seed)
    state = replay.init()
    streams = [[] for _ in range(num_envs)]
    uid = 0
    for _ in range(steps):
        rows = []
        for e in range(num_envs):
            term = bool(rng.random() < 0.1)
            trunc = (not term) and bool(rng.random() < 0.1)
            rows.append(dict(uid=uid, term=term, trunc=trunc))
            streams[e].append(rows[-1])
            uid += 1
        state = replay.add(
            state,
            Transition(
                obs=jnp.asarray([[r["uid"]] for r in rows], jnp.float32),
                action=jnp.asarray([[r["uid"] + 0.25] for r in rows], jnp.float32),
                reward=jnp.ones(num_envs),
                cost=jnp.ones((num_envs, 1)),
                next_obs=jnp.asarray([[r["uid"] + 0.5] for r in rows], jnp.float32),
                terminated=jnp.asarray([r["term"] for r in rows], jnp.float32),
                truncated=jnp.asarray([r["trunc"] for r in rows], jnp.float32),
            ),
        )
    return state, streams


@pytest.mark.parametrize("n, num_envs, capacity", [(1, 1, 64), (1, 3, 50), (3, 2, 37)])
def test_sampled_next_action_is_the_same_envs_next_step(n, num_envs, capacity):
    steps = 40
    replay = R.make_replay(capacity, 16, 1, 1, 1, n_step=n, stride=num_envs, next_action=True)
    state, streams = _fill(replay, num_envs, steps)
    where = {s["uid"]: (e, t) for e, stream in enumerate(streams) for t, s in enumerate(stream)}
    oldest = steps * num_envs - capacity
    newest_start = steps * num_envs - n * num_envs  # The window plus its successor exist.
    valid = invalid = 0
    sample = jax.jit(replay.sample)
    for k in range(20):
        out = sample(state, jax.random.PRNGKey(k))
        assert out.next_action.shape == (16, 1) and out.has_next_action.shape == (16,)
        for b in range(16):
            u = int(out.obs[b, 0])
            assert oldest <= u < newest_start, (u, oldest, newest_start)
            e, t = where[u]
            window = streams[e][t : t + n]
            ended = any(s["term"] or s["trunc"] for s in window)
            assert float(out.has_next_action[b]) == (0.0 if ended else 1.0)
            if not ended:
                # The successor's obs is this window's bootstrap obs (next_obs of its
                # last step, uid + 0.5 in this encoding), its action the next action.
                successor = streams[e][t + n]
                assert float(out.next_obs[b, 0]) == window[-1]["uid"] + 0.5
                assert float(out.next_action[b, 0]) == successor["uid"] + 0.25
                valid += 1
            else:
                invalid += 1
    assert valid > 50 and invalid > 5


def test_the_knob_off_samples_exactly_as_before():
    """Without next_action the replay keeps flashbax's own sampler (same batches)."""
    replay = R.make_replay(64, 8, 1, 1, 1, stride=2)
    state, _ = _fill(replay, 2, 20)
    out = replay.sample(state, jax.random.PRNGKey(0))
    assert out.next_action is None and out.discount is None
    want = replay.buffer.sample(state, jax.random.PRNGKey(0)).experience
    np.testing.assert_array_equal(out.obs, want.obs)


def test_data_bootstrap_target_equals_the_hand_computation():
    cfg = CVPOConfig(hidden_sizes=(8, 8), cost_bootstrap="data", num_samples=4)
    learner = make_learner(cfg, 3, (-1.0, -1.0), (1.0, 1.0))
    nets = learner.networks
    state = learner.init(jax.random.PRNGKey(0))
    rng = np.random.default_rng(1)
    b = 6
    f32 = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731
    batch = Transition(
        obs=f32(rng.normal(size=(b, 3))),
        action=f32(rng.uniform(-1, 1, (b, 2))),
        reward=f32(rng.normal(size=b)),
        cost=f32(rng.random((b, 1))),
        next_obs=f32(rng.normal(size=(b, 3))),
        terminated=f32([0, 0, 1, 0, 0, 0]),
        truncated=f32([0, 0, 0, 0, 1, 0]),
        discount=f32([0.99, 0.99, 0.0, 0.99, 0.99, 0.99]),
        cost_discount=f32([0.99, 0.99, 0.0, 0.99, 0.99, 0.99]),
        next_action=f32(rng.uniform(-1, 1, (b, 2))),
        has_next_action=f32([1, 1, 0, 1, 0, 1]),
    )
    loss = make_critic_loss(nets, cfg.gamma, cost_bootstrap="data")
    key = jax.random.PRNGKey(5)
    args = (state.critic_params, state.target_critic_params, state.target_policy_params)
    _, aux = loss(*args, batch, key)

    # By hand: the policy's clipped sample (same key) where there is no data action.
    mean, tril = nets.policy.apply(state.target_policy_params, batch.next_obs)
    from cvpo_jax.networks import policy_distribution

    sampled = np.clip(np.asarray(policy_distribution(mean, tril).sample(seed=key)), -1, 1)
    taken = np.where(np.asarray(batch.has_next_action)[:, None] > 0, batch.next_action, sampled)
    q_next = np.asarray(nets.critic.apply(state.target_critic_params, batch.next_obs, taken))
    _, q_next_c = nets.split_critic_values(q_next)  # [1, 1, B]
    y_c = np.asarray(batch.cost)[:, 0] + np.asarray(batch.cost_discount) * q_next_c[0, 0]
    q = np.asarray(nets.critic.apply(state.critic_params, batch.obs, batch.action))
    _, q_c = nets.split_critic_values(q)
    want = np.mean((q_c[0, 0] - y_c) ** 2)
    np.testing.assert_allclose(aux["critic_loss_cost"], want, rtol=1e-5)
    # And it differs from the policy bootstrap on the same batch (the knob acts).
    _, aux_policy = make_critic_loss(nets, cfg.gamma)(*args, batch, key)
    assert not np.isclose(aux_policy["critic_loss_cost"], want, rtol=1e-3)
    np.testing.assert_allclose(aux_policy["critic_loss_reward"], aux["critic_loss_reward"])
    # Without next actions in the batch the data bootstrap refuses to run.
    with pytest.raises(ValueError, match="next_action"):
        loss(*args, batch._replace(next_action=None, has_next_action=None), key)


def test_both_loops_train_with_the_data_bootstrap(tmp_path):
    import dataclasses

    from scripted_env import ScriptedVectorEnv
    from scripted_jax_env import ScriptedJaxEnv
    from test_train_loop import ALGO, CFG

    from cvpo_jax.device_loop import make_device_trainer
    from cvpo_jax.train_loop import train

    algo = ALGO.replace(cost_bootstrap="data")
    cfg = dataclasses.replace(CFG, total_steps=300, warmup_steps=100, checkpoint_every=300)
    result = train(
        cfg, algo, tmp_path / "host", progress=False, env_factory=lambda c: ScriptedVectorEnv(2)
    )
    assert result.updates == 5 * 5 and np.isfinite(result.last_row["critic_loss_cost"])
    trainer = make_device_trainer(cfg, algo, ScriptedJaxEnv())
    assert trainer.replay.next_action
    runner = jax.jit(trainer.init)(jax.random.PRNGKey(0))
    run_chunk = jax.jit(trainer.run_chunk)
    for _ in range(3):
        runner, log = run_chunk(runner)
    assert int(log.updates) == 25 and np.isfinite(float(log.metrics["critic_loss_cost"]))
