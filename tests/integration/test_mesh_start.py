"""Issue 24: the mesh starts by dependencies, not one service at a time; `tron up` says why
it gave up on a service; `tron down` needs only the home."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tomllib

import psutil

from tests.harness import REPO, TRON, wait_for

SLEEPER = ["{python}", "-c", "import time; time.sleep(3600)"]
STUCK = {"role": "command", "port": 6195, "command": SLEEPER, "startup": {"tcp": {}, "interval": 0.2, "timeout": 0.2}}


def test_a_service_that_never_gets_ready_holds_back_only_what_depends_on_it(mesh_factory):
    services = {"stuck": STUCK, **tomllib.loads((REPO / "mesh.toml").read_text())["services"]}
    services["waiter"] = {"role": "command", "port": 6196, "command": SLEEPER, "depends_on": {"stuck": "ready"}}
    # The stuck one stays "starting" for its start_timeout; the rest must not wait that long.
    # start_timeout leaves a loaded machine room to bring the others up while stuck still waits
    # (10 s: four times the slowest bring-up of the default mesh in a run of three workers on 2 cores)
    mesh = mesh_factory(services=services, policy={"start_timeout": 10.0})
    up = subprocess.Popen([*TRON, "--config", str(mesh.config), "up", "--detach"], env=mesh.env, cwd=REPO,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        def others_running():
            try:
                rows = {s["name"]: s for s in mesh.status()["services"]}
            except OSError:
                return None  # the daemon is not listening yet
            return all(rows[n]["state"] == "running" for n in rows if n not in ("stuck", "waiter")) and rows
        rows = wait_for(others_running, 60, "every service but the stuck one and its dependant running")
        # Seen while the stuck service is still inside its start_timeout: nothing waited for it
        # but the one service that declared that it must.
        assert rows["stuck"]["state"] == "starting" and rows["stuck"]["last_failure"] is None, rows["stuck"]
        assert rows["waiter"]["pid"] is None and rows["waiter"]["state"] == "stopped", rows["waiter"]
        agents = [n for n, s in services.items() if s["role"] != "command"]
        assert all(mesh.health(n) for n in agents)
        out, err = up.communicate(timeout=120)
    finally:
        if up.poll() is None:
            up.kill()
            up.wait()
    # `tron up` returns once every service is running or has failed, and names the failure.
    assert up.returncode == 1, (out, err)
    assert "stuck is" in err and "start_timeout" in err, err
    assert "mesh up on" in out and "s: " in out


def test_down_stops_the_mesh_whatever_mesh_toml_says(mesh):
    pids = [p.pid for p in mesh.processes()]
    assert len(pids) >= 9  # the daemon, its fork server, the services
    mesh.config.write_text(mesh.config.read_text() + "\n[services.broken\n")  # a typo
    assert mesh.tron("report").returncode == 2  # the file really is unreadable (report reads it)
    assert mesh.tron("status").returncode == 0  # status needs only the daemon
    proc = mesh.tron("down")
    assert proc.returncode == 0, proc.stderr
    assert "not valid TOML" in proc.stderr and "stopping by the home alone" in proc.stderr
    assert not mesh.processes()
    assert not [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]


# A process that neither answers nor stops on SIGTERM (wedged), and a parent that reaps what
# `tron down` ends (the CLI is not their parent): the first line it prints is their pids.
WEDGED = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)"
REAPER = """
import os, subprocess, sys
env = {**os.environ, "TRON_MESH": sys.argv[1], "TRON_HOME": sys.argv[1]}  # the home's mark, as its processes carry
kids = [subprocess.Popen([sys.executable, "-c", sys.argv[2], tag], env=env, start_new_session=True)
        for tag in ("tron.services.daemon", "a service")]
print(" ".join(str(k.pid) for k in kids), flush=True)
for k in kids:
    k.wait()
"""


def test_down_kills_a_daemon_that_will_not_stop_then_what_it_left(mesh_factory):
    """A daemon that does not answer and ignores SIGTERM: `tron down` waits out its grace
    (stop_grace + 15 s; + 1.5 s by the test knob here), SIGKILLs it, ends the rest of the home
    (SIGKILL for what ignores SIGTERM too) and says so; nothing of the home is left."""
    m = mesh_factory(policy={"stop_grace": 0.5})
    m.env["TRON_TEST_DOWN_SLACK"] = "1.5"  # the daemon's 15 s beyond stop_grace, shortened
    m.home.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in m.env.items() if k not in ("TRON_MESH", "TRON_HOME")}
    reaper = subprocess.Popen([sys.executable, "-c", REAPER, str(m.home), WEDGED], env=env, stdout=subprocess.PIPE,
                              text=True, start_new_session=True)
    kids: list[int] = []
    try:
        daemon, service = kids = [int(pid) for pid in reaper.stdout.readline().split()]
        wait_for(lambda: {daemon, service} <= {p.pid for p in m.processes()}, 10, "the home's processes")
        proc = m.tron("down")
        assert proc.returncode == 0, proc.stderr
        assert "daemon killed (it did not stop within 2s)" in proc.stdout, proc.stdout
        assert "ended 1 leftover process(es)" in proc.stdout and "Nothing left running" in proc.stdout, proc.stdout
        assert reaper.wait(timeout=10) == 0  # both of its children are gone
        assert not m.processes()
    finally:  # never left behind, whatever failed above
        for pid in kids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if reaper.poll() is None:
            reaper.kill()
        reaper.wait()
