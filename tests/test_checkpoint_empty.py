"""Checkpoints of pytrees with zero-size leaves (as the MJX physics state carries)."""

import jax.numpy as jnp
import numpy as np
import pytest

from cvpo_jax import checkpoint as ckpt


def _tree():
    return {
        "act": jnp.zeros((4, 0), jnp.float32),  # e.g. mjx Data.act without actuators
        "qpos": jnp.arange(6, dtype=jnp.float32).reshape(2, 3),
        "nested": {"empty_int": jnp.zeros((0,), jnp.int32), "x": jnp.ones((), jnp.int32)},
    }


def test_zero_size_leaves_save_and_restore_to_an_identical_tree(tmp_path):
    tree = _tree()
    for step in (10, 20):
        ckpt.save_tree_checkpoint(tmp_path, step, tree, {"step": step}, keep=2)
    restored = ckpt.restore_tree_checkpoint(tmp_path, tree, 20)
    assert restored["act"].shape == (4, 0) and restored["act"].dtype == jnp.float32
    assert restored["nested"]["empty_int"].shape == (0,)
    assert restored["nested"]["empty_int"].dtype == jnp.int32
    np.testing.assert_array_equal(restored["qpos"], tree["qpos"])
    assert int(restored["nested"]["x"]) == 1
    assert ckpt.restore_loop_counters(tmp_path, 20) == {"step": 20}


def test_a_failed_save_keeps_the_earlier_checkpoint_and_says_so(tmp_path):
    ckpt.save_tree_checkpoint(tmp_path, 10, _tree(), {"step": 10}, keep=2)
    bad = {**_tree(), "obj": object()}  # Not an array: orbax cannot save it.
    with pytest.raises(ckpt.CheckpointError, match="checkpoint 20 .*newest: 10"):
        ckpt.save_tree_checkpoint(tmp_path, 20, bad, {"step": 20}, keep=2)
    assert ckpt.latest_step(tmp_path) == 10
    restored = ckpt.restore_tree_checkpoint(tmp_path, _tree(), 10)
    np.testing.assert_array_equal(restored["qpos"], _tree()["qpos"])


def test_a_checkpoint_from_before_the_realised_cost_leaves_fails_with_a_clear_error(tmp_path):
    """A train state saved without estep_duals.realised_cost / realised_episodes (as
    every checkpoint before they existed) names the problem instead of orbax's tree
    diff."""
    import dataclasses

    import jax

    from cvpo_jax.config import CVPOConfig
    from cvpo_jax.learner import make_learner

    learner = make_learner(CVPOConfig(hidden_sizes=(8,)), 3, (-1.0,), (1.0,))
    state = learner.init(jax.random.PRNGKey(0))
    duals = {
        f.name: getattr(state.estep_duals, f.name)
        for f in dataclasses.fields(state.estep_duals)
        if f.name not in ("realised_cost", "realised_episodes")
    }
    replay = {"obs": np.zeros((2, 3), np.float32)}
    ckpt.save_checkpoint(tmp_path, 5, state.replace(estep_duals=duals), replay, {"x": 1}, keep=1)
    with pytest.raises(ckpt.NotARunError, match="written before the train state gained"):
        ckpt.restore_checkpoint(tmp_path, state, with_replay=False)
