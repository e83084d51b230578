"""The JAX Goal tasks (Point, Car) against Safety-Gymnasium itself, on the same layout
and actions.

The Point robot's planar dynamics with sliding and turning are chaotic: MuJoCo run
twice from the same state, once with the yaw velocity moved by 1e-9, agrees to
round-off for ~20 env steps and then differs by as much as the gyro's whole range
(measured: 0.39 rad/s apart after 6 steps of a constant forward-and-turn action).
No port can match a trajectory pointwise beyond that horizon, so the test checks:

1. an exact window (float64): every observation entry, reward and cost within 1e-5
   of Safety-Gymnasium's over the first steps, with a hazard entered and the goal
   reached and re-placed inside it (hazard 0 and the goal are moved ahead of the
   robot through Safety-Gymnasium's own objects);
2. a long window (300 steps of a goal-seeking controller with noise, goals reached
   and hazards crossed on the way): per observation part, the 90th percentile over
   steps of |JAX - MuJoCo| is at most 3x that of |MuJoCo perturbed by 1e-9 - MuJoCo|
   plus a floor, rewards likewise, and the costs agree on as many steps, less 3
   points, as the perturbed MuJoCo's do.

The Car is held to the exact window (1) and to weaker checks after it, because MJX
and MuJoCo resolve its wheels' line contact with the floor differently: a wheel
lying on the floor touches it along a segment, at distances of +-1e-17, and which
points of it the two engines keep depends on round-off. From a reset the two agree
exactly when their contact sets agree (resets of seeds 0-9: 0, 3 and 6) and through
the first ~17 steps of the arranged run, but over 300 steps the contact-force
sensors (accelerometer, the rear ball's angular velocity) chatter apart (90th
percentiles of |MJX - MuJoCo| 9.1 m/s^2 and 2.9 rad/s; MuJoCo perturbed by 1e-9:
0), while the robot's path stays the task's: heading (magnetometer) 0.04 and
velocity 0.09 m/s apart, the same goals reached and the same cost on every step.
The checks after the window are therefore:

2'. the 300-step controller run (seed 6): costs equal on >= 97% of steps, each
   of Safety-Gymnasium's goals reached within 3 steps, magnetometer and velocimeter
   90th percentiles <= 0.15;
3. a vase set beside the Car's path so that only a wheel touches it as the Car
   drives straight past (in Safety-Gymnasium a wheel's distance to the vase
   reaches 0 while the rest of the robot stays >= 3 mm away), the one pair that
   meets the prism collider: the JAX vase is pushed too (measured: 0.24 m against
   Safety-Gymnasium's 0.33; the prism in MuJoCo itself gives 0.31), at least half
   as far, and ends within 0.15 m of Safety-Gymnasium's.

Where Safety-Gymnasium re-places the goal, the JAX run is given the same new goal.
"""

import functools
import os

import jax
import jax.numpy as jnp
import mujoco
import numpy as np
import pytest

from cvpo_jax.envs.nav_env import SafeNavEnv
from cvpo_jax.envs.nav_task import load_nav_task, make_safety_gym_env

pytestmark = pytest.mark.slow

STEPS = 300  # every window: one compiled scan per robot
EVENT_STEPS = 200


def parts(spec):
    """Observation column slices by part (each sensor; the lidars together, and the
    buttons' alone)."""
    out, start = {}, 0
    for key, size in spec.obs_parts:
        if key == "buttons_lidar":
            out[key] = slice(start, start + size)
        name = "lidar" if key.endswith("_lidar") else key
        prev = out.get(name, slice(start, start))
        out[name] = slice(prev.start, start + size)
        start += size
    return out


def heading(task):
    """The robot's forward direction [2] in the world (the Car drives along -y)."""
    mat = task.agent.mat
    return mat[:2, 0] if type(task.agent).__name__ == "Point" else -mat[:2, 1]


def yaw_rate_dof(task):
    """The velocity entry of the robot's yaw (slide, slide, hinge; or a free joint)."""
    return 2 if type(task.agent).__name__ == "Point" else 5


def _layout(task, spec):
    """(layout [P, 2] in placement order, agent yaw, box yaws [V + G], goal) of a live
    env; goal: its xy (Goal) or the goal button's index (Button)."""
    layout = task.world_info.layout
    xy = [np.asarray(layout[name], np.float64)[:2] for name in spec.placement_order]
    xy[0] = task.agent.pos[:2]
    if spec.task == "Goal":
        xy[spec.layout_rows("goal").start] = task.goal.pos[:2]
        xy[spec.layout_rows("hazards")] = [p[:2] for p in task.hazards.pos[: spec.num_hazards]]
    config = task.world_info.world_config_dict
    boxes = [f"vase{i}" for i in range(spec.num_vases)]
    boxes += [f"gremlin{i}obj" for i in range(spec.num_gremlins)]
    yaws = np.asarray([config["free_geoms"][b]["rot"] for b in boxes], np.float64)
    goal = task.goal.pos[:2].copy() if spec.task == "Goal" else int(task.buttons.goal_button)
    return np.asarray(xy), float(config["agent_rot"]), yaws, goal


def _controller(task, rng, noise):
    """Turn toward the goal, drive when roughly facing it (Point: forward and turn
    actuators; Car: left and right wheels)."""
    h, to_goal = heading(task), task.goal.pos[:2] - task.agent.pos[:2]
    err = np.arctan2(h[0] * to_goal[1] - h[1] * to_goal[0], h @ to_goal)
    if type(task.agent).__name__ == "Point":
        action = np.array([0.8 if abs(err) < 0.4 else 0.05, np.clip(2 * err, -1, 1)])
    else:
        drive, turn = (0.8 if abs(err) < 0.4 else 0.0), np.clip(1.5 * err, -1, 1)
        action = np.array([drive + turn, drive - turn])
    return np.clip(action + rng.normal(0, noise, 2), -1, 1)


def _set_goal(task, goal):
    task.world_info.layout["goal"] = goal.copy()
    task._set_goal(goal)  # noqa: SLF001 - Safety-Gymnasium's own way to move the goal
    mujoco.mj_forward(task.model, task.data)
    task.last_dist_goal = task.dist_goal()


def _arrange(task):
    """Hazard 0 and the goal (Button: the goal button) straight ahead of the robot,
    0.3 m and 0.6 m away."""
    h, pos = heading(task), task.agent.pos[:2]
    task.model.body_pos[task.model.body("hazard0").id][:2] = pos + 0.3 * h
    task.world_info.layout["hazard0"] = pos + 0.3 * h
    if hasattr(task, "buttons"):
        button = f"button{task.buttons.goal_button}"
        task.model.body_pos[task.model.body(button).id][:2] = pos + 0.6 * h
        task.world_info.layout[button] = pos + 0.6 * h
    _set_goal(task, pos + 0.6 * h)


VASE_AHEAD, VASE_BESIDE = 0.45, 0.25  # m: the Car's wheel (not its body) meets the vase


def _arrange_vase(task):
    """Vase 0 aligned with the robot, ahead and to the side, the goal far ahead."""
    h, pos = heading(task), task.agent.pos[:2]
    model, data = task.model, task.data
    adr = model.jnt_qposadr[model.joint("vase0").id]
    yaw = np.arctan2(h[1], h[0])
    data.qpos[adr : adr + 2] = pos + VASE_AHEAD * h + VASE_BESIDE * np.array([-h[1], h[0]])
    data.qpos[adr + 3 : adr + 7] = [np.cos(yaw / 2), 0.0, 0.0, np.sin(yaw / 2)]
    task.world_info.world_config_dict["free_geoms"]["vase0"]["rot"] = yaw
    _set_goal(task, pos + 0.9 * h)


VASE_WINDOW = 40
WHEELS = ("left", "right")


def _vase_distances(task):
    """(least distance of a wheel, of the rest of the robot) to vase 0 now."""
    model, data = task.model, task.data
    vase, agent = model.geom("vase0").id, model.body("agent").id
    robot = [g for g in range(model.ngeom) if model.body_rootid[model.geom_bodyid[g]] == agent]
    robot = [g for g in robot if model.geom_contype[g] or model.geom_conaffinity[g]]
    fromto = np.zeros(6)
    wheel, rest = np.inf, np.inf
    for g in robot:
        dist = mujoco.mj_geomDistance(model, data, g, vase, 1.0, fromto)
        if model.geom(g).name in WHEELS:
            wheel = min(wheel, dist)
        else:
            rest = min(rest, dist)
    return wheel, rest


def reference(spec, seed, steps, actions=None, perturb=0.0, arrange=None, noise=0.1):
    """Safety-Gymnasium's run: the initial layout and per-step records."""
    env = make_safety_gym_env(spec.name)
    env.reset(seed=seed)
    task = env.unwrapped.task
    if arrange:
        arrange(task)
    layout = _layout(task, spec)
    if perturb:
        task.data.qvel[yaw_rate_dof(task)] += perturb
        mujoco.mj_forward(task.model, task.data)
    rng = np.random.default_rng(seed)
    rec = {"obs": [], "reward": [], "cost": [], "goal": [], "goal_met": [], "action": []}
    rec |= {"vase_xy": [], "vase_dist": []}
    for k in range(steps):
        action = _controller(task, rng, noise) if actions is None else actions[k]
        obs, reward, cost, _, _, info = env.step(np.asarray(action, np.float64))
        rec["obs"].append(obs)
        rec["reward"].append(reward)
        rec["cost"].append(cost)
        rec["goal"].append(
            task.buttons.goal_button if spec.task == "Button" else task.goal.pos[:2].copy()
        )
        rec["goal_met"].append(bool(info.get("goal_met", False)))
        rec["action"].append(np.asarray(action))
        rec["vase_xy"].append(task.vases.pos[0][:2].copy() if spec.num_vases else np.zeros(2))
        rec["vase_dist"].append(_vase_distances(task) if spec.num_vases else (np.inf, np.inf))
    env.close()
    return layout, {k: np.asarray(v) for k, v in rec.items()}


@functools.cache
def _scan(env):
    def body(state, inputs):
        action, goal = inputs
        state = env.step(state, action)
        if env.spec.task == "Button":
            button, goal = goal, env.buttons_xy(state.data)[goal]
            moved = button != state.goal_button
            state = state.replace(goal_button=button.astype(jnp.int32))
        else:
            moved = jnp.any(goal != state.goal_xy)
        agent_xy = env.agent_frame(state.data)[0][:2]
        state = state.replace(
            goal_xy=goal,
            last_dist=jnp.where(moved, jnp.linalg.norm(goal - agent_xy), state.last_dist),
            obs=env.observation(state.data, goal, state.hazards_xy, state.timer),
        )
        vase_xy = env.vases_xy(state.data)[0] if env.spec.num_vases else jnp.zeros(2)
        return state, (state.obs, state.reward, state.cost, vase_xy)

    return jax.jit(lambda s, a, g: jax.lax.scan(body, s, (a, g))[1])


@functools.cache
def _reset(env):
    return jax.jit(env.reset_from_layout)


def jax_run(env, layout, actions, goals):
    """The JAX task from the same layout, given the reference's goal after every step."""
    xy, yaw, yaws, goal = (jnp.asarray(x) for x in layout)
    # Jitted (compiled once per env, like the scan): op by op, MJX's forward pass at
    # the reset costs more than compiling it.
    state = _reset(env)(jax.random.PRNGKey(0), xy, yaw, yaws, goal)
    out = _scan(env)(state, jnp.asarray(actions), jnp.asarray(goals))
    return {
        k: np.asarray(v) for k, v in zip(("obs", "reward", "cost", "vase_xy"), out, strict=True)
    }


# (task, seed of the arranged run, seed of the long run): seeds whose long run reaches
# a goal and crosses a hazard.
# The Car's and the Button's cases compile their own float64 scans (~3-4 min each on
# 2 cores), which would take `make test` past its 15-minute budget; they run with
# CVPO_FULL_PARITY=1 (the Button task's pieces are tested in test_nav_env.py).
FULL_PARITY = pytest.mark.skipif(
    not os.environ.get("CVPO_FULL_PARITY"),
    reason="compiles for minutes: run with CVPO_FULL_PARITY=1",
)
CASES = [
    ("PointGoal1", 5, 3),
    pytest.param("CarGoal1", 3, 6, marks=FULL_PARITY),
    pytest.param("PointButton1", 0, 1, marks=FULL_PARITY),
]


@pytest.mark.parametrize(("name", "arranged_seed", "long_seed"), CASES)
def test_parity_with_safety_gymnasium(name, arranged_seed, long_seed):
    """Every window of a robot in one test: the float64 scan takes minutes to compile
    and seconds to run, and pytest workers do not share compilations."""
    with jax.enable_x64(True):
        env = SafeNavEnv(load_nav_task(name))
        spec = env.spec
        layout, ref = reference(spec, arranged_seed, STEPS, arrange=_arrange, noise=0.0)
        got = jax_run(env, layout, ref["action"], ref["goal"])
        if spec.task == "Button":
            check_button_press(spec, ref, got)
        else:
            check_exact_window(ref, got)
        if spec.robot == "Car":
            straight = np.tile([0.8, 0.8], (STEPS, 1))
            layout, ref = reference(spec, arranged_seed, STEPS, straight, arrange=_arrange_vase)
            check_wheel_meets_vase(ref, jax_run(env, layout, ref["action"], ref["goal"]))
        layout, ref = reference(spec, long_seed, STEPS)
        got = jax_run(env, layout, ref["action"], ref["goal"])
        if spec.robot == "Car" or spec.task == "Button":
            check_task_path(spec, ref, got)
        else:
            _, twin = reference(spec, long_seed, STEPS, actions=ref["action"], perturb=1e-9)
            check_long_run(spec, ref, got, twin)


def check_button_press(spec, ref, got):
    """The arranged Button run: the layout (robot, buttons, gremlins, hazards) loaded
    exactly, the hazard entered and the goal button pressed on the same steps, and the
    buttons' lidar dark while the timer runs, in both."""
    np.testing.assert_allclose(got["obs"][:2], ref["obs"][:2], atol=1e-3)
    met = np.flatnonzero(ref["goal_met"])
    assert met.size and met[0] < 40, "the arranged run must press the goal button early"
    window = met[0] + spec.button_resampling_delay + 1
    np.testing.assert_array_equal(got["cost"][:window], ref["cost"][:window])
    assert ref["cost"][:window].max() == 1.0, "the arranged run must enter the hazard"
    assert np.flatnonzero(got["reward"] > 0.5 * spec.reward_goal)[0] == met[0]
    lidar = parts(spec)["buttons_lidar"]
    dark = slice(met[0], met[0] + spec.button_resampling_delay)
    for run in (ref, got):
        assert np.all(run["obs"][dark, lidar] == 0.0) and np.any(run["obs"][dark.stop, lidar] > 0)


def check_exact_window(ref, got):
    """Obs, reward and cost within 1e-5 through a hazard entry and a goal re-placement."""
    assert ref["cost"].max() == 1.0, "the arranged run must enter the hazard"
    met = np.flatnonzero(ref["goal_met"])
    assert met.size and met[0] < 40, "the arranged run must reach the goal early"
    window = met[0] + 3  # through the re-placement and two steps beyond it
    np.testing.assert_allclose(got["obs"][:window], ref["obs"][:window], atol=1e-5)
    np.testing.assert_allclose(got["reward"][:window], ref["reward"][:window], atol=1e-5)
    np.testing.assert_array_equal(got["cost"][:window], ref["cost"][:window])
    assert np.any(ref["goal"][met[0]] != ref["goal"][0])  # the goal did move


def check_wheel_meets_vase(ref, got):
    """A wheel alone pushes the vase aside: the same in both (the prism collider)."""
    w = VASE_WINDOW
    wheel, rest = ref["vase_dist"][:w, 0], ref["vase_dist"][:w, 1]
    assert wheel.min() <= 0.0 and rest.min() >= 3e-3, (wheel.min(), rest.min())
    moved = np.linalg.norm(ref["vase_xy"][w - 1] - ref["vase_xy"][0])
    ours = np.linalg.norm(got["vase_xy"][w - 1] - got["vase_xy"][0])
    assert moved > 0.1 and ours >= 0.5 * moved, (moved, ours)  # pushed in both
    assert np.linalg.norm(got["vase_xy"][w - 1] - ref["vase_xy"][w - 1]) <= 0.15


def check_task_path(spec, ref, got):
    """300 steps of the Car or of a Button task: the same task events, close paths."""
    assert ref["goal_met"].sum() >= 1 and ref["cost"].sum() >= 1  # events happened
    assert np.mean(got["cost"] == ref["cost"]) >= 0.97
    # Every goal Safety-Gymnasium's robot reaches, the JAX robot reaches within 3 steps
    # of it (the JAX run is handed the reference's goals, so it may count one twice).
    # A button is pressed by touching it, which the paths' late drift can miss (seed 1:
    # all of Safety-Gymnasium's presses but the last, at step 238, matched): Button
    # tasks are held to the presses of the first EVENT_STEPS.
    horizon = EVENT_STEPS if spec.task == "Button" else STEPS
    ours = np.flatnonzero(got["reward"] > 0.5 * spec.reward_goal)
    theirs = np.flatnonzero(ref["goal_met"][:horizon])
    assert theirs.size and all(np.abs(ours - k).min() <= 3 for k in theirs), (ours, theirs)
    cols = parts(spec)
    for part in ("magnetometer", "velocimeter"):
        err = np.abs(got["obs"][:, cols[part]] - ref["obs"][:, cols[part]]).max(axis=1)
        assert np.percentile(err, 90) <= 0.15, (part, np.percentile(err, 90))


def check_long_run(spec, ref, got, twin):
    """300 steps: as close to Safety-Gymnasium as MuJoCo perturbed by 1e-9 is."""
    assert ref["goal_met"].sum() >= 1 and ref["cost"].sum() >= 1  # events happened

    def p90(a, b):
        return np.percentile(np.abs(a - b).max(axis=1) if a.ndim == 2 else np.abs(a - b), 90)

    for part, cols in parts(spec).items():
        ours = p90(got["obs"][:, cols], ref["obs"][:, cols])
        mujoco_self = p90(twin["obs"][:, cols], ref["obs"][:, cols])
        assert ours <= 3.0 * mujoco_self + 1e-3, (part, ours, mujoco_self)
    assert p90(got["reward"], ref["reward"]) <= 3.0 * p90(twin["reward"], ref["reward"]) + 1e-3
    ours = np.mean(got["cost"] == ref["cost"])
    mujoco_self = np.mean(twin["cost"] == ref["cost"])
    assert ours >= mujoco_self - 0.03, (ours, mujoco_self)
