"""Issue 5: agents forked from the fork server serve, beat, call their provider and are
replaced after a kill; a dead or out-of-date fork server is replaced; other commands
still spawn plainly."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import time
from pathlib import Path

import psutil
import pytest

from tests.harness import REPO, wait_for

pytestmark = pytest.mark.integration


def spawn_modes(mesh, agent: str) -> list[str]:
    return [json.loads(r["payload"])["mode"]
            for r in mesh.rows("SELECT payload FROM events WHERE kind = 'spawned' AND agent = ? ORDER BY id", (agent,))]


def made_by(pid: int) -> str:
    """How /proc says a process was made: a plain spawn is exec'd with its own environment
    (its TRON_INCARNATION in /proc/PID/environ); a forked agent keeps the fork server's
    environment block, which names no incarnation."""
    return "plain" if "TRON_INCARNATION" in psutil.Process(pid).environ() else "fork"


def test_forked_agents_serve_beat_call_their_provider_and_come_back_after_a_kill(mesh):
    fs = mesh.status()["fork_server"]
    assert fs["ready"] and fs["spawned"] == 8
    daemon_pid = json.loads((mesh.home / "run" / "daemon.json").read_text())["pid"]
    p1 = mesh.service("programmer-1")
    assert spawn_modes(mesh, "programmer-1") == ["fork"] and made_by(p1["pid"]) == "fork"
    # its own session and process group; reparented to the daemon (which reaps it)
    proc = psutil.Process(p1["pid"])
    assert proc.ppid() == daemon_pid and os.getpgid(p1["pid"]) == p1["pid"] and os.getsid(p1["pid"]) == p1["pid"]
    health = mesh.health("programmer-1")
    assert health["pid"] == p1["pid"] and health["incarnation"] == p1["incarnation"]
    assert "tron.services.programmer" in " ".join(proc.cmdline()) and "programmer-1" in " ".join(proc.cmdline())
    assert proc.environ().get("TRON_HOME") == str(mesh.home)  # leak checks can still find it
    # it beats and it calls its provider through the real SDK
    wait_for(lambda: mesh.service("programmer-1")["last_beat_age"] is not None, 30, "a beat from the forked agent")
    assert mesh.tron("run", "forked agents at work").returncode == 0
    # killed: replaced through the fork server, with a real exit status on record
    mesh.kill("programmer-1")
    mesh.wait_replaced("programmer-1", p1["pid"])
    assert spawn_modes(mesh, "programmer-1") == ["fork", "fork"]
    assert made_by(mesh.service("programmer-1")["pid"]) == "fork"
    ended = mesh.rows("SELECT exit_signal FROM sessions WHERE incarnation = ?", (p1["incarnation"],))[0]
    assert ended["exit_signal"] == signal.SIGKILL
    assert mesh.tron("run", "still working").returncode == 0


def test_a_dead_fork_server_is_replaced_and_spawns_meanwhile_fall_back_to_plain(mesh):
    fs = mesh.status()["fork_server"]
    # The server, the agent's standby (forked from it: test_standby.py) and the agent die
    # together: the agent is replaced at once (a first crash has no backoff), long before a
    # new server has imported the agents' code again.
    standby = mesh.standby("programmer-2")
    os.kill(fs["pid"], signal.SIGKILL)
    if standby is not None:
        os.kill(standby[0], signal.SIGKILL)
    old = mesh.kill("programmer-2")
    meanwhile = mesh.wait_replaced("programmer-2", old)
    assert spawn_modes(mesh, "programmer-2") == ["fork", "plain"]
    assert made_by(meanwhile["pid"]) == "plain"
    wait_for(lambda: (f := mesh.status()["fork_server"])["ready"] and f["pid"] != fs["pid"] and f, 30,
             "a new fork server")
    assert mesh.status()["fork_server"]["generation"] == 2
    assert not psutil.pid_exists(fs["pid"]) or psutil.Process(fs["pid"]).status() == "zombie"
    # once the new server is ready, spawns go through it again
    again = mesh.kill("programmer-2")
    back = mesh.wait_replaced("programmer-2", again)
    assert spawn_modes(mesh, "programmer-2")[-1] == "fork" and made_by(back["pid"]) == "fork"
    assert mesh.tron("run", "after the fork server died").returncode == 0


def test_a_stopped_fork_server_is_not_waited_for_and_is_said(mesh):
    fs = mesh.status()["fork_server"]
    os.kill(fs["pid"], signal.SIGSTOP)
    try:
        standby = mesh.standby("programmer-1")
        if standby is not None:  # its standby would take over without the server: the spawn is what is asked
            os.kill(standby[0], signal.SIGKILL)
        old = mesh.kill("programmer-1")
        back = mesh.wait_replaced("programmer-1", old)
        assert spawn_modes(mesh, "programmer-1")[-1] == "plain" and made_by(back["pid"]) == "plain"
        daemon_log = (mesh.home / "logs" / "daemon.log").read_text()
        assert "fork server could not spawn" not in daemon_log  # not asked, so not waited for (SPAWN_WAIT)
        assert f"the fork server (pid {fs['pid']}) is stopped" in daemon_log
        assert mesh.status()["fork_server"]["stopped"] is True
        assert f"fork server: DEGRADED: pid {fs['pid']} is stopped" in mesh.tron("status").stdout
    finally:
        os.kill(fs["pid"], signal.SIGCONT)
    assert mesh.status()["fork_server"]["stopped"] is False
    again = mesh.kill("programmer-1")
    assert made_by(mesh.wait_replaced("programmer-1", again)["pid"]) == "fork"


@contextlib.contextmanager
def frozen(pid: int):
    """``pid`` frozen by a cgroup2 freezer of its own: it runs (/proc says sleeping, not stopped)
    and answers nothing, as a server blocked in a lock or a syscall does. Thawed and put back
    in its own group afterwards, if it still lives."""
    from tron.services.daemon.cgroups import _mounts

    root = _mounts().get("unified")
    if root is None or not (root / "cgroup.procs").exists():
        pytest.skip("LOUD SKIP: no cgroup2 mount here to freeze a process with")
    line = next(x for x in Path(f"/proc/{pid}/cgroup").read_text().splitlines() if x.startswith("0::"))
    home = root / line[3:].lstrip("/")
    group = root / f"tron-test-freeze-{os.getpid()}-{pid}"
    group.mkdir()
    try:
        (group / "cgroup.procs").write_text(str(pid))
        (group / "cgroup.freeze").write_text("1")
        wait_for(lambda: "frozen 1" in (group / "cgroup.events").read_text(), 10, "the freezer to hold the server")
        assert psutil.Process(pid).status() != psutil.STATUS_STOPPED  # frozen looks like sleeping, not stopped
        yield
    finally:
        (group / "cgroup.freeze").write_text("0")
        for left in (group / "cgroup.procs").read_text().split():
            with contextlib.suppress(OSError):
                (home / "cgroup.procs").write_text(left)
        wait_for(lambda: not (group / "cgroup.procs").read_text().strip(), 10, "the frozen group to be empty")
        group.rmdir()


def test_a_stalled_fork_server_is_waited_for_once_then_ended_and_a_fresh_one_forks(mesh_factory):
    """A fork server that runs but answers nothing: the first start waits SPAWN_WAIT for it and
    spawns plainly; no later start waits for it (each one waited SPAWN_WAIT before); it is said
    in the log and by `tron status`; after the grace (a test knob: 4 s, shipped 20 s) it is
    ended, a fresh server is started, and agents fork from it again."""
    from tron.services.daemon.spawner import STALL_GRACE_KNOB

    m = mesh_factory()
    m.env[STALL_GRACE_KNOB] = "4"
    m.up()
    fs = m.status()["fork_server"]
    log = m.home / "logs" / "daemon.log"
    with frozen(fs["pid"]):
        standby = m.standby("programmer-1")
        if standby is not None:  # its standby would take over without the server: the spawn is what is asked
            os.kill(standby[0], signal.SIGKILL)
        back = m.wait_replaced("programmer-1", m.kill("programmer-1"))
        assert spawn_modes(m, "programmer-1")[-1] == "plain" and made_by(back["pid"]) == "plain"
        assert log.read_text().count("fork server could not spawn") == 1  # waited SPAWN_WAIT, once
        assert f"the fork server (pid {fs['pid']}) left a spawn unanswered" in log.read_text()
        status = m.status()["fork_server"]
        assert status["stalled_s"] is not None and status["pid"] == fs["pid"] and not status["ready"]
        if status["stalled_s"] < 3:  # the grace has not run out: `tron status` says so meanwhile
            assert f"fork server: DEGRADED: pid {fs['pid']} has answered nothing for" in m.tron("status").stdout
        again = m.wait_replaced("programmer-1", m.kill("programmer-1"))  # not asked: spawned plainly at once
        assert spawn_modes(m, "programmer-1")[-1] == "plain" and made_by(again["pid"]) == "plain"
        assert log.read_text().count("fork server could not spawn") == 1
        fresh = wait_for(lambda: (f := m.status()["fork_server"])["ready"] and f["pid"] != fs["pid"] and f, 60,
                         "the stalled fork server ended and a fresh one ready")
    assert not psutil.pid_exists(fs["pid"]) or psutil.Process(fs["pid"]).status() == psutil.STATUS_ZOMBIE
    assert fresh["stalled_s"] is None and fresh["generation"] >= 2
    assert f"the fork server (pid {fs['pid']}) answered nothing for" in log.read_text()
    assert log.read_text().count("ending it; a fresh one starts") == 1
    wait_for(lambda: m.standby("programmer-1"), 30, "a standby from the fresh server")
    last = m.wait_replaced("programmer-1", m.kill("programmer-1"))
    assert made_by(last["pid"]) == "fork"


def checkout_copy(into) -> str:
    """The code of this checkout, copied: a mesh run with it on PYTHONPATH imports (and
    its fork server watches) these files, so a test may touch them without making the
    fork servers of the meshes in other test workers stale."""
    for part in ("common", "registry", "services", "scripts", "prompts"):
        shutil.copytree(REPO / part, into / part, ignore=shutil.ignore_patterns("__pycache__"))
    # tron/ links to the folders beside it: copied as links, it reaches the copies, not this checkout
    shutil.copytree(REPO / "tron", into / "tron", symlinks=True, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "mesh.toml", into / "mesh.toml")
    return str(into)


def mesh_on_a_copy(mesh_factory, tmp_path):
    """A mesh up on a copy of this checkout's code (``checkout_copy``), so that a test may
    change a source of it; the mesh and the copy."""
    code = tmp_path / "code"
    code.mkdir()
    m = mesh_factory()
    m.env["PYTHONPATH"] = checkout_copy(code)
    m.up()
    return m, code


def test_an_out_of_date_fork_server_is_replaced(mesh_factory, tmp_path):
    m, code = mesh_on_a_copy(mesh_factory, tmp_path)
    fs = wait_for(lambda: (f := m.status()["fork_server"])["ready"] and f, 30, "the fork server")
    source = code / "services" / "director" / "app.py"
    st = source.stat()
    os.utime(source, (st.st_atime, st.st_mtime + 5))  # "the code changed"
    old = m.kill("director-docs")
    replaced = m.wait_replaced("director-docs", old)
    assert spawn_modes(m, "director-docs")[-1] == "plain"  # the stale server refused
    assert made_by(replaced["pid"]) == "plain"
    wait_for(lambda: (f := m.status()["fork_server"])["ready"] and f["pid"] != fs["pid"], 30,
             "a fresh fork server")
    assert not psutil.pid_exists(fs["pid"]) or psutil.Process(fs["pid"]).status() == "zombie"


def test_a_non_agent_command_still_spawns_plainly(mesh_factory):
    m = mesh_factory(services={"web": {"command": ["{python}", "-m", "http.server", "{port}", "--bind", "127.0.0.1"],
                                       "port": 6150}})
    m.up()
    assert spawn_modes(m, "web") == ["plain"] and made_by(m.service("web")["pid"]) == "plain"
    old = m.kill("web")
    wait_for(lambda: (s := m.service("web"))["state"] == "running" and s["pid"] not in (None, old), 20,
             "web to be respawned")
    assert spawn_modes(m, "web") == ["plain", "plain"]
    # A mesh of programs alone has no agent to call an LLM: its fork server imports no SDK and
    # starts no heir to import them (each was ~2 s of CPU after every `tron up`).
    fs = wait_for(lambda: (f := m.status()["fork_server"])["warm"] and f, 20, "the fork server warm")
    assert fs["generation"] == 1 and fs["heir"] is None, fs
    lines = [json.loads(x) for x in (m.home / "logs" / "forkserver.log").read_text().splitlines() if x.startswith("{")]
    assert [x["sdks"] for x in lines if x.get("msg") == "fork server warming up"] == [[]], lines


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


# A subreaper in front of the fork server, as the daemon is: the incarnations come to it.
REAPER = """
import ctypes, os, sys
ctypes.CDLL(None).prctl(36, 1, 0, 0, 0)
if os.fork() == 0:
    os.execv(sys.executable, [sys.executable, "-m", "tron.services.daemon.forkserver", sys.argv[1]])
while True:
    try:
        os.wait()
    except ChildProcessError:
        break
"""


@contextlib.contextmanager
def _fork_server(tmp_path, env: dict[str, str] | None = None):
    """A fork server behind its subreaper, on a socket in ``tmp_path``: (socket, server process);
    ended, and its reaper with it, however the test ends. Its output goes to ``tmp_path/fs.log``."""
    import subprocess
    import sys

    sock = str(tmp_path / "fs.sock")
    with open(tmp_path / "fs.log", "ab") as out:
        reaper = subprocess.Popen([sys.executable, "-c", REAPER, sock], cwd=REPO,
                                  env={**os.environ, "TRON_SDKS": "", "PYTHONUNBUFFERED": "1", **(env or {})},
                                  stdout=out, stderr=subprocess.STDOUT)
    server = None
    try:
        first = wait_for(lambda: _ping(sock), 60, "fork server ready", interval=0.05)
        server = psutil.Process(first["pid"])
        server.first_ping = first  # what it answered as soon as it was ready
        yield sock, server
    finally:
        if server is not None:
            server.terminate()
        try:
            reaper.wait(timeout=30)
        except subprocess.TimeoutExpired:
            reaper.kill()
            reaper.wait()


def test_a_spawn_asked_past_its_deadline_forks_nothing(tmp_path):
    """The daemon gave up waiting (and spawned plainly): a late request must not make a
    second incarnation."""
    import time

    from tron.services.daemon import unixline

    with _fork_server(tmp_path) as (sock, server):
        log = tmp_path / "late.log"
        answer = unixline.ask(sock, {"op": "spawn", "module": "calendar", "env": {}, "cwd": str(tmp_path),
                                     "log": str(log), "cgroup": [], "deadline": time.monotonic() - 1}, timeout=30)
        assert answer["ok"] is False and "deadline" in answer["error"]
        assert not log.exists() and not server.children()
        assert _ping(sock)  # and it serves on


async def test_concurrent_spawns_are_each_answered_with_a_running_incarnation(tmp_path):
    """A crash wave asks for many incarnations at once, each request with its log pipe: every
    one is answered with its own pid, each child runs (its output arrives on its own pipe),
    and no intermediate is left behind (the server waits for none of them)."""
    import asyncio
    import datetime

    from tron.services.daemon import unixline

    with _fork_server(tmp_path) as (sock, server):
        pipes = [os.pipe() for _ in range(12)]
        requests = [unixline.ask_async(sock, {"op": "spawn", "module": "calendar", "env": {"PATH": os.defpath},
                                              "cwd": str(tmp_path), "log": "", "log_pipe": True, "cgroup": []},
                                       timeout=30, fds=(w,)) for _, w in pipes]
        answers = await asyncio.gather(*requests)
        for _, w in pipes:
            os.close(w)
        assert all(a and a["ok"] for a in answers), answers
        assert len({a["pid"] for a in answers}) == len(answers)
        for r, _ in pipes:  # each child ran: the calendar, then EOF when it exited
            with os.fdopen(r, "rb") as out:
                assert str(datetime.date.today().year).encode() in out.read()
        wait_for(lambda: not server.children(), 30, "no intermediate left under the fork server")


def _ping(sock: str, timeout: float = 1.0) -> dict | None:
    from tron.services.daemon import unixline

    try:
        reply = unixline.ask(sock, {"op": "ping"}, timeout=timeout)
    except OSError:
        return None
    return reply if reply and reply.get("ok") else None


def _said(tmp_path, msg: str) -> dict | None:
    """The fork server's log line with this message, if it wrote it yet."""
    for line in (tmp_path / "fs.log").read_text().splitlines():
        with contextlib.suppress(ValueError):
            if (record := json.loads(line)).get("msg") == msg:
                return record
    return None


def test_the_fork_server_is_ready_before_its_sdk_warm_up_and_says_when_it_is_warm(tmp_path):
    """Ready (it answers, it would fork) with the agent code imported, the SDKs not yet: it
    warms them up when told the mesh is up, and says so."""
    from tron.services.daemon import unixline

    with _fork_server(tmp_path, {"TRON_SDKS": "ollama", "TRON_TEST_WARM_UP_DELAY": "1"}) as (sock, server):
        first = server.first_ping  # within ~50 ms of ready: untold, it waits 5 s without a request
        assert first["warm"] is False
        assert unixline.ask(sock, {"op": "warm_up"}, timeout=30)["ok"] is True
        warm = wait_for(lambda: (p := _ping(sock, timeout=30)) and p["warm"] and p, 60, "the warm-up")
        assert warm["pid"] == first["pid"] and warm["modules"] > first["modules"]  # the SDK came in after
        record = _said(tmp_path, "fork server warm")
        assert record is not None and record["seconds"] >= 1  # the test knob's delay is in it
        assert _said(tmp_path, "fork server warming up")["sdks"] == ["ollama"]


def test_a_mesh_that_asks_for_llm_advice_gets_a_fork_server_warm_from_the_start(tmp_path):
    """Its parents must answer within advice_timeout: no room there for an SDK import."""
    from tron.common.config import MeshConfig
    from tron.common.paths import Home
    from tron.services.daemon.spawner import fork_server_env

    services = {"a": {"role": "programmer", "port": 7001}}
    for advice, before_ready in ((True, "1"), (False, "0")):
        config = MeshConfig.model_validate({"services": services, "policy": {"llm_advice": advice}})
        assert fork_server_env(config, Home(tmp_path))["TRON_WARM_BEFORE_READY"] == before_ready
    with _fork_server(tmp_path, {"TRON_SDKS": "ollama", "TRON_WARM_BEFORE_READY": "1"}) as (sock, server):
        assert server.first_ping["warm"] is True


def test_a_spawn_asked_during_the_warm_up_is_served_once_it_is_over(tmp_path):
    """A request that comes while the server imports the SDKs (here untold: nothing asked for
    a while) waits in the backlog and is served after: nothing is lost (the daemon's
    deadline covers a warm-up too slow for it)."""
    import datetime

    from tron.services.daemon import unixline

    # untold: the warm-up starts after 1 s without a request here (the test knob; 5 s shipped)
    with _fork_server(tmp_path, {"TRON_TEST_WARM_UP_DELAY": "3", "TRON_TEST_WARM_UNASKED": "1"}) as (sock, server):
        wait_for(lambda: _said(tmp_path, "fork server warming up"), 60, "the warm-up to start")
        r, w = os.pipe()
        try:
            answer = unixline.ask(sock, {"op": "spawn", "module": "calendar", "env": {"PATH": os.defpath},
                                         "cwd": str(tmp_path), "log": "", "log_pipe": True, "cgroup": []},
                                  timeout=60, fds=(w,))
        finally:
            os.close(w)
        assert answer and answer["ok"], answer
        with os.fdopen(r, "rb") as out:  # the child ran: the calendar, then EOF when it exited
            assert str(datetime.date.today().year).encode() in out.read()
        assert _said(tmp_path, "fork server warm") is not None  # it was answered after the warm-up
        assert _ping(sock)["warm"] is True


def test_agents_forked_before_the_warm_up_import_their_sdk_off_the_loop_at_their_first_call(mesh_factory):
    """The fork server's warm-up held back (the test knob: it sleeps first), so the agents it
    forks have no SDK: a run through the gateway still succeeds, each agent that calls the
    LLM importing its SDK in a thread at its first call, and TRON hears its beats meanwhile
    (no alert of any kind)."""
    m = mesh_factory()
    m.env["TRON_TEST_WARM_UP_DELAY"] = "600"
    m.up()
    fs = m.status()["fork_server"]
    assert fs["ready"] and fs["warm"] is False
    # The programmers call the LLM in every run; forked cold (a spawn the warm-up held up past
    # its deadline would be plain, and import its SDK as it starts: not what is tested here).
    cold = {name: m.service(name)["pid"] for name in ("programmer-1", "programmer-2")
            if spawn_modes(m, name) == ["fork"]}
    assert cold, "no programmer was forked"
    assert not any(_has_sdk(pid) for pid in cold.values())
    assert m.tron("run", "forked cold").returncode == 0
    assert m.status()["fork_server"]["warm"] is False  # still sleeping: the agents imported their own
    assert all(_has_sdk(pid) for pid in cold.values())  # the same processes, not replacements
    assert m.rows("SELECT agent, reason FROM alerts") == []


def _no_heir_until(m, deadline: float) -> None:
    """The fork server's status says no heir and the first generation at every look until
    ``deadline`` (time.monotonic())."""
    while time.monotonic() < deadline:
        fs = m.status()["fork_server"]
        assert fs["heir"] is None and fs["generation"] == 1 and not fs["warm"], fs
        time.sleep(0.2)


def test_a_warm_heir_takes_over_so_that_no_restart_waits_for_the_sdk_import(mesh_factory):
    """WARM_AFTER_UP s after the mesh is up (not at once: the agents forked cold import their
    SDK then, and the first task runs), a second server imports the SDKs (held 6 s more by the
    test knob) while the first goes on forking: an agent killed meanwhile is forked at once by
    the cold server, not held in a backlog behind the import. Then the warm heir serves, on its
    own socket, and the cold server retires: it exits and its socket is gone."""
    m = mesh_factory()
    m.env["TRON_TEST_WARM_UP_DELAY"] = "6"
    # the heir starts 5 s after up here (10 s shipped): none seen for the first 3 s of them
    m.env["TRON_TEST_WARM_AFTER_UP"] = "5"
    m.up()
    _no_heir_until(m, time.monotonic() + 3.0)
    fs = wait_for(lambda: (s := m.status()["fork_server"])["heir"] and s, 30, "an heir warming up")
    assert fs["ready"] and not fs["warm"]
    old = m.service("programmer-1")
    m.kill("programmer-1")
    fresh = m.wait_replaced("programmer-1", old["pid"])
    assert m.status()["fork_server"]["heir"] == fs["heir"]  # still importing: the cold server forked it
    assert spawn_modes(m, "programmer-1") == ["fork", "fork"] and not _has_sdk(fresh["pid"])

    warm = wait_for(lambda: (s := m.status()["fork_server"])["warm"] and s, 120, "the heir to take over")
    assert warm["pid"] == fs["heir"] and warm["heir"] is None and warm["generation"] == fs["generation"] + 1
    assert warm["socket"] != fs["socket"]
    wait_for(lambda: not psutil.pid_exists(fs["pid"]) or psutil.Process(fs["pid"]).status() == psutil.STATUS_ZOMBIE
             or None, 30, "the cold server to retire")
    assert not os.path.exists(fs["socket"])
    # what is forked from now on has the SDK from the start
    m.kill("programmer-1")
    again = m.wait_replaced("programmer-1", fresh["pid"])
    assert _has_sdk(again["pid"])
    assert m.rows("SELECT agent, reason FROM alerts WHERE agent != 'programmer-1'") == []


def _has_sdk(pid: int) -> bool:
    """Whether the anthropic SDK is loaded in the process: its jiter extension is mapped (the
    fork server's preload has no use for it)."""
    return any("jiter" in m.path for m in psutil.Process(pid).memory_maps())


def test_an_incarnation_finds_the_message_schemas_built(tmp_path):
    """The message models build their schemas at first use (the CLI parses few of them); an
    incarnation forked from the server must not build them again at its start (Beat's alone
    was 4-10 ms of a restart): the server built them all once."""
    (tmp_path / "mods").mkdir()
    (tmp_path / "mods" / "schema_probe.py").write_text(
        "from tron.common import models\n"
        "todo, unbuilt = list(models.Msg.__subclasses__()), []\n"
        "while todo:\n"
        "    m = todo.pop(); todo.extend(m.__subclasses__())\n"
        "    unbuilt += [] if m.__pydantic_complete__ else [m.__name__]\n"
        "print('unbuilt:', ','.join(sorted(unbuilt)) or 'none', 'of', len(models.Msg.__subclasses__()))\n")
    log = tmp_path / "probe.log"
    with _fork_server(tmp_path, env={"PYTHONPATH": str(tmp_path / "mods")}) as (sock, server):
        from tron.services.daemon import unixline

        answer = unixline.ask(sock, {"op": "spawn", "module": "schema_probe", "env": {"PATH": os.defpath},
                                     "cwd": str(tmp_path), "log": str(log), "cgroup": []}, timeout=30)
        assert answer and answer["ok"], answer
        said = wait_for(lambda: "unbuilt:" in (log.read_text() if log.exists() else "") and log.read_text(), 30,
                        "the forked probe's line")
        assert "unbuilt: none of" in said, said


def test_a_spawn_with_a_channel_hands_the_service_its_end_of_it(tmp_path):
    """With "channel": true the last descriptor sent is the service's beat channel
    (services/daemon/beat_channel.py): the service finds it at the fd TRON_BEAT_FD names, not
    inherited by what it runs, and not taken for its listening socket."""
    import socket

    from tron.services.daemon import unixline

    log = tmp_path / "probe.log"
    with _fork_server(tmp_path) as (sock, server):
        ours, theirs = socket.socketpair()
        listener = socket.create_server(("127.0.0.1", 0))
        try:
            answer = unixline.ask(sock, {"op": "spawn", "module": "tests.integration.standby_probe",
                                         "env": {"PATH": os.defpath, "PROBE": "spawned"}, "cwd": str(REPO),
                                         "log": str(log), "cgroup": [], "channel": True}, timeout=30,
                                  fds=(listener.fileno(), theirs.fileno()))
            assert answer and answer["ok"], answer
            theirs.close()
            ours.settimeout(30)
            said = ours.recv(1 << 16).decode()
        finally:
            ours.close()
            listener.close()
        assert said == "channel at fd 4, inheritable False, SIGPIPE ignored\n"  # after the listening socket at fd 3
        wait_for(lambda: "probe spawned" in (log.read_text() if log.exists() else ""), 30, "the probe's line")


def _anon_huge_kb(pid: int) -> int:
    """KiB of ``pid``'s memory mapped as whole huge pages (those it never wrote into)."""
    for line in open(f"/proc/{pid}/smaps_rollup"):
        if line.startswith("AnonHugePages:"):
            return int(line.split()[1])
    return 0


def _in_huge_pages_kb(pid: int) -> int:
    """KiB of ``pid``'s private anonymous memory that lies in huge pages, mapped whole or not
    (a child's write splits its own mapping of one, and the rest stays shared): each present
    page's frame looked up in /proc/kpageflags (KPF_THP, bit 22; root only)."""
    from tron.services.daemon.hugepages import ranges

    page, found = os.sysconf("SC_PAGE_SIZE"), 0
    with open(f"/proc/{pid}/maps") as f:
        spans = ranges(f.read())
    with open(f"/proc/{pid}/pagemap", "rb") as pagemap, open("/proc/kpageflags", "rb") as flags:
        for lo, hi in spans:
            pagemap.seek(lo // page * 8)
            entries = pagemap.read((hi - lo) // page * 8)
            for at in range(0, len(entries), 8):
                entry = int.from_bytes(entries[at:at + 8], "little")
                if entry >> 63 and (pfn := entry & ((1 << 55) - 1)):
                    flags.seek(pfn * 8)
                    found += int.from_bytes(flags.read(8), "little") >> 22 & 1
    return found * page // 1024


@pytest.mark.parametrize("setting", ["shipped", "off"])
def test_an_incarnation_shares_the_fork_servers_heap_in_huge_pages(tmp_path, setting):
    """The server's frozen heap is rewritten in huge pages before it forks (hugepages.py), and
    a child shares those frames: its fork and its death (torn down before its pidfd says it
    died) cost the kernel about half. ``TRON_FORK_HUGE_PAGES=0`` leaves it in 4 KiB pages.
    Where the kernel cannot, the server says why."""
    from tron.services.daemon import unixline

    env = {"TRON_FORK_HUGE_PAGES": "0"} if setting == "off" else {}
    with _fork_server(tmp_path, env) as (sock, server):
        said = server.first_ping["huge_pages"]
        if setting == "off":
            assert said is None and _said(tmp_path, "fork server heap in huge pages") is None
        elif said.get("unavailable"):  # said as it is (THP never, a kernel before 6.1, ...)
            assert said["mb"] == 0 and _said(tmp_path, "fork server heap in huge pages")["unavailable"]
            pytest.skip(f"this machine has no huge pages for the fork server: {said['unavailable']}")
        else:
            assert said["mb"] >= 4 and "unavailable" not in said, said
            assert _said(tmp_path, "fork server heap in huge pages")["mb"] == said["mb"]
        answer = unixline.ask(sock, {"op": "spawn", "module": "tests.integration.standby_probe",
                                     "env": {"PATH": os.defpath, "PROBE": "huge", "PROBE_STAY": "1"},
                                     "cwd": str(REPO), "log": str(tmp_path / "child.log"), "cgroup": []}, timeout=30)
        assert answer and answer["ok"], answer
        child = psutil.Process(answer["pid"])
        try:
            log = tmp_path / "child.log"
            wait_for(lambda: log.exists() and "probe huge" in log.read_text(), 30, "the child running")
            if os.geteuid() != 0:
                pytest.skip("which frames are huge pages is for root to read (/proc/kpageflags)")
            if setting == "off":
                if "[always]" not in open("/sys/kernel/mm/transparent_hugepage/enabled").read():
                    assert _anon_huge_kb(server.pid) == 0 and _in_huge_pages_kb(child.pid) == 0
            else:
                # The server maps them whole (but where its own writes since its first fork
                # split its mapping); the child shares the frames, through 4 KiB entries once
                # its writes split its mappings: most of what was collapsed is still the
                # server's huge frames in the child (~97% here: its writes copied a few pages).
                assert _anon_huge_kb(server.pid) > 0
                assert _in_huge_pages_kb(child.pid) >= said["mb"] * 1024 // 2
        finally:
            child.kill()
            child.wait(timeout=30)
