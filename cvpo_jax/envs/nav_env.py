"""Safety-Gymnasium's navigation tasks (Point, Car) in JAX on MuJoCo MJX: pure, vmappable.

`SafeNavEnv` runs a task read by `nav_task.load_nav_task` with the same observation
vector (size and order), reward and cost as Safety-Gymnasium, so one policy runs in
both. One MJX model serves every layout: the robot's pose is in qpos (the robot body
at the origin, `nav_task.normalised_model`), the vases' in their free joints, and the
goal and hazards, which never collide, are positions in the state. A reset samples a
layout in JAX (`nav_geometry.sample_layout`), the cost of a step or two, where
Safety-Gymnasium rebuilds and recompiles its world (~330 ms).

Shape letters: O observation size, A action size, H hazards, V vases.
Where the port differs from Safety-Gymnasium (all stated in the README):
- physics is MJX, not MuJoCo's C engine: trajectories agree to float64 round-off for
  ~20 steps, then drift apart by millimetres to centimetres (contact and friction
  solve differently in detail), so observations agree within the parity test's
  tolerances, not exactly;
- the Car's wheels meet the vases through a 16-sided prism collider (MJX has no
  cylinder-box collision; `nav_task.wheel_colliders`), at most 0.2 mm inside the
  wheel's surface;
- layout sampling uses a bounded number of draws (`nav_geometry`), and the goal's
  re-placement on arrival draws GOAL_TRIES candidates instead of up to 10,000;
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


@flax.struct.dataclass
class NavState:
    """One environment's state (a fixed-shape pytree; vmap adds a leading env axis).

    data: the MJX physics state; goal_xy [2]; hazards_xy [H, 2]; last_dist []: the
    robot's distance to the goal after the previous step; key: the env's own key
    (goal re-placement); layout_ok []: the reset's layout met every keepout.
    The remaining fields are those of `brax_velocity.EnvState` (see there).
    """

    data: Any
    goal_xy: chex.Array
    hazards_xy: chex.Array
    last_dist: chex.Array
    key: chex.Array
    layout_ok: chex.Array
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
    """A Safety-Gymnasium navigation task (Point or Car, Goal, levels 0-2) on MJX.

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
        # Placement order: agent, goal, hazards, vases (checked in nav_task).
        self.keepouts = (
            (spec.keepout_agent, spec.keepout_goal)
            + (spec.keepout_hazard,) * spec.num_hazards
            + (spec.keepout_vase,) * spec.num_vases
        )

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

    def observation(self, data, goal_xy: chex.Array, hazards_xy: chex.Array) -> chex.Array:
        """The flat observation [O] in Safety-Gymnasium's order (sensors, then lidars)."""
        pos, mat = self.agent_frame(data)
        groups = {"goal": goal_xy[None], "hazards": hazards_xy, "vases": self.vases_xy(data)}
        parts = [
            quat_to_3x3(data.sensordata[adr : adr + dim]).ravel()
            if as_matrix
            else data.sensordata[adr : adr + dim]
            for adr, dim, as_matrix in self.sensor_slices
        ]
        s = self.spec
        for group in s.lidar_groups:
            ego = geo.ego_xy(groups[group], pos, mat)
            parts.append(
                geo.pseudo_lidar(
                    ego, s.lidar_bins, s.lidar_max_dist, s.lidar_exp_gain, s.lidar_alias
                )
            )
        return jnp.concatenate(parts).astype(jnp.float32)

    def cost_terms(self, data, hazards_xy: chex.Array) -> dict[str, chex.Array]:
        """Each constrained cost source as a 0/1 indicator of the current state."""
        s = self.spec
        agent_xy = self.agent_frame(data)[0][:2]
        terms = {}
        if s.num_hazards and s.hazards_constrained:
            dist = jnp.linalg.norm(hazards_xy - agent_xy, axis=1)
            terms["hazards"] = jnp.any(dist < s.hazard_size).astype(jnp.float32)
        if s.num_vases and s.vases_constrained:
            if s.vase_contact_cost:
                contact = data._impl.contact  # noqa: SLF001 - MJX's own code reads it so
                g1, g2 = contact.geom[:, 0], contact.geom[:, 1]
                is_agent = jnp.isin(g1, self.agent_geoms) | jnp.isin(g2, self.agent_geoms)
                is_vase = jnp.isin(g1, self.vase_geoms) | jnp.isin(g2, self.vase_geoms)
                touching = contact.dist <= 0.0
                terms["vases_contact"] = jnp.any(is_agent & is_vase & touching).astype(jnp.float32)
            if s.vase_velocity_cost:
                vel = data.qvel[self.vase_dof[:, None] + np.arange(3)[None, :]]  # [V, 3]
                moving = jnp.linalg.norm(vel, axis=1) >= s.vase_velocity_threshold
                terms["vases_velocity"] = jnp.any(moving).astype(jnp.float32)
        return terms

    def cost(self, data, hazards_xy: chex.Array) -> chex.Array:
        terms = self.cost_terms(data, hazards_xy)
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

    def physics_state(self, layout: chex.Array, agent_yaw: chex.Array, vase_yaws: chex.Array):
        """MJX data at rest for a layout [2 + H + V, 2] in placement order (forward run)."""
        s = self.spec
        qpos = jnp.asarray(self._data0.qpos)
        if self.agent_free:
            height = qpos[2:3]  # the body's resting height from the robot's XML
            pose = jnp.concatenate([layout[0], height, _quat_z(agent_yaw)])
            qpos = qpos.at[0:7].set(pose.astype(qpos.dtype))
        else:
            qpos = qpos.at[0:3].set(jnp.concatenate([layout[0], agent_yaw[None]]))
        vases = layout[2 + s.num_hazards :]
        for i in range(s.num_vases):
            z = s.vase_size - s.vase_sink
            pose = jnp.concatenate([vases[i], jnp.asarray([z]), _quat_z(vase_yaws[i])])
            qpos = qpos.at[self.vase_qpos[i] : self.vase_qpos[i] + 7].set(pose)
        data = self._data0.replace(qpos=qpos, qvel=jnp.zeros_like(self._data0.qvel))
        return mjx.forward(self.model, data)

    # ---- the env interface ---------------------------------------------------

    def reset_from_layout(
        self,
        key: chex.PRNGKey,
        layout: chex.Array,
        agent_yaw: chex.Array,
        vase_yaws: chex.Array,
        goal_xy: chex.Array,
        layout_ok: chex.Array | bool = True,
    ) -> NavState:
        """The state at a given layout (e.g. one read from Safety-Gymnasium)."""
        data = self.physics_state(layout, agent_yaw, vase_yaws)
        hazards_xy = layout[2 : 2 + self.spec.num_hazards]
        return self._fresh_state(key, data, goal_xy, hazards_xy, layout_ok)

    def _fresh_state(self, key, data, goal_xy, hazards_xy, layout_ok) -> NavState:
        """The state of a new episode on physics `data` at rest."""
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
        """A new episode: a random layout, robot yaw and vase yaws, then the goal
        re-drawn against the others (as Safety-Gymnasium's Goal tasks do)."""
        k_layout, k_yaw, k_vase, k_goal, k_env = jax.random.split(key, 5)
        layout, ok = geo.sample_layout(k_layout, self.spec.extents, self.keepouts)
        agent_yaw = jax.random.uniform(k_yaw, (), minval=0.0, maxval=2 * jnp.pi)
        vase_yaws = jax.random.uniform(k_vase, (self.spec.num_vases,), maxval=2 * jnp.pi)
        data = self.physics_state(layout, agent_yaw, vase_yaws)
        hazards_xy = layout[2 : 2 + self.spec.num_hazards]
        goal_xy = self.place_goal(k_goal, data, hazards_xy)
        # The goal does not collide: the physics computed above stays valid.
        return self._fresh_state(k_env, data, goal_xy, hazards_xy, ok)

    def physics_step(self, data, action: chex.Array):
        """frame_skip MJX steps with the action held, then a forward pass (so sensors
        and contacts describe the final state, as Safety-Gymnasium's `mj_forward`)."""
        low, high = jnp.asarray(self.action_low), jnp.asarray(self.action_high)
        data = data.replace(ctrl=jnp.clip(action, low, high).astype(data.ctrl.dtype))
        data = jax.lax.fori_loop(
            0, self.spec.frame_skip, lambda _, d: mjx.step(self.model, d), data
        )
        return mjx.forward(self.model, data)

    def step(
        self, state: NavState, action: chex.Array, goal_key: chex.PRNGKey | None = None
    ) -> NavState:
        """One env step; never resets. On reaching the goal it is re-placed (from
        `goal_key`, else the state's own key)."""
        s = self.spec
        action = jnp.asarray(action, jnp.float32)
        chex.assert_shape(action, (self.action_size,))
        data = self.physics_step(state.data, action)
        agent_xy = self.agent_frame(data)[0][:2]
        dist = jnp.linalg.norm(state.goal_xy - agent_xy)
        reached = dist <= s.goal_size
        reward = (state.last_dist - dist) * s.reward_distance + reached * s.reward_goal
        cost = self.cost(data, state.hazards_xy)
        key, k_goal = jax.random.split(state.key)
        k_goal = k_goal if goal_key is None else goal_key
        goal_xy = jnp.where(reached, self.place_goal(k_goal, data, state.hazards_xy), state.goal_xy)
        last_dist = jnp.where(reached, jnp.linalg.norm(goal_xy - agent_xy), dist)
        obs = self.observation(data, goal_xy, state.hazards_xy)
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
        fresh = self.reset(key)
        done = nxt.done > 0
        keep = ("next_obs", "reward", "cost", "terminated", "truncated")
        keep += ("final_return", "final_cost", "final_length")
        picked = jax.tree.map(lambda a, b: jnp.where(done, a, b), fresh, nxt)
        return picked.replace(**{k: getattr(nxt, k) for k in keep})
