"""The services the daemon runs: one record each, its state machine, and its processes.

``Supervisor`` starts an incarnation (the session row is written before the process
exists), waits until the *new* incarnation is healthy, stops one (the whole tree), and
replaces one for the ladder or an operator (the old tree is gone before the new one
starts). It decides nothing: a process exit becomes a TRON signal handed to
``on_signal``; what happens next is the ladder's.

Every change of a service's state goes through ``transition``: checked against
``tron.common.states.SERVICE``, logged (one line, stable wording), written to the registry.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import signal as signals
import socket
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Awaitable, Callable

import aiohttp

from tron.common import environ, telemetry
from tron.common.clock import Clock
from tron.common.config import DAEMON, MeshConfig, Policy, ServiceSpec
from tron.common.http import MeshClient, MeshHTTPError
from tron.common.models import Reason
from tron.common.monitor import Monitor, Signal
from tron.common.paths import Home, mesh_marks
from tron.common.states import SERVICE, RetryType, ServiceState
from tron.registry.protocol import Store
from tron.services.daemon import beat_channel
from tron.services.daemon.listeners import ListenerError, listen_env
from tron.services.daemon.access import Access
from tron.services.daemon.metrics import DaemonMetrics
from tron.services.daemon.cgroups import Limits
from tron.services.daemon.spawner import Child, SpawnError, Spawner, SpawnSpec

FIRST_BEAT_WAIT = 0.01  # s an agent's health check waits for its first beat before it also asks /health
log = logging.getLogger("tron.daemon")

NON_AGENT_BEAT_TIMEOUT = 10 * 365 * 86400.0  # command services have no beats to miss
S = ServiceState


def child_environ(config: MeshConfig) -> dict[str, str]:
    """The daemon's environment as a process it starts gets it: without the daemon's own
    secrets (a notification target's), which no child needs."""
    env = dict(environ.current())
    for entry in config.notify:
        env.pop(entry.secret_env, None)
    return env


# How a session ends when it was stopped on purpose (core.py's shutdown, operators.py,
# reload.py): the next session of that service is a start, not a restart.
DELIBERATE_STOPS = ("tron_down", "operator_stop:", "reload:")


def restarts_in(sessions: list[dict]) -> int:
    """How many times a service was restarted since it was last started on purpose, from
    its sessions, newest first: each session after the first of its current run is one
    (a run begins with its first session ever, or after one ended by a deliberate stop).

    Returns: 0 for a service started once and never replaced."""
    count = 0
    for older in sessions[1:]:
        if str(older.get("end_reason") or "").startswith(DELIBERATE_STOPS):
            break
        count += 1
    return count


def new_id(prefix: str = "") -> str:
    return prefix + uuid.uuid4().hex[:12]


@dataclass
class Service:
    """Everything the daemon knows about one service, in one place."""

    spec: ServiceSpec
    provider: str | None  # the provider it runs on now or, after a switch, will run on next
    state: ServiceState = S.STOPPED
    child: Child | None = None
    incarnation: str | None = None
    restarts: int = 0
    started_at: float | None = None  # clock readings of the current incarnation
    healthy_at: float | None = None
    last_beat: float | None = None
    task_id: str | None = None
    progress: str | None = None
    failed_at: float | None = None  # the failure not yet recovered from (recovery latency)
    failed_since: float | None = None  # when it entered FAILED (the watchdog's clock)
    replacing: str | None = None  # the incarnation a restart is already replacing
    # The incarnation an operator's restart (or task retry) was admitted for: set in the same
    # step as its guard, so ten concurrent requests admit one (a new incarnation clears it).
    admitted: tuple[str, str] | None = None  # (incarnation, the admitting request's ref)
    stopped: bool = False  # an operator stopped it: nothing brings it back but `tron start`
    paused: bool = False  # an operator paused it: no new tasks, the running ones finish
    crash_looping: bool = False
    ready: bool = False  # healthy, and its readiness probe (if any) passes
    last_failure: dict | None = None
    listener: socket.socket | None = None  # the listening socket held across restarts (listeners.py)
    beat_reader: asyncio.Task | None = None  # the current incarnation's beat channel (beat_channel.py)
    spawned_provider: str | None = None  # the provider the current incarnation was started on
    tasks_done: int = 0  # tasks the current incarnation finished (max_tasks, restart_above_memory)
    unreported: dict[str, float] = field(default_factory=dict)  # its tasks its beats do not name: since
    tasks_checked: float = float("-inf")  # when its beats' task list was last compared with the leases
    healthy: asyncio.Event = field(default_factory=asyncio.Event)
    settled: asyncio.Event = field(default_factory=asyncio.Event)  # the latest start ended, either way
    wake: asyncio.Event = field(default_factory=asyncio.Event)  # ends its backoff now (`tron start` after a fix)
    waiting_restart: bool = False  # a restart waits out its backoff: it, not the bring-up, starts the service
    beat_seen: asyncio.Event = field(default_factory=asyncio.Event)  # a beat of the starting incarnation: ask now
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def switched_away(self) -> bool:
        """Its incarnation runs on a provider the root has switched it away from: it gets
        no task (its replacement, on the new provider, does)."""
        return self.spawned_provider != self.provider

    @property
    def spawn_cause(self) -> str | None:
        """Why its latest start failed (missing_binary, permission_denied, port_in_use,
        cannot_start), while it waits for the next; None after any other failure."""
        f = self.last_failure or {}
        if f.get("reason") != Reason.SPAWN_FAILED or self.state not in (S.FAILED, S.BACKOFF):
            return None
        return (f.get("detail") or {}).get("cause")

    @property
    def waiting_out_spawn_failure(self) -> bool:
        """In BACKOFF after a failure to start: an operator who fixed the cause may end
        the wait (`tron start` / `tron restart`)."""
        return self.state == S.BACKOFF and self.spawn_cause is not None

    def stable(self, now: float, policy: Policy) -> bool:
        """Was the current incarnation healthy for at least ``min_uptime``?"""
        return self.healthy_at is not None and now - self.healthy_at >= policy.min_uptime


Hook = Callable[..., Awaitable[None]]


class Supervisor:
    def __init__(self, config: MeshConfig, home: Home, *, store: Store, spawner: Spawner, monitor: Monitor, clock: Clock,
                 metrics: DaemonMetrics, policy: Callable[[], Policy], client: MeshClient, background,
                 config_path: Path | None, access: Access) -> None:
        self.config = config
        self.access = access  # mints each incarnation's own credential
        self.home = home
        self.store = store
        self.spawner = spawner
        self.monitor = monitor
        self.clock = clock
        self.metrics = metrics
        self.policy = policy
        self.client = client
        self.checks = None  # ProbeChecks, plugged in by the daemon (services/daemon/probes.py)
        self.background = background  # schedules a coroutine as a tracked task
        self.config_path = config_path
        self.stopping = False
        self.spawning_paused = False  # the incident switch (operators.py): no new process starts
        self.spawning_resumed = asyncio.Event()
        self.spawning_resumed.set()
        self.on_signal: Callable[[Signal], Awaitable[None]] | None = None
        self.on_healthy: Callable[[Service], Awaitable[None]] | None = None
        self.judge_beat: beat_channel.Judge | None = None  # a beat on an agent's beat channel (the daemon's)
        # Does the new incarnation serve? HTTP by default; unit tests answer for a stub.
        self.healthy_now: Callable[[Service, str], Awaitable[bool]] = self._healthy_now
        self.first_beat_wait = FIRST_BEAT_WAIT
        self.services: dict[str, Service] = {
            name: Service(spec, config.provider_of(name) if spec.beats else None)
            for name, spec in config.services.items()
        }

    def __getitem__(self, name: str) -> Service:
        return self.services[name]

    # -- state ---------------------------------------------------------------------------

    async def transition(self, svc: Service, new: ServiceState, reason: str) -> None:
        old = svc.state
        if old == new and new != S.STARTING:
            return
        SERVICE.check(old, new)
        svc.state = new
        svc.failed_since = self.clock.now() if new == S.FAILED else None
        if new != S.RUNNING:  # no incarnation serves (or one is going away): not ready until the next is
            svc.ready = False
        log.info("%s: %s -> %s", svc.name, old, new, extra={"offender": svc.name, "from": str(old), "to": str(new),
                                                            "reason": reason, "incarnation": svc.incarnation})
        await self.store.set_agent(svc.name, state=new)

    async def declare(self, only: set[str] | None = None) -> None:
        """Every service of the mesh file is a registry row; what outlives a daemon (an
        operator's stop, a provider switch, a crash loop) is read back from it. ``only``:
        these services (added by a reload)."""
        for svc in self.services.values():
            if only is not None and svc.name not in only:
                continue
            row = await self.store.upsert_agent(svc.name, svc.spec.role, svc.spec.parent, svc.spec.port, svc.provider)
            if svc.spec.is_agent and row.get("provider"):
                svc.provider = row["provider"]
            svc.stopped = bool(row.get("stopped"))
            svc.paused = bool(row.get("paused"))
            svc.crash_looping = bool(row.get("crash_looping"))

    # -- starting ------------------------------------------------------------------------

    async def _env(self, svc: Service, incarnation: str) -> dict[str, str]:
        p = self.policy()
        env = child_environ(self.config)
        env.update(telemetry.child_env(self.config.telemetry))  # where traces go, for a program's own spans
        env.update(svc.spec.env)
        env.update(mesh_marks(self.home))
        env.update({
            "TRON_SERVICE": svc.name,
            "TRON_ROLE": svc.spec.role,
            "TRON_PORT": str(svc.spec.port),
            "TRON_INCARNATION": incarnation,
            "TRON_DAEMON_URL": self.config.daemon_url,
            "TRON_CONFIG": str(self.config_path or ""),
            "TRON_PORT_OFFSET": os.environ.get("TRON_PORT_OFFSET", "0"),
            "TRON_HEARTBEAT_INTERVAL": repr(p.heartbeat_interval),
            "PYTHONUNBUFFERED": "1",
        })
        if svc.spec.beats:  # ours, or declared to speak the agent contract
            # Its own credential, which dies with it; the operator's token is never handed out.
            env["TRON_TOKEN_FILE"] = str(self.access.mint_agent(svc.name, incarnation))
            env["TRON_RESUME"] = json.dumps(await self._resume(svc))
        else:
            env.pop("TRON_TOKEN_FILE", None)
        if svc.spec.agent:
            config_dir = Path(self.config_path).parent if self.config_path else Path.cwd()
            paths = [str((config_dir / p).resolve()) for p in svc.spec.agent_path] or [str(config_dir)]
            env["TRON_AGENT_CLASS"] = svc.spec.agent
            env["TRON_AGENT_PATH"] = os.pathsep.join(paths)
        if svc.provider:
            env["TRON_PROVIDER"] = svc.provider
        return env

    async def _resume(self, svc: Service) -> dict:
        """The tasks the next incarnation inherits, each with its last checkpoint."""
        tasks = []
        for t in await self.store.open_tasks(svc.name):
            marks = await self.store.checkpoints(t["task_id"])
            last = marks[-1] if marks else None
            tasks.append({"task_id": t["task_id"], "progress": t["progress"], "attempt": t["attempt"],
                          "checkpoint": None if last is None else
                          {"step": last["step"], "step_id": last["step_id"], "hash": last["hash"]}})
        return {"tasks": tasks}

    def values(self, svc: Service) -> dict[str, str]:
        """What {placeholders} in a service's command, env, cwd and probes stand for."""
        config_dir = Path(self.config_path).parent if self.config_path else Path.cwd()
        return svc.spec.values(self.home.root, config_dir)

    def _state_dir(self, svc: Service) -> Path:
        """<home>/services/<name>: a place of the service's own ({state}), owned by its user."""
        path = self.home.root / "services" / svc.name
        path.mkdir(parents=True, exist_ok=True)
        if svc.spec.user:
            import pwd

            pw = pwd.getpwnam(svc.spec.user)
            os.chown(path, pw.pw_uid, pw.pw_gid)
        return path

    def _spawn_spec(self, svc: Service, incarnation: str, env: dict[str, str]) -> SpawnSpec:
        values = self.values(svc)
        if not svc.spec.is_agent:
            self._state_dir(svc)
        env = {**env, **{k: v.format(**values) for k, v in svc.spec.env.items()}}
        if svc.spec.holds_socket:
            env.update(listen_env(svc.name))
        cwd = Path(svc.spec.cwd.format(**values)) if svc.spec.cwd else Path(values["config_dir"])
        spec = svc.spec
        pidfile = Path(spec.pidfile.format(**values)) if spec.pidfile else None
        if pidfile is not None and not pidfile.is_absolute():
            pidfile = cwd / pidfile
        return SpawnSpec(name=svc.name, incarnation=incarnation, argv=spec.argv(values), env=env, cwd=cwd,
                         log=self.home.log_file(svc.name), user=spec.user,
                         module=spec.module if spec.is_agent else None,
                         port=spec.port, log_limits=self.config.log_limits(svc.name),
                         limits=Limits(spec.memory_max, spec.cpu_max, spec.pids_max), open_files=spec.open_files,
                         daemonize=spec.daemonize, pidfile=pidfile, start_timeout=self.policy().start_timeout,
                         standby=spec.standby)

    def _listener(self, svc: Service) -> int | None:
        """The fd of the service's held listening socket, bound on first use. Raises
        ListenerError (naming the port and its holder) when the port is taken."""
        if not svc.spec.holds_socket:
            return None
        if svc.listener is None:
            shared = self._replica_listener(svc)
            # Not shared.dup(): it sets the copy's timeout, which clears O_NONBLOCK on the one open
            # socket every replica accepts from, and a sibling's event loop then blocks in accept().
            svc.listener = socket.socket(fileno=os.dup(shared.fileno())) if shared is not None \
                else self.spawner.listen(svc.spec.port, svc.spec.backlog)
        return svc.listener.fileno()

    def _replica_listener(self, svc: Service) -> socket.socket | None:
        """The listening socket a replicated program's replicas share (each holds a dup of
        it: the port closes when the last one closes its own)."""
        if not svc.spec.replica_of or svc.spec.is_agent:
            return None
        return next((o.listener for o in self.services.values() if o is not svc and o.listener is not None
                     and o.spec.replica_of == svc.spec.replica_of and o.spec.port == svc.spec.port), None)

    async def credential_ahead(self, name: str, incarnation: str) -> None:
        """The spawner prepared ``name``'s next start as ``incarnation``: its credential's
        file is written now, not on the restart's path."""
        svc = self.services.get(name)
        if svc is not None and svc.spec.beats:
            await self.access.prepare_agent(name, incarnation)

    def close_listener(self, svc: Service) -> None:
        """Nothing listens on a stopped service's port."""
        if svc.listener is not None:
            svc.listener.close()
            svc.listener = None

    async def start(self, svc: Service, *, reason: str) -> None:
        """Spawn a new incarnation. The session row is written first (a daemon killed
        between fork and record still knows what it may have started); TRON watches it
        from the first moment, with the start timeout as its first deadline."""
        if svc.waiting_restart:  # the bring-up after a daemon restart: the backoff it adopted is kept
            log.info("%s: not started (%s): its restart waits out its backoff", svc.name, reason,
                     extra={"offender": svc.name})
            svc.settled.set()
            return
        # An id the spawner prepared a start for (its cgroup made and joined ahead: spawner.Gate), else a new one.
        incarnation = self.spawner.reserve(svc.name) or new_id("i-")
        await self.transition(svc, S.STARTING, reason)
        now = self.clock.now()
        if svc.beat_reader is not None:  # the last incarnation's channel: nothing of it is heard any more
            svc.beat_reader.cancel()
            svc.beat_reader = None
        svc.incarnation, svc.child = incarnation, None
        svc.started_at, svc.healthy_at, svc.last_beat = now, None, None
        svc.task_id = svc.progress = None
        svc.tasks_done = 0
        svc.unreported.clear()
        svc.ready = False
        svc.spawned_provider = svc.provider
        svc.healthy.clear()
        svc.settled.clear()
        svc.beat_seen.clear()
        await self.store.open_session(incarnation, svc.name, svc.spec.port, svc.provider,
                                      mode="fork" if svc.spec.is_agent else "plain")
        self.watch(svc)
        try:
            spec = self._spawn_spec(svc, incarnation, await self._env(svc, incarnation))
            spec = dataclasses.replace(spec, listen_fd=self._listener(svc))
            child = await self.spawner.spawn(spec)
        except SpawnError as err:
            await self._spawn_failed(svc, incarnation, str(err), cause=err.cause, holder=err.holder)
            return
        except ListenerError as err:
            holder = self.spawner.port_holder(svc.spec.port)
            await self._spawn_failed(svc, incarnation, str(err), cause="port_in_use" if holder else "cannot_start",
                                     holder=holder)
            return
        except Exception as err:  # nothing may leave a service STARTING with nobody watching it
            log.exception("cannot start %s", svc.name)
            await self._spawn_failed(svc, incarnation, f"cannot prepare its start: {type(err).__name__}: {err}")
            return
        svc.child = child
        if child.channel is not None:  # it beats on a connection of its own (beat_channel.py)
            channel, child.channel = child.channel, None
            if self.judge_beat is None:
                channel.close()  # nobody here judges beats: it beats over HTTP
            else:
                svc.beat_reader = self.background(
                    beat_channel.serve_beats(channel, svc.name, incarnation, self.judge_beat,
                                             first_within=self.policy().start_timeout, head=child.channel_head,
                                             taken=self.metrics.beats_on_channel.inc),
                    f"beats of {svc.name}")
        await self.store.session_started(incarnation, child.pid, child.create_time, mode=child.mode)
        await self.store.event("spawned", {"pid": child.pid, "reason": reason, "provider": svc.provider,
                                           "mode": child.mode, "argv": spec.argv},
                               agent=svc.name, incarnation=incarnation)
        log.info("spawned", extra={"offender": svc.name, "pid": child.pid, "incarnation": incarnation,
                                   "reason": reason, "mode": child.mode})
        self.background(self._await_health(svc, incarnation), f"health {svc.name}")

    async def _spawn_failed(self, svc: Service, incarnation: str, error: str, *, cause: str = "cannot_start",
                            holder: dict | None = None) -> None:
        """A process that could not be started is a failure like any other: it enters the
        ladder, with its ``cause``. A cause retrying cannot fix (a missing binary, no
        execute permission, a port another program holds) backs off to
        ``spawn_failed_backoff_max``, not ``backoff_max``; `tron start` retries at once."""
        log.error("spawn failed", extra={"offender": svc.name, "error": error, "cause": cause, "holder": holder,
                                         "incarnation": incarnation})
        await self.store.close_session(incarnation, reason=f"spawn_failed: {error}")
        try:
            argv = svc.spec.argv(self.values(svc))
        except Exception as err:  # the template itself may be what failed: the event shows it as written
            log.debug("command of %s not formatted for the event (%s: %s)", svc.name, type(err).__name__, err)
            argv = svc.spec.command
        detail = {"error": error, "cause": cause} | ({"holder": holder} if holder else {})
        await self.store.event("spawn_failed", {**detail, "argv": argv}, agent=svc.name, incarnation=incarnation)
        signal = self.monitor.raise_alert(svc.name, incarnation, Reason.SPAWN_FAILED, self.clock.now(), detail)
        if signal is not None and self.on_signal is not None:
            self.background(self.on_signal(signal), f"spawn failure {svc.name}")

    def watch(self, svc: Service) -> None:
        p = self.policy()
        beat_timeout = p.beat_timeout if svc.spec.beats else NON_AGENT_BEAT_TIMEOUT
        now = self.clock.now()
        self.monitor.watch(svc.name, svc.incarnation, now + max(0.0, p.start_timeout - beat_timeout),
                           beat_timeout=beat_timeout, progress_timeout=p.progress_timeout,
                           task_timeout=p.task_timeout)

    async def _healthy_now(self, svc: Service, incarnation: str) -> bool:
        """The new incarnation serves: an agent's /health names its incarnation; a program
        passes its startup probe (or readiness, or liveness) from its own process tree."""
        if svc.spec.is_agent:
            if not self.spawner.is_listening(svc.spec.port):
                return False  # not serving yet (a cheap local read; on another node: cannot tell, ask it)
            try:
                body = await self.client.get(f"{self.config.url(svc.name)}/health", timeout=1.0)
                return isinstance(body, dict) and body.get("incarnation") == incarnation
            except (MeshHTTPError, OSError, asyncio.TimeoutError, aiohttp.ClientError, ValueError):
                return False  # not up yet (refused, cut off, slow, an error or a half answer): the next try decides
            except Exception as err:  # anything else is a surprise, said; still the next try decides
                log.warning("health check of %s failed unexpectedly: %s: %s", svc.name, type(err).__name__, err)
                return False
        if svc.spec.heartbeat and svc.last_beat is None:
            return False  # a command that speaks the contract is ready at its first accepted beat
        probe = svc.spec.first_probe
        if probe is None:
            return True  # nothing to ask: started is healthy
        port = self.checks.probe_port(svc, probe)
        if port is not None and not self.spawner.is_listening(port):
            return False
        ok, _ = await self.checks.check(svc, probe)
        if not ok or port != svc.spec.port or svc.child is None:
            return ok
        # The listener must be the new incarnation's: an answer from a leftover of an old tree is not its health.
        return await asyncio.to_thread(self.spawner.listener_is_ours, svc.child, port)

    async def _await_health(self, svc: Service, incarnation: str) -> None:
        probe = None if svc.spec.is_agent else svc.spec.first_probe
        if probe is not None and probe.initial_delay:
            await self.clock.sleep(probe.initial_delay)
        needed = probe.success_threshold if probe else 1
        # Loopback http/tcp checks are cheap: ask often, so recovery is not waiting on us.
        pause = 0.01 if probe is None or probe.kind != "exec" else min(probe.interval, 0.2)
        deadline = self.clock.now() + self.policy().start_timeout
        passed = 0
        while self.clock.now() < deadline:
            if svc.incarnation != incarnation or svc.child is None or not svc.child.alive:
                return
            if svc.spec.is_agent:
                ok = await self._served_or_beat(svc, incarnation)
            else:
                svc.beat_seen.clear()  # a beat from here on means it may serve now
                ok = await self.healthy_now(svc, incarnation)
            passed = passed + 1 if ok else 0
            if passed >= needed:
                break
            await self._pause(svc, pause)
        else:
            if svc.incarnation == incarnation and svc.child is not None and svc.child.alive:
                signal = self.monitor.raise_alert(svc.name, incarnation, Reason.START_TIMEOUT, self.clock.now(),
                                                  {"start_timeout": self.policy().start_timeout})
                if signal is not None and self.on_signal is not None:
                    await self.on_signal(signal)
            return
        if svc.incarnation != incarnation or svc.state != S.STARTING:
            return
        await self.store.session_running(incarnation)
        await self.transition(svc, S.RUNNING, "healthy")
        now = self.clock.now()
        svc.healthy_at = svc.healthy_at or now  # an adopted incarnation was healthy since then already
        # Ready now, unless readiness is a probe of its own that has not passed yet (the
        # start was judged by a startup probe): the probe loop then says when.
        svc.ready = svc.spec.is_agent or svc.spec.readiness is None or svc.spec.first_probe is svc.spec.readiness
        svc.healthy.set()
        svc.settled.set()
        if svc.failed_at is not None:
            self.metrics.recovery_latency.observe(now - svc.failed_at)
            await self.store.event("recovered", {"seconds": round(now - svc.failed_at, 4),
                                                 "cold_start": round(now - svc.started_at, 4)},
                                   agent=svc.name, incarnation=incarnation)
            svc.failed_at = None
        if self.on_healthy is not None and svc.spec.is_agent:
            await self.on_healthy(svc)

    async def _served_or_beat(self, svc: Service, incarnation: str) -> bool:
        """An agent is healthy when its /health names the new incarnation, or as soon as
        that incarnation's first beat is accepted (start() cleared ``beat_seen``): the
        runtime beats only once it listens (common/service.py), and a beat is signed with
        the incarnation's own token or comes on the beat channel only it holds
        (beat_channel.py), so it proves as much, a few ms sooner (the check's
        connection waits in the held socket's backlog behind the new process's start)."""
        if not svc.beat_seen.is_set() and self.first_beat_wait > 0:
            # A beat usually comes first; asking /health as well costs the daemon an HTTP
            # request per restart, which adds up in a crash wave: ask only if it is late. (Real
            # time, not the policy clock: how soon to ask is no policy a test steps through.)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(svc.beat_seen.wait(), self.first_beat_wait)
        if svc.beat_seen.is_set():
            return True
        check = asyncio.ensure_future(self.healthy_now(svc, incarnation))
        beat = asyncio.ensure_future(svc.beat_seen.wait())
        try:
            await asyncio.wait({check, beat}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            beat.cancel()
            check.cancel()
        return svc.beat_seen.is_set() or (check.done() and not check.cancelled() and check.result())

    async def _pause(self, svc: Service, seconds: float) -> None:
        """Until the next health check: ``seconds``, or less when the new incarnation beats
        first. An agent beats as soon as it serves, so its recovery does not wait out the
        rest of a poll interval."""
        if not svc.beat_seen.is_set():
            await self._sleep_or(seconds, svc.beat_seen)

    async def _sleep_or(self, seconds: float, event: asyncio.Event) -> None:
        """``seconds`` on the clock, or less if ``event`` is set meanwhile."""
        sleep = asyncio.ensure_future(self.clock.sleep(seconds))
        woken = asyncio.ensure_future(event.wait())
        try:
            await asyncio.wait({sleep, woken}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            sleep.cancel()
            woken.cancel()

    async def wait_settled(self, svc: Service, timeout: float) -> bool:
        """Until the latest start attempt is healthy or has failed; True if healthy."""
        try:
            await asyncio.wait_for(svc.settled.wait(), timeout)
        except asyncio.TimeoutError:
            pass
        return svc.healthy.is_set()

    # -- stopping and replacing ----------------------------------------------------------

    async def stop(self, svc: Service, *, reason: str) -> None:
        """The whole tree, gracefully: the service's stop signal, then SIGKILL after
        ``stop_grace``. A stop always completes, whatever the registry does."""
        async with svc.lock:
            if svc.state == S.STOPPED:
                return
            await self._best_effort(self.transition(svc, S.STOPPING, reason), f"record stopping {svc.name}")
            svc.state = S.STOPPING
            svc.waiting_restart = False  # a stopped service is started by whoever starts it next
            self.monitor.unwatch(svc.name)
            self.access.revoke_agent(svc.name)  # a stopped service speaks for nobody
            child = svc.child
            if child is not None:
                await self.spawner.stop(child, self.stop_grace(svc), signals.Signals[svc.spec.stop_signal])
                await self._best_effort(self.store.close_session(
                    child.incarnation, reason=reason, exit_code=child.exit_code, exit_signal=child.exit_signal),
                    f"close session {child.incarnation}")
            self.close_listener(svc)
            self.spawner.release(svc.name)  # its standby or gate would wait for a start that may never come
            await self._best_effort(self.transition(svc, S.STOPPED, reason), f"record stopped {svc.name}")
            svc.state = S.STOPPED
            svc.settled.set()

    def stop_grace(self, svc: Service) -> float:
        return svc.spec.grace(self.policy())

    async def _best_effort(self, coro, what: str) -> None:
        try:
            await coro
        except Exception as err:  # a stop must never be aborted by the registry
            log.error("%s failed while stopping: %s", what, err)

    async def replace(self, svc: Service, old_incarnation: str, *, delay: float, reason: str,
                      provider: str | None = None, requeue: bool = True, graceful: bool = False) -> bool:
        """Kill the old incarnation's tree (``graceful``: stop it as `tron stop` does, with
        its stop_signal and stop_grace first), wait out ``delay`` (BACKOFF), then start a
        new one (on ``provider`` if given) that inherits the open tasks when ``requeue``.
        A no-op (False) when the incarnation is no longer current or the service stops."""
        async with svc.lock:
            if svc.incarnation != old_incarnation or svc.state in (S.STOPPING, S.STOPPED) or svc.stopped:
                return False
            svc.replacing = old_incarnation
            self.monitor.unwatch(svc.name)
            old = svc.child
        try:
            if old is not None and graceful:
                await self.spawner.stop(old, self.stop_grace(svc), signals.Signals[svc.spec.stop_signal])
            elif old is not None:
                await self.spawner.kill(old)
            if old is not None:
                await self.store.close_session(old.incarnation, reason=f"replaced:{reason}",
                                               exit_code=old.exit_code, exit_signal=old.exit_signal)
            elif old_incarnation:
                await self.store.close_session(old_incarnation, reason=f"replaced:{reason}")
            if delay > 0 or self.spawning_paused:
                svc.wake.clear()  # before BACKOFF is visible: a `tron start` from then on ends the wait
                if svc.state == S.FAILED:
                    await self.transition(svc, S.BACKOFF, f"{reason}, restart in {delay:.2f}s"
                                          + (" (spawning is paused)" if self.spawning_paused else ""))
                svc.waiting_restart = True
                try:
                    await self._backoff(svc, delay)
                    await self.spawning_resumed.wait()
                finally:
                    svc.waiting_restart = False
            async with svc.lock:
                if svc.incarnation != old_incarnation or self.stopping or svc.stopped \
                        or svc.state in (S.STOPPING, S.STOPPED):
                    return False
                if provider and provider != svc.provider:
                    svc.provider = provider
                    await self.store.set_agent(svc.name, provider=provider)
                if requeue:
                    await self.store.requeue_tasks(svc.name, provider=provider)
                svc.restarts += 1
                await self.start(svc, reason=reason)
                return True
        finally:
            svc.replacing = None  # only now: until the new incarnation exists, the old one is being replaced
            svc.waiting_restart = False  # however it ended (early, or on an error): start() is not held back for good

    async def _backoff(self, svc: Service, delay: float) -> None:
        """Wait out ``delay`` on the clock, or until an operator wakes the service."""
        await self._sleep_or(delay, svc.wake)
        if svc.wake.is_set():
            log.info("%s: backoff ended by an operator", svc.name, extra={"offender": svc.name})

    def recycle_due(self, svc: Service) -> tuple[str, dict] | None:
        """Why an agent is due to be recycled between tasks (max_tasks, memory_recycle),
        with what was measured; None when not (it has done no task since it started: an
        incarnation that is large from birth would be recycled for ever)."""
        spec, child = svc.spec, svc.child
        if svc.state != S.RUNNING or svc.replacing or svc.stopped or child is None or not child.alive \
                or svc.tasks_done < 1:
            return None
        if spec.max_tasks and svc.tasks_done >= spec.max_tasks:
            return "max_tasks", {"tasks": svc.tasks_done, "max_tasks": spec.max_tasks}
        over = self.over_memory(svc)
        if over is not None:
            return "memory_recycle", {**over, "tasks": svc.tasks_done}
        return None

    def over_memory(self, svc: Service) -> dict | None:
        """What was measured when the agent's processes hold more resident memory than its
        ``restart_above_memory``; None when they do not (or it has no such size)."""
        child, limit = svc.child, svc.spec.restart_above_memory
        if not limit or child is None or not child.alive:
            return None
        size = self.spawner.resident(child)
        return {"rss": size, "restart_above_memory": limit} if size > limit else None

    def retry_now(self, svc: Service) -> bool:
        """End the backoff of a service waiting out a failure to start: its restart goes
        ahead now (through the same replace, so the same guards apply). False when it is
        not waiting out one."""
        if not svc.waiting_out_spawn_failure or svc.replacing is None:
            return False
        svc.wake.set()
        return True

    # -- exits and adoption ----------------------------------------------------------------

    def on_exit(self, child: Child) -> None:
        """Called by the spawner's pidfd callback, on the loop: hand over, nothing else."""
        svc = self.services.get(child.name)
        log.info("process exited", extra={"offender": child.name, "pid": child.pid, "exit_code": child.exit_code,
                                          "signal": child.exit_signal, "expected": child.expected_exit,
                                          "incarnation": child.incarnation})
        if child.expected_exit or svc is None or self.stopping or svc.incarnation != child.incarnation:
            return
        signal = self.monitor.process_exited(child.name, child.incarnation, self.clock.now(),
                                             exit_code=child.exit_code, signal=child.exit_signal)
        if signal is not None and child.oom_killed:  # the kernel's count in its cgroup says so
            signal = dataclasses.replace(signal, reason=Reason.OOM_KILLED,
                                         detail={**signal.detail, "memory_max": svc.spec.memory_max})
        self.background(self.store.close_session(child.incarnation, reason="oom_killed" if child.oom_killed
                                                 else "process_exit", exit_code=child.exit_code,
                                                 exit_signal=child.exit_signal), f"close {child.incarnation}")
        if signal is not None and child.lost:
            signal = dataclasses.replace(signal, detail={**signal.detail, "node_lost": child.node})
        if signal is not None and self.on_signal is not None:
            self.background(self._exited(svc, signal), f"exit {child.name}")

    async def _exited(self, svc: Service, signal: Signal) -> None:
        if svc.healthy_at is None and not signal.detail.get("node_lost"):
            # It never came up: what it said last is why (a missing module, a bad config line).
            await self.spawner.sync_log(self.home.log_file(svc.name))  # a log pump writes behind the program
            last = last_line(self.home.log_file(svc.name))
            if last:
                signal = dataclasses.replace(signal, detail={**signal.detail, "error": last})
        await self.on_signal(signal)

    async def adopt_or_close(self) -> None:
        """Sessions left open by an earlier daemon: adopt the live ones (same pid and start
        time), end the trees of the rest. No session stays open without its process, and
        no process of this home runs without its session."""
        for row in await self.store.open_sessions():
            svc = self.services.get(row["agent"])
            child = None
            if svc is not None and svc.child is None and row["pid"] and not svc.stopped:
                child = self.spawner.adopt(svc.name, row["incarnation"], row["pid"], row["pid_create_time"])
            if child is None:
                await self._end_lost(row)
                continue
            svc.child, svc.incarnation = child, row["incarnation"]
            await self._restore_history(svc, row)
            svc.provider = svc.spawned_provider = row["provider"] or svc.provider
            svc.settled.clear()
            await self.transition(svc, S.STARTING, "adopted")
            self.watch(svc)
            socket_note = self._recover_listener(svc, child.pid)
            await self.store.event("adopted", {"pid": child.pid, **socket_note}, agent=svc.name,
                                   incarnation=svc.incarnation)
            log.info("adopted", extra={"offender": svc.name, "pid": child.pid, "incarnation": svc.incarnation,
                                       **socket_note})
            self.background(self._await_health(svc, svc.incarnation), f"health {svc.name}")

        for svc in self.services.values():
            if svc.child is None and not svc.stopped:
                await self._resume_backoff(svc)

    async def _restore_history(self, svc: Service, row: dict) -> None:
        """An adopted incarnation keeps what the daemon before knew of it: when it started and
        became healthy (the registry's clock readings: one monotonic clock per machine), so its
        uptime and min_uptime's stability rule count from then, not from the adoption; and how
        often the service was restarted."""
        now = self.clock.now()
        started, healthy = row.get("started_mono"), row.get("healthy_mono")
        svc.started_at = started if isinstance(started, (int, float)) and started <= now else now
        svc.healthy_at = healthy if isinstance(healthy, (int, float)) and healthy <= now else None
        svc.restarts = restarts_in(await self.store.sessions_of(svc.name))

    async def _resume_backoff(self, svc: Service) -> None:
        """A service the daemon before left waiting out its backoff (a crash loop) has no
        process to adopt; the bring-up would start it at once, and the backoff the ladder
        decided would be lost. Its restart goes on waiting until the end of that delay (from
        its failure), then starts it, counted as the restart it is."""
        agent = await self.store.agent(svc.name)
        if agent is None or agent.get("state") != S.BACKOFF or not agent.get("current_incarnation"):
            return
        latest = await self.store.failures(svc.name, limit=1)
        if not latest:
            return
        rows = await self.store.retry_rows(latest[0]["alert_id"])
        delay = next((float((r.get("detail") or {}).get("delay") or 0.0) for r in reversed(rows)
                      if r["retry_type"] == RetryType.CHILD_RESTART), 0.0)
        left = latest[0]["mono"] + delay - self.clock.now()
        if not 0 < left <= delay:  # over already (or a reading from before a reboot: the clock began again)
            return
        svc.restarts = restarts_in(await self.store.sessions_of(svc.name))
        svc.incarnation = agent["current_incarnation"]
        svc.state = S.BACKOFF  # as the registry has it already: the daemon before put it there
        svc.waiting_restart = True  # from now: the bring-up that follows must not start it
        log.info("%s: resumes its backoff, restart in %.2fs", svc.name, left, extra={"offender": svc.name})
        await self.store.event("backoff_resumed", {"delay": round(left, 3)}, agent=svc.name,
                               incarnation=svc.incarnation)
        svc.wake.clear()
        self.background(self.replace(svc, svc.incarnation, delay=left, reason="backoff_resumed"),
                        f"restart {svc.name}")

    def _recover_listener(self, svc: Service, pid: int) -> dict:
        """After a daemon restart: take the held socket back from the adopted incarnation
        (no gap), or say that the next restart binds it again (a gap of one restart)."""
        if not svc.spec.holds_socket or svc.listener is not None:
            return {}
        svc.listener = self.spawner.recover_listener(pid, svc.spec.port)
        if svc.listener is not None:
            return {"socket": "recovered"}
        log.warning("%s: the listening socket could not be taken back from pid %d; the next restart binds the "
                    "port again (callers are refused while it is down)", svc.name, pid,
                    extra={"offender": svc.name})
        return {"socket": "lost: bound again at the next restart"}

    async def sweep_ghosts(self) -> list[str]:
        """Processes of this home that no session accounts for (a daemon killed between
        fork and record, a registry that could not be written): ended, and recorded."""
        owners = {svc.child.pid for svc in self.services.values() if svc.child is not None}
        ghosts = self.spawner.ghosts(str(self.home.root), owners)
        if ghosts:
            names = list(ghosts.values())
            for pid in ghosts:
                ghost = Child("ghost", "unknown", pid, 0.0, mode="adopted")
                ghost.exited.set()
                await self.spawner.kill(ghost)
            log.error("ended %d process(es) of this home that no session accounted for: %s", len(ghosts), names)
            await self.store.event("ghosts_ended", {"processes": names})
            return names
        return []

    async def _end_lost(self, row: dict) -> None:
        """A session whose process is gone (or is a ghost we will not adopt): end whatever
        of its tree still runs, then close the row."""
        leftovers = []
        if row["pid"]:
            ghost = Child(row["agent"], row["incarnation"], row["pid"], row["pid_create_time"] or 0.0,
                          mode="adopted")
            ghost.exited.set()
            leftovers = self.spawner.leftovers(ghost)
            if leftovers:
                await self.spawner.kill(ghost)
        await self.store.close_session(row["incarnation"], reason="lost_while_daemon_down")
        await self.store.event("session_lost", {"pid": row["pid"], "ended": leftovers}, agent=row["agent"],
                               incarnation=row["incarnation"])

    # -- status -------------------------------------------------------------------------------

    def rows(self) -> list[dict]:
        now = self.clock.now()
        out = []
        for name in self.config.start_order():
            svc = self.services[name]
            out.append({
                "name": name, "role": svc.spec.role, "parent": svc.spec.parent, "port": svc.spec.port,
                "state": str(svc.state), "pid": svc.child.pid if svc.child and svc.child.alive else None,
                "incarnation": svc.incarnation, "restarts": svc.restarts, "provider": svc.provider,
                "last_beat_age": round(now - svc.last_beat, 3) if svc.last_beat else None,
                "uptime": round(now - svc.started_at, 1) if svc.started_at and svc.state == S.RUNNING else None,
                "task": svc.task_id, "progress": svc.progress, "crash_looping": svc.crash_looping,
                "stopped": svc.stopped, "last_failure": svc.last_failure, "ready": svc.ready,
                "paused": svc.paused, "node": svc.child.node if svc.child else None,
                "mode": svc.child.mode if svc.child else None,
                "cause": svc.spawn_cause,  # why it cannot start (spawn_failed), while it has not run since
            })
        return out


def last_line(path: Path, limit: int = 4096) -> str | None:
    """The last line a program wrote to its log (JSON lines: their message), for a start
    failure's reason."""
    try:
        with open(path, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - limit))
            lines = [ln for ln in f.read().decode(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return None
    if not lines:
        return None
    line = lines[-1]
    try:
        line = json.loads(line).get("msg", line)
    except (ValueError, AttributeError):
        pass
    return str(line)[:300]


def top_of(config: MeshConfig, decider: str) -> bool:
    """Nobody decides above the daemon, or above a service of the root role."""
    return decider == DAEMON or config.services[decider].role == "root"

