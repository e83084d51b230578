"""Makes safety-gymnasium 1.0.0 import and run on Python 3.11, MuJoCo 3 and numpy 2.

safety-gymnasium 1.0.0 (the latest release) was written for Python 3.8-3.10,
MuJoCo 2.3 and numpy 1.x. On the pinned stack it fails in five places. Every fix
lives here, is applied at import time from this file, and leaves site-packages
untouched, so a fresh install works without a post-install step:

  (a) ``assets/**.py``: dataclass fields use a numpy array as default, which
      Python 3.11's dataclasses reject (``ValueError: mutable default``). The
      default becomes ``field(default_factory=<array>.copy)``.
  (b) ``bases/base_agent.py``, ``assets/robot.py``: MuJoCo 3's ``model.jnt()``
      rejects the shape-(1,) array that ``model.sensor(i).objid`` returns.
  (c) ``bases/base_agent.py``: numpy 2 rejects ``float()`` of a 1-element array.
  (d) gymnasium 0.29.1's ``swimmer.xml`` has ``<option collision=...>``, which
      MuJoCo 3 removed (SafetySwimmerVelocity only).
  (e) gymnasium's ``mujoco_rendering.py`` leaves ``matid`` of marker geoms
      uninitialised; MuJoCo 3 reads it and segfaults when rendering rgb_array
      of tasks that draw markers (e.g. CarGoal1).

(a)-(c) must be fixed before the module body runs (the dataclass decorator
raises during import), so they are source-text patches applied by a
``sys.meta_path`` finder to the named modules only. (d) and (e) patch classes
right after import. Each patch states how often its pattern must occur and
raises :class:`SafetyGymnasiumCompatError` otherwise, so a version bump that
changes the patched code is noticed instead of silently running unpatched.

Use :func:`import_safety_gymnasium` instead of ``import safety_gymnasium``. It
also points MuJoCo's log file (``MUJOCO_LOG.TXT``, written into the cwd by
default) at :func:`mujoco_log_path`.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.abc
import importlib.machinery
import os
import pathlib
import re
import sys
import tempfile
import threading
import types
from collections.abc import Callable

SUPPORTED_VERSION = "1.0.0"

# Set on every module whose source this layer patched.
_PATCHED_MARKER = "__cvpo_jax_compat__"


class SafetyGymnasiumCompatError(ImportError):
    """A compatibility patch no longer matches the installed code."""


@dataclasses.dataclass(frozen=True)
class SourcePatch:
    """A regex substitution applied to one module's source before it is compiled.

    Attributes:
      fix: which of the documented fixes (a)-(e) this implements.
      pattern: regex (multiline mode) to replace.
      replacement: ``re.sub`` replacement text. Must not add lines, so that
        tracebacks keep pointing at the right line of the installed file.
      count: how many matches the supported version has; any other number is an
        error.
    """

    fix: str
    pattern: str
    replacement: str
    count: int = 1


# (a): modules with exactly one ``color: np.array = COLOR['...']`` field each.
# ``__import__`` keeps the replacement on one line and works whether or not
# the module imported ``field`` (circle.py and sigwalls.py do not).
_ARRAY_DEFAULT_MODULES = (
    "safety_gymnasium.assets.free_geoms.push_box",
    "safety_gymnasium.assets.free_geoms.vases",
    "safety_gymnasium.assets.geoms.apples",
    "safety_gymnasium.assets.geoms.buttons",
    "safety_gymnasium.assets.geoms.circle",
    "safety_gymnasium.assets.geoms.goal",
    "safety_gymnasium.assets.geoms.hazards",
    "safety_gymnasium.assets.geoms.oranges",
    "safety_gymnasium.assets.geoms.pillars",
    "safety_gymnasium.assets.geoms.sigwalls",
    "safety_gymnasium.assets.geoms.walls",
    "safety_gymnasium.assets.mocaps.gremlins",
)
_ARRAY_DEFAULT_PATCH = SourcePatch(
    fix="(a) numpy-array dataclass default",
    pattern=r"^(\s+\w+: np\.array = )(COLOR\[['\"]\w+['\"]\])\s*$",
    replacement=r"\1__import__('dataclasses').field(default_factory=\2.copy)",
)

SOURCE_PATCHES: dict[str, tuple[SourcePatch, ...]] = {
    **{name: (_ARRAY_DEFAULT_PATCH,) for name in _ARRAY_DEFAULT_MODULES},
    "safety_gymnasium.bases.base_agent": (
        SourcePatch(
            fix="(b) MuJoCo 3 jnt() index",
            pattern=r"\.jnt\(joint_id\)",
            replacement=r".jnt(int(np.ravel(joint_id)[0]))",
        ),
        SourcePatch(
            fix="(c) numpy 2 float() of a 1-element array",
            pattern=r"theta = float\(self\.get_sensor\(sensor\)\)",
            replacement=r"theta = float(np.ravel(self.get_sensor(sensor))[0])",
        ),
    ),
    "safety_gymnasium.assets.robot": (
        # robot.py does not import numpy; objid is always a shape-(1,) array.
        SourcePatch(
            fix="(b) MuJoCo 3 jnt() index",
            pattern=r"\.jnt\(joint_id\)",
            replacement=r".jnt(int(joint_id[0]))",
        ),
    ),
}


def apply_source_patches(module_name: str, source: str) -> str:
    """Returns ``source`` with every patch for ``module_name`` applied.

    Raises:
      SafetyGymnasiumCompatError: a pattern matched a different number of times
        than the supported version has, or a patch changed the line count.
    """
    for patch in SOURCE_PATCHES.get(module_name, ()):
        patched, n = re.subn(patch.pattern, patch.replacement, source, flags=re.MULTILINE)
        if n != patch.count:
            raise SafetyGymnasiumCompatError(
                f"safety-gymnasium compat fix {patch.fix}: expected {patch.count} "
                f"match(es) of {patch.pattern!r} in {module_name}, found {n}. The "
                f"installed safety-gymnasium is probably not {SUPPORTED_VERSION}; "
                f"update cvpo_jax/envs/safety_gymnasium_compat.py."
            )
        if patched.count("\n") != source.count("\n"):
            raise SafetyGymnasiumCompatError(
                f"compat fix {patch.fix} changed the line count of {module_name}"
            )
        source = patched
    return source


class _PatchingLoader(importlib.machinery.SourceFileLoader):
    """Compiles the patched source; never reads or writes bytecode caches.

    The caches next to the installed files hold the unpatched code, and writing
    patched bytecode there would modify site-packages.
    """

    def get_source(self, fullname: str) -> str:
        return apply_source_patches(fullname, super().get_source(fullname))

    def get_code(self, fullname: str) -> types.CodeType:
        return compile(self.get_source(fullname), self.path, "exec", dont_inherit=True)

    def exec_module(self, module: types.ModuleType) -> None:
        setattr(module, _PATCHED_MARKER, True)
        super().exec_module(module)


class _PatchingFinder(importlib.abc.MetaPathFinder):
    """Routes the modules in :data:`SOURCE_PATCHES` through :class:`_PatchingLoader`."""

    def find_spec(self, fullname, path, target=None):
        if fullname not in SOURCE_PATCHES:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or not isinstance(spec.loader, importlib.machinery.SourceFileLoader):
            raise SafetyGymnasiumCompatError(
                f"cannot patch {fullname}: no source file found (spec={spec})"
            )
        spec.loader = _PatchingLoader(fullname, spec.origin)
        spec.cached = None
        return spec


def _install_finder() -> None:
    if not any(isinstance(f, _PatchingFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _PatchingFinder())


# Installed on import of this module as well, so that a plain
# ``import safety_gymnasium`` anywhere after it gets the source fixes (a)-(c).
_install_finder()


def _check_not_imported_unpatched() -> None:
    """Fails if a module that needs a source patch was imported without one."""
    stale = sorted(
        name
        for name in SOURCE_PATCHES
        if name in sys.modules and not getattr(sys.modules[name], _PATCHED_MARKER, False)
    )
    if stale:
        raise SafetyGymnasiumCompatError(
            "these safety_gymnasium modules were imported before the compat layer and "
            f"run unpatched: {stale}. Import safety_gymnasium only through "
            "cvpo_jax.envs.safety_gymnasium_compat.import_safety_gymnasium()."
        )


# --- (d) swimmer.xml ---------------------------------------------------------

_SWIMMER_MODULE = "safety_gymnasium.tasks.safe_velocity.safety_swimmer_velocity_v0"
_SWIMMER_COLLISION = 'collision="predefined" '


def patch_swimmer_xml(xml: str) -> str:
    """Rewrites gymnasium 0.29.1's swimmer.xml for MuJoCo 3.

    ``collision="predefined"`` meant "only explicit <pair> contacts"; swimmer.xml
    declares none, so its MuJoCo 3 equivalent is disabling contacts. Dropping
    the attribute alone would let the swimmer touch the floor and change its
    dynamics.
    """
    if xml.count(_SWIMMER_COLLISION) != 1 or xml.count("<option ") != 1:
        raise SafetyGymnasiumCompatError(
            f"compat fix (d) swimmer.xml: expected one <option {_SWIMMER_COLLISION}...>; "
            "gymnasium's swimmer.xml changed, update safety_gymnasium_compat.py."
        )
    xml = xml.replace(_SWIMMER_COLLISION, "")
    option = re.search(r"<option [^>]*?/>", xml)
    if option is None:
        raise SafetyGymnasiumCompatError("compat fix (d): swimmer.xml <option> is not self-closing")
    opened = option.group(0)[: -len("/>")].rstrip() + ">"
    return xml.replace(option.group(0), opened + '<flag contact="disable"/></option>')


def _swimmer_initialize_simulation(self):
    """``MujocoEnv._initialize_simulation`` (gymnasium 0.29.1) on the rewritten XML."""
    import mujoco

    with open(self.fullpath, encoding="utf-8") as f:
        model = mujoco.MjModel.from_xml_string(patch_swimmer_xml(f.read()))
    # MjrContext copies model.vis.global_.off* to con.off*.
    model.vis.global_.offwidth = self.width
    model.vis.global_.offheight = self.height
    return model, mujoco.MjData(model)


def _patch_swimmer() -> None:
    module = importlib.import_module(_SWIMMER_MODULE)
    cls = module.SafetySwimmerVelocityEnv
    if cls.__dict__.get("_initialize_simulation") is not _swimmer_initialize_simulation:
        if "_initialize_simulation" in cls.__dict__:
            raise SafetyGymnasiumCompatError(
                f"compat fix (d): {_SWIMMER_MODULE} now defines _initialize_simulation"
            )
        cls._initialize_simulation = _swimmer_initialize_simulation


# --- (e) marker matid ---------------------------------------------------------


def _patch_marker_matid() -> None:
    from gymnasium.envs.mujoco import mujoco_rendering

    base = mujoco_rendering.BaseRender
    original = base.__dict__["_add_marker_to_scene"]
    if getattr(original, "_cvpo_jax_compat", False):
        return

    def _add_marker_to_scene(self, marker: dict):
        # gymnasium resets most mjvGeom fields of the next free slot but not
        # matid; a stale value indexes a material that does not exist.
        if self.scn.ngeom < self.scn.maxgeom:
            self.scn.geoms[self.scn.ngeom].matid = -1
        return original(self, marker)

    _add_marker_to_scene._cvpo_jax_compat = True
    _add_marker_to_scene.__wrapped__ = original
    base._add_marker_to_scene = _add_marker_to_scene


# --- MuJoCo's log file ---------------------------------------------------------


def mujoco_log_path() -> pathlib.Path:
    """Where MuJoCo's log goes once :func:`import_safety_gymnasium` has run."""
    return pathlib.Path(tempfile.gettempdir()) / "cvpo_jax_mujoco" / "MUJOCO_LOG.TXT"


def _redirect_mujoco_log() -> None:
    """Moves MuJoCo's log file out of the working directory.

    MuJoCo appends every warning (e.g. gymnasium's half_cheetah.xml uses a
    deprecated attribute) to ``MUJOCO_LOG.TXT`` in the cwd, which is usually
    the repository. Messages still go to the console. A log path someone set
    explicitly (absolute) is left alone; older MuJoCo has no log config.
    """
    import mujoco

    if not hasattr(mujoco, "MjLogConfig"):
        return
    config = mujoco.MjLogConfig.get()
    if os.path.isabs(config.logfile):
        return
    path = mujoco_log_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    config.logfile = str(path)
    config.set()


# --- entry point --------------------------------------------------------------

_POST_IMPORT_PATCHES: tuple[Callable[[], None], ...] = (
    _patch_swimmer,
    _patch_marker_matid,
    _redirect_mujoco_log,
)
_lock = threading.Lock()


def _silence_import_notices() -> None:
    """Drops the notices gymnasium / gymnasium-robotics print to stderr on import.

    They concern environments this project does not use (e.g. Adroit reward changes)
    and would otherwise open every command's output and every worker's start.
    """
    try:
        from farama_notifications import notifications
    except ImportError:
        return
    for package in ("gymnasium", "gymnasium_robotics"):
        notifications.pop(package, None)


def import_safety_gymnasium() -> types.ModuleType:
    """Returns the ``safety_gymnasium`` module with all five fixes applied.

    Also moves MuJoCo's log file out of the cwd (see :func:`_redirect_mujoco_log`).

    Idempotent and thread-safe. Every patched module is imported eagerly here,
    so a pattern that no longer matches fails now, not at the first env make.

    Raises:
      SafetyGymnasiumCompatError: a fix no longer matches the installed code, or
        a module needing a source fix was imported before this function ran.
    """
    with _lock:
        _check_not_imported_unpatched()
        _install_finder()
        _silence_import_notices()
        module = importlib.import_module("safety_gymnasium")
        for name in SOURCE_PATCHES:
            importlib.import_module(name)
        for patch in _POST_IMPORT_PATCHES:
            patch()
        return module
