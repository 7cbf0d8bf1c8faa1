"""The daemon: the one process that owns the mesh.

It holds the home's lock, owns the registry writer, runs TRON's monitor thread, spawns
and stops every service, turns TRON's signals into persisted alerts and delivers them
up the parent chain, and carries out the restarts that parents ask for.

Handlers enqueue, one loop acts: the monitor thread and the pidfd callbacks only hand
signals to the event loop; everything that changes state runs there.
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import logging
import os
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common import logs
from common.config import DAEMON, REPO_ROOT, MeshConfig, ServiceSpec
from common.http import MeshClient, MeshHTTPError
from common.models import Alert, Escalation, PermanentFailure, Reason, RestartRequest, RunFailed, TaskAssign, TaskResult
from common.monitor import Monitor, MonitorThread, Signal, Verdict
from common.paths import Home, ensure_token
from common.ladder import plan_child_failure
from registry.store import Registry
from services.daemon import metrics
from services.daemon.spawner import Child, ForkServerClient, LocalSpawner, become_subreaper, reap_strays
from services.daemon.states import State, check

log = logging.getLogger("tron.daemon")

NON_AGENT_BEAT_TIMEOUT = 10 * 365 * 86400.0  # command services have no beats to miss


class StartError(Exception):
    """The daemon cannot start; the message says why."""


def new_id(prefix: str = "") -> str:
    return prefix + uuid.uuid4().hex[:12]


@dataclass
class ServiceState:
    """Everything the daemon knows about one service, in one place."""

    spec: ServiceSpec
    provider: str | None
    state: State = State.STOPPED
    child: Child | None = None
    incarnation: str | None = None
    restarts: int = 0
    started_mono: float | None = None
    last_beat_mono: float | None = None
    task_id: str | None = None
    progress: str | None = None
    failed_mono: float | None = None
    healthy: asyncio.Event = field(default_factory=asyncio.Event)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    probe_failures: int = 0
    replacing: str | None = None  # the incarnation a restart is already replacing
    failed_since: float | None = None  # when it entered FAILED (the watchdog's clock)

    @property
    def name(self) -> str:
        return self.spec.name


class Daemon:
    def __init__(self, config: MeshConfig, home: Home, *, config_path: Path | None = None) -> None:
        self.config = config
        self.policy = config.policy
        self.home = home
        self.config_path = config_path
        self.registry = Registry(home.registry_db)
        self.monitor = Monitor()
        self.services: dict[str, ServiceState] = {
            name: ServiceState(spec, config.provider_of(name) if spec.is_agent else None)
            for name, spec in config.services.items()
        }
        self.token = ""
        self.client: MeshClient | None = None
        self.spawner: LocalSpawner | None = None
        self.forkserver: ForkServerClient | None = None
        self.monitor_thread: MonitorThread | None = None
        self._lock_fd: int | None = None
        self._tasks: set[asyncio.Task] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self.stopping = False
        self.started_mono = time.monotonic()
        self.last_alert: dict | None = None
        self.metrics = metrics.DaemonMetrics()
        self.shutdown_requested = asyncio.Event()

    def request_shutdown(self) -> None:
        self.shutdown_requested.set()

    # -- lifecycle ------------------------------------------------------------------------

    def acquire_lock(self) -> None:
        """One authority per home: a second daemon refuses to start."""
        self.home.ensure()
        fd = os.open(self.home.lock_file, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 64).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise StartError(
                f"another tron daemon (pid {holder}) already runs on home {self.home.root}; "
                "use `tron status`, or `tron down` first"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._lock_fd = fd

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self.acquire_lock()
        await self.registry.open()
        self.token = ensure_token(self.home.token_file)
        self.client = MeshClient(self.token, timeout=self.policy.alert_delivery_timeout)
        self.spawner = LocalSpawner(self.home.logs, self._on_exit)
        logs.setup(DAEMON, comms_path=self.home.comms_log)
        if self.config.mesh.fork_server and become_subreaper():
            # TRON_HOME marks every process of this home, forked ones included (a forked
            # process's /proc environ is the server's).
            env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "TRON_HOME": str(self.home.root)}
            self.forkserver = ForkServerClient(self.home.run / "forkserver.sock", self.home.log_file("forkserver"),
                                               REPO_ROOT, env)
            self._forkserver_started = self._spawn_bg(self.forkserver.start(), "fork server")
        for st in self.services.values():
            await self.registry.upsert_agent(st.name, st.spec.role, st.spec.parent, st.spec.port, st.provider)
            row = await self.registry.agent(st.name)
            if st.spec.is_agent and row and row["provider"]:
                st.provider = row["provider"]  # a provider switch outlives a daemon restart
        self.monitor_thread = MonitorThread(self.monitor, self._signal_from_thread)
        self.monitor_thread.start()
        await self.registry.event("daemon_started", {"pid": os.getpid(), "config": str(self.config_path)})

    async def bring_up(self) -> None:
        """Adopt what an earlier daemon left running, start the rest, parents first."""
        await self._adopt_or_close_sessions()
        if self.forkserver is not None:
            await asyncio.wait([self._forkserver_started], timeout=30)
        self._spawn_bg(self._housekeeping(), "housekeeping")
        for name in self.config.start_order():
            st = self.services[name]
            if st.child is None or not st.child.alive:
                await self.start_service(st, reason="mesh_start")
            await self.wait_healthy(st)
        self._spawn_bg(self._probe_loop(), "liveness probes")
        # Results recorded while the previous daemon was down or dying reach their parents now.
        for row in await self.registry.undelivered_results():
            outcome = TaskResult(task_id=row["task_id"], run_id=row["run_id"], status=row["status"],
                                 result=row["result"], reason=(row["failure"] or {}).get("reason"),
                                 detail=row["failure"] or {}, service=row["agent"])
            self._spawn_bg(self._deliver_result(row["parent_agent"], outcome), f"redeliver {row['task_id']}")
        # Alerts persisted by an earlier daemon but never handled are delivered now.
        for row in await self.registry.pending_alerts():
            st = self.services.get(row["agent"])
            if st and st.incarnation == row["incarnation"]:
                self._spawn_bg(self.deliver(self._alert_from_row(row)), f"redeliver {row['alert_id']}")
            else:
                await self.registry.mark_alert(row["alert_id"], "handled", decision="superseded_by_daemon_restart")

    async def shutdown(self) -> None:
        """Stop every service (children before parents), then the daemon itself."""
        if self.stopping:
            return
        self.stopping = True
        log.info("shutdown: stopping every service")
        for task in list(self._tasks):
            task.cancel()
        for name in reversed(self.config.start_order()):
            st = self.services[name]
            await self.stop_service(st, reason="tron_down")
        if self.forkserver is not None:
            await self.forkserver.stop()
        if self.monitor_thread:
            self.monitor_thread.stop()
        await self.registry.event("daemon_stopped", {"pid": os.getpid()})
        await self.registry.close()
        if self.client:
            await self.client.close()
        try:
            self.home.daemon_file.unlink()
        except FileNotFoundError:
            pass
        if self._lock_fd is not None:
            os.close(self._lock_fd)

    def write_daemon_file(self, port: int) -> None:
        data = {"pid": os.getpid(), "port": port, "config": str(self.config_path or ""), "home": str(self.home.root)}
        tmp = self.home.daemon_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(data))
        tmp.replace(self.home.daemon_file)

    # -- spawning -------------------------------------------------------------------------

    def _env(self, st: ServiceState, incarnation: str) -> dict[str, str]:
        env = dict(os.environ)
        env.update(st.spec.env)
        env.update({
            "TRON_SERVICE": st.name,
            "TRON_ROLE": st.spec.role,
            "TRON_PORT": str(st.spec.port),
            "TRON_INCARNATION": incarnation,
            "TRON_HOME": str(self.home.root),
            "TRON_DAEMON_URL": self.config.daemon_url,
            "TRON_TOKEN_FILE": str(self.home.token_file),
            "TRON_CONFIG": str(self.config_path or ""),
            "TRON_PORT_OFFSET": os.environ.get("TRON_PORT_OFFSET", "0"),
            "PYTHONPATH": str(REPO_ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else ""),
            "PYTHONUNBUFFERED": "1",
        })
        if st.provider:
            env["TRON_PROVIDER"] = st.provider
        return env

    async def start_service(self, st: ServiceState, *, reason: str) -> None:
        """Spawn a new incarnation. TRON watches it from the first moment, with the
        start timeout as its first beat deadline, so a child that never comes up is
        caught by the same machinery as one that stops beating."""
        incarnation = new_id("i-")
        await self._transition(st, State.STARTING, reason)
        st.healthy.clear()
        env = self._env(st, incarnation)
        try:
            child, mode = None, "plain"
            if st.spec.is_agent and self.forkserver is not None and self.forkserver.ready:
                pid = await self.forkserver.spawn(f"services.{st.spec.role}", env, REPO_ROOT,
                                                  self.home.log_file(st.name))
                if pid is not None:
                    child, mode = self.spawner.track_forked(st.name, incarnation, pid), "fork"
            if child is None:
                child = self.spawner.spawn(st.name, incarnation, st.spec.argv(), env, REPO_ROOT)
        except OSError as err:
            log.error("spawn failed", extra={"offender": st.name, "error": str(err)})
            await self._transition(st, State.GIVEN_UP, f"spawn_failed: {err}")
            await self.registry.event("spawn_failed", {"error": str(err), "argv": st.spec.argv()}, agent=st.name)
            return
        st.child, st.incarnation = child, incarnation
        st.started_mono = time.monotonic()
        st.last_beat_mono = None
        st.probe_failures = 0
        await self.registry.open_session(incarnation, st.name, child.pid, child.create_time, st.spec.port, st.provider)
        await self.registry.event("spawned", {"pid": child.pid, "reason": reason, "provider": st.provider,
                                              "mode": mode, "argv": st.spec.argv()},
                                  agent=st.name, incarnation=incarnation)
        self._watch(st, first_deadline=self.policy.start_timeout)
        log.info("spawned", extra={"offender": st.name, "pid": child.pid, "incarnation": incarnation,
                                   "reason": reason, "mode": mode})
        self._spawn_bg(self._await_health(st, incarnation), f"health {st.name}")

    def _watch(self, st: ServiceState, *, first_deadline: float) -> None:
        now = time.monotonic()
        beat_timeout = self.policy.beat_timeout if st.spec.is_agent else NON_AGENT_BEAT_TIMEOUT
        self.monitor.watch(st.name, st.incarnation, now + max(0.0, first_deadline - beat_timeout),
                           beat_timeout=beat_timeout, progress_timeout=self.policy.progress_timeout,
                           task_timeout=self.policy.task_timeout)

    async def _await_health(self, st: ServiceState, incarnation: str) -> None:
        url = st.spec.health_url
        deadline = time.monotonic() + self.policy.start_timeout
        while url and time.monotonic() < deadline:
            if st.incarnation != incarnation or st.child is None or not st.child.alive:
                return
            try:
                body = await self.client.get(url, timeout=1.0)
                if not st.spec.is_agent or (isinstance(body, dict) and body.get("incarnation") == incarnation):
                    break
            except (MeshHTTPError, OSError, asyncio.TimeoutError):
                pass
            await asyncio.sleep(0.01)
        else:
            if url:
                return  # never healthy: TRON's start deadline raises the alert
        if st.incarnation != incarnation or st.state != State.STARTING:
            return
        await self.registry.session_running(incarnation)
        await self._transition(st, State.RUNNING, "healthy")
        st.healthy.set()
        if st.failed_mono is not None:
            self.metrics.recovery_latency.observe(time.monotonic() - st.failed_mono)
            await self.registry.event("recovered", {"seconds": round(time.monotonic() - st.failed_mono, 4),
                                                    "cold_start": round(time.monotonic() - st.started_mono, 4)},
                                      agent=st.name, incarnation=incarnation)
            st.failed_mono = None
        if st.spec.is_agent:
            await self._redispatch(st)

    async def wait_healthy(self, st: ServiceState, timeout: float | None = None) -> bool:
        try:
            await asyncio.wait_for(st.healthy.wait(), timeout or self.policy.start_timeout + 1)
            return True
        except asyncio.TimeoutError:
            return False

    async def stop_service(self, st: ServiceState, *, reason: str) -> None:
        async with st.lock:
            if st.state == State.STOPPED:
                return
            await self._transition(st, State.STOPPING, reason)
            child = st.child
            if child is not None:
                self.monitor.unwatch(st.name)
                await self.spawner.stop(child, self.policy.stop_grace)
                await self._close_session(child, reason)
            await self._transition(st, State.STOPPED, reason)

    async def _close_session(self, child: Child, reason: str) -> None:
        closed = await self.registry.close_session(child.incarnation, reason=reason, exit_code=child.exit_code,
                                                   exit_signal=child.exit_signal)
        if closed:
            await self.registry.event("session_ended", {"reason": reason, "exit_code": child.exit_code,
                                                        "signal": child.exit_signal, "pid": child.pid},
                                      agent=child.name, incarnation=child.incarnation)

    async def _adopt_or_close_sessions(self) -> None:
        """Sessions left open by an earlier daemon: adopt the live ones (same pid and
        start time), close the rest with a reason. No session stays 'running' without
        its process."""
        for row in await self.registry.open_sessions():
            st = self.services.get(row["agent"])
            child = None
            if st is not None and st.child is None and row["pid"]:
                child = self.spawner.adopt(st.name, row["incarnation"], row["pid"], row["pid_create_time"])
            if child is None:
                await self.registry.close_session(row["incarnation"], reason="lost_while_daemon_down")
                await self.registry.event("session_lost", {"pid": row["pid"]}, agent=row["agent"],
                                          incarnation=row["incarnation"])
                continue
            st.child, st.incarnation = child, row["incarnation"]
            st.started_mono = time.monotonic()
            st.provider = row["provider"] or st.provider
            await self._transition(st, State.STARTING, "adopted")
            self._watch(st, first_deadline=self.policy.start_timeout)
            await self.registry.event("adopted", {"pid": child.pid}, agent=st.name, incarnation=st.incarnation)
            log.info("adopted", extra={"offender": st.name, "pid": child.pid, "incarnation": st.incarnation})
            self._spawn_bg(self._await_health(st, st.incarnation), f"health {st.name}")

    # -- state ------------------------------------------------------------------------------

    async def _transition(self, st: ServiceState, new: State, reason: str) -> None:
        old = st.state
        if old == new and new != State.STARTING:
            return
        check(old, new)
        st.state = new
        st.failed_since = time.monotonic() if new == State.FAILED else None
        log.info("%s: %s -> %s", st.name, old, new,
                 extra={"offender": st.name, "from": str(old), "to": str(new), "reason": reason,
                        "incarnation": st.incarnation})
        await self.registry.set_agent(st.name, state=str(new))

    # -- beats ------------------------------------------------------------------------------

    async def on_beat(self, beat) -> Verdict:
        now = time.monotonic()
        verdict = self.monitor.beat(beat.service, beat.incarnation, beat.seq, now, task_id=beat.task_id,
                                    progress=beat.progress, waiting=beat.waiting)
        if verdict is not Verdict.ACCEPTED:
            self.metrics.beats_rejected.labels(verdict=str(verdict)).inc()
            return verdict
        self.metrics.beats.inc()
        st = self.services[beat.service]
        st.last_beat_mono = now
        if beat.task_id and (beat.task_id != st.task_id or beat.progress != st.progress):
            await self.registry.task_progress(beat.task_id, beat.incarnation, beat.progress)
        st.task_id, st.progress = beat.task_id, beat.progress
        return verdict

    # -- failures -----------------------------------------------------------------------------

    def _signal_from_thread(self, signal: Signal) -> None:
        """Called on the monitor thread: hand over to the loop, nothing else."""
        self._loop.call_soon_threadsafe(self._spawn_bg, self.on_signal(signal), f"signal {signal.service}")

    def _on_exit(self, child: Child) -> None:
        """Called by the spawner's pidfd callback, on the loop."""
        st = self.services.get(child.name)
        log.info("process exited", extra={"offender": child.name, "pid": child.pid, "exit_code": child.exit_code,
                                          "signal": child.exit_signal, "expected": child.expected_exit,
                                          "incarnation": child.incarnation})
        if child.expected_exit or st is None or self.stopping:
            return
        signal = self.monitor.process_exited(child.name, child.incarnation, time.monotonic(),
                                             exit_code=child.exit_code, signal=child.exit_signal)
        self._spawn_bg(self._close_session(child, "process_exit"), f"close {child.incarnation}")
        if signal is not None:
            self._spawn_bg(self.on_signal(signal), f"exit {child.name}")

    async def on_signal(self, signal: Signal, *, retryable: bool = True) -> None:
        """A TRON signal becomes a persisted alert, then is delivered up the chain."""
        st = self.services.get(signal.service)
        if st is None or st.incarnation != signal.incarnation or self.stopping:
            return
        self.metrics.alerts.labels(reason=str(signal.reason)).inc()
        self.metrics.detection_latency.labels(reason=str(signal.reason)).observe(
            max(0.0, signal.fired_at - signal.deadline))
        task = await self.registry.task(signal.task_id) if signal.task_id else None
        alert = Alert(
            alert_id=new_id("a-"), service=signal.service, incarnation=signal.incarnation, reason=signal.reason,
            detail={**signal.detail, "detected_after": round(signal.fired_at - signal.deadline, 4)},
            task_id=signal.task_id, run_id=task["run_id"] if task else None, progress=signal.progress,
            provider=st.provider, retryable=retryable,
        )
        row, created = await self.registry.insert_alert(alert.model_dump(mode="json"))
        if not created:
            return  # this incarnation already has its alert: never handled twice
        st.failed_mono = st.failed_mono or signal.deadline
        if st.state in (State.RUNNING, State.STARTING):
            await self._transition(st, State.FAILED, str(signal.reason))
        self.last_alert = {"service": st.name, "reason": str(signal.reason), "at": time.time()}
        log.warning("alert", extra={"offender": st.name, "reason": str(signal.reason), "alert": alert.alert_id,
                                    "incarnation": alert.incarnation, "task": alert.task_id, "detail": alert.detail})
        await self.deliver(alert)

    def _alert_from_row(self, row: dict) -> Alert:
        return Alert(alert_id=row["alert_id"], service=row["agent"], incarnation=row["incarnation"],
                     reason=row["reason"], detail=json.loads(row["detail"]), task_id=row["task_id"],
                     run_id=row["run_id"], provider=self.services[row["agent"]].provider)

    async def deliver(self, alert: Alert) -> None:
        """To the parent's /handle_child_timeout; if it does not answer, the next
        ancestor; the daemon itself is the last ancestor and always answers."""
        for target in self.config.ancestors(alert.service):
            alert.hops.append(target)
            if target == DAEMON:
                await self.registry.mark_alert(alert.alert_id, "delivered", delivered_to=DAEMON)
                logs.comms("alert", src=DAEMON, dst=DAEMON, alert=alert.alert_id, agent=alert.service,
                           task=alert.task_id, run=alert.run_id, incarnation=alert.incarnation)
                await self.handle_child_failure(alert)
                return
            parent = self.services[target]
            if parent.state != State.RUNNING:
                log.info("alert: skipping %s (%s)", target, parent.state, extra={"alert": alert.alert_id})
                continue
            url = self.config.url(target) + "/handle_child_timeout"
            logs.comms("alert", src=DAEMON, dst=target, alert=alert.alert_id, agent=alert.service,
                       task=alert.task_id, run=alert.run_id, incarnation=alert.incarnation)
            try:
                answer = await self.client.post(url, alert, timeout=self.policy.alert_delivery_timeout)
            except (MeshHTTPError, OSError, asyncio.TimeoutError) as err:
                log.warning("alert delivery to %s failed: %s", target, err, extra={"alert": alert.alert_id})
                continue
            answer = answer if isinstance(answer, dict) else {}
            st = self.services[alert.service]
            acted = answer.get("status") in ("accepted", "duplicate", "recorded") or not (
                st.state == State.FAILED and st.incarnation == alert.incarnation and st.replacing != alert.incarnation)
            if not acted:
                # The parent answered but nothing happened (its restart was refused, say):
                # an answered alert that changes nothing is a dropped alert. Go on up.
                log.warning("alert %s: %s answered %s but took no action; next ancestor", alert.alert_id, target,
                            answer, extra={"alert": alert.alert_id, "offender": alert.service})
                continue
            await self.registry.mark_alert(alert.alert_id, "delivered", delivered_to=target,
                                           decision=answer.get("action"))
            return

    async def handle_child_failure(self, alert: Alert) -> dict:
        """The daemon as parent (of llm-sim, gateway, root): the same level-1 rule as
        every agent. Above the daemon there is nobody: giving up is final."""
        plan = plan_child_failure(alert, await self.ladder(alert.service, alert.task_id), self.policy, DAEMON)
        if isinstance(plan, RestartRequest):
            return await self.restart(plan)
        answer = await self.give_up(plan, by=DAEMON, to=DAEMON)
        if answer.get("status") == "recorded":
            await self.permanent_failure(PermanentFailure(
                alert_id=plan.alert_id, service=plan.service, task_id=plan.task_id, run_id=plan.run_id,
                reason=plan.reason, detail={"last_reason": str(alert.reason)}, requested_by=DAEMON),
                notify_gateway=True)
        return answer

    async def ladder(self, service: str, task_id: str | None) -> dict:
        return {
            "service": service,
            "restart_times": await self.registry.restart_times(service),
            "now": time.monotonic(),
            "task": await self.registry.task_ladder(task_id) if task_id else None,
            "policy": self.policy.model_dump(),
        }

    # -- restarts -------------------------------------------------------------------------------

    async def restart(self, req: RestartRequest) -> dict:
        """Replace one incarnation. Guarded by the incarnation it replaces (a stale
        request is a no-op) and idempotent by alert id (one history row, one restart)."""
        st = self.services[req.service]
        async with st.lock:
            alert = await self.registry.alert(req.alert_id)
            if await self.registry.retry_recorded(req.alert_id, req.retry_type, st.name) or (
                    req.retry_type == "child_restart" and alert is not None and alert["status"] == "handled"):
                return {"status": "duplicate", "alert_id": req.alert_id}
            if (st.incarnation != req.replaces or st.replacing == req.replaces
                    or st.state in (State.STOPPING, State.STOPPED)):
                return {"status": "stale", "current": st.incarnation, "state": str(st.state)}
            task_id = req.task_id or st.task_id or (alert or {}).get("task_id")
            task = await self.registry.task(task_id) if task_id else None
            to_provider = req.provider if req.retry_type == "llm_change" else None
            row = await self.registry.record_retry(
                alert_id=req.alert_id, agent_id=st.name, retry_type=req.retry_type, reason=req.reason,
                detail=req.detail, task_id=task["task_id"] if task else None, run_id=task["run_id"] if task else None,
                from_provider=st.provider, to_provider=to_provider, decided_by=req.decided_by,
                requested_by=req.requested_by)
            if row is None:
                return {"status": "duplicate", "alert_id": req.alert_id}
            st.replacing = req.replaces
            await self.registry.mark_alert(req.alert_id, "handled", decision=req.retry_type)
            self.metrics.restarts.labels(kind=req.retry_type).inc()
            if req.retry_type == "llm_change":
                self.metrics.provider_switches.inc()
            st.restarts += 1
            st.failed_mono = st.failed_mono or time.monotonic()
            if req.delay > 0:
                await self._transition(st, State.BACKOFF, f"{req.reason}, retry in {req.delay:.2f}s")
            old = st.child
            old_incarnation = st.incarnation
            self.monitor.unwatch(st.name)
        logs.comms("restart", src=req.requested_by, dst=DAEMON, agent=st.name, alert=req.alert_id,
                   incarnation=old_incarnation)
        self._spawn_bg(self._replace(st, old, old_incarnation, req, to_provider), f"restart {st.name}")
        return {"status": "accepted", "retry_count": row["retry_count"], "delay": req.delay,
                "replaces": old_incarnation}

    async def _replace(self, st: ServiceState, old: Child | None, old_incarnation: str, req: RestartRequest,
                       to_provider: str | None) -> None:
        if old is not None and old.alive:
            await self.spawner.kill(old)  # hung or failed: nothing to wait for
        if old is not None:
            await self._close_session(old, f"replaced:{req.reason}")
        if req.delay > 0:
            await asyncio.sleep(req.delay)
        async with st.lock:
            try:
                if st.incarnation != old_incarnation or self.stopping:
                    return  # someone else moved it on meanwhile
                if to_provider:
                    st.provider = to_provider
                    await self.registry.set_agent(st.name, provider=to_provider)
                await self.registry.requeue_tasks(st.name, provider=to_provider)
                await self.start_service(st, reason=f"{req.retry_type}:{req.reason}")
            finally:
                st.replacing = None  # only now: until the new incarnation exists, the old one is being replaced

    async def _redispatch(self, st: ServiceState) -> None:
        """Give a fresh incarnation the tasks its predecessor held, with the last
        progress marker so it can resume instead of starting over."""
        for task in await self.registry.open_tasks(st.name):
            assign = TaskAssign(task_id=task["task_id"], run_id=task["run_id"], kind=task["kind"],
                                prompt=task["prompt"], reply_to=task["parent_agent"],
                                parent_task_id=task["parent_task_id"], progress=task["progress"],
                                attempt=task["attempt"], provider=st.provider)
            url = self.config.url(st.name) + "/tasks"
            logs.comms("task_redispatch", src=DAEMON, dst=st.name, task=task["task_id"], run=task["run_id"],
                       incarnation=st.incarnation, progress=task["progress"], attempt=task["attempt"])
            try:
                await self.client.post(url, assign, timeout=5)
                await self.registry.event("task_resumed", {"progress": task["progress"], "attempt": task["attempt"]},
                                          agent=st.name, incarnation=st.incarnation, task_id=task["task_id"],
                                          run_id=task["run_id"])
            except (MeshHTTPError, OSError, asyncio.TimeoutError) as err:
                log.warning("re-dispatch of %s to %s failed: %s", task["task_id"], st.name, err)

    async def give_up(self, esc: Escalation, *, by: str, to: str) -> dict:
        """Record an escalation hop; the first hop also stops the failing service (it
        is not restarted again until the root decides what to do)."""
        st = self.services[esc.service]
        row = await self.registry.record_retry(
            alert_id=esc.alert_id, agent_id=esc.service, retry_type="escalation", reason=esc.reason,
            detail={**esc.detail, "from": by, "to": to, "path": esc.path, "restarts": esc.restarts},
            task_id=esc.task_id, run_id=esc.run_id, from_provider=esc.provider, requested_by=by, hop=f"{by}->{to}",
            decided_by=esc.decided_by)
        if row is None:
            return {"status": "duplicate", "action": "escalate"}
        self.metrics.escalations.inc()
        await self.registry.mark_alert(esc.alert_id, "handled", decision="escalate")
        async with st.lock:
            if st.incarnation == esc.incarnation and st.state not in (State.GIVEN_UP, State.STOPPED):
                self.monitor.unwatch(st.name)
                if st.child is not None and st.child.alive:
                    await self.spawner.kill(st.child)
                if st.child is not None:
                    await self._close_session(st.child, f"given_up:{esc.reason}")
                if st.state != State.FAILED:
                    await self._transition(st, State.FAILED, esc.reason)
                await self._transition(st, State.GIVEN_UP, esc.reason)
        log.error("escalation", extra={"offender": esc.service, "reason": esc.reason, "from": by, "to": to,
                                       "alert": esc.alert_id, "task": esc.task_id})
        return {"status": "recorded", "action": "escalate", "retry_count": row["retry_count"]}

    async def permanent_failure(self, rec: PermanentFailure, *, notify_gateway: bool = False) -> dict:
        """Level 3: the task and its run fail with a structured reason; the parent that
        waits for the task is told; an agent that failed while working is left healthy
        and idle for the next run (one that failed while idle stays given up)."""
        st = self.services[rec.service]
        task = await self.registry.task(rec.task_id) if rec.task_id else None
        rows = await self.registry.task_history(rec.task_id) if rec.task_id else []
        signals = sorted({json.loads(r["detail"]).get("detected_by") or r["reason"] for r in rows
                          if r["retry_type"] == "escalation"} | {r["reason"] for r in rows
                                                                 if r["retry_type"] == "child_restart"})
        providers = [p for p in dict.fromkeys([r["from_provider"] for r in rows] + [st.provider]) if p]
        failure = {
            **rec.detail,
            "agent": rec.service, "reason": rec.reason, "signals": signals, "providers_tried": providers,
            "restarts": sum(r["retry_type"] == "child_restart" for r in rows),
            "provider_switches": sum(r["retry_type"] == "llm_change" for r in rows),
            "task_id": rec.task_id, "run_id": rec.run_id,
        }
        row = await self.registry.record_retry(
            alert_id=rec.alert_id, agent_id=rec.service, retry_type="permanent_failure", reason=rec.reason,
            detail=failure, task_id=rec.task_id, run_id=rec.run_id, from_provider=st.provider,
            requested_by=rec.requested_by)
        if row is None:
            return {"status": "duplicate"}
        self.metrics.permanent_failures.inc()
        log.error("permanent failure", extra={"offender": rec.service, "task": rec.task_id, "run": rec.run_id,
                                              "reason": rec.reason, "failure": failure})
        if task is not None:
            await self.finish_task(task["task_id"], "failed", None, "permanent_failure", failure, None)
        run_failed_now = bool(rec.run_id) and await self.finish_run(rec.run_id, "failed", None, failure)
        if run_failed_now:
            if notify_gateway:
                self._spawn_bg(self._notify_gateway(rec.run_id, rec.task_id, rec.reason, failure), "notify")
        async with st.lock:
            if task is not None and st.state == State.GIVEN_UP and not self.stopping:
                st.provider = self.config.provider_of(st.name)
                await self.registry.set_agent(st.name, provider=st.provider)
                await self.start_service(st, reason="idle_after_permanent_failure")
        return {"status": "recorded", "failure": failure, "run_failed_now": run_failed_now}

    async def finish_task(self, task_id: str, status: str, result: str | None, reason: str | None,
                          detail: dict, incarnation: str | None) -> bool:
        """Record a task's end, then deliver it to the waiting parent: persisted before
        delivered, by the one process that does not die with the child. A run's root
        task also ends the run here, so the outcome never depends on the gateway."""
        row = await self.registry.task(task_id)
        failure = {"reason": reason, **detail} if status == "failed" else None
        if row is None or not await self.registry.finish_task(task_id, status, result, failure):
            return False
        await self.registry.event(f"task_{status}", {"reason": reason, "incarnation": incarnation},
                                  agent=row["agent"], task_id=task_id, run_id=row["run_id"])
        if row["parent_task_id"] is None:
            await self.finish_run(row["run_id"], status, result, failure)
        outcome = TaskResult(task_id=task_id, run_id=row["run_id"], status=status, result=result, reason=reason,
                             detail=detail, service=row["agent"], incarnation=incarnation)
        self._spawn_bg(self._deliver_result(row["parent_agent"], outcome), f"deliver {task_id}")
        return True

    async def finish_run(self, run_id: str, status: str, result: str | None, failure: dict | None) -> bool:
        """End a run once; the first outcome recorded is the one that stands."""
        changed = await self.registry.finish_run(run_id, status, result, failure)
        if changed:
            await self.registry.event(f"run_{status}", {"reason": (failure or {}).get("reason"),
                                                        "failure": failure}, run_id=run_id)
        return changed

    async def _deliver_result(self, target: str, outcome: TaskResult) -> None:
        if target not in self.services:
            return
        logs.comms("task_result", src=DAEMON, dst=target, task=outcome.task_id, run=outcome.run_id,
                   status=outcome.status, reason=outcome.reason, agent=outcome.service)
        delay = 0.02
        while not self.stopping:
            st = self.services[target]
            if st.state == State.RUNNING:
                try:
                    await self.client.post(self.config.url(target) + "/task_result", outcome, timeout=5)
                    await self.registry.mark_delivered(outcome.task_id)
                    return
                except (MeshHTTPError, OSError, asyncio.TimeoutError) as err:
                    log.info("result of %s not delivered to %s yet: %s", outcome.task_id, target, err)
            elif st.state in (State.GIVEN_UP, State.STOPPED):
                return  # a restarted parent finds the result in the registry when it re-delegates
            await asyncio.sleep(delay)
            delay = min(delay * 2, 1.0)

    async def _notify_gateway(self, run_id: str, task_id: str | None, reason: str, failure: dict) -> None:
        gateway = next((n for n, s in self.config.services.items() if s.role == "gateway"), None)
        if gateway is None:
            return
        notice = RunFailed(run_id=run_id, task_id=task_id, reason=reason, detail=failure)
        logs.comms("notify_run_failed", src=DAEMON, dst=gateway, run=run_id, task=task_id, reason=reason)
        try:
            await self.client.post(self.config.url(gateway) + "/notify_run_failed", notice, timeout=5)
        except (MeshHTTPError, OSError, asyncio.TimeoutError) as err:
            log.error("gateway not told of failed run %s: %s (the registry has it)", run_id, err)

    def decision_deadline(self, name: str) -> float:
        """How long an alert may take to become a decision: every ancestor may time out."""
        hops = len(self.config.ancestors(name))
        return hops * self.policy.alert_delivery_timeout + 5.0

    async def _housekeeping(self) -> None:
        """Once a second: reap orphans we inherited (as a subreaper), and act on any
        service that has been FAILED too long with no decision (an alert whose handler
        answered but did nothing): the daemon is the last ancestor and decides itself."""
        last_reap = 0.0
        while not self.stopping:
            await asyncio.sleep(1.0)
            now = time.monotonic()
            if now - last_reap >= 2.0:
                last_reap = now
                tracked = {st.child.pid for st in self.services.values() if st.child is not None}
                if self.forkserver is not None and self.forkserver.pid:
                    tracked.add(self.forkserver.pid)
                reap_strays(tracked)
            for st in self.services.values():
                if st.state == State.FAILED and st.failed_since and now - st.failed_since > self.decision_deadline(st.name):
                    row = await self.registry.alert_for(st.name, st.incarnation)
                    if row is None:
                        continue
                    alert = self._alert_from_row(row)
                    log.error("watchdog: %s has been failed for %.1fs with no decision; the daemon decides",
                              st.name, now - st.failed_since, extra={"offender": st.name, "alert": alert.alert_id})
                    await self.registry.event("watchdog_decides", {"failed_for": round(now - st.failed_since, 3)},
                                              agent=st.name, incarnation=st.incarnation, alert_id=alert.alert_id)
                    st.failed_since = now  # one attempt per deadline, not one per second
                    self._spawn_bg(self.handle_child_failure(alert), f"watchdog {st.name}")

    async def respawn(self, service: str, reason: str) -> dict:
        """Start a given-up or stopped service again: an operator's decision, recorded as
        an event, not as a retry (the ladder did not ask for it)."""
        st = self.services[service]
        async with st.lock:
            if st.state not in (State.GIVEN_UP, State.STOPPED):
                return {"status": "not_needed", "state": str(st.state)}
            await self.registry.event("respawned", {"reason": reason, "was": str(st.state)}, agent=service)
            st.failed_mono = None
            await self.start_service(st, reason=reason)
        return {"status": "starting", "incarnation": st.incarnation}

    # -- liveness probes for non-agent services -----------------------------------------------------

    async def _probe_loop(self) -> None:
        """One task for every probe (not one per service): each service is probed on
        its own interval; ``failure_threshold`` failures in a row raise an alert."""
        due: dict[str, float] = {}
        while not self.stopping:
            now = time.monotonic()
            for st in self.services.values():
                probe = st.spec.liveness
                if probe is None or st.state != State.RUNNING:
                    continue
                if due.get(st.name, 0) > now:
                    continue
                due[st.name] = now + probe.interval
                self._spawn_bg(self._probe(st), f"probe {st.name}")
            await asyncio.sleep(0.1)

    async def _probe(self, st: ServiceState) -> None:
        probe = st.spec.liveness
        incarnation = st.incarnation
        try:
            await self.client.get(st.spec.health_url, timeout=probe.timeout)
            st.probe_failures = 0
            st.last_beat_mono = time.monotonic()
            return
        except (MeshHTTPError, OSError, asyncio.TimeoutError) as err:
            st.probe_failures += 1
            failure = str(err) or type(err).__name__
        if st.probe_failures >= probe.failure_threshold and st.incarnation == incarnation:
            signal = self.monitor.raise_alert(st.name, incarnation, Reason.LIVENESS_FAILED, time.monotonic(),
                                              {"failures": st.probe_failures, "last_error": failure[:200]})
            if signal:
                await self.on_signal(signal)

    # -- helpers ------------------------------------------------------------------------------------

    def _spawn_bg(self, coro, what: str) -> asyncio.Task:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)

        def done(t: asyncio.Task) -> None:
            self._tasks.discard(t)
            if not t.cancelled() and t.exception() is not None:
                log.error("background task %r failed", what, exc_info=t.exception())

        task.add_done_callback(done)
        return task

    def status(self) -> dict[str, Any]:
        now = time.monotonic()
        services = []
        for name in self.config.start_order():
            st = self.services[name]
            services.append({
                "name": name, "role": st.spec.role, "parent": st.spec.parent, "port": st.spec.port,
                "state": str(st.state), "pid": st.child.pid if st.child and st.child.alive else None,
                "incarnation": st.incarnation, "restarts": st.restarts, "provider": st.provider,
                "last_beat_age": round(now - st.last_beat_mono, 3) if st.last_beat_mono else None,
                "uptime": round(now - st.started_mono, 1) if st.started_mono and st.state == State.RUNNING else None,
                "task": st.task_id, "progress": st.progress,
            })
        return {
            "daemon": {"pid": os.getpid(), "port": self.config.mesh.daemon_port, "home": str(self.home.root),
                       "uptime": round(now - self.started_mono, 1), "monitor_alive": bool(
                           self.monitor_thread and self.monitor_thread.is_alive())},
            "services": services,
            "fork_server": None if self.forkserver is None else {
                "pid": self.forkserver.pid, "ready": self.forkserver.ready,
                "generation": self.forkserver.generation, "spawned": self.forkserver.spawned},
            "last_alert": self.last_alert,
            "policy": self.policy.model_dump(),
        }
