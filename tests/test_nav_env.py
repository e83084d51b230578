"""The JAX navigation tasks' pieces: lidar against Safety-Gymnasium's formula, layouts
against their keepouts, the env under vmap and auto-reset, names and errors."""

import cmath

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cvpo_jax.envs import nav_geometry as geo
from cvpo_jax.envs.nav_env import SafeNavEnv
from cvpo_jax.envs.nav_task import load_nav_task, resolve_nav_name
from cvpo_jax.envs.registry import is_jax_env, list_env_ids, make_jax_env, resolve_env_id


def reference_lidar(points, num_bins=16, max_dist=3.0, alias=True):
    """Safety-Gymnasium's `_obs_lidar_pseudo` on ego-frame points, as written there."""
    obs = np.zeros(num_bins)
    for x, y in points:
        z = complex(x, y)
        dist = abs(z)
        angle = cmath.phase(z) % (2 * np.pi)
        bin_size = (2 * np.pi) / num_bins
        b = int(angle / bin_size)
        bin_angle = bin_size * b
        sensor = max(0, max_dist - dist) / max_dist
        obs[b] = max(obs[b], sensor)
        if alias:
            frac = (angle - bin_angle) / bin_size
            obs[(b + 1) % num_bins] = max(obs[(b + 1) % num_bins], frac * sensor)
            obs[(b - 1) % num_bins] = max(obs[(b - 1) % num_bins], (1 - frac) * sensor)
    return obs


@pytest.mark.parametrize("alias", [True, False])
def test_lidar_matches_safety_gymnasiums_formula(alias):
    rng = np.random.default_rng(0)
    for n in (1, 3, 8):
        points = rng.uniform(-3.5, 3.5, (n, 2))
        got = geo.pseudo_lidar(jnp.asarray(points, jnp.float32), 16, 3.0, 1.0, alias)
        np.testing.assert_allclose(got, reference_lidar(points, alias=alias), atol=1e-5)


def test_ego_frame_rotates_into_the_robot_heading():
    yaw = 0.7
    mat = np.array([[np.cos(yaw), -np.sin(yaw), 0], [np.sin(yaw), np.cos(yaw), 0], [0, 0, 1]])
    pos = np.array([0.5, -0.2, 0.1])
    ahead = pos[:2] + 2.0 * np.array([np.cos(yaw), np.sin(yaw)])
    left = pos[:2] + 1.0 * np.array([-np.sin(yaw), np.cos(yaw)])
    ego = geo.ego_xy(jnp.asarray([ahead, left]), jnp.asarray(pos), jnp.asarray(mat))
    np.testing.assert_allclose(ego, [[2.0, 0.0], [0.0, 1.0]], atol=1e-6)


def test_layouts_respect_keepouts_and_extents():
    extents, keepouts = (-1.5, -1.5, 1.5, 1.5), (0.4, 0.305) + (0.18,) * 8 + (0.15,)
    layouts, oks = jax.vmap(lambda k: geo.sample_layout(k, extents, keepouts))(
        jax.random.split(jax.random.PRNGKey(0), 64)
    )
    assert bool(jnp.all(oks))
    ko = np.asarray(keepouts)
    for xy in np.asarray(layouts):
        dist = np.linalg.norm(xy[:, None] - xy[None], axis=-1)
        need = ko[:, None] + ko[None, :]
        off_diagonal = ~np.eye(len(ko), dtype=bool)
        assert np.all(dist[off_diagonal] >= need[off_diagonal] - 1e-6)
        assert np.all(np.abs(xy) <= 1.5 - ko[:, None] + 1e-6)
    # Different keys, different layouts.
    assert np.unique(np.asarray(layouts)[:, 0, 0]).size == 64


def test_a_crowded_layout_reports_failure():
    _, ok = geo.sample_layout(jax.random.PRNGKey(0), (-0.5, -0.5, 0.5, 0.5), (0.4,) * 6)
    assert not bool(ok)


def _check_keepouts(xy, keepouts, extents):
    ko = np.asarray(keepouts)
    dist = np.linalg.norm(xy[:, None] - xy[None], axis=-1)
    off_diagonal = ~np.eye(len(ko), dtype=bool)
    assert np.all(dist[off_diagonal] >= (ko[:, None] + ko[None, :])[off_diagonal] - 1e-6)
    assert np.all(np.abs(xy) <= extents[2] - ko[:, None] + 1e-6)


def test_crowded_button_layouts_are_retried_until_complete():
    """PointButton1's layout: one attempt rarely completes; the retry loop does."""
    spec = load_nav_task("PointButton1")
    keys = jax.random.split(jax.random.PRNGKey(0), 256)
    _, once = jax.vmap(lambda k: geo.sample_layout(k, spec.extents, spec.keepouts, 100, 1))(keys)
    assert 0.0 < float(jnp.mean(once)) < 0.1  # measured: ~2% of single attempts
    layouts, oks = jax.jit(
        jax.vmap(lambda k: geo.sample_layout_until(k, spec.extents, spec.keepouts, 10_000))
    )(keys[:16])
    assert bool(jnp.all(oks))
    for xy in np.asarray(layouts):
        _check_keepouts(xy, spec.keepouts, spec.extents)
    assert np.unique(np.asarray(layouts)[:, 0, 0]).size == 16


@pytest.fixture(scope="module")
def goal0():
    return SafeNavEnv(load_nav_task("PointGoal0"), episode_length=3)


def test_env_resets_and_steps_under_vmap_and_auto_resets(goal0):
    env = goal0
    assert env.observation_size == 28 and env.action_size == 2  # Safety-Gymnasium's sizes
    keys = jax.random.split(jax.random.PRNGKey(1), 4)
    state = jax.jit(jax.vmap(env.reset))(keys)
    assert state.obs.shape == (4, 28) and bool(jnp.all(state.layout_ok))
    step = jax.jit(jax.vmap(env.step_autoreset))
    actions = jnp.ones((4, 2)) * jnp.asarray([1.0, 0.0])
    for t in range(3):
        before = state
        state = step(state, actions, jax.random.split(jax.random.PRNGKey(10 + t), 4))
    assert np.all(np.asarray(state.truncated) == 1.0)  # the third step hits the time limit
    assert np.all(np.asarray(state.steps) == 0)  # ... and a new episode began
    assert np.all(np.asarray(state.final_length) == 3)
    assert not np.allclose(state.obs, state.next_obs)  # next_obs: the ended episode's last
    np.testing.assert_allclose(state.final_return, before.episode_return + state.reward, rtol=1e-5)
    assert np.all(np.isfinite(np.asarray(state.next_obs)))
    # Goal0 has no constrained objects: the cost is 0.
    assert np.all(np.asarray(state.final_cost) == 0.0)


@pytest.mark.slow
def test_button_task_resets_presses_and_keeps_a_spare_layout():
    """PointButton1 under vmap: complete layouts at every reset (the spare one at the
    auto-reset), the goal one of the buttons, and after a press the timer running and
    the buttons' lidar dark."""
    env = SafeNavEnv(load_nav_task("PointButton1"), episode_length=4)
    s = env.spec
    assert env.observation_size == 76  # Safety-Gymnasium's size
    state = jax.jit(jax.vmap(env.reset))(jax.random.split(jax.random.PRNGKey(3), 4))
    assert bool(jnp.all(state.layout_ok))
    for i in range(4):
        goal = state.goal_xy[i]
        np.testing.assert_allclose(
            goal, state.data.mocap_pos[i, env.button_mocap][state.goal_button[i], :2]
        )
        _check_keepouts(np.asarray(state.spare_layout[i]), s.keepouts, s.extents)
    first = np.asarray(state.hazards_xy)
    step = jax.jit(jax.vmap(env.step_autoreset))
    for t in range(4):
        state = step(state, jnp.zeros((4, 2)), jax.random.split(jax.random.PRNGKey(20 + t), 4))
    assert np.all(np.asarray(state.steps) == 0) and bool(jnp.all(state.layout_ok))
    hazards = np.asarray(state.hazards_xy)
    assert not np.allclose(hazards, first)  # the spare layout, not the first again
    # A press: the robot placed on the goal button's edge, one step.
    one = jax.tree.map(lambda x: x[0], state)
    goal_xy = np.asarray(one.goal_xy)
    layout = np.asarray(one.spare_layout).copy()
    layout[0] = goal_xy + np.array([0.19, 0.0])  # 1 cm into the button
    yaws = jnp.zeros(s.num_gremlins)
    # Jitted: op by op, MJX's forward pass took 96 s of this test's 185 s.
    pressed = jax.jit(env.reset_from_layout)(
        one.key, jnp.asarray(layout), jnp.asarray(0.0), yaws, one.goal_button
    )
    # Through the step compiled above (4 copies; a fresh episode does not auto-reset).
    batch = jax.tree.map(lambda x: jnp.stack([x] * 4), pressed)
    after = step(batch, jnp.zeros((4, 2)), jax.random.split(jax.random.PRNGKey(9), 4))
    after = jax.tree.map(lambda x: x[0], after)
    assert float(after.reward) > 0.5 * s.reward_goal and int(after.timer) == 10
    cols = {k: size for k, size in s.obs_parts}
    start = sum(
        size for k, size in s.obs_parts[: [k for k, _ in s.obs_parts].index("buttons_lidar")]
    )
    assert np.all(np.asarray(after.obs[start : start + cols["buttons_lidar"]]) == 0.0)
    assert np.any(np.asarray(pressed.obs[start : start + cols["buttons_lidar"]]) > 0.0)


def test_names_prefix_and_errors():
    assert resolve_nav_name("safetypointgoal2-v0") == "PointGoal2"
    assert resolve_env_id("mjx/pointgoal1") == "mjx/PointGoal1"
    assert is_jax_env("mjx/PointGoal1") and is_jax_env("brax/AntVelocity")
    assert not is_jax_env("SafetyPointGoal1-v0")
    assert resolve_env_id("mjx/cargoal1") == "mjx/CarGoal1"
    assert resolve_env_id("mjx/carbutton2") == "mjx/CarButton2"
    robots, tasks = ("Point", "Car"), ("Goal", "Button")
    names = [f"mjx/{r}{t}{lv}" for r in robots for t in tasks for lv in range(3)]
    assert list_env_ids("mjx") == sorted(names)
    with pytest.raises(ValueError, match="CarPush1 is not ported to JAX yet"):
        resolve_env_id("mjx/CarPush1")
    with pytest.raises(ValueError, match="Did you mean mjx/PointGoal1"):
        resolve_env_id("mjx/PointGoa1")
    with pytest.raises(ValueError, match="runs on MJX only"):
        make_jax_env("mjx/PointGoal1", backend="spring")


def test_quat_to_matrix_matches_mujoco():
    """The conversion the Car's ball-joint sensor goes through (brax's) is MuJoCo's."""
    import mujoco

    from cvpo_jax.envs.nav_env import quat_to_3x3 as quat_to_matrix

    rng = np.random.default_rng(0)
    for _ in range(5):
        q = rng.normal(size=4)
        q /= np.linalg.norm(q)
        expected = np.zeros(9)
        mujoco.mju_quat2Mat(expected, q)
        got = quat_to_matrix(jnp.asarray(q, jnp.float32))
        np.testing.assert_allclose(np.asarray(got).ravel(), expected, atol=1e-6)


def test_car_wheel_colliders_trace_the_wheels_and_route_contacts():
    """Each Car wheel's prism has its cylinder's pose and radius (vertices on the rim,
    at the two faces), adds no mass, and meets boxes of the world only, while the
    cylinder meets the floor only: the pairs MuJoCo would collide, by contact bits."""
    import mujoco

    from cvpo_jax.envs.nav_task import normalised_model

    spec = load_nav_task("CarGoal1")
    model, plain = normalised_model(spec), mujoco.MjModel.from_xml_string(spec.xml)
    np.testing.assert_allclose(model.body_mass, plain.body_mass)
    np.testing.assert_allclose(model.body_inertia, plain.body_inertia)
    data = mujoco.MjData(model)
    mujoco.mj_forward(model, data)

    def collides(a, b):
        ga, gb = model.geom(a).id, model.geom(b).id
        ct, ca = model.geom_contype, model.geom_conaffinity
        return bool(ct[ga] & ca[gb] or ct[gb] & ca[ga])

    for wheel in ("left", "right"):
        prism = f"{wheel}_box_collider"
        cyl, pri = data.geom(wheel), data.geom(prism)
        mesh = model.geom(prism).dataid[0]
        start, count = model.mesh_vertadr[mesh], model.mesh_vertnum[mesh]
        world = pri.xpos + model.mesh_vert[start : start + count] @ pri.xmat.reshape(3, 3).T
        local = (world - cyl.xpos) @ cyl.xmat.reshape(3, 3)
        radius, half = model.geom_size[model.geom(wheel).id][:2]
        np.testing.assert_allclose(np.linalg.norm(local[:, :2], axis=1), radius, rtol=1e-6)
        np.testing.assert_allclose(np.abs(local[:, 2]), half, rtol=1e-6)
        assert collides(wheel, "floor") and not collides(wheel, "vase0")
        assert collides(prism, "vase0") and not collides(prism, "floor")
        assert not collides(prism, "agent") and not collides(prism, "left_box_collider")
    # Everything else collides as in Safety-Gymnasium's model.
    for a, b in (("agent", "vase0"), ("rear", "floor"), ("vase0", "floor"), ("agent", "floor")):
        assert collides(a, b)
    # The Point has no cylinder to substitute: its model is Safety-Gymnasium's.
    point = load_nav_task("PointGoal1")
    assert normalised_model(point).ngeom == mujoco.MjModel.from_xml_string(point.xml).ngeom
