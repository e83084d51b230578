"""The safety-gymnasium compatibility layer: each of the five fixes, and its guards.

Each env test exercises code that fails on the pinned stack without its fix:
(a) the import itself, (b) any Car/Doggo/Ant model (jointed sensors),
(c) Doggo/Ant navigation observations, (d) SafetySwimmerVelocity, (e) rgb_array
rendering of a task with markers (a segfault, hence a subprocess).
"""

import ctypes.util
import importlib.util
import os
import pathlib
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from cvpo_jax.envs import safety_gymnasium_compat as compat

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _mujoco_logs_in_tmp(tmp_path, monkeypatch):
    # MuJoCo writes MUJOCO_LOG.TXT into the cwd on errors; keep it out of the repo.
    monkeypatch.chdir(tmp_path)


def _run_fresh_python(code: str, cwd, extra_env=None, timeout=120):
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), **(extra_env or {})}
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def _step_env(env_id, n=10):
    sg = compat.import_safety_gymnasium()
    env = sg.make(env_id)
    try:
        obs, _ = env.reset(seed=0)
        rng = np.random.default_rng(0)
        for _ in range(n):
            obs, reward, cost, _, _, _ = env.step(rng.uniform(-1, 1, env.action_space.shape))
        return obs, reward, cost
    finally:
        env.close()


def test_car_goal_steps_in_fresh_interpreter(tmp_path):
    """The fresh-install check: a new process imports via the compat layer and steps CarGoal1."""
    result = _run_fresh_python(
        """
        import numpy as np
        from cvpo_jax.envs.safety_gymnasium_compat import import_safety_gymnasium
        sg = import_safety_gymnasium()
        env = sg.make("SafetyCarGoal1-v0")
        obs, info = env.reset(seed=0)
        for _ in range(20):
            obs, r, c, te, tr, info = env.step(env.action_space.sample())
        assert obs.shape == (72,) and np.all(np.isfinite(obs)), obs
        print("STEPPED", obs.shape[0], float(r), float(c))
        """,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "STEPPED 72" in result.stdout


def test_site_packages_left_untouched():
    # The installed file still has the unpatched code; only the loaded module differs.
    package_dir = importlib.util.find_spec("safety_gymnasium").submodule_search_locations[0]
    assert ".jnt(joint_id)" in (pathlib.Path(package_dir) / "bases" / "base_agent.py").read_text()
    compat.import_safety_gymnasium()
    module = sys.modules["safety_gymnasium.bases.base_agent"]
    assert getattr(module, compat._PATCHED_MARKER)


def test_fix_a_array_defaults_are_copied_per_instance():
    compat.import_safety_gymnasium()
    from safety_gymnasium.assets.color import COLOR
    from safety_gymnasium.assets.geoms.goal import Goal

    first, second = Goal(), Goal()
    first.color[0] = -1.0
    np.testing.assert_array_equal(second.color, COLOR["goal"])
    assert COLOR["goal"][0] == 0.0


def test_fix_b_car_goal_steps():
    obs, reward, cost = _step_env("SafetyCarGoal1-v0")
    assert obs.shape == (72,) and np.all(np.isfinite(obs))
    assert np.isfinite(reward) and cost in (0.0, 1.0)


@pytest.mark.parametrize("env_id", ["SafetyDoggoGoal1-v0", "SafetyAntGoal1-v0"])
def test_fix_c_legged_goal_steps(env_id):
    obs, reward, _ = _step_env(env_id)
    assert obs.ndim == 1 and obs.size > 72 and np.all(np.isfinite(obs))
    assert np.isfinite(reward)


def test_fix_d_swimmer_velocity_steps():
    obs, reward, _ = _step_env("SafetySwimmerVelocity-v1")
    assert obs.shape == (8,) and np.all(np.isfinite(obs)) and np.isfinite(reward)


def test_fix_d_swimmer_xml_loads_with_contacts_disabled():
    import gymnasium.envs.mujoco
    import mujoco

    xml = (
        pathlib.Path(gymnasium.envs.mujoco.__file__).parent / "assets" / "swimmer.xml"
    ).read_text()
    with pytest.raises(ValueError, match="collision"):
        mujoco.MjModel.from_xml_string(xml)
    model = mujoco.MjModel.from_xml_string(compat.patch_swimmer_xml(xml))
    # "predefined" collisions with no <pair> meant no contacts at all.
    assert model.opt.disableflags & mujoco.mjtDisableBit.mjDSBL_CONTACT
    assert model.opt.timestep == pytest.approx(0.01)
    with pytest.raises(compat.SafetyGymnasiumCompatError, match="swimmer.xml"):
        compat.patch_swimmer_xml(xml.replace('collision="predefined" ', ""))


@pytest.mark.slow
@pytest.mark.skipif(
    ctypes.util.find_library("OSMesa") is None,
    reason="headless rgb_array rendering needs OSMesa (Debian: apt-get install libosmesa6)",
)
def test_fix_e_car_goal_renders_rgb_array(tmp_path):
    # A subprocess: without the fix this segfaults, which would kill pytest.
    result = _run_fresh_python(
        """
        from cvpo_jax.envs.safety_gymnasium_compat import import_safety_gymnasium
        sg = import_safety_gymnasium()
        env = sg.make("SafetyCarGoal1-v0", render_mode="rgb_array", width=64, height=48)
        env.reset(seed=0)
        env.step(env.action_space.sample())
        img = env.render()
        print("IMAGE", img.shape, img.dtype, int(img.std() > 1.0))
        env.close()
        """,
        cwd=tmp_path,
        extra_env={"MUJOCO_GL": "osmesa", "PYOPENGL_PLATFORM": "osmesa"},
    )
    assert result.returncode == 0, f"rc={result.returncode}\n{result.stderr[-3000:]}"
    assert "IMAGE (48, 64, 3) uint8 1" in result.stdout


def test_mujoco_log_stays_out_of_cwd(tmp_path):
    import mujoco

    # HalfCheetah's XML makes MuJoCo log a deprecation warning.
    _step_env("SafetyHalfCheetahVelocity-v1", n=1)
    assert not (tmp_path / "MUJOCO_LOG.TXT").exists()
    assert mujoco.MjLogConfig.get().logfile == str(compat.mujoco_log_path())


def test_import_is_idempotent():
    first = compat.import_safety_gymnasium()
    second = compat.import_safety_gymnasium()
    assert first is second
    assert sum(isinstance(f, compat._PatchingFinder) for f in sys.meta_path) == 1
    from gymnasium.envs.mujoco.mujoco_rendering import BaseRender

    wrapped = BaseRender._add_marker_to_scene.__wrapped__
    assert not getattr(wrapped, "_cvpo_jax_compat", False)  # wrapped exactly once


def test_missing_pattern_fails_loudly():
    source = "color: np.array = np.zeros(4)\n"  # as if a new release changed the code
    with pytest.raises(compat.SafetyGymnasiumCompatError, match=r"\(a\).*found 0"):
        compat.apply_source_patches("safety_gymnasium.assets.geoms.goal", source)


def test_source_patch_keeps_line_numbers():
    source = "x = 1\n    color: np.array = COLOR['goal']\ny = 2\n"
    patched = compat.apply_source_patches("safety_gymnasium.assets.geoms.goal", source)
    assert patched.count("\n") == source.count("\n")
    assert "default_factory=COLOR['goal'].copy" in patched
