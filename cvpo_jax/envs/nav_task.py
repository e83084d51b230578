"""Safety-Gymnasium's navigation tasks, read from the installed package for the JAX port.

Everything that defines a task (object counts, sizes, keepouts, placement extents,
reward and cost parameters, the lidar, the robot's sensors and their order, frame
skip, episode length, the robot's MJCF and the world around it) is read here from a
live Safety-Gymnasium env, not retyped, so the JAX task (`nav_env.py`) follows the
installed version. The definitions mirrored (safety-gymnasium 1.0.0):

- layout: `utils/random_generator.py` (`sample_layout`, `draw_placement`): objects in
  placement order, each drawn uniformly from the extents shrunk by its keepout, valid
  when its distance to every placed object is >= the sum of the two keepouts;
- lidar: `bases/base_task.py` `_obs_lidar_pseudo`, `_ego_xy` (linear in distance when
  `max_dist` is set, aliasing into the two neighbouring bins, max over objects);
- reward: `tasks/safe_navigation/goal/goal_level0.py` `calculate_reward` (distance
  progress times `reward_distance`, plus `reward_goal` within `goal.size`), the goal
  re-placed against the current layout on arrival (`base_task.py` `build_goal_position`);
- Button: `tasks/safe_navigation/button/button_level0.py` (the goal is one of the
  buttons, drawn uniformly, again after every press; a press is a contact of the robot
  with it; `reward_distance` and `reward_goal` are the buttons'), `assets/geoms/buttons.py`
  (touching another button costs while the resampling timer is 0; the timer runs
  `resampling_delay` steps after a press, and the buttons' lidar reads 0 until then),
  `assets/mocaps/gremlins.py` (a light box welded to a mocap body that circles its
  placement with radius `travel` at phase = sim time; touching one costs);
- cost: `assets/geoms/hazards.py` (distance < size), `assets/free_geoms/vases.py`
  (contact, velocity >= threshold), each source as a 0/1 indicator and the step's cost
  1 if any source is active (`builder.py` `_cost`, `constrain_indicator`);
- physics: the robot XML's timestep, `frameskip_binom_n` substeps per env step
  (`frameskip_binom_p` = 1: always all of them).
"""

from __future__ import annotations

import dataclasses
import difflib
import re

import mujoco
import numpy as np

from cvpo_jax.envs.registry import NAV_BACKEND

PREFIX = NAV_BACKEND  # the registry's prefix of these tasks
ROBOTS = ("Point", "Car")
TASKS = ("Goal", "Button")
LEVELS = (0, 1, 2)
TASK_NAMES = tuple(f"{r}{t}{lv}" for r in ROBOTS for t in TASKS for lv in LEVELS)
# Not yet ported (named here so that a request gets a precise error).
PLANNED = tuple(f"{r}Push{lv}" for r in ROBOTS for lv in LEVELS)
# Layout groups: Safety-Gymnasium's object name and its placement entries' prefix.
GROUPS = {"goal": "goal", "hazards": "hazard", "vases": "vase", "buttons": "button"}
GROUPS |= {"gremlins": "gremlin"}


@dataclasses.dataclass(frozen=True)
class NavTaskSpec:
    """A Safety-Gymnasium navigation task's definition (see module docstring).

    Positions are in the world's xy plane; `keepout_*` are placement radii.
    `placement_order` names the layout's entries in sampling order ("agent",
    "goal", "hazard0", ..., "vase0", ... for Goal; "agent", "button0", ..., "goal",
    "hazard0", ..., "gremlin0", ... for Button); `obs_parts` the observation's parts in
    order with their sizes; `sensors` the robot sensors (MuJoCo sensor names);
    `quat_sensors` those among them (ball joints' quaternions) that Safety-Gymnasium
    reports as a flattened 3x3 rotation matrix.
    """

    name: str
    safety_gym_id: str
    robot: str
    task: str
    placement_order: tuple[str, ...]
    extents: tuple[float, float, float, float]
    keepout_agent: float
    goal_size: float
    keepout_goal: float
    reward_distance: float
    reward_goal: float
    num_hazards: int
    hazard_size: float
    keepout_hazard: float
    hazards_constrained: bool
    num_vases: int
    keepout_vase: float
    vase_size: float
    vase_sink: float
    vases_constrained: bool
    vase_contact_cost: bool
    vase_velocity_cost: bool
    vase_velocity_threshold: float
    num_buttons: int
    button_size: float
    keepout_button: float
    buttons_constrained: bool
    button_resampling_delay: int
    num_gremlins: int
    gremlin_size: float
    keepout_gremlin: float
    gremlin_travel: float
    gremlins_constrained: bool
    lidar_bins: int
    lidar_max_dist: float | None
    lidar_exp_gain: float
    lidar_alias: bool
    lidar_groups: tuple[str, ...]
    sensors: tuple[str, ...]
    quat_sensors: tuple[str, ...]
    obs_parts: tuple[tuple[str, int], ...]
    frame_skip: int
    episode_length: int
    xml: str

    @property
    def observation_size(self) -> int:
        return int(sum(size for _, size in self.obs_parts))

    @property
    def env_id(self) -> str:
        return f"{PREFIX}/{self.name}"

    def layout_rows(self, group: str) -> slice:
        """The rows of a layout [P, 2] (placement order) holding `group` ("agent",
        "goal", "hazards", "vases", "buttons", "gremlins"; empty if absent)."""
        prefix = "agent" if group == "agent" else GROUPS[group]
        rows = [
            i
            for i, n in enumerate(self.placement_order)
            if n == prefix or (n.startswith(prefix) and n[len(prefix) :].isdigit())
        ]
        return slice(rows[0], rows[-1] + 1) if rows else slice(0, 0)

    @property
    def keepouts(self) -> tuple[float, ...]:
        """Each layout entry's placement keepout, in placement order."""
        by_prefix = {
            "agent": self.keepout_agent,
            "goal": self.keepout_goal,
            "hazard": self.keepout_hazard,
            "vase": self.keepout_vase,
            "button": self.keepout_button,
            "gremlin": self.keepout_gremlin,
        }
        return tuple(by_prefix[n.rstrip("0123456789")] for n in self.placement_order)


def resolve_nav_name(name: str) -> str:
    """The canonical task name for `name` ("PointGoal1", "pointgoal1",
    "SafetyPointGoal1-v0" all give "PointGoal1"), with close matches on error."""
    key = re.sub(r"^safety", "", name.strip().lower())
    key = re.sub(r"-v\d+$", "", key)
    by_key = {n.lower(): n for n in TASK_NAMES}
    if key in by_key:
        return by_key[key]
    planned = {n.lower(): n for n in PLANNED}
    if key in planned:
        raise ValueError(
            f"{PREFIX}/{planned[key]} is not ported to JAX yet; available: "
            f"{', '.join(PREFIX + '/' + n for n in TASK_NAMES)} (or {planned[key]} without "
            f"the prefix: Safety-Gymnasium on the host)."
        )
    close = difflib.get_close_matches(key, list(by_key) + list(planned), n=3, cutoff=0.6)
    hint = f" Did you mean {', '.join(PREFIX + '/' + (by_key | planned)[c] for c in close)}?"
    raise ValueError(
        f"unknown JAX navigation task {name!r}.{hint if close else ''} Available: "
        f"{', '.join(PREFIX + '/' + n for n in TASK_NAMES)}."
    )


def make_safety_gym_env(name: str):
    """The Safety-Gymnasium env of a navigation task (reset once, so its task exists)."""
    from cvpo_jax.envs.safety_gymnasium_compat import import_safety_gymnasium

    sg = import_safety_gymnasium()
    env = sg.make(f"Safety{name}-v0")
    env.reset(seed=0)
    return env


def load_nav_task(name: str) -> NavTaskSpec:
    """Reads task `name` ("PointGoal1") from the installed Safety-Gymnasium."""
    name = resolve_nav_name(name)
    env = make_safety_gym_env(name)
    try:
        return _spec_from_task(name, env.unwrapped.task)
    finally:
        env.close()


def _spec_from_task(name: str, task) -> NavTaskSpec:
    lidar = task.lidar_conf
    if lidar.type != "pseudo":
        raise NotImplementedError(f"{name}: lidar type {lidar.type!r} is not ported")
    if task.sim_conf.frameskip_binom_p != 1.0:
        raise NotImplementedError(f"{name}: a random frame skip is not ported")
    obstacles = {ob.name: ob for ob in task._obstacles}  # noqa: SLF001 - the task's own list
    unsupported = sorted(set(obstacles) - set(GROUPS))
    if unsupported:
        raise NotImplementedError(f"{name}: objects {unsupported} are not ported")
    hazards, vases, goal = obstacles.get("hazards"), obstacles.get("vases"), obstacles["goal"]
    buttons, gremlins = obstacles.get("buttons"), obstacles.get("gremlins")
    kind = "Button" if buttons is not None else "Goal"
    # The Button tasks reward pressing a button: their distance and goal rewards are
    # the buttons' (the goal object only marks the goal button).
    rewarded = buttons if buttons is not None else goal
    spaces = task.obs_info.obs_space_dict.spaces
    obs_parts = tuple((key, int(np.prod(space.shape))) for key, space in spaces.items())
    lidar_groups = tuple(k[: -len("_lidar")] for k, _ in obs_parts if k.endswith("_lidar"))
    sensors = tuple(k for k, _ in obs_parts if not k.endswith("_lidar"))
    placement_order = tuple(task.placements_conf.placements)
    expected_order = ("agent",) + tuple(
        GROUPS[ob.name] if ob.name == "goal" else f"{GROUPS[ob.name]}{i}"
        for ob in task._obstacles  # noqa: SLF001
        for i in range(1 if ob.name == "goal" else ob.num)
    )
    info = task.agent.sensor_info
    if info.hinge_pos_names or info.freejoint_pos_name or info.freejoint_qvel_name:
        raise NotImplementedError(f"{name}: hinge or free-joint position sensors are not ported")
    if not task.agent.sensor_conf.sensors_angle_components:
        raise NotImplementedError(f"{name}: raw ball-joint quaternions are not ported")
    if placement_order != expected_order:
        raise NotImplementedError(f"{name}: placement order {placement_order} is not ported")
    if any(region is not None for region, _ in task.placements_conf.placements.values()):
        raise NotImplementedError(f"{name}: placement regions other than the extents")
    return NavTaskSpec(
        name=name,
        safety_gym_id=f"Safety{name}-v0",
        robot=type(task.agent).__name__,
        task=kind,
        placement_order=placement_order,
        extents=tuple(float(x) for x in task.placements_conf.extents),
        keepout_agent=float(task.agent.keepout),
        goal_size=float(goal.size),
        keepout_goal=float(goal.keepout),
        reward_distance=float(rewarded.reward_distance),
        reward_goal=float(rewarded.reward_goal),
        num_hazards=int(hazards.num) if hazards else 0,
        hazard_size=float(hazards.size) if hazards else 0.0,
        keepout_hazard=float(hazards.keepout) if hazards else 0.0,
        hazards_constrained=bool(hazards.is_constrained) if hazards else False,
        num_vases=int(vases.num) if vases else 0,
        keepout_vase=float(vases.keepout) if vases else 0.0,
        vase_size=float(vases.size) if vases else 0.0,
        vase_sink=float(vases.sink) if vases else 0.0,
        vases_constrained=bool(vases.is_constrained) if vases else False,
        vase_contact_cost=bool(vases and vases.contact_cost),
        vase_velocity_cost=bool(vases and vases.velocity_cost),
        vase_velocity_threshold=float(vases.velocity_threshold) if vases else 0.0,
        num_buttons=int(buttons.num) if buttons else 0,
        button_size=float(buttons.size) if buttons else 0.0,
        keepout_button=float(buttons.keepout) if buttons else 0.0,
        buttons_constrained=bool(buttons.is_constrained) if buttons else False,
        button_resampling_delay=int(buttons.resampling_delay) if buttons else 0,
        num_gremlins=int(gremlins.num) if gremlins else 0,
        gremlin_size=float(gremlins.size) if gremlins else 0.0,
        keepout_gremlin=float(gremlins.keepout) if gremlins else 0.0,
        gremlin_travel=float(gremlins.travel) if gremlins else 0.0,
        gremlins_constrained=bool(gremlins.is_constrained) if gremlins else False,
        lidar_bins=int(lidar.num_bins),
        lidar_max_dist=None if lidar.max_dist is None else float(lidar.max_dist),
        lidar_exp_gain=float(lidar.exp_gain),
        lidar_alias=bool(lidar.alias),
        lidar_groups=lidar_groups,
        sensors=sensors,
        quat_sensors=tuple(info.ballquat_names),
        obs_parts=obs_parts,
        frame_skip=int(task.sim_conf.frameskip_binom_n),
        episode_length=int(task.num_steps),
        xml=task.world.xml_string,
    )


# The Car's wheels are cylinders; MJX has no (cylinder, box) collision, so a wheel
# cannot touch a vase (a box). Each wheel gets a massless collider for boxes: a
# prism over a regular WHEEL_PRISM_SIDES-gon inscribed in the wheel's circle (at
# most r (1 - cos(pi / n)) = 0.2 mm inside it for r = 0.05 m), with the wheel's
# length and contact parameters. Contact bits route the pairs (MuJoCo collides two
# geoms when contype_1 & conaffinity_2 or contype_2 & conaffinity_1 is nonzero):
# the cylinder meets only the floor, the prism only boxes of the world (the vases),
# everything else as before. Pairs dropped: the wheels with the car's own rear ball
# and with each other, which are rigidly apart and never touch. (The buttons'
# contact bit, below, is kept: MJX collides spheres with cylinders.)
WHEEL_PRISM_SIDES = 16
_FLOOR_BITS = (3, 1)  # contype, conaffinity
_WHEEL_BITS = (0, 2)  # the cylinder: floor only
_PRISM_BITS = (0, 4)  # the prism: world boxes only
_BOX_CONTYPE = 5  # world boxes (vases): as before, plus the prisms


# Buttons touch only what moves. Safety-Gymnasium's buttons are static geoms, which
# MuJoCo never collides with the static floor or with each other; here they are
# mocap bodies (one model serves every layout), which MJX would pair with the floor
# and each other, so they get a contact bit of their own that only moving geoms
# (robot, gremlins) carry.
_BUTTON_BIT = 8


def normalised_model(spec: NavTaskSpec) -> mujoco.MjModel:
    """The task's MjModel with the robot's body at the origin (identity orientation),
    so that one model serves every layout: the robot's pose lives in qpos.

    Safety-Gymnasium compiles a new model per reset with the robot body placed and
    rotated there and its joints at 0. For the Point (slide x, slide y, hinge z, all
    isotropic) a body at the origin with qpos = (x, y, yaw) is the same system; the
    Car's free joint ignores the body's pose (qpos holds it). Cylinders of the robot
    that can touch a box get the box collider above (`wheel_colliders`). The Button
    worlds' layout-dependent parts move into the state (`layout_free_world`).
    """
    model = wheel_colliders(layout_free_world(spec))
    agent = model.body("agent").id
    model.body_pos[agent] = [0.0, 0.0, model.body_pos[agent][2]]
    model.body_quat[agent] = [1.0, 0.0, 0.0, 0.0]
    return model


def layout_free_world(spec: NavTaskSpec) -> str:
    """The task's XML with every placement held in the state, not the model.

    Buttons become mocap bodies (their positions: `mocap_pos`). A gremlin is a free
    box welded to a mocap body; Safety-Gymnasium puts that body at the origin with
    its geom, and the weld's reference pose, offset by the placement, and moves the
    body on a circle about the origin. Here the body itself is placed (`mocap_pos` =
    placement + circle, `mocap_quat` = the box's yaw) and the weld holds the box at
    its pose: the same target pose of the box, hence the same constraint. Goal tasks
    are returned unchanged.
    """
    if spec.task != "Button":
        return spec.xml
    world = mujoco.MjSpec.from_string(spec.xml)
    for i in range(spec.num_buttons):
        body = world.body(f"button{i}")
        body.mocap = True
        body.pos, body.quat = [0.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]
        geom = world.geom(f"button{i}")
        geom.contype, geom.conaffinity = 0, _BUTTON_BIT
    for i in range(spec.num_gremlins):
        box = world.body(f"gremlin{i}obj")
        box.pos, box.quat = [0.0, 0.0, spec.gremlin_size], [1.0, 0.0, 0.0, 0.0]
        world.geom(f"gremlin{i}mocap").pos = [0.0, 0.0, 0.0]
        world.geom(f"gremlin{i}mocap").quat = [1.0, 0.0, 0.0, 0.0]
    # The weld's reference pose is computed at compile time from the poses above
    # (the box at height gremlin_size in the mocap body's frame).
    model = world.compile()
    agent = model.body("agent").id
    moving = {b for b in range(model.nbody) if model.body_rootid[b] == agent}
    moving |= {model.body(f"gremlin{i}obj").id for i in range(spec.num_gremlins)}
    for g in range(model.ngeom):
        collides = model.geom_contype[g] or model.geom_conaffinity[g]
        if model.geom_bodyid[g] in moving and collides and model.geom(g).name:
            world.geom(model.geom(g).name).contype |= _BUTTON_BIT
    return world.to_xml()


def wheel_colliders(xml: str) -> mujoco.MjModel:
    """The model of `xml` with a prism collider per colliding robot cylinder (see
    above); the plain model when the robot has none (the Point)."""
    model = mujoco.MjModel.from_xml_string(xml)
    cyl, box, plane = (mujoco.mjtGeom.mjGEOM_CYLINDER, mujoco.mjtGeom.mjGEOM_BOX, 0)
    agent = model.body("agent").id
    robot = {b for b in range(model.nbody) if model.body_rootid[b] == agent}
    collides = (model.geom_contype != 0) | (model.geom_conaffinity != 0)
    wheels = [
        g
        for g in range(model.ngeom)
        if model.geom_bodyid[g] in robot and model.geom_type[g] == cyl and collides[g]
    ]
    if not wheels:
        return model
    spec = mujoco.MjSpec.from_string(xml)
    for g in range(model.ngeom):
        geom = spec.geom(model.geom(g).name) if model.geom(g).name else None
        if geom is None or not collides[g]:
            continue
        if model.geom_type[g] == plane:
            geom.contype, geom.conaffinity = _FLOOR_BITS
        elif model.geom_type[g] == box and model.geom_bodyid[g] not in robot:
            geom.contype = _BOX_CONTYPE | (geom.contype & _BUTTON_BIT)
    for g in wheels:
        name = model.geom(g).name
        radius, half = (float(x) for x in model.geom_size[g][:2])
        angles = 2 * np.pi * np.arange(WHEEL_PRISM_SIDES) / WHEEL_PRISM_SIDES
        ring = np.stack([radius * np.cos(angles), radius * np.sin(angles)], axis=1)
        verts = np.concatenate(
            [np.c_[ring, np.full(len(ring), -half)], np.c_[ring, np.full(len(ring), half)]]
        )
        mesh = spec.add_mesh()
        mesh.name = f"{name}_box_collider"
        mesh.uservert = verts.ravel().tolist()
        wheel = spec.geom(name)
        wheel.contype = _WHEEL_BITS[0] | (wheel.contype & _BUTTON_BIT)  # buttons: spheres
        wheel.conaffinity = _WHEEL_BITS[1]
        body = spec.body(model.body(model.geom_bodyid[g]).name)
        prism = body.add_geom()
        prism.name = f"{name}_box_collider"
        prism.type = mujoco.mjtGeom.mjGEOM_MESH
        prism.meshname = mesh.name
        prism.pos = model.geom_pos[g].copy()
        prism.quat = model.geom_quat[g].copy()
        prism.contype, prism.conaffinity = _PRISM_BITS
        prism.condim = int(model.geom_condim[g])
        prism.friction = model.geom_friction[g].copy()
        prism.solref = model.geom_solref[g].copy()
        prism.solimp = model.geom_solimp[g].copy()
        prism.mass = 0.0
        prism.group = 5
        prism.rgba = [0.0, 0.0, 0.0, 0.0]
    return spec.compile()
