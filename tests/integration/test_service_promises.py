"""README promises about a service's own settings, held against what the program saw
(tests/integration/apps/witness.py notes it) and what the kernel says (`ss`, /proc):

- its own `stop_signal` is what `tron restart`, `tron stop` and `tron down` send; a program
  that ignores it lives through its own `stop_grace` (not the policy's) and is then killed;
- an http probe's `status` range and `headers`, and the probe defaults as the README writes
  them (failure_threshold 3 before a liveness failure);
- `backlog` is the kernel's queue length of the held socket (Send-Q of the LISTEN socket);
- `tron drill handover --workers N` runs N request loops at once."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.request

import psutil
import pytest

from tests.harness import REPO, TRON, wait_for

pytestmark = pytest.mark.integration
WITNESS = str(REPO / "tests" / "integration" / "apps" / "witness.py")


def notes(path) -> list[dict]:
    """What the witness wrote down (a line being written is left for the next read)."""
    if not path.exists():
        return []
    lines = path.read_text().splitlines()
    out = []
    for line in lines:
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return out


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_a_services_own_stop_signal_and_stop_grace_are_what_it_gets(mesh_factory, tmp_path):
    trap_out, stub_out = tmp_path / "trap.jsonl", tmp_path / "stubborn.jsonl"
    services = {
        # SIGINT, with a grace long enough that it always exits by itself
        "trap": {"command": [sys.executable, WITNESS, "trap", str(trap_out)], "port": 6171,
                 "stop_signal": "SIGINT", "stop_grace": 20.0},
        # SIGTERM (the default), ignored: only SIGKILL ends it, after its own grace
        "stubborn": {"command": [sys.executable, WITNESS, "stubborn", str(stub_out)], "port": 6172,
                     "stop_grace": 2.0},
    }
    mesh = mesh_factory(services=services, policy={"stop_grace": 0.2})  # the policy's grace is not theirs
    mesh.up()
    started = lambda path: [n["pid"] for n in notes(path) if n["event"] == "started"]  # noqa: E731
    wait_for(lambda: len(started(trap_out)) == 1 and len(started(stub_out)) == 1, 20, "both programs to start")
    trap1, stub = mesh.service("trap")["pid"], mesh.service("stubborn")["pid"]
    assert started(trap_out) == [trap1] and started(stub_out) == [stub]

    # the stubborn one is stopped while the trap goes through its verbs (the grace takes a while)
    stopping = subprocess.Popen([*TRON, "--config", str(mesh.config), "stop", "stubborn"], env=mesh.env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        # a graceful restart, a stop and a start, and `tron down` (below): SIGINT each time
        mesh.tron("restart", "trap", "--wait", check=True)
        trap2 = mesh.service("trap")["pid"]
        assert trap2 != trap1 and gone(trap1)
        mesh.tron("stop", "trap", check=True)
        wait_for(lambda: gone(trap2), 20, "the stopped trap to be gone")
        mesh.tron("start", "trap", "--wait", check=True)
        trap3 = mesh.service("trap")["pid"]
        wait_for(lambda: started(trap_out) == [trap1, trap2, trap3], 20, "each incarnation to start")
    finally:
        assert stopping.wait(60) == 0, stopping.stdout.read()

    # SIGTERM, then it lived on through its own grace (2 s), then SIGKILL
    wait_for(lambda: gone(stub), 30, "the stubborn program to be killed")
    seen = [n for n in notes(stub_out) if n["pid"] == stub]
    [termed] = [n for n in seen if n["event"] == "signal"]
    assert termed["signal"] == "SIGTERM"
    alive_after = max(n["at"] for n in seen if n["event"] == "alive") - termed["at"]
    # a lower bound only: killed at the policy's 0.2 s it could not have noted 1 s of life
    assert alive_after > 1.0, f"alive only {alive_after:.2f}s after SIGTERM with stop_grace = 2"
    [stub_session] = mesh.rows("SELECT exit_code, exit_signal FROM sessions WHERE pid = ?", (stub,))
    assert stub_session["exit_signal"] == 9, stub_session

    assert mesh.down().returncode == 0
    assert gone(trap3)
    signals = [(n["pid"], n["signal"]) for n in notes(trap_out) if n["event"] == "signal"]
    assert signals == [(trap1, "SIGINT"), (trap2, "SIGINT"), (trap3, "SIGINT")], signals
    trap_sessions = mesh.rows("SELECT pid, exit_code, exit_signal FROM sessions WHERE agent = 'trap' ORDER BY pid")
    assert all(s["exit_signal"] is None and s["exit_code"] in (0, None) for s in trap_sessions), trap_sessions


def listen_backlog(port: int) -> list[int]:
    """The backlog of each LISTEN socket on the port, as the kernel reports it (`ss`: Send-Q)."""
    out = subprocess.run(["ss", "-Hltn", f"sport = :{port}"], capture_output=True, text=True, check=True).stdout
    return [int(line.split()[2]) for line in out.splitlines() if line.strip()]


def test_an_http_probes_status_and_headers_a_held_sockets_backlog_and_the_drills_workers(mesh_factory, tmp_path):
    """Two programs on one mesh: ``probed`` answers its probe with the status written in a
    file; ``held`` serves on the daemon's socket and answers nobody until ``workers`` callers
    are inside it at once (apps/witness.py)."""
    probed_out, status, held_out, workers = tmp_path / "probed.jsonl", tmp_path / "status", tmp_path / "held.jsonl", 3
    status.write_text("418")
    # failure_threshold, success_threshold and initial_delay: the defaults (3, 1, 0); a long
    # timeout, so that a program starved by a busy machine is not what fails the probe
    liveness = {"http": {"path": "/alive", "status": [418, 418], "headers": {"X-Probe": "tron"}}, "interval": 0.3,
                "timeout": 5.0}
    services = {
        "probed": {"command": [sys.executable, WITNESS, "probed", str(probed_out), "{port}", str(status)],
                   "port": 6173, "liveness": liveness},
        "held": {"command": [sys.executable, WITNESS, "barrier", str(held_out), str(workers)], "port": 6174,
                 "socket": "inherit", "backlog": 7},
    }
    mesh = mesh_factory(services=services)
    mesh.up()

    # the probe: its headers (never the mesh token), and 418 passes because it is in its range
    first = mesh.wait_state("probed", "running")
    requests = lambda pid: [n for n in notes(probed_out) if n["event"] == "request" and n["pid"] == pid]  # noqa: E731
    wait_for(lambda: requests(first["pid"]), 20, "a probe request")
    probe = requests(first["pid"])[0]
    assert probe["path"] == "/alive" and probe["status"] == 418
    headers = {k.lower(): v for k, v in probe["headers"].items()}
    assert headers.get("x-probe") == "tron" and "x-tron-token" not in headers, headers
    assert mesh.rows("SELECT reason FROM alerts WHERE agent = 'probed'") == []
    # 200 is outside [418, 418]: three failures in a row (the default threshold), then replaced
    status.write_text("200")
    [alert] = wait_for(lambda: mesh.rows("SELECT reason, detail FROM alerts WHERE agent = 'probed'"), 40,
                       "a liveness failure")
    assert alert["reason"] == "liveness_failed" and json.loads(alert["detail"])["failures"] == 3, alert
    assert len([r for r in requests(first["pid"]) if r["status"] == 200]) >= 3  # not fewer than the threshold
    status.write_text("418")
    back = wait_for(lambda: (s := mesh.service("probed"))["state"] == "running" and s["pid"] != first["pid"] and s,
                    40, "a new incarnation that passes its probe")
    assert gone(first["pid"]) and requests(back["pid"])[-1]["status"] == 418

    # the held socket: the kernel queues `backlog` connections on it, before and after a kill
    mesh.wait_state("held", "running")
    port = mesh.port("held")
    assert listen_backlog(port) == [7]  # one socket, the daemon's, shared with the program
    proc = mesh.tron("drill", "handover", "held", "--kills", "1", "--workers", str(workers), "--path", "/",
                     "--interval", "1.0", "--json", timeout=120)
    drill = json.loads(proc.stdout)
    assert proc.returncode == 0 and drill["summary"]["refused"] == 0, drill
    # One loop has one request out at a time, and the program holds each until `workers` are
    # inside (or 2 s passed): the peak is the number of loops the drill ran.
    peaks = [n for n in notes(held_out) if n["event"] == "peak"]
    assert max(p["inside"] for p in peaks) == workers, peaks
    [restart] = mesh.rows("SELECT reason, drill FROM retry_history WHERE agent_id = 'held'")
    assert (restart["reason"], restart["drill"]) == ("process_exit", "handover:held")
    assert listen_backlog(port) == [7]  # the same socket, held across the kill


def test_wait_replaced_sees_a_program_back_by_the_pid_the_daemon_recorded_and_its_port(mesh_factory, tmp_path):
    """tests/harness.py Mesh.wait_replaced for plain programs (they answer no /health): a
    program that serves its port, and one that serves none (``listens=False``); what it
    returns is the process the program itself says started, and the old one is gone."""
    web_out, status, quiet_out = tmp_path / "web.jsonl", tmp_path / "status", tmp_path / "quiet.jsonl"
    status.write_text("200")
    services = {"web": {"command": [sys.executable, WITNESS, "probed", str(web_out), "{port}", str(status)],
                        "port": 6175},
                "quiet": {"command": [sys.executable, WITNESS, "trap", str(quiet_out)], "port": 6176}}
    mesh = mesh_factory(services=services)
    mesh.up()
    started = lambda path: [n["pid"] for n in notes(path) if n["event"] == "started"]  # noqa: E731
    for name, out, listens in (("web", web_out, True), ("quiet", quiet_out, False)):
        first = mesh.wait_state(name, "running")
        wait_for(lambda: first["pid"] in started(out), 20, f"{name} to note its start")
        old = mesh.kill(name)
        back = mesh.wait_replaced(name, old, timeout=40, listens=listens)
        assert back["pid"] != old and back["state"] == "running", back
        assert gone(old)
        wait_for(lambda: back["pid"] in started(out), 20, f"the new {name} to note its start")
    # the new web answers on its port, and it is the new process that answers
    with urllib.request.urlopen(f"{mesh.url('web')}/", timeout=20) as answer:
        assert answer.status == 200
    assert wait_for(lambda: [n for n in notes(web_out) if n["event"] == "request"], 20, "the request's note")[-1][
        "pid"] == mesh.service("web")["pid"]
