"""Bootstrap shared by every service process: environment, logging, /health, heartbeats.

A service is started by the daemon with its identity in the environment (TRON_SERVICE,
TRON_INCARNATION, TRON_PORT, ...). ``run_service(build)`` reads it, builds the role's
aiohttp app, adds ``GET /health`` and the heartbeat sender, and serves on 127.0.0.1.

The heartbeat is sent from the service's own event loop: if the loop is blocked, the
beats stop, which is exactly what TRON must see.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import os
import signal
import socket
import sys
import time
from pathlib import Path
from typing import Any, Awaitable, Callable, Mapping, cast

from aiohttp import web
from pydantic import BaseModel, ConfigDict

from tron.common import conn_guard, environ, logs, telemetry
from tron.common.clock import Clock, MonotonicClock
from tron.common.config import MeshConfig, load_mesh
from tron.common import credentials
from tron.common.http import AUTH_KEY, TOKEN_KEY, MeshClient, MeshHTTPError
from tron.common.models import Beat
from tron.common.wire import TOKEN_HEADER
from tron.common.paths import read_token

log = logging.getLogger("tron.service")


class ServiceEnv(BaseModel):
    model_config = ConfigDict(frozen=True)

    service: str
    role: str
    port: int
    incarnation: str
    home: Path
    daemon_url: str
    token_file: Path
    config: str = ""
    provider: str | None = None
    heartbeat_interval: float | None = None
    node_pid: int | None = None  # the Tron node agent that started us (Ray placement)
    beat_url: str | None = None  # that node agent's beat relay, which batches its agents' beats to the daemon

    @classmethod
    def from_environ(cls, env: Mapping[str, str] | None = None) -> "ServiceEnv":
        env = environ.current() if env is None else env
        missing = [k for k in ("TRON_SERVICE", "TRON_PORT", "TRON_INCARNATION", "TRON_HOME", "TRON_DAEMON_URL",
                               "TRON_TOKEN_FILE") if not env.get(k)]
        if missing:
            raise SystemExit(f"this service is started by the tron daemon; missing environment: {', '.join(missing)}")
        return cls(service=env["TRON_SERVICE"], role=env.get("TRON_ROLE", ""), port=int(env["TRON_PORT"]),
                   incarnation=env["TRON_INCARNATION"], home=Path(env["TRON_HOME"]),
                   daemon_url=env["TRON_DAEMON_URL"], token_file=Path(env["TRON_TOKEN_FILE"]),
                   config=env.get("TRON_CONFIG", ""), provider=env.get("TRON_PROVIDER") or None,
                   heartbeat_interval=float(env["TRON_HEARTBEAT_INTERVAL"]) if env.get("TRON_HEARTBEAT_INTERVAL")
                   else None,
                   node_pid=int(env["TRON_NODE_PID"]) if env.get("TRON_NODE_PID", "").isdigit() else None,
                   beat_url=env.get("TRON_BEAT_URL") or None)


class ServiceContext:
    """What a role's code gets: identity, config, the token, an HTTP client, and the
    task/progress fields that the heartbeat carries."""

    def __init__(self, env: ServiceEnv, config: MeshConfig, token: str) -> None:
        self.env = env
        self.config = config
        self.token = token  # this incarnation's own credential: sent to the daemon only
        self.client = MeshClient(token, timeout=10)
        self.client.token_for = self._token_for
        self._peer_tokens: dict[str, str] = {}  # service -> a peer token for calling it
        # Services our mesh file does not name, by address, as the daemon told us of them: a
        # replica of a child that `tron scale` added after the file was read (learn_peer).
        self._peer_urls: dict[str, str] = {}
        self.started = time.monotonic()
        self.provider = env.provider
        self.task_id: str | None = None
        self.progress: str | None = None
        self.waiting = False
        self.tasks: list[str] | None = None  # every task id worked on here (an Agent keeps it)
        self.beat_seq = 0
        self.superseded = asyncio.Event()

    @property
    def name(self) -> str:
        return self.env.service

    async def _token_for(self, url: str, fresh: bool = False) -> str | None:
        """Our credential to the daemon; to another of our services a peer token the daemon
        makes for that one (kept until shortly before it expires); to anything else none."""
        if url.startswith(self.env.daemon_url + "/") or url == self.env.beat_url:  # the relay: our node agent's
            return self.token
        target = next((n for n in self.config.services if url.startswith(self.config.url(n) + "/")), None) \
            or next((n for base, n in self._peer_urls.items() if url.startswith(base + "/")), None)
        if target is None:
            return None
        held = None if fresh else self._peer_tokens.get(target)
        if held is None or credentials.peer_expires(held) - 30 < time.time():
            try:
                answer = await self.client.post(self.env.daemon_url + "/auth/peer", {"to": target})
            except MeshHTTPError as err:
                if err.status != 403:
                    raise
                return None  # not one we may call with a token (llm-sim's API needs none)
            held = self._peer_tokens[target] = answer["token"]
        return held

    def learn_peer(self, name: str, url: str) -> None:
        """``name`` listens at ``url`` (the daemon said so): calls there carry a peer token for it."""
        if name not in self.config.services:
            self._peer_urls[url.rstrip("/")] = name

    def peer_caller(self, request: web.Request) -> str | None:
        """Who a request's peer token speaks for, if the daemon made it for this service."""
        return credentials.check_peer(request.headers.get(TOKEN_HEADER), self._inbound, self.name)

    def peer_ok(self, request: web.Request) -> bool:
        """Our endpoints' check (require_token): the daemon and the operator may call any of
        them; another service only what it needs: our parent (or a gateway, for a top-level
        service) hands us tasks, our children escalate to us. A compromised child cannot
        post a result, a cancel or an alert in the daemon's name."""
        caller = self.peer_caller(request)
        if caller is None:
            return False
        services = self.config.services
        if caller not in services:  # "daemon", "operator:NAME", "session:LOGIN": made for the operator
            return True
        me = services.get(self.config.standing_for(self.name) or self.name)  # a replica newer than our file too
        if request.path == "/tasks":
            return me is not None and (me.parent == caller or services[caller].role == "gateway")
        if request.path == "/handle_grandchild_failure":
            return services[caller].parent == self.name
        return False

    @functools.cached_property
    def _inbound(self) -> bytes:
        return credentials.inbound_key(self.token)

    def health(self) -> dict[str, Any]:
        return {
            "status": "ok", "service": self.name, "role": self.env.role, "pid": os.getpid(),
            "incarnation": self.env.incarnation, "uptime": round(time.monotonic() - self.started, 3),
            "task": self.task_id, "progress": self.progress, "provider": self.provider,
        }


HEALTH_KEY = web.AppKey("service_ctx", ServiceContext)


PUBLIC_HEALTH = ("status", "service", "role", "uptime")  # what a load balancer needs


async def _health(request: web.Request) -> web.Response:
    """Public: up, who and for how long. The pid, the incarnation (what the daemon's
    readiness check matches), the task, its progress and the provider only with a peer
    token the daemon made for this service (the daemon's own checks, the CLI, drills)."""
    ctx = request.app[HEALTH_KEY]
    answer = ctx.health()
    if ctx.peer_caller(request) is None:
        answer = {k: answer[k] for k in PUBLIC_HEALTH}
    return web.json_response(answer)


async def heartbeat_loop(ctx: ServiceContext, clock: Clock | None = None,
                         channel: BeatChannel | None = None) -> None:
    """Beat every interval, on a fixed schedule (no drift). The daemon's answer carries
    the current interval (settings change at run time). A 409 means a newer incarnation
    replaced us; a daemon that does not know us at all (404) for ``stale_after`` seconds
    means we are a ghost of an earlier daemon: either way, stop rather than linger.

    Placed by a node agent, the beat goes to its relay (``TRON_BEAT_URL``), which answers
    with the daemon's verdict on our previous beat; a relay that does not answer at all is
    passed by, and the beat goes to the daemon itself.

    ``channel`` (``beat_channel()``): the beats go there, and the daemon answers each there
    as POST /beat would; once it does not, that beat and every later one go over HTTP."""
    clock = clock or MonotonicClock()
    interval = ctx.env.heartbeat_interval or ctx.config.policy.heartbeat_interval
    urls = [u for u in (ctx.env.beat_url, ctx.env.daemon_url + "/beat") if u]
    next_at = clock.now()
    unknown_since: float | None = None
    while True:
        started = clock.now()
        beat = Beat(service=ctx.name, incarnation=ctx.env.incarnation, pid=os.getpid(), seq=ctx.beat_seq,
                    task_id=ctx.task_id, progress=ctx.progress, provider=ctx.provider, waiting=ctx.waiting,
                    tasks=ctx.tasks, spans_dropped=telemetry.dropped() or None)
        ctx.beat_seq += 1
        try:
            answer = None
            if channel is not None:
                answer = await channel.beat(beat, timeout=max(0.5, interval))
                if answer is None:
                    channel = None  # it failed (and is closed): HTTP from now on
            if channel is None:
                answer = await _post_beat(ctx, urls, beat, timeout=max(0.5, interval))
            unknown_since = None
            if isinstance(answer, dict) and isinstance(answer.get("interval"), (int, float)) and answer["interval"] > 0:
                interval = float(answer["interval"])
            if isinstance(answer, dict) and isinstance(answer.get("hosts"), dict):
                ctx.config.hosts.clear()  # where the services placed on other machines run now
                ctx.config.hosts.update({str(k): str(v) for k, v in answer["hosts"].items()})
        except MeshHTTPError as err:
            verdict = err.json().get("verdict")
            if err.status == 409 and verdict == "stale_incarnation":
                log.error("superseded: the daemon no longer knows this incarnation; exiting")
                ctx.superseded.set()
                return
            if err.status == 404 and verdict == "unknown_service":
                unknown_since = unknown_since or clock.now()
                if clock.now() - unknown_since >= ctx.config.policy.stale_after:
                    log.error("the daemon has not known this service for %.0fs: a ghost of an earlier daemon; "
                              "exiting", ctx.config.policy.stale_after)
                    ctx.superseded.set()
                    return
            log.warning("beat rejected: %s", err)
        except (OSError, asyncio.TimeoutError) as err:
            log.debug("beat not delivered (daemon unreachable): %s", err)
        if node_gone(ctx.env.node_pid):
            log.error("the Tron node agent that started this incarnation (pid %s) is gone: its node is lost; "
                      "exiting", ctx.env.node_pid)
            ctx.superseded.set()
            return
        next_at += interval
        if next_at < started:  # this beat went out late (a stalled loop): the schedule restarts from it
            next_at = started + interval
        await clock.sleep(next_at - clock.now())


async def _post_beat(ctx: ServiceContext, urls: list[str], beat: Beat, *, timeout: float) -> object:
    """To the first of ``urls`` that answers at all (an HTTP error is an answer); its
    JSON answer, which the caller checks field by field."""
    for url in urls[:-1]:
        try:
            return await ctx.client.post(url, beat, timeout=timeout)
        except (OSError, asyncio.TimeoutError) as err:
            log.debug("beat relay %s did not answer (%s): beating to the daemon", url, err)
    return await ctx.client.post(urls[-1], beat, timeout=timeout)


CHANNEL = "the daemon (the beat channel)"


def beat_channel() -> BeatChannel | None:
    """Our beat channel, the connection to the daemon we were started with (``TRON_BEAT_FD``,
    services/daemon/beat_channel.py), if any. The variable is removed either way, so a
    program this one starts does not take it."""
    fd = os.environ.pop("TRON_BEAT_FD", "")
    if not fd.isdigit():
        return None
    try:
        sock = socket.socket(fileno=int(fd))
    except OSError:  # not open, or not a socket: not ours to use
        return None
    if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
        sock.detach()  # someone else's descriptor: left as it is
        return None
    sock.setblocking(False)
    return BeatChannel(sock)


class BeatChannel:
    """The agent's end of its beat channel (services/daemon/beat_channel.py)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock, self.buf = sock, b""

    async def beat(self, beat: Beat, *, timeout: float) -> object | None:
        """``beat`` sent, and the daemon's answer to it, as POST /beat's (a refusal raised as
        MeshHTTPError; no answer within ``timeout``: TimeoutError, as over HTTP, and a late
        answer is passed over later: each names the beat it answers). None when the channel
        is broken: it is closed, and the caller beats over HTTP from now on."""
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(timeout):
                await loop.sock_sendall(self.sock, beat.model_dump_json().encode() + b"\n")
                while True:
                    while b"\n" not in self.buf:
                        chunk = await loop.sock_recv(self.sock, 1 << 16)
                        if not chunk:
                            raise OSError("closed by the daemon")
                        self.buf += chunk
                    line, _, self.buf = self.buf.partition(b"\n")
                    reply = json.loads(line)
                    if reply.get("seq") is None:  # the line itself refused (400, 403): the channel is over
                        raise OSError(f"refused by the daemon: {reply.get('answer')}")
                    if reply["seq"] == beat.seq:  # an earlier one's, too late: passed over
                        break
            status, answer = int(reply["status"]), cast(object, reply["answer"])
        except TimeoutError:
            raise
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
            log.info("beats go over HTTP from now on: the beat channel failed (%s: %s)", type(err).__name__, err)
            self.close()
            return None
        if status >= 300:
            raise MeshHTTPError(status, CHANNEL, json.dumps(answer))
        return answer

    def close(self) -> None:
        self.sock.close()


def node_gone(pid: int | None) -> bool:
    """Placed by a node agent (Ray), and that agent is no longer running: the daemon has
    already re-placed us elsewhere, so this copy must not linger holding the port."""
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


Build = Callable[[ServiceContext], Awaitable[web.Application] | web.Application]
LISTEN_FD = 3  # systemd's SD_LISTEN_FDS_START


def inherited_socket() -> socket.socket | None:
    """The listening socket the daemon handed this incarnation at fd 3 (LISTEN_FDS,
    LISTEN_PID: systemd's convention), if it is for this process. The LISTEN_* variables
    are removed either way, so a program this one starts does not take the socket too."""
    env = os.environ
    count = env.get("LISTEN_FDS", "0")
    ours = env.get("LISTEN_PID") == str(os.getpid()) and count.isdigit() and int(count) >= 1
    for key in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        env.pop(key, None)
    if not ours:
        return None
    sock = socket.socket(fileno=LISTEN_FD)
    sock.set_inheritable(False)
    sock.setblocking(False)
    return sock


async def _serve(build: Build) -> None:
    env = ServiceEnv.from_environ()
    logs.setup(env.service, incarnation=env.incarnation, comms_path=env.home / "logs" / "comms.jsonl")
    config = load_mesh(env.config or None)
    telemetry.setup(config.telemetry, service=env.service, incarnation=env.incarnation)
    token = read_token(env.token_file)
    if not token:
        raise SystemExit(f"no mesh token at {env.token_file}")
    ctx = ServiceContext(env, config, token)
    built = build(ctx)
    app = built if isinstance(built, web.Application) else await built
    app[HEALTH_KEY] = ctx
    app[TOKEN_KEY] = token
    app[AUTH_KEY] = ctx.peer_ok  # our own credential is not accepted here: it is never sent to us
    app.router.add_get("/health", _health)
    runner = web.AppRunner(app, access_log=None, handle_signals=False, keepalive_timeout=conn_guard.IDLE_TIMEOUT)
    await runner.setup()
    assert runner.server is not None
    conn_guard.ConnectionGuard(runner.server)  # connections held open by anyone cannot take our descriptors
    held = inherited_socket()  # the daemon's: callers wait in its backlog while we restart
    spec = config.services.get(env.service)
    backlog = spec.backlog if spec is not None else 128  # create_server listens again: keep the configured size
    site = web.SockSite(runner, held, backlog=backlog) if held else \
        web.TCPSite(runner, "127.0.0.1", env.port, reuse_address=True, backlog=backlog)
    await site.start()
    beats = asyncio.ensure_future(heartbeat_loop(ctx, channel=beat_channel()))
    await asyncio.sleep(0)  # the first beat (it says we serve: a restart waits for it) leaves before the rest
    log.info("serving", extra={"port": env.port, "pid": os.getpid(), "provider": ctx.provider,
                               "socket": "inherited" if held else "bound"})
    stop = asyncio.Event()
    _stop_on_signals(asyncio.get_running_loop(), stop)
    superseded = asyncio.ensure_future(ctx.superseded.wait())
    await asyncio.wait([asyncio.ensure_future(stop.wait()), superseded], return_when=asyncio.FIRST_COMPLETED)
    beats.cancel()
    log.info("stopping")
    await runner.cleanup()
    await ctx.client.close()
    telemetry.shutdown()  # bounded: a hung collector never holds a stop


def _stop_on_signals(loop: asyncio.AbstractEventLoop, stop: asyncio.Event) -> None:
    """SIGTERM and SIGINT set ``stop``. Not ``loop.add_signal_handler``: asyncio checks each
    signal against ``signal.valid_signals()``, which makes an enum member of each of the 65
    signals per call (68 us; a crash wave's restarts share two cores). A handler that wakes
    the loop (the signal interrupts its wait, as asyncio.run's own SIGINT handler does) does
    the same."""
    def handler(signum: int, frame: object) -> None:
        # A signal after the loop closed (a second SIGTERM while the process exits) is no
        # error raised into whatever the main thread runs then: the exit is under way.
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(stop.set)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, handler)


def run_service(build: Build) -> None:
    try:
        asyncio.run(_serve(build))
    except OSError as err:
        print(f"cannot serve: {err}", file=sys.stderr)
        sys.exit(3)
    # Stopped (and cleaned up: the server, the client, the exporter). Gone now, as an incarnation
    # forked by the fork server goes: the interpreter's own teardown (every module's objects,
    # and a thread still importing an SDK it was warming up, waited for) held a plain-spawned
    # agent 0.5-1.6 s after its SIGTERM, on every stop, rolling restart and `tron down`.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
