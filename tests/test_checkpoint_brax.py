"""The on-device runner's env state of real brax tasks through a checkpoint.

The MJX physics state carries zero-size arrays (e.g. `act` for robots without
actuator activations), which orbax refuses; a run on the default backend used to end
at its first checkpoint with "Cannot save arrays with zero size". Each backend's real
state must save and restore to an identical pytree.
"""

import jax
import numpy as np
import pytest

from cvpo_jax import checkpoint as ckpt
from cvpo_jax.envs.brax_velocity import BACKEND_CHOICES, make_brax_velocity_env


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKEND_CHOICES)
def test_real_brax_env_state_round_trips_through_a_checkpoint(tmp_path, backend):
    env = make_brax_velocity_env("HopperVelocity", backend=backend)
    keys = jax.random.split(jax.random.PRNGKey(0), 2)
    state = jax.jit(jax.vmap(env.reset))(keys)
    action = np.full((2, env.action_size), 0.3, np.float32)
    step = jax.jit(jax.vmap(env.step))  # one compile: a second jit object would recompile
    state = step(state, action)
    leaves = jax.tree.leaves(state)
    if backend == "mjx":  # The case that used to fail.
        assert any(np.asarray(x).size == 0 for x in leaves)
    ckpt.save_tree_checkpoint(tmp_path, 1, {"env_state": state}, {"k": 1}, keep=2)
    restored = ckpt.restore_tree_checkpoint(tmp_path, {"env_state": state}, 1)["env_state"]
    assert jax.tree.structure(restored) == jax.tree.structure(state)
    for a, b in zip(jax.tree.leaves(restored), leaves, strict=True):
        assert a.shape == b.shape and a.dtype == b.dtype
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # The restored state steps on exactly like the original.
    np.testing.assert_array_equal(step(restored, action).obs, step(state, action).obs)
