"""The daemon's own life: a killed daemon's children keep serving and are adopted by
the next daemon; a malformed registry stops the start; non-agent services are
supervised by exit and by an HTTP liveness probe."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import psutil
import pytest

from tests.harness import wait_for

pytestmark = pytest.mark.integration


def test_killed_daemon_leaves_children_serving_and_the_next_one_adopts_them(mesh):
    before = {s["name"]: (s["pid"], s["incarnation"]) for s in mesh.status()["services"]}
    daemon_pid = json.loads((mesh.home / "run" / "daemon.json").read_text())["pid"]
    os.kill(daemon_pid, signal.SIGKILL)
    wait_for(lambda: not psutil.pid_exists(daemon_pid) or psutil.Process(daemon_pid).status() == "zombie", 10,
             "the daemon to die")
    for name, (pid, _) in before.items():
        # No daemon, no peer token: the public answer, from the same process as before.
        code, public = mesh.http("GET", mesh.url(name) + "/health", token=False, timeout=2)
        assert code == 200 and public["service"] == name, f"{name} stopped serving when the daemon died"
        assert psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    mesh.up()
    for name, (pid, incarnation) in before.items():  # and, with a daemon again, it is the same incarnation
        assert (mesh.health(name)["pid"], mesh.health(name)["incarnation"]) == (pid, incarnation)
    after = {s["name"]: (s["pid"], s["incarnation"]) for s in mesh.status()["services"]}
    assert after == before, "the new daemon spawned duplicates instead of adopting"
    # Their beat channels ended with the daemon that held the other end: they beat over HTTP now,
    # to the new daemon, which hears every one of them (none is taken for hung).
    adopted_at = time.monotonic()
    wait_for(lambda: time.monotonic() - adopted_at > 2.5
             and all(s["last_beat_age"] is not None and s["last_beat_age"] < 1.5 for s in mesh.status()["services"]),
             30, "beats from every adopted service")
    assert "beats go over HTTP from now on" in (mesh.home / "logs" / "programmer-1.log").read_text()
    adopted = mesh.rows("SELECT agent FROM events WHERE kind = 'adopted'")
    assert sorted(r["agent"] for r in adopted) == sorted(before)
    # an adopted child is supervised like any other: kill it and it comes back
    old = mesh.kill("programmer-1")
    mesh.wait_replaced("programmer-1", old)
    [row] = mesh.history("programmer-1")
    assert row["reason"] == "process_exit"


def test_tron_down_after_a_daemon_crash_still_stops_every_child(mesh):
    pids = [s["pid"] for s in mesh.status()["services"]]
    ownership = mesh.status()["ownership"]
    os.kill(json.loads((mesh.home / "run" / "daemon.json").read_text())["pid"], signal.SIGKILL)
    proc = mesh.down()
    assert proc.returncode == 0 and "no daemon was running; ended" in proc.stdout, proc.stdout + proc.stderr
    assert "[tron " in proc.stdout, proc.stdout  # it names what it ended (the first five)
    assert mesh.processes() == []
    assert not any(psutil.pid_exists(p) and psutil.Process(p).status() != "zombie" for p in pids)
    if ownership["mode"] == "cgroup":  # and the killed daemon's cgroups are not left behind in the kernel
        from tron.services.daemon.cgroups import _mounts, _own_paths, subtree_name

        assert not Path(ownership["path"]).exists(), sorted(p.name for p in Path(ownership["path"]).iterdir())
        mounts, own = _mounts(), _own_paths()
        left = [str(mounts[c] / own[c].lstrip("/") / subtree_name(mesh.home)) for c in mounts if c in own]
        assert [p for p in left if Path(p).exists()] == []  # nor in a v1 hierarchy (limits, OOM counts)


def test_malformed_registry_stops_the_start_with_a_clear_message(mesh_factory):
    m = mesh_factory()
    db = m.home / "registry" / "registry.db"
    db.parent.mkdir(parents=True)
    db.write_bytes(b"SQLite format 3\x00" + os.urandom(8192))
    proc = m.tron("up", "--detach")
    assert proc.returncode != 0
    assert "registry" in proc.stderr and ("malformed" in proc.stderr or "not a usable" in proc.stderr), proc.stderr
    assert m.processes() == []


def test_wal_without_its_database_stops_the_start(mesh_factory):
    m = mesh_factory()
    reg = m.home / "registry"
    reg.mkdir(parents=True)
    (reg / "registry.db-wal").write_bytes(b"\x00" * 64)
    proc = m.tron("up", "--detach")
    assert proc.returncode != 0 and "was lost" in proc.stderr, proc.stderr
    assert not (reg / "registry.db").exists()


def test_a_non_agent_command_is_supervised_by_exit_and_liveness_probe(mesh_factory):
    services = {
        "web": {"command": ["{python}", "-m", "http.server", "{port}", "--bind", "127.0.0.1"], "port": 6150,
                "liveness": {"url": "http://127.0.0.1:{port}/", "interval": 0.2, "timeout": 0.3,
                             "failure_threshold": 2}},
    }
    m = mesh_factory(services=services)
    m.up()
    web = m.service("web")
    assert web["state"] == "running" and web["provider"] is None
    old = m.kill("web")
    wait_for(lambda: (s := m.service("web"))["state"] == "running" and s["pid"] not in (None, old), 20,
             "web to be respawned")
    [row] = m.history("web")
    assert row["reason"] == "process_exit"
    # a hung (stopped) server: the process exists but the probe fails
    hung = m.kill("web", signal.SIGSTOP)
    wait_for(lambda: (s := m.service("web"))["state"] == "running" and s["pid"] not in (None, hung), 20,
             "the hung web server to be replaced")
    rows = m.history("web")
    assert [r["reason"] for r in rows] == ["process_exit", "liveness_failed"]


def test_a_command_runs_in_its_cwd_with_its_env_and_without_the_token(mesh_factory):
    """`cwd` and `env` take the {placeholders}; a program that is not ours never gets the
    mesh token's path."""
    script = ("import os, json, time; json.dump({{'cwd': os.getcwd(), 'greeting': os.environ.get('GREETING'), "
              "'token': os.environ.get('TRON_TOKEN_FILE')}}, open('seen.json', 'w')); time.sleep(600)")  # {{ }}: braces
    services = {"worker": {"command": ["{python}", "-c", script], "port": 6152, "cwd": "{state}",
                           "env": {"GREETING": "hello from {name} on {port}"}}}
    m = mesh_factory(services=services)
    m.up()
    seen_file = m.home / "services" / "worker" / "seen.json"
    seen = wait_for(lambda: seen_file.exists() and seen_file.read_text() and json.loads(seen_file.read_text()),
                    20, "the worker to write what it saw")
    assert seen == {"cwd": str(m.home / "services" / "worker"),
                    "greeting": f"hello from worker on {m.port('worker')}", "token": None}, seen
