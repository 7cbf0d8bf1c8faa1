"""Policy settings changed at run time: validated by the mesh file's own model, kept in
an overlay beside the mesh file, applied on top of it at load time."""

from __future__ import annotations

import os
import subprocess
from contextlib import contextmanager

import pytest
from pydantic import ValidationError

from tron.common.config import ConfigError, Policy, load_mesh
from tron.common.install import resource
from tron.common.settings import apply_overlay, field_errors, merged_policy, overlay_path, read_overlay, write_overlay


def test_changes_are_validated_as_a_whole_and_errors_name_their_field():
    assert merged_policy(Policy(), {"miss_threshold": 5}).miss_threshold == 5
    with pytest.raises(ValidationError) as err:
        merged_policy(Policy(), {"miss_threshold": 0, "heartbeat_interval": -1, "colour": "red"})
    fields = field_errors(err.value)
    assert set(fields) == {"miss_threshold", "heartbeat_interval", "colour"}
    assert "greater than or equal to 2" in fields["miss_threshold"] and fields["colour"] == "unknown setting"


def test_the_overlay_round_trips_and_applies_on_top_of_the_mesh_file(tmp_path):
    config = tmp_path / "mesh.toml"
    config.write_text(resource("mesh.toml").read_text())
    path = overlay_path(config, tmp_path / "home")
    assert path == tmp_path / "mesh.overlay.toml"
    write_overlay(path, {"miss_threshold": 5, "backoff_max": 2.5, "llm_advice": True})
    assert read_overlay(path) == {"miss_threshold": 5, "backoff_max": 2.5, "llm_advice": True}
    cfg = apply_overlay(load_mesh(config), read_overlay(path), path)
    assert (cfg.policy.miss_threshold, cfg.policy.backoff_max, cfg.policy.llm_advice) == (5, 2.5, True)
    assert cfg.policy.heartbeat_interval == 1.0  # untouched numbers come from the mesh file


@pytest.mark.parametrize("interval", [0.5, 2.0, 60.0])
def test_one_missed_beat_is_no_threshold_whatever_the_interval(interval):
    """miss_threshold = 1 puts the deadline at the beat period itself: every beat arrives
    just after it, and every agent of the mesh looks hung (it crash-looped at 2.0 s x 1)."""
    with pytest.raises(ValidationError) as err:
        merged_policy(Policy(), {"heartbeat_interval": interval, "miss_threshold": 1})
    assert "greater than or equal to 2" in field_errors(err.value)["miss_threshold"]
    assert merged_policy(Policy(), {"heartbeat_interval": interval, "miss_threshold": 2}).miss_threshold == 2


@pytest.mark.parametrize("text,message", [
    ("[policy]\nmiss_threshold = 0\n", "policy.miss_threshold: Input should be greater than or equal to 2"),
    ("[policy]\nmis_threshold = 3\n", "policy.mis_threshold: unknown key"),
    ("[services.x]\nport = 1\n", "only [policy] may be overlaid"),
    ("[policy\n", "not valid TOML"),
    ("policy = 3\n", "policy must be a table ([policy]), not int"),  # once a TypeError from set(3)
    ('policy = "ab"\n', "policy must be a table ([policy]), not str"),  # once "policy.a: unknown key"
])
def test_a_bad_overlay_is_refused_naming_the_file_and_key(tmp_path, text, message):
    path = tmp_path / "mesh.overlay.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        apply_overlay(load_mesh(), read_overlay(path), path)
    assert str(err.value).startswith(str(path)) and message in str(err.value)


@contextmanager
def unwritable(directory):
    """``directory`` made unwritable for whoever runs the test, root included: mode 0500
    stops a user; root (CI) gets the directory bind-mounted read-only onto itself, so
    every write fails with EROFS as on a read-only image."""
    directory.chmod(0o500)
    mounted = False
    try:
        if os.geteuid() == 0:
            for cmd in (["mount", "--bind", str(directory), str(directory)],
                        ["mount", "-o", "remount,bind,ro", str(directory)]):
                proc = subprocess.run(cmd, capture_output=True, text=True)
                assert proc.returncode == 0, f"{' '.join(cmd)}: {proc.stderr.strip()}"
                mounted = True
        yield directory
    finally:
        if mounted:
            subprocess.run(["umount", str(directory)], capture_output=True)
        directory.chmod(0o700)


def test_an_unwritable_config_directory_puts_the_overlay_in_the_home(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    with unwritable(ro):
        assert not os.access(ro, os.W_OK)
        with pytest.raises(OSError):  # the world agrees: nothing can be written there
            (ro / "probe").write_text("x")
        assert overlay_path(ro / "mesh.toml", tmp_path / "home") == tmp_path / "home" / "policy.overlay.toml"
    # writable again: the overlay goes back beside the mesh file
    assert overlay_path(ro / "mesh.toml", tmp_path / "home") == ro / "mesh.overlay.toml"
    assert overlay_path(None, tmp_path / "home") == tmp_path / "home" / "policy.overlay.toml"


def test_an_overlay_that_cannot_be_written_leaves_the_old_one_and_no_temporary_file(tmp_path, monkeypatch):
    import errno

    path = tmp_path / "mesh.overlay.toml"
    write_overlay(path, {"miss_threshold": 5})

    def full(*_):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "replace", full)
    with pytest.raises(OSError):
        write_overlay(path, {"miss_threshold": 6})
    assert read_overlay(path) == {"miss_threshold": 5}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mesh.overlay.toml"]


# Issue 20, item 4: every policy number is strictly typed, finite and bounded above, in the
# model shared by mesh.toml and PUT /settings. Before, backoff_factor = 1e308 was taken (and
# overflowed the backoff at the 5th kill), "600" was a task_timeout, and 1e999 was stored
# as inf in the overlay and loaded by the next daemon.
@pytest.mark.parametrize("changes,field,message", [
    ({"backoff_factor": 1e308}, "backoff_factor", "less than or equal to 10"),
    ({"task_timeout": "600"}, "task_timeout", "a valid number"),
    ({"task_timeout": float("inf")}, "task_timeout", "a finite number"),  # what JSON's 1e999 becomes
    ({"backoff_max": float("nan")}, "backoff_max", "a finite number"),
    ({"restart_window": True}, "restart_window", "a valid number"),
    ({"miss_threshold": True}, "miss_threshold", "a valid integer"),
    ({"max_restarts": 3.0}, "max_restarts", "a valid integer"),
    ({"max_restarts": "3"}, "max_restarts", "a valid integer"),
    ({"llm_advice": 1}, "llm_advice", "a valid boolean"),
    ({"task_timeout": 604800.5}, "task_timeout", "less than or equal to 604800"),
    ({"operator_timeout": 1e12}, "operator_timeout", "less than or equal to 604800"),
    ({"backoff_max": 86401}, "backoff_max", "less than or equal to 86400"),
    ({"lane_trip_count": 1001}, "lane_trip_count", "less than or equal to 1000"),
])
def test_a_setting_of_the_wrong_type_or_out_of_bounds_is_refused_naming_it(changes, field, message):
    with pytest.raises(ValidationError) as err:
        merged_policy(Policy(), changes)
    fields = field_errors(err.value)
    assert list(fields) == [field] and message in fields[field], fields


def test_every_policy_number_has_an_upper_bound_that_holds_and_an_int_is_a_float():
    from annotated_types import Le, Lt

    for name, info in Policy.model_fields.items():
        if info.annotation is bool:
            continue
        high = next((m.le if isinstance(m, Le) else m.lt for m in info.metadata if isinstance(m, (Le, Lt))), None)
        assert high is not None, f"policy.{name} has no upper bound"
        over = high + 1 if info.annotation is int else high * 1.01
        with pytest.raises(ValidationError):
            merged_policy(Policy(), {name: over})
        if info.annotation is float:  # 600 is a task_timeout as much as 600.0 (TOML and JSON write both)
            assert getattr(merged_policy(Policy(), {name: int(high)}), name) == high


@pytest.mark.parametrize("text,message", [
    ("[policy]\ntask_timeout = inf\n", "policy.task_timeout: Input should be a finite number"),
    ("[policy]\ntask_timeout = nan\n", "policy.task_timeout: Input should be a finite number"),
    ('[policy]\ntask_timeout = "600"\n', "policy.task_timeout: Input should be a valid number"),
    ("[policy]\nbackoff_factor = 1e308\n", "policy.backoff_factor: Input should be less than or equal to 10"),
    ("[policy]\nmiss_threshold = true\n", "policy.miss_threshold: Input should be a valid integer"),
])
def test_an_overlay_with_inf_a_string_or_a_huge_number_is_refused_at_load(tmp_path, text, message):
    path = tmp_path / "mesh.overlay.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        apply_overlay(load_mesh(), read_overlay(path), path)
    assert str(err.value) == f"{path}: {message}"


@pytest.mark.parametrize("change, field, needle", [
    ({"heartbeat_interval": 0.0001}, "heartbeat_interval", "greater than or equal to 0.05"),
    ({"heartbeat_interval": 0.1, "miss_threshold": 2}, "miss_threshold", "is not hung"),
    ({"start_timeout": 0.01}, "start_timeout", "greater than or equal to 0.5"),
    ({"alert_delivery_timeout": 0.001}, "alert_delivery_timeout", "greater than or equal to 0.1"),
])
def test_a_setting_that_would_make_every_agent_look_hung_is_refused(change, field, needle):
    """PUT /settings once took a beat every 0.1 ms: every agent was declared hung within a
    second, the mesh crash-looped, and the overlay kept it for the next `tron up`."""
    with pytest.raises(ValidationError) as err:
        merged_policy(Policy(), change)
    fields = field_errors(err.value)
    assert any(needle in text for text in fields.values()), fields
    assert field in fields or any(field in text for text in fields.values()), fields
