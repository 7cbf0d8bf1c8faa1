"""Issue 22: Tron writes every service's log (the log pump): rotated while the program
keeps writing, with no line lost at a rotation; a flood is rate-limited and said once;
`tron logs` reads across the rotated files; the pump outlives a killed daemon."""

from __future__ import annotations

import json
import os
import signal
import time

import psutil
import pytest

from tests.harness import wait_for

pytestmark = pytest.mark.integration

# Writes N numbered lines as fast as it can (8 KiB buffered writes: lines are cut across
# writes, which the pump must join), then "done", then serves a port for its probe.
FLOOD = """
import socket, sys, time
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", int(sys.argv[1]))); s.listen()
out = sys.stdout.buffer
pad = b"x" * 90
for i in range(int(sys.argv[2])):
    out.write(b"%d %s\\n" % (i, pad))
out.write(b"done\\n"); out.flush()
while True:
    time.sleep(1)
"""


def flood_mesh(mesh_factory, tmp_path, count: int, **log):
    script = tmp_path / "flood.py"
    script.write_text(FLOOD)
    services = {"flood": {"command": ["{python}", str(script), "{port}", str(count)], "port": 6150,
                          "liveness": {"tcp": {}, "interval": 0.5, "timeout": 0.5}, **log}}
    mesh = mesh_factory(services=services)
    mesh.up()
    return mesh


def log_files(mesh, name: str) -> list:
    """Oldest first."""
    logs = mesh.home / "logs"
    older = sorted(logs.glob(f"{name}.log.*"), key=lambda p: -int(p.suffix[1:]))
    return older + [logs / f"{name}.log"]


def numbered(mesh, name: str) -> list[int]:
    out = []
    for path in log_files(mesh, name):
        for line in path.read_bytes().splitlines():
            head = line.split(b" ", 1)[0]
            if head.isdigit():
                out.append(int(head))
    return out


def test_a_flood_is_rotated_with_no_line_lost(mesh_factory, tmp_path):
    count = 200_000  # ~19 MB
    mesh = flood_mesh(mesh_factory, tmp_path, count, log_max_bytes="2MB", log_backups=3)
    wait_for(lambda: b"done" in (mesh.home / "logs" / "flood.log").read_bytes(), 60, "the flood to end")
    files = log_files(mesh, "flood")
    assert len(files) == 4, files  # name.log and 3 backups, never more
    assert sum(p.stat().st_size for p in files) <= 4 * (2_000_000 + 65_536)
    got = numbered(mesh, "flood")
    assert got[-1] == count - 1 and got == list(range(got[0], count))  # contiguous across every rotation
    started = time.monotonic()
    proc = mesh.tron("logs", "-n", "5", "flood")
    took = time.monotonic() - started
    assert proc.returncode == 0 and "done" in proc.stdout, proc.stderr
    print(f"tron logs -n 5 took {took:.3f}s")
    logs = wait_for(lambda: (s := mesh.status()).get("logs") and s["logs"]["rotations"] and s["logs"], 10,
                    "the pump's counters in /status")
    assert logs["state"] == "ok" and logs["dropped"] == 0


def test_a_flood_over_the_rate_limit_is_counted_and_said_once(mesh_factory, tmp_path):
    mesh = flood_mesh(mesh_factory, tmp_path, 50_000, log_rate_limit=2000)
    path = mesh.home / "logs" / "flood.log"

    def accounted():
        """Every line of the flood (50 000 numbered, and "done") is in the log or in a drop count."""
        text = path.read_text(errors="replace").splitlines()
        said = [ln for ln in text if "over log_rate_limit (2000 lines/s)" in ln]
        dropped = sum(int(json.loads(ln)["msg"].split()[0]) for ln in said)
        done = int(any(ln == "done" for ln in text))
        return dropped + len(numbered(mesh, "flood")) + done == 50_001 and said

    said = wait_for(accounted, 30, "every dropped line counted")
    assert len(said) <= 10  # once per second of flood at most (this one lasts well under that), not per line
    kept = numbered(mesh, "flood")
    assert 2000 <= len(kept) < 50_000 and kept[:2000] == list(range(2000)) and kept == sorted(set(kept))


def test_the_log_pump_outlives_a_killed_daemon(mesh_factory, tmp_path):
    mesh = flood_mesh(mesh_factory, tmp_path, 10)
    path = mesh.home / "logs" / "flood.log"
    wait_for(lambda: b"done" in path.read_bytes(), 20, "the lines")
    [pump] = pumps(mesh)
    daemon = mesh.status()["daemon"]["pid"]
    before = mesh.service("flood")
    os.kill(daemon, signal.SIGKILL)
    wait_for(lambda: not any(p.pid == daemon for p in mesh.processes()), 10, "the daemon gone")
    assert pump.is_running() and [p.pid for p in pumps(mesh)] == [pump.pid]
    mesh.up()  # the new daemon adopts the service and goes on with the same pump
    assert mesh.service("flood")["pid"] == before["pid"]
    assert [p.pid for p in pumps(mesh)] == [pump.pid]


def pumps(mesh) -> list:
    found = []
    for p in mesh.processes():
        try:
            if "tron.services.daemon.logpump" in " ".join(p.cmdline()):
                found.append(p)
        except psutil.Error:  # ended (or a zombie) between the listing and this read: not a pump
            continue
    return found


def test_a_start_failure_names_the_last_line_its_program_wrote(mesh_factory, tmp_path):
    """The pump writes behind the program: the daemon lets it catch up before it reads why."""
    services = {"bad": {"command": ["{python}", "-c", "print('warming up'); print('fatal: no config at /x'); "
                                    "raise SystemExit(3)"], "port": 6150,
                        "liveness": {"tcp": {}, "interval": 0.5, "timeout": 0.5}}}
    mesh = mesh_factory(services=services)
    mesh.tron("up", "--detach")
    rows = wait_for(lambda: (r := mesh.rows("SELECT detail FROM alerts WHERE agent = 'bad'")) and r, 30, "an alert")
    assert "fatal: no config at /x" in rows[0]["detail"], rows


def test_a_disk_too_full_for_logs_stops_the_logs_first_loudly(mesh_factory, tmp_path):
    script = tmp_path / "flood.py"
    script.write_text(FLOOD)
    services = {"flood": {"command": ["{python}", str(script), "{port}", "1000"], "port": 6150,
                          "liveness": {"tcp": {}, "interval": 0.5, "timeout": 0.5}}}
    mesh = mesh_factory(services=services)
    with open(mesh.config, "a") as f:  # no disk has an exabyte free: "nearly full" from the start
        f.write("[logs]\nmin_free = 1000000000000000000\n")
    mesh.up()
    logs = wait_for(lambda: (s := mesh.status()).get("logs") and s["logs"]["dropped"] >= 1001 and s["logs"], 20,
                    "the flood dropped")
    assert logs["state"] == "disk_full"
    assert mesh.service("flood")["state"] == "running"  # supervision goes on
    assert not (mesh.home / "logs" / "flood.log").exists() or b"x" * 90 not in \
        (mesh.home / "logs" / "flood.log").read_bytes()
    proc = mesh.tron("status")
    assert "DISK NEARLY FULL" in proc.stdout, proc.stdout
    assert [r for r in mesh.rows("SELECT kind FROM events WHERE kind = 'logs_disk_full'")]


# Numbered lines of 1 KB, 50 a second, each flushed, until killed; serves a port for its probe.
# SIGPIPE as a C program has it: a write to a pipe without a reader kills it.
STEADY = """
import os, signal, socket, sys, time
signal.signal(signal.SIGPIPE, signal.SIG_DFL)
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", int(sys.argv[1]))); s.listen()
out = sys.stdout.buffer
pad = b"x" * 1000
i = 0
while True:
    out.write(b"%d %d %s\\n" % (i, os.getpid(), pad)); out.flush()
    i += 1
    time.sleep(0.02)
"""


def test_a_killed_log_pump_is_started_again_and_no_line_is_lost(mesh_factory, tmp_path):
    """The pump is killed: a new one within a second or so, handed the pipes the daemon
    holds. The running program never sees a pipe without a reader (it would die of SIGPIPE),
    every line it wrote meanwhile is in its log, an incarnation started right then logs
    through the new pump, and the logs rotate at their limits again."""
    script = tmp_path / "steady.py"
    script.write_text(STEADY)
    probe = {"tcp": {}, "interval": 0.5, "timeout": 0.5}
    limits = {"log_max_bytes": "200KB", "log_backups": 3}
    mesh = mesh_factory(services={
        "steady": {"command": ["{python}", str(script), "{port}"], "port": 6150, "liveness": probe, **limits},
        "fresh": {"command": ["{python}", str(script), "{port}"], "port": 6151, "liveness": probe, **limits}})
    mesh.up()
    wait_for(lambda: len(numbered(mesh, "steady")) >= 20, 20, "steady's first lines")
    [pump] = pumps(mesh)
    steady = mesh.service("steady")["pid"]
    os.kill(pump.pid, signal.SIGKILL)
    fresh = mesh.kill("fresh")  # its next incarnation starts while the pump is down or just back
    killed = time.monotonic()
    [new] = wait_for(lambda: (p := [q for q in pumps(mesh) if q.pid != pump.pid]) and p, 10, "a new pump")
    print(f"a new pump {time.monotonic() - killed:.2f}s after the kill")
    logs = wait_for(lambda: (s := mesh.status()["logs"])["pid"] == new.pid and s["state"] == "ok" and s, 10,
                    "/status to name the new pump")
    assert logs["died"] == 1 and logs["restarts"] == 1, logs
    back = mesh.wait_replaced("fresh", fresh)
    wait_for(lambda: b" %d x" % back["pid"] in (mesh.home / "logs" / "fresh.log").read_bytes(), 10,
             "the new incarnation's lines in its log")
    wait_for(lambda: mesh.status()["logs"]["rotations"] >= 2, 30, "the new pump to rotate the logs")
    assert mesh.service("steady")["pid"] == steady  # never killed by SIGPIPE, never restarted
    got = numbered(mesh, "steady")
    assert got == list(range(got[0], got[-1] + 1))  # nothing lost while no pump ran, nothing twice
    for name in ("steady", "fresh"):
        files = [p for p in log_files(mesh, name) if p.exists()]
        assert len(files) <= 4 and all(p.stat().st_size <= 200_000 + 65_536 for p in files), \
            [(p.name, p.stat().st_size) for p in files]
    kinds = [r["kind"] for r in mesh.rows("SELECT kind FROM events WHERE kind LIKE 'log_pump_%' ORDER BY id")]
    assert kinds == ["log_pump_died", "log_pump_restarted"], kinds
    assert mesh.metrics()[("tron_log_pump_deaths_total", ())] == 1
    assert "the log pump died 1 times" in mesh.tron("status").stdout
    # a pump that runs but does not answer (stopped, stalled) is said to be so, then ok again
    os.kill(new.pid, signal.SIGSTOP)
    try:
        wait_for(lambda: mesh.status()["logs"]["state"] == "not_answering", 10, "the stopped pump to be said")
        assert f"the log pump (pid {new.pid}) has not answered for" in mesh.tron("status").stdout
    finally:
        os.kill(new.pid, signal.SIGCONT)
    wait_for(lambda: mesh.status()["logs"]["state"] == "ok", 10, "the pump to answer again")
    assert mesh.service("steady")["pid"] == steady


# Half a line, the rest 0.3 s later; then a prompt with no newline, and it waits.
PROMPT = """
import socket, sys, time
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", int(sys.argv[1]))); s.listen()
sys.stdout.write("hel"); sys.stdout.flush()
time.sleep(0.3)
sys.stdout.write("lo world\\n"); sys.stdout.flush()
sys.stdout.write("Password: "); sys.stdout.flush()
while True:
    time.sleep(1)
"""


def test_a_line_without_its_newline_is_written_while_its_program_waits(mesh_factory, tmp_path):
    script = tmp_path / "prompt.py"
    script.write_text(PROMPT)
    mesh = mesh_factory(services={"prompt": {"command": ["{python}", str(script), "{port}"], "port": 6150,
                                             "liveness": {"tcp": {}, "interval": 0.5, "timeout": 0.5}}})
    mesh.up()
    path = mesh.home / "logs" / "prompt.log"
    wait_for(lambda: path.exists() and b"Password: \n" in path.read_bytes(), 10, "the prompt in the log")
    assert path.read_bytes().splitlines()[:2] == [b"hello world", b"Password: "]  # the piecewise line whole
    proc = mesh.tron("logs", "-n", "5", "prompt")
    assert "Password:" in proc.stdout and "hello world" in proc.stdout, proc.stdout + proc.stderr
    assert mesh.service("prompt")["state"] == "running"
