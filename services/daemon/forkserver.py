"""The fork server: agents restart in milliseconds instead of seconds.

An agent's cold start is dominated by imports (``import anthropic`` alone is ~1.7 s
here). The fork server imports the agent code and its dependencies once, then forks a
new incarnation on request, as multiprocessing's forkserver and Android's zygote do.

What must not cross a fork never exists in it: no threads, no event loop, no database
handle, no socket but its own control socket (closed in the child). Each incarnation
gets its own environment (identity, config path, provider, token file), its own log
file and its own session; it reads its config and token after the fork, exactly as a
fresh spawn does.

Process tree: the server double-forks, and the intermediate exits at once, so the agent
is reparented to the nearest subreaper, the daemon (``PR_SET_CHILD_SUBREAPER``): the
daemon reaps it and gets its real exit status, as for a plain spawn. The intermediate,
not the server, answers with the pid: the server forks once per request and takes the
next, so a crash wave's incarnations are forked one after another in a few ms each.

Once its heap is built (before it is ready, and again after the warm-up) the server freezes it
for the collector and has the kernel rewrite it in huge pages (hugepages.py): an incarnation
then shares it in far fewer, larger pages, which its fork copies and its death tears down (a
killed agent is known dead only once that is done).

Before each fork the server checks that no source file it imported has changed (a stat of
each once inotify says anything in their directories changed: sourcewatch.py); if one has,
it answers ``stale`` and exits, and the daemon spawns plainly and starts a new server. A
dead server is replaced the same way.

The server is ready (it answers and forks) once the agent code is imported, before the LLM
SDKs: those (1-2 s of imports) would otherwise sit on the path of every agent's first
start. Once the mesh is up (on a Ray node: 2 s after the node agent's setup), the daemon
tells this server an heir will warm (``heir_warms``), and ``WARM_AFTER_UP`` s later
(spawner.py: not beside the mesh's first work) starts it: a second server, on a socket of
its own, with ``TRON_WARM_BEFORE_READY=1``, which imports them before it is ready, while
this one goes on serving. When the heir answers, the daemon sends its requests there and
this one ``retire``s: it answers what it had queued, then exits. Where no heir can run, the server is told to warm
up itself (``warm_up``), and untold it does so after ``WARM_UNASKED`` s without a
request. It then imports them in its one thread, and
requests that come meanwhile wait in the listen backlog (or the daemon stops waiting at
their deadline and spawns plainly). An agent forked cold imports its SDK at its first LLM
call, in a thread (tron.common.providers.client). A mesh that asks the LLM for advice (a
parent must answer within ``advice_timeout``, which has no room for the import) has its
first server warm before it is ready, too.
``TRON_TEST_WARM_UP_DELAY=S`` (a test knob): the warm-up sleeps S seconds first, as a slow
machine's would take, so a test can fork agents cold or ask for one during the warm-up.

Protocol: one JSON object per line on a Unix socket.
    {"op": "ping"}                                   -> {"ok": true, "pid": ..., "modules": n, "warm": bool,
                                                         "warmth": "cold" | "warm" | "failed",
                                                         "huge_pages": {"mb", "seconds", "unavailable"?} | null}
    {"op": "warm_up"}                                -> {"ok": true, "warm": bool}, then the warm-up
    {"op": "heir_warms"}                             -> {"ok": true}; it no longer warms up untold
    {"op": "retire"}                                 -> {"ok": true, "retiring": true}, then it exits
    {"op": "check_code"}                             -> {"ok": true} | {"ok": false, "error", "stale"} (and it exits)
    {"op": "spawn", "module", "env", "cwd", "log", "cgroup": [procs files], "open_files", "deadline"}
                                                     -> {"ok": true, "pid": ...} | {"ok": false, "error", "stale"}
    {"op": "standby", "cgroup": [procs files], "config": mesh file, "service": name, "deadline"}
                                                     -> {"ok": true, "pid": ...} | {"ok": false, "error"}
"deadline" (CLOCK_MONOTONIC seconds, optional): past it the server forks nothing, since the
daemon no longer waits for the answer.

A standby is a forked gate (gate.py's, for an agent): forked now, it joins the cgroup of the
service's next incarnation (the kernel's grace period for that move, 5-15 ms, is paid here,
off the restart path) and makes its own session, then waits on the same connection for the
spawn's line ({"module", "env", "cwd", "log", "log_pipe", "open_files", "channel"}, descriptors
as for a spawn). It answers that line {"ok": true} and becomes the service (the same pid), or
{"ok": false, "stale": true} and exits when a source file changed since the server read it.
With "channel": true it keeps the connection, and the service beats on it instead of
``POST /beat`` (``BEAT_FD``; services/daemon/beat_channel.py); a spawn with "channel": true
sends the service's end of a socket pair as its last descriptor, for the same use.
The daemon closing the connection ends it: it never runs a service nobody asked for. While it
waits it has rehearsed its start (``_rehearse``): for a built-in role ("service" names it), its
application built for a stand-in incarnation, so the pages an agent's start touches are copied
before the restart, not on its path.
A spawn may carry descriptors (SCM_RIGHTS): first, with "log_pipe": true, the log pump's
pipe (the child's stdout and stderr, instead of opening "log"); then the service's
listening socket, which the child gets at fd 3 with LISTEN_PID set to its own pid (the
daemon sets LISTEN_FDS).
"""

from __future__ import annotations

import contextlib
import fcntl
import gc
import importlib
import json
import os
import random
import runpy
import select
import signal
import socket
import sys
import time
from collections.abc import Mapping
from pathlib import Path

from tron.common import environ as environ_snapshot  # os only
from tron.services.daemon import unixline  # json and socket only: nothing heavy before the path check
from tron.services.daemon.sourcewatch import SourceWatch  # ctypes and select only

REPO = Path(__file__).resolve().parents[2]
# The LLM SDKs are not listed: warm_up() imports those of the mesh's providers (the registry in
# tron.common.providers says which modules each needs).
PRELOAD = [
    "aiohttp", "aiohttp.web", "pydantic", "psutil", "setproctitle",
    "tron.common.agent", "tron.common.agent_runtime", "tron.common.ladder_parent", "tron.sdk", "tron.common.service",
    "tron.common.providers",
    "tron.common.prompts",
    "tron.services.gateway.app", "tron.services.root.app", "tron.services.architect.app", "tron.services.director.app",
    "tron.services.programmer.app", "tron.services.llm_sim.app", "tron.services.agent_host.app",
]


def server_sdks(env: Mapping[str, str] | None = None) -> set[str]:
    """The SDKs a fork server with this environment (its own by default) warms up: the
    mesh's providers' (``TRON_SDKS``, set by the daemon from the provider chain and the
    services' own providers, none for a mesh without agents); every one when it is not said."""
    from tron.common.providers import SDKS

    said = (os.environ if env is None else env).get("TRON_SDKS")
    return set(SDKS) if said is None else {s for s in said.split(",") if s in SDKS}


# Whether anything in the sources' directories changed since they were read: a check that is
# one select() until something did (sourcewatch.py), inherited by every child.
_watch = SourceWatch()


def _own_sources() -> dict[str, float]:
    """Source files of the repo's own modules that are loaded, with their mtimes (their
    directories watched first)."""
    paths = [path for mod in list(sys.modules.values()) if (path := getattr(mod, "__file__", None))
             and path.startswith(str(REPO)) and "/.venv/" not in path]
    _watch.watch(paths)
    out = {}
    for path in paths:
        try:
            out[path] = os.stat(path).st_mtime
        except OSError:
            out[path] = -1.0
    return out


def _stale(sources: dict[str, float]) -> str | None:
    if _watch.quiet():
        return None
    for path, mtime in sources.items():
        try:
            if os.stat(path).st_mtime != mtime:
                return path
        except OSError:
            return path
    return None


def _stale_reply(sources: dict[str, float]) -> dict | None:
    """The answer that refuses a spawn when a source file changed since the server read it."""
    changed = _stale(sources)
    return None if changed is None else {"ok": False, "stale": True,
                                         "error": f"{changed} changed since the fork server started"}


def _become_service(req: dict, fds: list[int], *, entered: bool = False, channel: int | None = None) -> None:
    """In the new incarnation: a fresh session (``entered``: a standby has it, and its
    cgroup, already), its own stdio, environment and cwd, then run the role module as
    __main__. ``channel``: its beat channel to the daemon (a standby's kept connection;
    for a spawn, the last descriptor sent), at ``BEAT_FD``. Never returns."""
    code = 1
    try:
        if not entered:
            _enter(req.get("cgroup") or ())
        if channel is None and req.get("channel") and fds:  # a spawn's: the last descriptor sent
            channel = fcntl.fcntl(fds[-1], fcntl.F_DUPFD_CLOEXEC, CHANNEL_PARKED)
            os.close(fds[-1])
            fds = fds[:-1]
        code = _run_service(req, fds, channel)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:
        import traceback

        traceback.print_exc()
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


def _enter(cgroup: list[str] | tuple[str, ...]) -> None:
    """Its incarnation's cgroup (before anything of the service runs) and a session of its own."""
    for procs in cgroup:
        with open(procs, "w") as f:
            f.write(str(os.getpid()))
    os.setsid()


def _run_service(req: dict, fds: list[int], channel: int | None = None) -> int:
    """In the cgroup and session already: the limits, stdio, environment and cwd, then the
    role module as __main__. ``channel`` goes to the fd after the listening socket's, named
    by ``BEAT_FD``. Returns its exit code (0 when it returns); raises SystemExit."""
    if req.get("open_files"):
        import resource

        resource.setrlimit(resource.RLIMIT_NOFILE, (req["open_files"], req["open_files"]))
    # Before the environment is replaced: setproctitle reuses the environ area.
    _set_title(f"{req['module']} [tron {req['env'].get('TRON_SERVICE', '?')}]")
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD):
        signal.signal(sig, signal.SIG_DFL)
    # As a fresh interpreter has it (what a plain spawn runs): a write to a connection whose other
    # end is gone is an error (EPIPE), not the end of the agent; subprocess restores the default
    # for the programs it runs. A dead daemon's end of the beat channel is such a connection.
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    if req.get("log_pipe"):  # the log pump's pipe (services/daemon/logpump.py) comes first
        log, fds = fds[0], fds[1:]
    else:
        log = os.open(req["log"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.dup2(log, 1)
    os.dup2(log, 2)
    # The server's stdout is block-buffered (it is not a terminal): a log line that
    # waits in a buffer is lost when the agent is SIGKILLed. Write through, as a
    # plain spawn with PYTHONUNBUFFERED does.
    sys.stdout.reconfigure(line_buffering=True, write_through=True)
    sys.stderr.reconfigure(line_buffering=True, write_through=True)
    if fds:  # the daemon's listening socket, at fd 3 as systemd hands it over
        os.dup2(fds[0], LISTEN_FD)
        os.set_inheritable(LISTEN_FD, True)
    first_free = LISTEN_FD + 1 if fds else LISTEN_FD
    if channel is not None:  # not inherited by what the agent runs: it is this process's only
        os.dup2(channel, first_free, inheritable=False)
        first_free += 1
    os.closerange(first_free, 65536)  # the control socket and the rest of ours
    env = dict(req["env"])
    if fds:
        env["LISTEN_PID"] = str(os.getpid())
    if channel is not None:
        env[BEAT_FD] = str(first_free - 1)
    _replace_environ(env)
    os.chdir(req["cwd"])
    random.seed()  # the server's random state must not be shared by every incarnation
    sys.argv = [req["module"]]
    runpy.run_module(req["module"], run_name="__main__", alter_sys=True)
    return 0


def _replace_environ(new: Mapping[str, str]) -> None:
    """``os.environ`` becomes ``new`` (the incarnation's whole environment), with only the
    variables that differ unset or set: most of it is the server's already, and each putenv is
    a few microseconds on the restart's path, and a page copied. It is compared with what
    ``environ.current()`` holds, decoded once (a standby decodes it ahead, while it waits):
    each read of ``os.environ`` encodes or decodes, and the comparison through it was a tenth
    of a standby's CPU from its hand-over to its first beat."""
    now = environ_snapshot.current()
    for key in now.keys() - new.keys():
        del os.environ[key]
    for key, value in new.items():
        if now.get(key) != value:
            os.environ[key] = value
    environ_snapshot.adopt(new)  # what the incarnation reads of it first is not decoded again


def _stand_by(req: dict, conn: socket.socket, sources: dict[str, float]) -> None:
    """In a standby: enter the next incarnation's cgroup and a session now, then wait for
    the spawn's line on ``conn`` and become that service. Never returns."""
    code = 0
    try:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        _enter(req.get("cgroup") or ())
        _rehearse(req.get("config"), req.get("service"))
        environ_snapshot.current()  # decoded now, compared with the incarnation's at the hand-over (_replace_environ)
        line, fds = unixline.receive(conn, 4)
        if not line.endswith(b"\n"):
            return  # the daemon gave this standby up (or went away): run nothing
        go = json.loads(line)
        stale = _stale_reply(sources)
        if stale is not None:
            conn.sendall(json.dumps(stale).encode() + b"\n")
            return
        channel = None
        if go.get("channel"):  # the daemon reads the beats here (BEAT_FD): kept, above the fds it may take
            try:
                channel = fcntl.fcntl(conn.fileno(), fcntl.F_DUPFD_CLOEXEC, CHANNEL_PARKED)
            except OSError:  # no descriptor that high (a low open-files limit): it beats over HTTP
                channel = None
        conn.sendall(b'{"ok": true}\n')
        conn.close()
    except BaseException:
        code = 1
    else:
        _become_service(go, fds, entered=True, channel=channel)
    finally:
        os._exit(code)


def _rehearse(config: str | None, service: str | None = None) -> None:
    """In a standby, before it waits: what every agent does first, done ahead and without
    effects outside this process (its mesh file read and validated for its load_mesh, an
    event loop run, an HTTP app that serves itself a POST and a GET on a loopback port of
    its own, a log line formatted; for a built-in role, its own application built and its
    first beat's message made, for a stand-in incarnation). The memory pages this touches
    are copied from the server now, off the restart's path, not after the restart hands
    the standby its spawn."""
    try:
        import asyncio

        import aiohttp
        from aiohttp import web

        if config:
            from tron.common.config import preload_mesh

            preload_mesh(config)

        async def health(request: web.Request) -> web.Response:
            if request.can_read_body:
                await request.json()
            return web.json_response({"ok": True})

        async def rehearsal() -> None:
            # One request of each kind an agent's start makes first (its first beat, a POST
            # of JSON; the daemon's GET /health), served to itself on a loopback port of
            # its own that is closed again at once.
            app = web.Application()
            app.router.add_get("/health", health)
            app.router.add_post("/health", health)
            runner = web.AppRunner(app, access_log=None, handle_signals=False)
            await runner.setup()
            try:
                site = web.TCPSite(runner, "127.0.0.1", 0)
                await site.start()
                port = runner.addresses[0][1]
                async with aiohttp.ClientSession() as session:
                    for method in ("POST", "GET"):
                        async with session.request(method, f"http://127.0.0.1:{port}/health",
                                                   json={"seq": 0} if method == "POST" else None) as answer:
                            await answer.json()
            finally:
                await runner.cleanup()

        loop = asyncio.new_event_loop()
        try:
            loop.run_until_complete(rehearsal())
        finally:
            loop.close()
        import logging

        from tron.common.logs import JsonFormatter

        JsonFormatter().format(logging.LogRecord("tron.service", logging.INFO, __file__, 0, "serving", (), None))
        if config and service:
            _rehearse_role(config, service)
    except Exception as err:  # a rehearsal is only a head start: the start itself still runs in full
        print(json.dumps({"msg": "standby rehearsal failed", "error": f"{type(err).__name__}: {err}"}), flush=True)


# The built-in roles whose application a standby builds ahead (agent_host loads a user's
# class from its environment, which a standby does not have yet).
ROLE_APPS = {f"tron.services.{r}": f"tron.services.{r}.app" for r in ("gateway", "root", "architect", "director",
                                                                      "programmer")}


def _rehearse_role(config: str, service: str) -> None:
    """The role's application built for a stand-in incarnation of ``service`` and dropped:
    its routes compiled, its agent and runtime made, a beat made and encoded. Nothing is
    started, served or sent."""
    from tron.common import logs
    from tron.common.config import load_mesh, preload_mesh
    from tron.common.models import Beat
    from tron.common.service import ServiceContext, ServiceEnv

    mesh = load_mesh(config)  # the read-ahead copy, handed out once: the incarnation gets one of its own
    preload_mesh(config)
    spec = mesh.services.get(service)
    app_module = ROLE_APPS.get(spec.module) if spec is not None and spec.is_agent else None
    if spec is None or app_module is None:
        return
    env = ServiceEnv(service=service, role=spec.role, port=spec.port, incarnation="i-standby", home=Path("/nonexistent"),
                     daemon_url="http://127.0.0.1:9", token_file=Path("/nonexistent"), config=config)
    logs.setup(service, incarnation=env.incarnation)  # its levels set ahead: the real setup changes none
    ctx = ServiceContext(env, mesh, "standby")
    app = importlib.import_module(app_module).make_app(ctx)
    app.router.freeze()
    Beat(service=service, incarnation=env.incarnation, pid=os.getpid(), seq=0).model_dump(mode="json")


def _set_title(title: str) -> None:
    """A forked process keeps the server's command line; `ps` should name the agent."""
    try:
        from setproctitle import setproctitle
    except ImportError:
        return
    setproctitle(title)


def _fork(req: dict, fds: list[int], conn: socket.socket, standby: dict[str, float] | None = None) -> None:
    """Fork the intermediate, which forks the service, answers the daemon on ``conn`` with
    its pid and leaves. The server goes back to ``accept`` after one fork: the second
    fork, the answer and the intermediate's exit (tearing down a copy of this whole
    address space, ~15 ms here) overlap the next request instead of queueing it. With
    ``standby`` (the server's sources), the service is a standby that keeps ``conn``. Raises
    OSError when the first fork fails (the server answers that one)."""
    if os.fork() != 0:
        return
    code = 0
    try:  # intermediate
        try:
            pid = os.fork()
        except OSError as err:
            reply = {"ok": False, "error": f"fork failed: {err}"}
        else:
            if pid == 0:
                if standby is not None:
                    _stand_by(req, conn, standby)
                conn.close()
                _become_service(req, fds)
            reply = {"ok": True, "pid": pid}
        conn.sendall(json.dumps(reply).encode() + b"\n")
    except BaseException:
        code = 1
    finally:
        os._exit(code)


PR_SET_PDEATHSIG = 1


def _die_with(parent: int) -> None:
    """The fork server is the daemon's helper and must not outlive it (the agents it
    forked must, and do: the kernel clears this setting in every fork)."""
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    if os.getppid() != parent:  # the daemon died before we asked
        sys.exit(0)


SOCKET_PATH_MAX = 107  # sun_path is 108 bytes with its NUL
CANNOT_RUN = 3  # an exit code the daemon does not retry: a new launch would fail the same way
LISTEN_FD = 3  # where a held listening socket goes in the child (systemd's SD_LISTEN_FDS_START)
# A standby asked for it (the spawn line's "channel") keeps its connection to the daemon, a spawn
# gets one sent, and the service finds it at the fd this variable names: it beats there, not over
# HTTP (common/service.py; the daemon's side: services/daemon/beat_channel.py).
BEAT_FD = "TRON_BEAT_FD"
CHANNEL_PARKED = 100  # where it waits meanwhile: clear of stdio, the listening socket and the fds received


# setproctitle must not write the title over the environ area: forked agents keep the
# server's /proc environ, whose TRON_MESH is how leak checks find a home's processes. Set in
# the server alone, never at import: the daemon imports this module too, and whatever is in
# its environment reaches every program it starts. An incarnation's environment replaces the
# server's (_replace_environ) after its title is set, so no agent sees it either.
SPT_NOENV = "SPT_NOENV"


def serve(sock_path: str, parent: int | None = None) -> int:
    os.environ[SPT_NOENV] = "1"  # before setproctitle is first used (PRELOAD imports it; a child calls it)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    if parent:
        _die_with(parent)
    # Checked before the slow imports: a path that cannot be bound never will be.
    if len(os.fsencode(sock_path)) > SOCKET_PATH_MAX:
        print(json.dumps({"msg": "fork server cannot run: socket path too long",
                          "path": sock_path, "limit": SOCKET_PATH_MAX}), flush=True)
        return CANNOT_RUN
    for name in PRELOAD:  # after the path check: nothing heavy before it
        importlib.import_module(name)
    from tron.common.models import build_all

    build_all()  # the messages' schemas, deferred for the CLI, built once here for every incarnation
    from tron.common.providers import defer_sdks

    defer_sdks()  # what is forked before the warm-up imports its SDK at its first LLM call
    # The LLM SDKs come later (_warm_up), once the first agents are forked.
    if os.environ.get("TRON_TRACES") == "1":  # the mesh exports traces: every agent sets the SDK up at start
        from tron.common import telemetry

        telemetry.preload()
    sources = _own_sources()
    if os.environ.get("TRON_WARM_BEFORE_READY") == "1":  # the daemon's choice (fork_server_env): the old order
        _warm_up(sources)
    else:
        _settle_heap()
    try:
        os.unlink(sock_path)
    except FileNotFoundError:
        pass
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        server.bind(sock_path)
    except OSError as err:
        print(json.dumps({"msg": "fork server cannot run: bind failed", "error": str(err)}), flush=True)
        return CANNOT_RUN
    os.chmod(sock_path, 0o600)
    server.listen(256)  # a crash wave asks for many incarnations at once
    # The intermediates exit on their own and nobody here waits for them: the kernel reaps
    # them (each incarnation sets SIGCHLD back to the default before it runs). Only from
    # here: the imports above may run a subprocess and wait for it (the warm-up sets it back).
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)
    print(json.dumps({"msg": "fork server ready", "pid": os.getpid(), "modules": len(sys.modules),
                      "source_check": _watch.how}), flush=True)
    last_asked, told, waived = time.monotonic(), False, False
    while True:
        while _warmth == "cold":  # serve what comes; warm up when told, or once nothing has come for a while
            due = _warm_up_in(time.monotonic(), last_asked, told, waived)
            if due is not None and due <= 0:
                _warm_up(sources)
            elif select.select([server], [], [], due)[0]:
                break
        conn, _ = server.accept()
        fds: list[int] = []
        with conn:
            try:
                line, fds = unixline.receive(conn, 4)
            except OSError:
                continue
            try:
                req = json.loads(line) if line else None
            except json.JSONDecodeError as err:
                reply = {"ok": False, "error": f"bad request: {err}"}
            else:
                op = req.get("op") if isinstance(req, dict) else None
                told = told or op == "warm_up"
                waived = waived or op == "heir_warms"
                if op != "ping":  # the daemon pings until the server is warm: that is no work coming
                    last_asked = time.monotonic()
                reply = _handle(req, sources, fds, conn) if req is not None else \
                    {"ok": False, "error": "empty request"}
            finally:
                for fd in fds:  # the children have their copies
                    os.close(fd)
            if reply is None:  # a spawn: the intermediate answers with the pid
                continue
            try:
                conn.sendall(json.dumps(reply).encode() + b"\n")
            except OSError:
                pass
            if reply.get("stale"):
                print(json.dumps({"msg": "fork server out of date, exiting", "changed": reply["error"]}), flush=True)
                return 0
            if reply.get("retiring"):  # what was queued before this request was answered first
                print(json.dumps({"msg": "fork server retired: a warm heir serves now"}), flush=True)
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(sock_path)
                return 0


WARM_UNASKED = 5.0  # s without a request after which the server warms up untold (a node agent never tells)
WARM_UNASKED_KNOB = "TRON_TEST_WARM_UNASKED"  # a test knob: a shorter wait than WARM_UNASKED
WARM_UP_DELAY = "TRON_TEST_WARM_UP_DELAY"  # a test knob: the warm-up sleeps this many seconds first
HUGE_PAGES = "TRON_FORK_HUGE_PAGES"  # "0": the heap stays in 4 KiB pages (a benchmark's baseline)

_warmth = "cold"  # -> "warm" | "failed" (the SDKs could not be imported here: agents import their own)
_huge_pages: dict | None = None  # what the last _settle_heap() put in huge pages (hugepages.Collapsed.log_fields)


def _warm_up_in(now: float, last_asked: float, told: bool, waived: bool = False) -> float | None:
    """Seconds until the SDK warm-up is due (<= 0: now): at once when the daemon said its
    mesh is up (``told``), never when it said an heir warms up instead (``waived``), else
    ``WARM_UNASKED`` after the last request (or ready)."""
    if told:
        return 0.0
    return None if waived else last_asked + float(os.environ.get(WARM_UNASKED_KNOB) or WARM_UNASKED) - now


def _warm_up(sources: dict[str, float]) -> None:
    """Import the LLM SDKs of the mesh's providers (1-2 s each) and what they import on a
    first request, so that every agent forked from now on has them. Requests wait in the
    backlog meanwhile. The new repo modules join ``sources`` (the staleness check) and
    everything imported joins the permanent generation, as the preload did."""
    global _warmth
    from tron.common.providers import warm_up

    started, sdks = time.monotonic(), server_sdks()
    print(json.dumps({"msg": "fork server warming up", "sdks": sorted(sdks)}), flush=True)
    delay = float(os.environ.get(WARM_UP_DELAY) or 0)
    if delay > 0:
        time.sleep(delay)
    # The SDKs' imports and first request may run a subprocess and wait for it: SIGCHLD
    # back to the default meanwhile (an intermediate that exits meanwhile is reaped after).
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    try:
        warm_up(sdks)
    except Exception as err:  # an SDK that cannot be imported: agents import (and report) it themselves
        _warmth = "failed"
        print(json.dumps({"msg": "fork server warm-up failed", "error": f"{type(err).__name__}: {err}"}), flush=True)
    else:
        _warmth = "warm"
    finally:
        signal.signal(signal.SIGCHLD, signal.SIG_IGN)
        _reap_intermediates()
    sources.update({path: mtime for path, mtime in _own_sources().items() if path not in sources})
    _settle_heap()
    if _warmth == "warm":
        print(json.dumps({"msg": "fork server warm", "seconds": round(time.monotonic() - started, 3),
                          "modules": len(sys.modules)}), flush=True)


def _settle_heap() -> None:
    """Make what is imported so far cheap to share with every child forked from now on."""
    global _huge_pages
    # Every object goes to the permanent generation: a child's collections never walk them,
    # so they stay shared pages instead of copies made by reference counts.
    gc.freeze()
    # And in huge pages: a child's fork and its death (the kernel tears its memory down
    # before anyone can know it died) cost the kernel about half (hugepages.py).
    if os.environ.get(HUGE_PAGES, "1") != "0":
        from tron.services.daemon.hugepages import Collapsed, collapse

        try:
            # Before ready it is on `tron up`'s path (~10 ms for the cold heap); the warm-up's is not.
            done = collapse(budget=1.0 if _warmth != "cold" else 0.2)
        except Exception as err:  # an optimisation: the server serves on without it
            done = Collapsed(unavailable=f"{type(err).__name__}: {err}"[:300])
        _huge_pages = done.log_fields()
        print(json.dumps({"msg": "fork server heap in huge pages", **_huge_pages}), flush=True)


def _reap_intermediates() -> None:
    """Reap the intermediates that exited while SIGCHLD was at its default (the server's only
    children: the incarnations are the daemon's)."""
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def _handle(req: dict, sources: dict[str, float], fds: list[int], conn: socket.socket) -> dict | None:
    """The answer to one request; None when a forked process answers it instead."""
    if not isinstance(req, dict):
        return {"ok": False, "error": f"bad request: a JSON object is expected, not {type(req).__name__}"}
    if req.get("op") == "ping":
        return {"ok": True, "pid": os.getpid(), "modules": len(sys.modules), "warm": _warmth == "warm",
                "warmth": _warmth, "huge_pages": _huge_pages}
    if req.get("op") == "warm_up":  # the mesh is up: the server's loop warms up once this is answered
        return {"ok": True, "warm": _warmth == "warm"}
    if req.get("op") == "heir_warms":  # another server imports the SDKs: this one serves on, cold
        return {"ok": True}
    if req.get("op") == "retire":  # a warm heir serves now: exit once this is answered
        return {"ok": True, "retiring": True}
    if req.get("op") == "check_code":  # a standby of ours found the code changed: exit if so (the loop does)
        return _stale_reply(sources) or {"ok": True}
    if req.get("op") not in ("spawn", "standby"):
        return {"ok": False, "error": f"unknown op {req.get('op')!r}"}
    stale = _stale_reply(sources)
    if stale is not None:
        return stale
    deadline = req.get("deadline")
    if isinstance(deadline, (int, float)) and time.monotonic() > deadline:
        return {"ok": False, "error": "the request waited past its deadline: the daemon has stopped waiting"}
    try:
        _fork(req, fds, conn, sources if req["op"] == "standby" else None)
        return None
    except OSError as err:
        return {"ok": False, "error": f"fork failed: {err}"}


if __name__ == "__main__":
    sys.exit(serve(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else None))
