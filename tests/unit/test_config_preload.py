"""preload_mesh: a fork server's standby reads and validates the mesh file before it knows
which incarnation it becomes; the load_mesh after its start gets that reading only while
the file is unchanged, and only once."""

from __future__ import annotations

import os

import pytest

from tron.common.config import ConfigError, load_mesh, preload_mesh

MESH = """
[mesh]
daemon_port = {port}

[services.llm-sim]
role = "llm_sim"
port = 6100
"""


@pytest.fixture
def mesh_file(tmp_path):
    path = tmp_path / "mesh.toml"
    path.write_text(MESH.format(port=7000))
    return path


def test_the_reading_ahead_is_handed_out_once(mesh_file, monkeypatch):
    from tron.common import config as config_module

    parsed = []
    real = config_module.parse_mesh
    monkeypatch.setattr(config_module, "parse_mesh", lambda *a, **kw: parsed.append(1) or real(*a, **kw))
    preload_mesh(mesh_file, port_offset=0)
    assert len(parsed) == 1
    first = load_mesh(mesh_file, port_offset=0)
    assert first.mesh.daemon_port == 7000 and len(parsed) == 1  # the reading ahead, not a second parse
    again = load_mesh(mesh_file, port_offset=0)
    assert again is not first and len(parsed) == 2  # once only: the next load reads the file again


@pytest.mark.parametrize("change", ["rewritten", "replaced", "other offset", "other file"])
def test_a_file_changed_since_is_read_again(mesh_file, tmp_path, change):
    preload_mesh(mesh_file, port_offset=0)
    offset, path = 0, mesh_file
    if change == "rewritten":  # same size, a later mtime
        mesh_file.write_text(MESH.format(port=7001))
        st = mesh_file.stat()
        os.utime(mesh_file, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    elif change == "replaced":  # a new inode, as an editor's save-and-rename makes
        fresh = tmp_path / "new.toml"
        fresh.write_text(MESH.format(port=7001))
        fresh.replace(mesh_file)
    elif change == "other offset":
        offset = 10
    else:
        path = tmp_path / "other.toml"
        path.write_text(MESH.format(port=7001))
    config = load_mesh(path, port_offset=offset)
    expected = 7000 + offset if change == "other offset" else 7001
    assert config.mesh.daemon_port == expected


def test_a_file_that_does_not_load_is_left_to_load_mesh_to_report(tmp_path):
    broken = tmp_path / "mesh.toml"
    broken.write_text("[mesh\n")
    preload_mesh(broken, port_offset=0)  # says nothing
    preload_mesh(tmp_path / "missing.toml", port_offset=0)
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_mesh(broken, port_offset=0)
    with pytest.raises(ConfigError, match="no such file"):
        load_mesh(tmp_path / "missing.toml", port_offset=0)
