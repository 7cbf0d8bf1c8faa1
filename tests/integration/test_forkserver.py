"""Issue 5: agents forked from the fork server serve, beat, call their provider and are
replaced after a kill; a dead or out-of-date fork server is replaced; other commands
still spawn plainly."""

from __future__ import annotations

import json
import os
import signal

import psutil
import pytest

from tests.harness import REPO, wait_for

pytestmark = pytest.mark.integration


def spawn_modes(mesh, agent: str) -> list[str]:
    return [json.loads(r["payload"])["mode"]
            for r in mesh.rows("SELECT payload FROM events WHERE kind = 'spawned' AND agent = ? ORDER BY id", (agent,))]


def test_forked_agents_serve_beat_call_their_provider_and_come_back_after_a_kill(mesh):
    fs = mesh.status()["fork_server"]
    assert fs["ready"] and fs["spawned"] == 8
    daemon_pid = json.loads((mesh.home / "run" / "daemon.json").read_text())["pid"]
    p1 = mesh.service("programmer-1")
    assert spawn_modes(mesh, "programmer-1") == ["fork"]
    # its own session and process group; reparented to the daemon (which reaps it)
    proc = psutil.Process(p1["pid"])
    assert proc.ppid() == daemon_pid and os.getpgid(p1["pid"]) == p1["pid"] and os.getsid(p1["pid"]) == p1["pid"]
    health = mesh.health("programmer-1")
    assert health["pid"] == p1["pid"] and health["incarnation"] == p1["incarnation"]
    assert "services.programmer" in " ".join(proc.cmdline()) and "programmer-1" in " ".join(proc.cmdline())
    assert proc.environ().get("TRON_HOME") == str(mesh.home)  # leak checks can still find it
    # it beats and it calls its provider through the real SDK
    wait_for(lambda: mesh.service("programmer-1")["last_beat_age"] is not None, 5, "a beat from the forked agent")
    assert mesh.tron("run", "forked agents at work").returncode == 0
    # killed: replaced through the fork server, with a real exit status on record
    mesh.kill("programmer-1")
    mesh.wait_replaced("programmer-1", p1["pid"])
    assert spawn_modes(mesh, "programmer-1") == ["fork", "fork"]
    ended = mesh.rows("SELECT exit_signal FROM sessions WHERE incarnation = ?", (p1["incarnation"],))[0]
    assert ended["exit_signal"] == signal.SIGKILL
    assert mesh.tron("run", "still working").returncode == 0


def test_a_dead_fork_server_is_replaced_and_spawns_meanwhile_fall_back_to_plain(mesh):
    fs = mesh.status()["fork_server"]
    os.kill(fs["pid"], signal.SIGKILL)
    wait_for(lambda: (f := mesh.status()["fork_server"])["ready"] and f["pid"] != fs["pid"] and f, 30,
             "a new fork server")
    assert mesh.status()["fork_server"]["generation"] == 2
    old = mesh.kill("programmer-2")
    mesh.wait_replaced("programmer-2", old)
    assert spawn_modes(mesh, "programmer-2")[-1] == "fork"
    assert mesh.tron("run", "after the fork server died").returncode == 0


def test_an_out_of_date_fork_server_is_replaced(mesh):
    fs = mesh.status()["fork_server"]
    source = REPO / "services" / "director" / "app.py"
    st = source.stat()
    try:
        os.utime(source, (st.st_atime, st.st_mtime + 5))  # "the code changed"
        old = mesh.kill("director-docs")
        mesh.wait_replaced("director-docs", old)
        assert spawn_modes(mesh, "director-docs")[-1] == "plain"  # the stale server refused
        wait_for(lambda: (f := mesh.status()["fork_server"])["ready"] and f["pid"] != fs["pid"], 30,
                 "a fresh fork server")
    finally:
        os.utime(source, (st.st_atime, st.st_mtime))
    assert not psutil.pid_exists(fs["pid"]) or psutil.Process(fs["pid"]).status() == "zombie"


def test_a_non_agent_command_still_spawns_plainly(mesh_factory):
    m = mesh_factory(services={"web": {"command": ["{python}", "-m", "http.server", "{port}", "--bind", "127.0.0.1"],
                                       "port": 6150}})
    m.up()
    assert spawn_modes(m, "web") == ["plain"]
    old = m.kill("web")
    wait_for(lambda: (s := m.service("web"))["state"] == "running" and s["pid"] not in (None, old), 20,
             "web to be respawned")
    assert spawn_modes(m, "web") == ["plain", "plain"]


def test_without_the_fork_server_agents_spawn_plainly(mesh_factory):
    m = mesh_factory()
    text = m.config.read_text().replace("[mesh]\n", "[mesh]\nfork_server = false\n")
    m.config.write_text(text)
    m.up()
    assert m.status()["fork_server"] is None
    assert set(spawn_modes(m, "programmer-1")) == {"plain"}
    old = m.kill("programmer-1")
    m.wait_replaced("programmer-1", old)
    assert spawn_modes(m, "programmer-1") == ["plain", "plain"]  # the replacement too: no fork server to ask
