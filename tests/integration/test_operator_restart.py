"""Issue 22: an operator's restart stops a program gracefully (its stop_signal, its
stop_grace, then a kill), `--force` kills at once; a drill whose service never comes back
still gives its timeline and a FAIL verdict (exit 1), exit 2 staying for a drill that
could not start."""

from __future__ import annotations

import json

import pytest

from tests.harness import wait_for

pytestmark = pytest.mark.integration

# A server that says how it ended: "clean shutdown" only when it got its stop signal.
POLITE = """
import os, signal, socket, sys, time
def bye(*_):
    print("clean shutdown", os.getpid(), flush=True)
    sys.exit(0)
signal.signal(signal.SIGTERM, bye)
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", int(sys.argv[1]))); s.listen()
print("serving", os.getpid(), flush=True)
while True:
    time.sleep(1)
"""

# Serves once; every later start fails (its marker is there): a restart never succeeds.
ONCE = """
import os, socket, sys, time
if os.path.exists(sys.argv[2]):
    print("cannot start again", flush=True)
    sys.exit(1)
open(sys.argv[2], "w").close()
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", int(sys.argv[1]))); s.listen()
while True:
    time.sleep(1)
"""

# Listens in its first incarnation only; later ones run and never listen.
LISTENS_ONCE = """
import os, socket, sys, time
if not os.path.exists(sys.argv[2]):
    open(sys.argv[2], "w").close()
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("127.0.0.1", int(sys.argv[1]))); s.listen()
while True:
    time.sleep(1)
"""


def _server(tmp_path, source: str, *args: str) -> dict:
    script = tmp_path / "server.py"
    script.write_text(source)
    return {"command": ["{python}", str(script), "{port}", *args], "port": 6150,
            "liveness": {"tcp": {}, "interval": 0.2, "timeout": 0.5}}


def test_restart_is_graceful_and_force_kills(mesh_factory, tmp_path):
    mesh = mesh_factory(services={"web": _server(tmp_path, POLITE)})
    mesh.up()
    log = mesh.home / "logs" / "web.log"
    first = mesh.service("web")
    proc = mesh.tron("restart", "web", "--wait")
    assert proc.returncode == 0, proc.stderr
    assert f"clean shutdown {first['pid']}" in log.read_text()
    second = mesh.service("web")
    assert second["incarnation"] != first["incarnation"]
    [row] = [r for r in mesh.history("web") if r["retry_type"] == "operator_restart"]
    assert json.loads(row["detail"])["force"] is False

    proc = mesh.tron("restart", "web", "--wait", "--force")
    assert proc.returncode == 0, proc.stderr
    third = wait_for(lambda: (s := mesh.service("web"))["incarnation"] != second["incarnation"]
                     and s["state"] == "running" and s, 20, "web back")
    assert third["pid"] != second["pid"]
    assert f"clean shutdown {second['pid']}" not in log.read_text()  # SIGKILL: no chance to say goodbye
    rows = [r for r in mesh.history("web") if r["retry_type"] == "operator_restart"]
    assert [json.loads(r["detail"])["force"] for r in rows] == [False, True]


def test_a_drill_that_never_sees_recovery_fails_with_its_timeline(mesh_factory, tmp_path):
    marker = tmp_path / "started-once"
    mesh = mesh_factory(services={"once": _server(tmp_path, ONCE, str(marker))}, policy={"start_timeout": 5.0})
    mesh.up()
    # The drill gives up after the policy's bounds + 10 s of slack: 1 s of slack here (the test knob)
    mesh.env["TRON_TEST_RECOVERY_SLACK"] = "1"
    proc = mesh.tron("drill", "kill", "once", "--json", timeout=120)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    result = json.loads(proc.stdout)
    assert result["verdict"] == "fail" and result["recovery_seconds"] is None
    events = [e["event"] for e in result["timeline"]]
    assert {"fault injected", "detected", "gave up"} <= set(events), events
    [failed] = [c["check"] for c in result["checks"] if not c["ok"] and c["check"].startswith("recovered in time")]
    assert "once is " in failed

    proc = mesh.tron("drill", "kill", "once", timeout=60)  # not running now: the drill cannot start
    assert proc.returncode == 2 and "a drill needs it running" in proc.stderr, proc.stdout + proc.stderr


def test_a_kill_drill_fails_when_the_port_it_served_is_not_served_again_whatever_its_probe_says(mesh_factory,
                                                                                                tmp_path):
    """A probe that proves nothing (it asks elsewhere: here, `true`) lets Tron take the new
    incarnation for healthy; the drill asks the port itself, as a user would."""
    service = {**_server(tmp_path, LISTENS_ONCE, str(tmp_path / "listened")),
               "liveness": {"exec": {"command": ["true"]}, "interval": 0.2}}
    (tmp_path / "web").mkdir()
    web = {**_server(tmp_path / "web", POLITE), "port": 6151}  # one that does serve again
    mesh = mesh_factory(services={"mute": service, "web": web})
    mesh.up()
    proc = mesh.tron("drill", "kill", "web", "--json", timeout=120)
    result = json.loads(proc.stdout)
    assert proc.returncode == 0 and result["verdict"] == "pass", proc.stdout + proc.stderr
    assert [c["ok"] for c in result["checks"] if "takes connections again" in c["check"]] == [True]
    proc = mesh.tron("drill", "kill", "mute", "--json", timeout=120)
    result = json.loads(proc.stdout)
    assert proc.returncode == 1 and result["verdict"] == "fail", proc.stdout + proc.stderr
    failed = [c["check"] for c in result["checks"] if not c["ok"]]
    assert len(failed) == 1 and "takes connections again, as before the fault" in failed[0], failed
    assert mesh.service("mute")["state"] == "running"  # Tron's own view: healthy; the drill is the one to say no
