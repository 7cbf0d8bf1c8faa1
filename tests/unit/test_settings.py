"""Policy settings changed at run time: validated by the mesh file's own model, kept in
an overlay beside the mesh file, applied on top of it at load time."""

from __future__ import annotations

import os

import pytest
from pydantic import ValidationError

from common.config import ConfigError, Policy, load_mesh, resource
from common.settings import apply_overlay, field_errors, merged_policy, overlay_path, read_overlay, write_overlay


def test_changes_are_validated_as_a_whole_and_errors_name_their_field():
    assert merged_policy(Policy(), {"miss_threshold": 5}).miss_threshold == 5
    with pytest.raises(ValidationError) as err:
        merged_policy(Policy(), {"miss_threshold": 0, "heartbeat_interval": -1, "colour": "red"})
    fields = field_errors(err.value)
    assert set(fields) == {"miss_threshold", "heartbeat_interval", "colour"}
    assert "greater than or equal to 1" in fields["miss_threshold"] and fields["colour"] == "unknown setting"


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


@pytest.mark.parametrize("text,message", [
    ("[policy]\nmiss_threshold = 0\n", "policy.miss_threshold: Input should be greater than or equal to 1"),
    ("[policy]\nmis_threshold = 3\n", "policy.mis_threshold: unknown key"),
    ("[services.x]\nport = 1\n", "only [policy] may be overlaid"),
    ("[policy\n", "not valid TOML"),
])
def test_a_bad_overlay_is_refused_naming_the_file_and_key(tmp_path, text, message):
    path = tmp_path / "mesh.overlay.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        apply_overlay(load_mesh(), read_overlay(path), path)
    assert str(err.value).startswith(str(path)) and message in str(err.value)


def test_an_unwritable_config_directory_puts_the_overlay_in_the_home(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        if os.access(ro, os.W_OK):
            pytest.skip("running as root: every directory is writable")
        assert overlay_path(ro / "mesh.toml", tmp_path / "home") == tmp_path / "home" / "policy.overlay.toml"
    finally:
        ro.chmod(0o700)
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
