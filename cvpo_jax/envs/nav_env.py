"""Safety-Gymnasium's navigation tasks (Point, Car) in JAX on MuJoCo MJX: pure, vmappable.

`SafeNavEnv` runs a task read by `nav_task.load_nav_task` with the same observation
vector (size and order), reward and cost as Safety-Gymnasium, so one policy runs in
both. One MJX model serves every layout: the robot's pose is in qpos (the robot body
at the origin, `nav_task.normalised_model`), the vases' and gremlins' in their free
joints, the buttons' and the gremlins' mocap bodies in mocap_pos, and the goal and
hazards, which never collide, are positions in the state. A reset samples a
layout in JAX (`nav_geometry.sample_layout`), the cost of a step or two, where
Safety-Gymnasium rebuilds and recompiles its world (~330 ms).

Shape letters: O observation size, A action size, H hazards, V vases, B buttons,
G gremlins, P layout entries (placement order).
Where the port differs from Safety-Gymnasium (all stated in the README):
- physics is MJX, not MuJoCo's C engine: trajectories agree to float64 round-off for
  ~20 steps, then drift apart by millimetres to centimetres (contact and friction
  solve differently in detail), so observations agree within the parity test's
  tolerances, not exactly;
- the Car's wheels meet the vases through a 16-sided prism collider (MJX has no
  cylinder-box collision; `nav_task.wheel_colliders`), at most 0.2 mm inside the
  wheel's surface;
- layout sampling uses a bounded number of draws (`nav_geometry`), and the goal's
  re-placement on arrival draws GOAL_TRIES candidates instead of up to 10,000; a
  Button task's auto-reset takes the latest complete layout of the attempts made
  at every step (SPARE_ATTEMPTS);
- a gremlin's box starts resting on the floor at distances of +-1e-17, which side
  of 0 depends on round-off and decides whether its floor contacts are active in
  the first substeps (0.8 mm of the box's path, gone within ~20 steps); MuJoCo's
  solver then converges the robot's motion differently at round-off level, which
  the Point's chaotic dynamics amplify (MuJoCo itself, on this file's model and on
  Safety-Gymnasium's, differs so after 2 steps);
- Safety-Gymnasium draws one random number per step for its frame skip (always 10);
  nothing here depends on that stream.
"""

from __future__ import annotations

from typing import Any

import chex
import flax.struct
import jax
import jax.numpy as jnp
import mujoco
import numpy as np
from brax.math import quat_to_3x3  # = MuJoCo's mju_quat2Mat, which Safety-Gymnasium uses
from mujoco import mjx

from cvpo_jax.envs import nav_geometry as geo
from cvpo_jax.envs.nav_task import NavTaskSpec, load_nav_task, normalised_model

GOAL_TRIES = 1000
# Button layouts are crowded: one sampling attempt (Safety-Gymnasium's: 100 draws per
# object) completes ~2% of the time (measured over 8,192 attempts: PointButton1
# 1.9%, PointButton2 2.5%), where Safety-Gymnasium retries up to 10,000 times. A
# reset at the start retries in a loop (up to LAYOUT_ATTEMPTS); the auto-reset of a
# step, computed at every step under vmap, cannot afford that, so every step makes
# SPARE_ATTEMPTS attempts and keeps the latest complete layout as the next episode's
# (refreshed every ~1 / (1 - 0.98^4) = 13 steps: the episode's 1000 steps leave it
# fresh, and the latest success of independent attempts is distributed as one).
LAYOUT_ATTEMPTS = 10_000
SPARE_ATTEMPTS = 4


@flax.struct.dataclass
class NavState:
    """One environment's state (a fixed-shape pytree; vmap adds a leading env axis).

    data: the MJX physics state; goal_xy [2]; hazards_xy [H, 2]; last_dist []: the
    robot's distance to the goal after the previous step; key: the env's own key
    (goal re-placement); layout_ok []: the reset's layout met every keepout.
    Button tasks: goal_button [] (int32) the goal's button, timer [] (int32) the steps
    left before the buttons cost and show again, gremlins_xy [G, 2] the centres of
    the gremlins' circles (Goal tasks: 0, 0 and [0, 2]); spare_layout [P, 2]: a
    complete layout for the next episode (Button tasks; see SPARE_ATTEMPTS).
    The remaining fields are those of `brax_velocity.EnvState` (see there).
    """

    data: Any
    goal_xy: chex.Array
    hazards_xy: chex.Array
    last_dist: chex.Array
    key: chex.Array
    layout_ok: chex.Array
    goal_button: chex.Array
    timer: chex.Array
    gremlins_xy: chex.Array
    spare_layout: chex.Array
    obs: chex.Array
    next_obs: chex.Array
    reward: chex.Array
    cost: chex.Array
    terminated: chex.Array
    truncated: chex.Array
    steps: chex.Array
    episode_return: chex.Array
    episode_cost: chex.Array
    final_return: chex.Array
    final_cost: chex.Array
    final_length: chex.Array

    @property
    def done(self) -> chex.Array:
        return jnp.maximum(self.terminated, self.truncated)


def _quat_z(yaw: chex.Array) -> chex.Array:
    return jnp.stack([jnp.cos(yaw / 2), jnp.zeros_like(yaw), jnp.zeros_like(yaw), jnp.sin(yaw / 2)])


class SafeNavEnv:
    """A Safety-Gymnasium navigation task (Point or Car, Goal or Button, levels 0-2)
    on MJX.

    Attributes: name ("PointGoal1"), spec (`NavTaskSpec`), env_id ("mjx/PointGoal1"),
    episode_length, observation_size O, action_size A, action_low / action_high [A].
    """

    backend = "mjx"

    def __init__(self, spec: NavTaskSpec, episode_length: int | None = None):
        if spec.robot not in ("Point", "Car"):
            raise NotImplementedError(f"{spec.name}: the {spec.robot} robot is not ported")
        self.spec = spec
        self.name = spec.name
        self.episode_length = int(episode_length or spec.episode_length)
        self.mj_model = normalised_model(spec)
        self.model = mjx.put_model(self.mj_model)
        m = self.mj_model
        self.agent_body = m.body("agent").id
        self.agent_geoms = np.flatnonzero(m.geom_bodyid == self.agent_body)
        self.vase_bodies = np.asarray([m.body(f"vase{i}").id for i in range(spec.num_vases)], int)
        self.vase_geoms = np.flatnonzero(np.isin(m.geom_bodyid, self.vase_bodies))
        vase_joints = [m.body_jntadr[b] for b in self.vase_bodies]
        self.vase_qpos = np.asarray([m.jnt_qposadr[j] for j in vase_joints], int)
        self.vase_dof = np.asarray([m.jnt_dofadr[j] for j in vase_joints], int)
        self.button_mocap = np.asarray(
            [m.body_mocapid[m.body(f"button{i}").id] for i in range(spec.num_buttons)], int
        )
        self.button_geoms = np.asarray([m.geom(f"button{i}").id for i in range(spec.num_buttons)])
        gremlins = range(spec.num_gremlins)
        self.gremlin_bodies = np.asarray([m.body(f"gremlin{i}obj").id for i in gremlins], int)
        self.gremlin_geoms = np.flatnonzero(np.isin(m.geom_bodyid, self.gremlin_bodies))
        self.gremlin_qpos = np.asarray(
            [m.jnt_qposadr[m.body_jntadr[b]] for b in self.gremlin_bodies], int
        )
        self.gremlin_mocap = np.asarray(
            [m.body_mocapid[m.body(f"gremlin{i}mocap").id] for i in gremlins], int
        )
        # The Point's joints are slide x, slide y, hinge z (qpos = x, y, yaw); the Car's
        # is a free joint (qpos = x, y, z, quaternion), its wheels' and ball at rest.
        agent_joint = m.body_jntadr[self.agent_body]
        self.agent_free = int(m.jnt_type[agent_joint]) == int(mujoco.mjtJoint.mjJNT_FREE)
        self.sensor_slices = []
        for name in spec.sensors:
            sensor = m.sensor(name)
            as_matrix = name in spec.quat_sensors
            self.sensor_slices.append((int(sensor.adr[0]), int(sensor.dim[0]), as_matrix))
        self.observation_size = spec.observation_size
        self.action_size = int(m.nu)
        self.action_low = m.actuator_ctrlrange[:, 0].astype(np.float32)
        self.action_high = m.actuator_ctrlrange[:, 1].astype(np.float32)
        self._data0 = mjx.put_data(m, mujoco.MjData(m))
        self.keepouts = spec.keepouts
        self.spare_layouts = spec.task == "Button"

    @classmethod
    def from_name(cls, name: str, episode_length: int | None = None) -> SafeNavEnv:
        return cls(load_nav_task(name), episode_length)

    @property
    def env_id(self) -> str:
        return self.spec.env_id

    def __repr__(self) -> str:
        return f"SafeNavEnv({self.env_id}, episode_length={self.episode_length})"

    # ---- pieces (pure) -------------------------------------------------------

    def agent_frame(self, data) -> tuple[chex.Array, chex.Array]:
        """The robot body's position [3] and orientation [3, 3]."""
        return data.xpos[self.agent_body], data.xmat[self.agent_body]

    def vases_xy(self, data) -> chex.Array:
        return data.xpos[self.vase_bodies][:, :2]

    def buttons_xy(self, data) -> chex.Array:
        return data.mocap_pos[self.button_mocap][:, :2]

    def gremlin_boxes_xy(self, data) -> chex.Array:
        return data.xpos[self.gremlin_bodies][:, :2]

    def observation(
        self, data, goal_xy: chex.Array, hazards_xy: chex.Array, timer: chex.Array | int = 0
    ) -> chex.Array:
        """The flat observation [O] in Safety-Gymnasium's order (sensors, then lidars);
        the buttons' lidar reads 0 while the timer runs (Button tasks)."""
        pos, mat = self.agent_frame(data)
        groups = {"goal": goal_xy[None], "hazards": hazards_xy, "vases": self.vases_xy(data)}
        groups |= {"buttons": self.buttons_xy(data), "gremlins": self.gremlin_boxes_xy(data)}
        parts = [
            quat_to_3x3(data.sensordata[adr : adr + dim]).ravel()
            if as_matrix
            else data.sensordata[adr : adr + dim]
            for adr, dim, as_matrix in self.sensor_slices
        ]
        s = self.spec
        for group in s.lidar_groups:
            ego = geo.ego_xy(groups[group], pos, mat)
            lidar = geo.pseudo_lidar(
                ego, s.lidar_bins, s.lidar_max_dist, s.lidar_exp_gain, s.lidar_alias
            )
            parts.append(jnp.where(timer == 0, lidar, 0.0) if group == "buttons" else lidar)
        return jnp.concatenate(parts).astype(jnp.float32)

    def touching(self, data, geoms: np.ndarray) -> chex.Array:
        """[len(geoms)] bool: geom k of `geoms` is in contact with the robot."""
        contact = data._impl.contact  # noqa: SLF001 - MJX's own code reads it so
        g1, g2 = contact.geom[:, 0], contact.geom[:, 1]
        touching = contact.dist <= 0.0
        robot1, robot2 = jnp.isin(g1, self.agent_geoms), jnp.isin(g2, self.agent_geoms)
        hit = (robot1[:, None] & (g2[:, None] == geoms[None])) | (
            robot2[:, None] & (g1[:, None] == geoms[None])
        )
        return jnp.any(hit & touching[:, None], axis=0)

    def cost_terms(
        self,
        data,
        hazards_xy: chex.Array,
        goal_button: chex.Array | int = 0,
        timer: chex.Array | int = 0,
    ) -> dict[str, chex.Array]:
        """Each constrained cost source as a 0/1 indicator of the current state
        (buttons: another than the goal's touched while the timer is 0)."""
        s = self.spec
        agent_xy = self.agent_frame(data)[0][:2]
        terms = {}
        if s.num_hazards and s.hazards_constrained:
            dist = jnp.linalg.norm(hazards_xy - agent_xy, axis=1)
            terms["hazards"] = jnp.any(dist < s.hazard_size).astype(jnp.float32)
        if s.num_vases and s.vases_constrained:
            if s.vase_contact_cost:
                touched = self.touching(data, self.vase_geoms)
                terms["vases_contact"] = jnp.any(touched).astype(jnp.float32)
            if s.vase_velocity_cost:
                vel = data.qvel[self.vase_dof[:, None] + np.arange(3)[None, :]]  # [V, 3]
                moving = jnp.linalg.norm(vel, axis=1) >= s.vase_velocity_threshold
                terms["vases_velocity"] = jnp.any(moving).astype(jnp.float32)
        if s.num_buttons and s.buttons_constrained:
            wrong = self.touching(data, self.button_geoms)
            wrong = wrong & (jnp.arange(s.num_buttons) != goal_button)
            terms["buttons"] = (jnp.any(wrong) & (timer == 0)).astype(jnp.float32)
        if s.num_gremlins and s.gremlins_constrained:
            touched = self.touching(data, self.gremlin_geoms)
            terms["gremlins"] = jnp.any(touched).astype(jnp.float32)
        return terms

    def cost(self, data, hazards_xy: chex.Array, goal_button=0, timer=0) -> chex.Array:
        terms = self.cost_terms(data, hazards_xy, goal_button, timer)
        if not terms:
            return jnp.zeros((), jnp.float32)
        return jnp.max(jnp.stack(list(terms.values())))

    def place_goal(self, key: chex.PRNGKey, data, hazards_xy: chex.Array) -> chex.Array:
        """A new goal [2] clear of the robot, the hazards and the vases where they are."""
        s = self.spec
        others = jnp.concatenate(
            [self.agent_frame(data)[0][None, :2], hazards_xy, self.vases_xy(data)]
        )
        others_keepout = jnp.asarray(
            (s.keepout_agent,)
            + (s.keepout_hazard,) * s.num_hazards
            + (s.keepout_vase,) * s.num_vases
        )
        xy, _ = geo.draw_clear_point(
            key, s.extents, s.keepout_goal, others, others_keepout, GOAL_TRIES
        )
        return xy

    def physics_state(self, layout: chex.Array, agent_yaw: chex.Array, yaws: chex.Array):
        """MJX data at rest for a layout [P, 2] in placement order (forward run).

        yaws: [V + G] the vases' then the gremlins' yaws (their free boxes')."""
        s = self.spec
        qpos = jnp.asarray(self._data0.qpos)
        if self.agent_free:
            height = qpos[2:3]  # the body's resting height from the robot's XML
            pose = jnp.concatenate([layout[0], height, _quat_z(agent_yaw)])
            qpos = qpos.at[0:7].set(pose.astype(qpos.dtype))
        else:
            qpos = qpos.at[0:3].set(jnp.concatenate([layout[0], agent_yaw[None]]))
        vases, gremlins = layout[s.layout_rows("vases")], layout[s.layout_rows("gremlins")]
        boxes = [
            (vases[i], s.vase_size - s.vase_sink, yaws[i], self.vase_qpos[i])
            for i in range(s.num_vases)
        ]
        boxes += [
            (gremlins[i], s.gremlin_size, yaws[s.num_vases + i], self.gremlin_qpos[i])
            for i in range(s.num_gremlins)
        ]
        for xy, z, yaw, adr in boxes:
            pose = jnp.concatenate([xy, jnp.asarray([z]), _quat_z(yaw)])
            qpos = qpos.at[adr : adr + 7].set(pose.astype(qpos.dtype))
        data = self._data0.replace(qpos=qpos, qvel=jnp.zeros_like(self._data0.qvel))
        if s.num_buttons or s.num_gremlins:
            mocap_pos, mocap_quat = data.mocap_pos, data.mocap_quat
            buttons = layout[s.layout_rows("buttons")]
            z = jnp.full((s.num_buttons, 1), s.button_size)
            mocap_pos = mocap_pos.at[self.button_mocap].set(jnp.concatenate([buttons, z], 1))
            # Before the first substep moves them, Safety-Gymnasium's gremlin mocap
            # bodies sit at the origin: here, at the placement (height 0).
            z = jnp.zeros((s.num_gremlins, 1))
            mocap_pos = mocap_pos.at[self.gremlin_mocap].set(jnp.concatenate([gremlins, z], 1))
            if s.num_gremlins:
                quats = jnp.stack([_quat_z(y) for y in yaws[s.num_vases :]])
                mocap_quat = mocap_quat.at[self.gremlin_mocap].set(quats)
            data = data.replace(
                mocap_pos=mocap_pos.astype(data.mocap_pos.dtype),
                mocap_quat=mocap_quat.astype(data.mocap_quat.dtype),
            )
        return mjx.forward(self.model, data)

    # ---- the env interface ---------------------------------------------------

    def reset_from_layout(
        self,
        key: chex.PRNGKey,
        layout: chex.Array,
        agent_yaw: chex.Array,
        yaws: chex.Array,
        goal: chex.Array,
        layout_ok: chex.Array | bool = True,
    ) -> NavState:
        """The state at a given layout (e.g. one read from Safety-Gymnasium).

        yaws: [V + G] as in `physics_state`; goal: the goal's xy [2] (Goal tasks) or
        the goal button's index [] (Button tasks)."""
        data = self.physics_state(layout, agent_yaw, yaws)
        if self.spec.task == "Button":
            goal_button = jnp.asarray(goal, jnp.int32)
        else:
            goal_button = jnp.zeros((), jnp.int32)
        return self._fresh_state(key, data, goal, goal_button, layout, layout_ok)

    def _fresh_state(self, key, data, goal, goal_button, layout, layout_ok) -> NavState:
        """The state of a new episode on physics `data` at rest."""
        hazards_xy = layout[self.spec.layout_rows("hazards")]
        gremlins_xy = layout[self.spec.layout_rows("gremlins")]
        goal_xy = self.buttons_xy(data)[goal_button] if self.spec.task == "Button" else goal
        obs = self.observation(data, goal_xy, hazards_xy)
        zero = jnp.zeros((), jnp.float32)
        izero = jnp.zeros((), jnp.int32)
        dist = jnp.linalg.norm(goal_xy - self.agent_frame(data)[0][:2])
        return NavState(
            data=data,
            goal_xy=goal_xy,
            hazards_xy=hazards_xy,
            last_dist=dist,
            key=key,
            layout_ok=jnp.asarray(layout_ok),
            goal_button=jnp.asarray(goal_button, jnp.int32),
            timer=izero,
            gremlins_xy=gremlins_xy,
            spare_layout=layout,
            obs=obs,
            next_obs=obs,
            reward=zero,
            cost=zero,
            terminated=zero,
            truncated=zero,
            steps=izero,
            episode_return=zero,
            episode_cost=zero,
            final_return=zero,
            final_cost=zero,
            final_length=izero,
        )

    def reset(self, key: chex.PRNGKey) -> NavState:
        """A new episode: a random layout, robot yaw and box yaws, then the goal: re-drawn
        against the others (Goal tasks) or one of the buttons (Button tasks), as
        Safety-Gymnasium's `update_world` does."""
        s = self.spec
        if self.spare_layouts:
            k_layout, k_rest = jax.random.split(key)
            # This episode's layout and the spare for the next one.
            layouts, oks = jax.vmap(
                lambda k: geo.sample_layout_until(k, s.extents, self.keepouts, LAYOUT_ATTEMPTS)
            )(jax.random.split(k_layout))
            state = self.reset_at(k_rest, layouts[0], oks[0])
            return state.replace(spare_layout=jnp.where(oks[1], layouts[1], layouts[0]))
        k_layout, k_yaw, k_vase, k_goal, k_env = jax.random.split(key, 5)
        layout, ok = geo.sample_layout(k_layout, self.spec.extents, self.keepouts)
        return self.reset_at(key, layout, ok, (k_yaw, k_vase, k_goal, k_env))

    def reset_at(self, key, layout: chex.Array, ok: chex.Array, keys=None) -> NavState:
        """A new episode on a given layout [P, 2]: random robot and box yaws and goal."""
        s = self.spec
        k_yaw, k_box, k_goal, k_env = keys if keys is not None else jax.random.split(key, 4)
        agent_yaw = jax.random.uniform(k_yaw, (), minval=0.0, maxval=2 * jnp.pi)
        yaws = jax.random.uniform(k_box, (s.num_vases + s.num_gremlins,), maxval=2 * jnp.pi)
        data = self.physics_state(layout, agent_yaw, yaws)
        if s.task == "Button":
            goal_button = jax.random.randint(k_goal, (), 0, s.num_buttons)
            goal = goal_button
        else:
            goal_button = jnp.zeros((), jnp.int32)
            # The goal does not collide: the physics computed above stays valid.
            goal = self.place_goal(k_goal, data, layout[s.layout_rows("hazards")])
        return self._fresh_state(k_env, data, goal, goal_button, layout, ok)

    def move_gremlins(self, data, gremlins_xy: chex.Array):
        """Gremlins' mocap bodies at phase = sim time on their circles (`Gremlins.move`)."""
        s = self.spec
        phase = data.time
        circle = jnp.stack([jnp.sin(phase), jnp.cos(phase)]) * s.gremlin_travel
        xy = gremlins_xy + circle[None].astype(gremlins_xy.dtype)
        pos = jnp.concatenate([xy, jnp.full((s.num_gremlins, 1), s.gremlin_size, xy.dtype)], 1)
        return data.replace(
            mocap_pos=data.mocap_pos.at[self.gremlin_mocap].set(pos.astype(data.mocap_pos.dtype))
        )

    def physics_step(self, data, action: chex.Array, gremlins_xy: chex.Array | None = None):
        """frame_skip MJX steps with the action held (the gremlins moved before each),
        then a forward pass (so sensors and contacts describe the final state, as
        Safety-Gymnasium's `mj_forward`)."""
        low, high = jnp.asarray(self.action_low), jnp.asarray(self.action_high)
        data = data.replace(ctrl=jnp.clip(action, low, high).astype(data.ctrl.dtype))

        def substep(_, d):
            if self.spec.num_gremlins:
                d = self.move_gremlins(d, gremlins_xy)
            return mjx.step(self.model, d)

        data = jax.lax.fori_loop(0, self.spec.frame_skip, substep, data)
        return mjx.forward(self.model, data)

    def step(
        self, state: NavState, action: chex.Array, goal_key: chex.PRNGKey | None = None
    ) -> NavState:
        """One env step; never resets. On reaching the goal it is re-placed (from
        `goal_key`, else the state's own key): Goal tasks draw a new position, Button
        tasks a new goal button (possibly the same) and start the buttons' timer."""
        s = self.spec
        action = jnp.asarray(action, jnp.float32)
        chex.assert_shape(action, (self.action_size,))
        data = self.physics_step(state.data, action, state.gremlins_xy)
        agent_xy = self.agent_frame(data)[0][:2]
        dist = jnp.linalg.norm(state.goal_xy - agent_xy)
        if s.task == "Button":
            reached = self.touching(data, self.button_geoms)[state.goal_button]
        else:
            reached = dist <= s.goal_size
        reward = (state.last_dist - dist) * s.reward_distance + reached * s.reward_goal
        cost = self.cost(data, state.hazards_xy, state.goal_button, state.timer)
        key, k_goal = jax.random.split(state.key)
        k_goal = k_goal if goal_key is None else goal_key
        timer = jnp.maximum(state.timer - 1, 0)
        if s.task == "Button":
            new_button = jax.random.randint(k_goal, (), 0, s.num_buttons)
            goal_button = jnp.where(reached, new_button, state.goal_button)
            timer = jnp.where(reached, s.button_resampling_delay, timer)
            goal_xy = self.buttons_xy(data)[goal_button].astype(state.goal_xy.dtype)
        else:
            goal_button = state.goal_button
            new_goal = self.place_goal(k_goal, data, state.hazards_xy)
            goal_xy = jnp.where(reached, new_goal, state.goal_xy)
        last_dist = jnp.where(reached, jnp.linalg.norm(goal_xy - agent_xy), dist)
        obs = self.observation(data, goal_xy, state.hazards_xy, timer)
        steps = state.steps + 1
        truncated = (steps >= self.episode_length).astype(jnp.float32)
        reward = reward.astype(jnp.float32)
        episode_return = state.episode_return + reward
        episode_cost = state.episode_cost + cost
        return state.replace(
            data=data,
            goal_xy=goal_xy,
            last_dist=last_dist,
            key=key,
            goal_button=goal_button.astype(jnp.int32),
            timer=timer.astype(jnp.int32),
            obs=obs,
            next_obs=obs,
            reward=reward,
            cost=cost,
            terminated=jnp.zeros((), jnp.float32),
            truncated=truncated,
            steps=steps,
            episode_return=episode_return,
            episode_cost=episode_cost,
            final_return=episode_return,
            final_cost=episode_cost,
            final_length=steps,
        )

    def step_autoreset(self, state: NavState, action: chex.Array, key: chex.PRNGKey) -> NavState:
        """`step`, with an ended episode replaced by `reset(key)` (obs, physics, layout,
        counters); next_obs, reward, cost, terminated, truncated and final_* describe
        the transition. Branch-free: safe under vmap."""
        nxt = self.step(state, action)
        if self.spare_layouts:
            k_try, k_reset = jax.random.split(key)
            s = self.spec
            tried, ok = geo.sample_layout(k_try, s.extents, self.keepouts, restarts=SPARE_ATTEMPTS)
            spare = jnp.where(ok, tried, state.spare_layout)
            fresh = self.reset_at(k_reset, state.spare_layout, state.layout_ok)
            nxt, fresh = nxt.replace(spare_layout=spare), fresh.replace(spare_layout=spare)
        else:
            fresh = self.reset(key)
        done = nxt.done > 0
        keep = ("next_obs", "reward", "cost", "terminated", "truncated")
        keep += ("final_return", "final_cost", "final_length")
        picked = jax.tree.map(lambda a, b: jnp.where(done, a, b), fresh, nxt)
        return picked.replace(**{k: getattr(nxt, k) for k in keep})
