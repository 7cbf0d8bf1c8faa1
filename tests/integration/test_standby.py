"""Issue 24: an agent's restart does not wait for the kernel to move a process into a new
cgroup, nor for the fork server's two forks. After a start, the spawner asks the fork server
for a standby of the next incarnation: a forked process that joins that incarnation's cgroup
and waits (services/daemon/forkserver.py). A restart hands it the spawn (environment, log,
held socket) and it becomes the agent, with the same pid. A standby that died, or whose code
is out of date, is not used: the restart forks as before. A standby runs nothing unasked."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest

from tests.harness import REPO, wait_for
from tron.services.daemon.spawner import GATE_AFTER

pytestmark = pytest.mark.integration


def spawned(mesh, agent: str) -> list[dict]:
    import json

    return [json.loads(r["payload"]) for r in mesh.rows(
        "SELECT payload FROM events WHERE kind = 'spawned' AND agent = ? ORDER BY id", (agent,))]


def cgroup_leaf(pid: int) -> str:
    """The name of the cgroup2 (unified) group ``pid`` is in."""
    line = next(x for x in Path(f"/proc/{pid}/cgroup").read_text().splitlines() if x.startswith("0::"))
    return line.rsplit("/", 1)[-1]


def standby_of(mesh, name: str) -> tuple[int, str]:
    if mesh.status()["ownership"]["mode"] != "cgroup":
        pytest.skip(f"LOUD SKIP: no cgroups here, so no standbys: {mesh.status()['ownership'].get('why')}")
    return wait_for(lambda: mesh.standby(name), 30, f"a standby for {name}")


def _has_sdk(pid: int) -> bool:
    return "jiter" in Path(f"/proc/{pid}/maps").read_text()  # the anthropic SDK's extension, mapped


def test_a_killed_agent_comes_back_as_its_standby_in_its_own_cgroup_and_works(mesh_factory):
    m = mesh_factory()
    m.env["TRON_TEST_WARM_AFTER_UP"] = "4"  # 10 s shipped: the cold standby comes within 0.5 s
    m.up()
    # A standby comes at once, from the cold server (the SDKs' heir starts WARM_AFTER_UP s after up)...
    cold, _ = standby_of(m, "programmer-1")
    assert not m.status()["fork_server"]["warm"] and not _has_sdk(cold)
    # ... and is made again once the server has its SDKs: its agent will not import them
    pid, incarnation = wait_for(lambda: (s := m.standby("programmer-1")) and s[0] != cold and s, 90,
                                "a standby forked from the warm server")
    assert m.status()["fork_server"]["warm"] and _has_sdk(pid)
    wait_for(lambda: not psutil.pid_exists(cold) or psutil.Process(cold).status() == psutil.STATUS_ZOMBIE or None,
             30, "the cold standby to be ended")
    daemon = m.status()["daemon"]["pid"]
    wait_for(lambda: psutil.Process(pid).ppid() == daemon, 30, "the standby reparented to the daemon (which reaps it)")
    assert cgroup_leaf(pid) == f"programmer-1.{incarnation}"  # in the next incarnation's cgroup already
    old = m.kill("programmer-1")
    back = m.wait_replaced("programmer-1", old)
    assert back["pid"] == pid and back["incarnation"] == incarnation  # the standby became the agent, in place
    assert cgroup_leaf(pid) == f"programmer-1.{incarnation}"
    assert spawned(m, "programmer-1")[-1]["mode"] == "fork"
    # it beats on the standby's connection kept for it, not over HTTP: every agent does
    back_at = time.monotonic()
    wait_for(lambda: time.monotonic() - back_at > 2.5 and m.service("programmer-1")["last_beat_age"] < 1.5 or None,
             30, "its beats going on")
    samples = m.metrics()
    on_channel, received = samples[("tron_beats_on_channel_total", ())], samples[("tron_beats_received_total", ())]
    assert received >= on_channel > received / 2  # those started before the fork server served beat over HTTP
    assert "beats go over HTTP" not in (m.home / "logs" / "programmer-1.log").read_text()
    assert ("tron_beats_rejected_total", (("verdict", "seq_out_of_order"),)) not in samples
    proc = psutil.Process(pid)
    assert "tron.services.programmer" in " ".join(proc.cmdline()) and os.getsid(pid) == pid
    assert pid not in m.status()["ownership"]["gates"]  # the incarnation's main process now, not a helper
    # it beats, serves its port (the held socket) and calls its provider
    wait_for(lambda: m.service("programmer-1")["last_beat_age"] is not None, 30, "a beat from the new incarnation")
    assert m.tron("run", "a standby at work").returncode == 0
    # and the start after it has a standby of its own
    nxt, nxt_incarnation = wait_for(lambda: (s := m.standby("programmer-1")) and s[0] != pid and s, 30,
                                    "the next standby")
    assert nxt_incarnation != incarnation


def test_a_standby_that_died_is_not_used_and_the_restart_forks(mesh_factory):
    m = mesh_factory()
    m.up()
    pid, incarnation = standby_of(m, "programmer-2")
    os.kill(pid, signal.SIGKILL)
    # Dead (its teardown done), not dying: a standby killed a moment before the restart may
    # still be taken for alive by it, and then found dead when opened; that start forks
    # too, under the id it reserved.
    wait_for(lambda: not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE, 30,
             "the standby dead")
    old = m.kill("programmer-2")
    back = m.wait_replaced("programmer-2", old)
    assert back["pid"] != pid and back["incarnation"] != incarnation
    assert spawned(m, "programmer-2")[-1]["mode"] == "fork"
    assert cgroup_leaf(back["pid"]) == f"programmer-2.{back['incarnation']}"
    # the dead standby was reaped (no zombie), and its cgroup removed
    wait_for(lambda: not psutil.pid_exists(pid), 30, "the dead standby reaped")
    assert m.tron("run", "after a dead standby").returncode == 0


def test_a_standby_still_serves_a_restart_while_the_fork_server_is_down(mesh_factory):
    m = mesh_factory()
    m.up()
    pid, incarnation = standby_of(m, "architect")
    fs = m.status()["fork_server"]
    os.kill(fs["pid"], signal.SIGKILL)
    old = m.kill("architect")
    back = m.wait_replaced("architect", old)
    assert (back["pid"], back["incarnation"]) == (pid, incarnation)
    assert spawned(m, "architect")[-1]["mode"] == "fork"
    wait_for(lambda: (f := m.status()["fork_server"])["ready"] and f["pid"] != fs["pid"], 60, "a new fork server")
    assert m.tron("run", "while the fork server came back").returncode == 0


def test_standbys_off_restarts_fork_from_the_server_and_keep_no_process_waiting(mesh_factory):
    """``[mesh] standbys = false`` (a mesh of many agents short of memory): no agent has a
    process waiting for its next start, and a killed agent is forked from the server; but
    one whose own ``standby = true`` says otherwise keeps its standby."""
    m = mesh_factory()
    text = m.config.read_text().replace("[mesh]\n", "[mesh]\nstandbys = false\n")
    header = '[services."programmer-1"]\n'  # as tests/harness.py writes it (quoted: a name may hold a dot)
    assert header in text
    m.config.write_text(text.replace(header, header + "standby = true\n"))
    m.up()
    if m.status()["ownership"]["mode"] != "cgroup":
        pytest.skip(f"LOUD SKIP: no cgroups here, so no standbys either way: {m.status()['ownership'].get('why')}")
    standby_of(m, "programmer-1")
    others = [n for n, s in m.spec["services"].items() if s.get("role") != "llm_sim" and n != "programmer-1"]
    # A standby comes half a second after its agent's start (GATE_AFTER): watch over four times that.
    deadline = time.monotonic() + 4 * GATE_AFTER
    while time.monotonic() < deadline:
        assert [n for n in others if m.standby(n)] == []
        time.sleep(0.1)
    old = m.kill("programmer-2")
    back = m.wait_replaced("programmer-2", old)
    assert spawned(m, "programmer-2")[-1]["mode"] == "fork" and back["pid"] != old
    assert m.tron("run", "without standbys").returncode == 0
    assert [n for n in others if m.standby(n)] == []
    standby_of(m, "programmer-1")  # still kept (made again from the warm server, when that came meanwhile)


def test_a_stopped_agent_keeps_no_standby_and_gets_one_again_when_started(mesh_factory):
    m = mesh_factory()
    m.up()
    pid, incarnation = standby_of(m, "director-code")
    assert m.tron("stop", "director-code").returncode == 0
    wait_for(lambda: not psutil.pid_exists(pid) and m.standby("director-code") is None, 30,
             "the stopped service's standby ended")
    assert pid not in m.status()["ownership"]["gates"]
    assert m.tron("start", "director-code").returncode == 0
    back = wait_for(lambda: (s := m.service("director-code"))["state"] == "running" and s, 30, "director-code back")
    assert back["incarnation"] != incarnation  # that standby's id was never used
    assert wait_for(lambda: m.standby("director-code"), 30, "a standby again")[0] != pid


def test_a_standby_with_out_of_date_code_refuses_and_the_new_code_runs(mesh_factory, tmp_path):
    from tests.integration.test_forkserver import mesh_on_a_copy

    m, code = mesh_on_a_copy(mesh_factory, tmp_path)
    pid, _ = standby_of(m, "director-docs")
    server = m.status()["fork_server"]["pid"]
    source = code / "services" / "director" / "app.py"
    st = source.stat()
    os.utime(source, (st.st_atime, st.st_mtime + 5))  # "the code changed"
    old = m.kill("director-docs")
    back = m.wait_replaced("director-docs", old)
    assert back["pid"] != pid  # the standby said stale; the fork server did too: a plain spawn
    assert spawned(m, "director-docs")[-1]["mode"] == "plain"
    wait_for(lambda: not psutil.pid_exists(pid), 30, "the refused standby gone")
    # The server that forked the standby has the old code too: it is told to check, exits, and a
    # fresh one serves (without the check it waited on unasked, and every start spawned plainly).
    wait_for(lambda: (f := m.status()["fork_server"])["ready"] and f["pid"] != server, 30, "a fresh fork server")
    wait_for(lambda: not psutil.pid_exists(server) or psutil.Process(server).status() == psutil.STATUS_ZOMBIE, 10,
             "the out-of-date server gone")


# -- the fork server's side, without a daemon ---------------------------------------------------

def _standby(sock: str, cgroup: list[str] | None = None):
    return asyncio.run(_ask_standby(sock, cgroup or []))


async def _ask_standby(sock, cgroup):
    from tron.services.daemon import unixline

    answer, conn = await unixline.ask_keep_async(sock, {"op": "standby", "cgroup": cgroup}, timeout=30)
    conn.setblocking(True)
    return answer, conn


def test_a_standby_runs_nothing_when_its_daemon_closes_its_end(tmp_path):
    from tests.integration.test_forkserver import _fork_server

    with _fork_server(tmp_path) as (sock, server):
        answer, conn = _standby(sock)
        assert answer["ok"]
        standby = psutil.Process(answer["pid"])
        wait_for(lambda: os.getsid(standby.pid) == standby.pid, 30, "the standby in its own session")  # waiting
        conn.close()  # as when the daemon gives it up, or dies
        wait_for(lambda: not standby.is_running() or standby.status() == psutil.STATUS_ZOMBIE, 30,
                 "the standby to exit")


def test_a_standby_becomes_the_service_it_is_handed_with_the_same_pid(tmp_path):
    """Handed a spawn line with its log pipe, the standby answers ok and runs the module in
    place: the module's output arrives on the pipe, from the standby's own pid."""
    import json
    import socket

    from tests.integration.test_forkserver import _fork_server

    with _fork_server(tmp_path) as (sock, server):
        answer, conn = _standby(sock)
        pid = answer["pid"]
        r, w = os.pipe()
        line = {"module": "tests.integration.standby_probe", "env": {"PATH": os.defpath, "PROBE": "handed"},
                "cwd": str(REPO), "log": "", "log_pipe": True, "open_files": 512}
        socket.send_fds(conn, [json.dumps(line).encode() + b"\n"], [w])
        os.close(w)
        conn.settimeout(30)
        assert json.loads(conn.recv(1 << 16)) == {"ok": True}
        conn.close()
        with os.fdopen(r, "rb") as out:
            said = out.read().decode()
        assert f"pid {pid} " in said and "probe handed" in said and "nofile 512" in said, said


def test_a_standby_asked_to_keep_its_channel_hands_it_to_the_service(tmp_path):
    """With "channel": true, the standby answers ok and the service finds the same connection
    at the fd TRON_BEAT_FD names, not inherited by what it runs: what it writes there follows
    the answer, on the daemon's end (where its first beat goes, services/daemon/beat_channel.py)."""
    import json
    import socket

    from tests.integration.test_forkserver import _fork_server

    with _fork_server(tmp_path) as (sock, server):
        answer, conn = _standby(sock)
        r, w = os.pipe()
        line = {"module": "tests.integration.standby_probe", "env": {"PATH": os.defpath, "PROBE": "channel"},
                "cwd": str(REPO), "log": "", "log_pipe": True, "open_files": 512, "channel": True}
        socket.send_fds(conn, [json.dumps(line).encode() + b"\n"], [w])
        os.close(w)
        conn.settimeout(30)
        said = b""
        while said.count(b"\n") < 2:
            chunk = conn.recv(1 << 16)
            assert chunk, f"closed after {said!r}"
            said += chunk
        conn.close()
        ok, channel = said.decode().splitlines()[:2]
        assert json.loads(ok) == {"ok": True}
        assert channel == "channel at fd 3, inheritable False, SIGPIPE ignored"  # no listening socket: the first free fd
        with os.fdopen(r, "rb") as out:
            assert "probe channel" in out.read().decode()


def test_an_unknown_op_or_a_request_that_is_no_object_is_refused(tmp_path):
    from tests.integration.test_forkserver import _fork_server, _ping
    from tron.services.daemon import unixline

    with _fork_server(tmp_path) as (sock, server):
        assert unixline.ask(sock, {"op": "stand-by"}, timeout=30) == {"ok": False, "error": "unknown op 'stand-by'"}
        answer = unixline.ask(sock, ["op", "standby"], timeout=30)  # type: ignore[arg-type]
        assert answer["ok"] is False and "a JSON object is expected" in answer["error"]
        assert _ping(sock)  # and it serves on
        assert not server.children()



def test_a_drills_census_counts_a_standby_being_made_as_the_fork_servers_not_a_stray(mesh_factory):
    """A standby is forked and only then listed under ownership.gates: one being made at the
    moment of a drill's census (0.5 s after any restart) is a copy of the fork server, with
    its command line, not an orphan. Made here by asking the fork server directly, so the
    daemon never lists it."""
    from tron.common.config import load_mesh
    from tron.common.paths import Home
    from tron.scripts.client import MeshClient
    from tron.scripts.drills import Runner

    m = mesh_factory()
    m.env["TRON_TEST_WARM_AFTER_UP"] = "1"  # the warm heir is what this needs, not its wait (10 s shipped)
    m.up()
    wait_for(lambda: m.status()["fork_server"]["warm"], 90, "the warm heir to take over")
    standby_of(m, "programmer-1")  # the mesh's own standbys are in place (and listed)
    answer, conn = _standby(m.status()["fork_server"]["socket"])  # the warm heir's
    try:
        unlisted = answer["pid"]
        assert unlisted not in m.status()["ownership"]["gates"]
        runner = Runner(MeshClient(Home.resolve(str(m.home)), load_mesh(m.config)))
        census = runner.census()
        assert census["problems"] == [], census
        # and a process that is no copy of it is still reported
        other = subprocess.Popen(["sleep", "60"], env={**os.environ, "TRON_MESH": str(m.home)})
        try:
            wait_for(lambda: any(f"pid {other.pid} " in p for p in runner.census()["problems"]), 30,
                     "the stray reported")
        finally:
            other.kill()
            other.wait()
    finally:
        conn.close()
