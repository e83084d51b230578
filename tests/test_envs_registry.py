"""Environment names: short names, full ids, case, errors, backend prefixes."""

import pytest

from cvpo_jax.envs import registry
from cvpo_jax.envs.registry import (
    build_safety_gym_names,
    list_env_ids,
    list_env_names,
    resolve_env_id,
)


@pytest.mark.parametrize(
    "name, expected",
    [
        ("CarGoal1", "SafetyCarGoal1-v0"),
        ("SafetyCarGoal1-v0", "SafetyCarGoal1-v0"),
        ("cargoal1", "SafetyCarGoal1-v0"),
        ("  PointButton2 ", "SafetyPointButton2-v0"),
        ("RacecarCircle0", "SafetyRacecarCircle0-v0"),
        ("DoggoPush1", "SafetyDoggoPush1-v0"),
        ("HalfCheetahVelocity", "SafetyHalfCheetahVelocity-v1"),
        ("SafetyHalfCheetahVelocity-v0", "SafetyHalfCheetahVelocity-v0"),
        ("SwimmerVelocity", "SafetySwimmerVelocity-v1"),
    ],
)
def test_resolve(name, expected):
    assert resolve_env_id(name) == expected


def test_every_robot_task_level_is_listed():
    names = set(list_env_names())
    expected = {
        f"{robot}{task}{level}"
        for robot in ("Point", "Car", "Racecar", "Doggo", "Ant")
        for task in ("Goal", "Button", "Push", "Circle")
        for level in range(3)
    }
    assert expected <= names
    assert {"AntVelocity", "HalfCheetahVelocity", "SwimmerVelocity"} <= names
    # Vision, debug and other task families are not offered.
    assert not any(n.endswith(("Vision", "Debug")) or "Run" in n or "Race0" in n for n in names)
    ids = list_env_ids()
    assert all(resolve_env_id(i) == i for i in ids)
    assert "SafetyHalfCheetahVelocity-v0" in ids and "SafetyHalfCheetahVelocity-v1" in ids


def test_unknown_name_suggests_close_match_and_lists_names():
    with pytest.raises(ValueError) as err:
        resolve_env_id("CarGaol1")
    message = str(err.value)
    assert "'CarGaol1'" in message
    assert "Did you mean 'CarGoal1'" in message
    assert "PointPush2" in message  # the list of valid names


def test_unknown_name_without_close_match():
    with pytest.raises(ValueError, match="unknown safety_gymnasium environment 'zzz'") as err:
        resolve_env_id("zzz")
    assert "Did you mean" not in str(err.value)


@pytest.mark.parametrize("bad", ["", "   ", None, 3])
def test_rejects_non_names(bad):
    with pytest.raises(ValueError, match="non-empty string"):
        resolve_env_id(bad)


def test_brax_prefix_resolves_to_the_jax_backend():
    assert resolve_env_id("brax/HalfCheetahVelocity") == "brax/HalfCheetahVelocity"
    assert resolve_env_id("brax/antvelocity") == "brax/AntVelocity"
    with pytest.raises(ValueError, match="AntVelocity"):
        resolve_env_id("brax/AntVelocty")
    with pytest.raises(ValueError, match="unknown environment backend 'gym'"):
        resolve_env_id("gym/CartPole-v1")


def test_second_backend_plugs_in(monkeypatch):
    monkeypatch.setitem(registry.BACKENDS, "brax", lambda name: {"ant": "ant"}[name])
    assert resolve_env_id("brax/ant") == "brax/ant"
    assert resolve_env_id("CarGoal1") == "SafetyCarGoal1-v0"


def test_build_names_pure_picks_newest_version():
    names = build_safety_gym_names(
        [
            "SafetyAntVelocity-v0",
            "SafetyAntVelocity-v1",
            "SafetyCarGoal1-v0",
            "SafetyCarGoal1Vision-v0",
            "SafetyCarRun0-v0",
            "CartPole-v1",
        ]
    )
    assert names == {
        "SafetyAntVelocity-v0": "SafetyAntVelocity-v0",
        "SafetyAntVelocity-v1": "SafetyAntVelocity-v1",
        "AntVelocity": "SafetyAntVelocity-v1",
        "SafetyCarGoal1-v0": "SafetyCarGoal1-v0",
        "CarGoal1": "SafetyCarGoal1-v0",
    }


def test_list_rejects_unknown_backend_and_lists_brax():
    with pytest.raises(ValueError, match="unknown backend 'gym'"):
        list_env_names("gym")
    assert "brax/HalfCheetahVelocity" in list_env_names("brax")
    assert list_env_ids("brax") == list_env_names("brax")
