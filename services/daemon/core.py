"""The daemon: the one process that owns the mesh. services/daemon/build.py chooses its
parts (store, spawner, cluster control) and hands them in; this module puts the rest
together and runs its lifecycle, asking its parts only what their protocols say (no
probing). Each part has one job and takes its collaborators (clock, store, spawner) as
arguments:

    lock.HomeLock          one daemon per home
    supervisor.Supervisor  services, their state machine, their processes
    alerts.AlertRouter     TRON signal -> persisted alert -> up the chain; the watchdog
    carrier.Carrier        carries out the ladder's decisions (common/ladder.py decides)
    ledger.Ledger          runs and tasks: recorded, delivered, handed over
    operators.Operators    restart / stop / start, audited
    providers.ProviderDesk provider health, the governor, parked tasks (provider failures)
    api                    the HTTP API (services/daemon/api.py)

Handlers enqueue, one loop acts: the monitor thread and the pidfd callbacks only hand
signals to the event loop; everything that changes state runs there.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from tron.common.conn_guard import ConnectionGuard
from tron.common import logs
from tron.common.clock import Clock, MonotonicClock
from tron.common.config import DAEMON, MeshConfig, Policy, registry_url
from tron.common.http import MeshClient
from tron.common.monitor import Monitor, MonitorThread, Signal, Verdict
from tron.common.notify import missing_secrets
from tron.common.paths import Home, UnsafeTokenFile, ensure_token
from tron.common.settings import field_errors, merged_policy, overlay_path, read_overlay, write_overlay
from tron.common.models import Beat, Reason
from tron.common.states import ServiceState, TaskState
from tron.registry.protocol import Store
from tron.services.daemon import metrics
from tron.services.daemon.access import Access
from tron.services.daemon.alerts import AlertRouter
from tron.services.daemon.carrier import Carrier
from tron.services.daemon.ledger import Ledger
from tron.services.daemon.notify import Notifier, last_event
from tron.services.daemon.lock import HomeLock, StartError
from tron.services.daemon.audit import Audit, RefusalBudget, Refused
from tron.services.daemon.breaker import Breaker
from tron.services.daemon.operators import Operators
from tron.services.daemon.reload import ReloadRefused, Reloader
from tron.services.daemon.replicas import Replicas
from tron.services.daemon.task_actions import TaskActions
from tron.services.daemon.probes import ProbeChecks, Probes
from tron.services.daemon import failback
from tron.services.daemon.failback import Failback
from tron.services.daemon.providers import ProviderDesk
from tron.services.daemon.spend import Spend
from tron.services.daemon.logpump import rotate_if_large
from tron.services.daemon.spawner import ClusterControl, LocalSpawner, SpawnError, Spawner, reap_strays
from tron.services.daemon.supervisor import Supervisor, new_id

log = logging.getLogger("tron.daemon")
# A leased task an agent's beats have not named for this long (or 4 beat intervals) is lost.
LOST_TASK_GRACE = 5.0
PUMP_SILENT = 2.0  # s a running log pump may not answer before /status says so
LOST_TASK_CHECK_EVERY = 1.0

# How POST /beat (and a beat on an agent's beat channel, beat_channel.py) answers a beat not accepted.
VERDICT_STATUS = {Verdict.UNKNOWN: 404, Verdict.STALE: 409, Verdict.DUPLICATE: 409, Verdict.FOREIGN_TASK: 409}


def verdict_message(b: Beat, verdict: Verdict) -> str:
    return {
        Verdict.UNKNOWN: f"no service named {b.service!r} is watched",
        Verdict.STALE: f"incarnation {b.incarnation} of {b.service} is not the current one",
        Verdict.DUPLICATE: f"sequence number {b.seq} is not the next one (a late or repeated beat): carry on",
        Verdict.FOREIGN_TASK: f"task {b.task_id} is leased to another incarnation: this beat changed nothing",
    }[verdict]


__all__ = ["VERDICT_STATUS", "Daemon", "StartError", "verdict_message"]

RECYCLED_TASKS = 10_000  # tasks remembered as recycled at a checkpoint (once each)


class Daemon:
    def __init__(self, config: MeshConfig, home: Home, *, store: Store, spawner: Spawner,
                 cluster: ClusterControl | None = None, config_path: Path | None = None, clock: Clock | None = None,
                 monitor_thread: bool = True, lock: HomeLock | None = None) -> None:
        """Its parts, made by services/daemon/build.py (``build_daemon``): ``store`` not opened
        yet, ``spawner`` not started yet, ``cluster`` only on a cluster engine (Ray)."""
        self.config = config
        self.home = home
        self.config_path = config_path
        self.clock = clock or MonotonicClock()
        self._policy = config.policy
        self.store = store
        self.store_opened = False  # a daemon refused before it opens its registry leaves nothing there
        self.spawner = spawner
        self.cluster = cluster
        self.metrics = metrics.DaemonMetrics()
        self.monitor = Monitor()
        self.lock = lock or HomeLock(home)
        self.token = ""
        self.client = MeshClient(None, timeout=config.policy.alert_delivery_timeout)
        self._tasks: set[asyncio.Task] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self.monitor_thread: MonitorThread | None = None
        self.started_at = self.clock.now()
        self.shutdown_requested = asyncio.Event()
        self.stopping = False
        self.log_stats: dict | None = None  # the log pump's counters, read by the housekeeping
        self.log_pump_silent_since: float | None = None  # monotonic s: a pump that runs stopped answering
        self.logs_disk_full = False
        self.http_guard: ConnectionGuard | None = None  # its HTTP server's bound on connections (serve() sets it)
        self.log_pump_seen = {"died": 0, "restarts": 0}  # the pump's counts already recorded as events
        self._recycling: set[str] = set()  # incarnations being recycled at a checkpoint (once each)
        # Tasks already recycled at a checkpoint: once per task, so an agent already over its
        # limit when it starts (a limit set too low) is not killed at every step of one task;
        # it is recycled again between tasks. Bounded: forgotten wholesale past RECYCLED_TASKS.
        self._recycled_tasks: set[str] = set()
        self._run_monitor_thread = monitor_thread  # unit tests drive monitor.tick(now) themselves
        self.sup: Supervisor | None = None
        self.notifier: Notifier | None = None
        self.brought_up = asyncio.Event()  # the first bring-up is over (a reload waits for it)
        self.reloader = Reloader(self)  # tron reload, SIGHUP, tron scale (services/daemon/reload.py)
        self.replicas = Replicas(self)
        self.access = Access(config, home.run, current=self._current_incarnation)
        # The daemon calls our services with a peer token made for each (access.py); the
        # operator's token never leaves the daemon.
        self.client.token_for = self._peer_token_for

    def _current_incarnation(self, name: str) -> str | None:
        svc = self.sup.services.get(name) if self.sup is not None else None
        return svc.incarnation if svc is not None else None

    async def _peer_token_for(self, url: str, fresh: bool = False) -> str | None:
        return self.access.peer_for_url(url)

    def policy(self) -> Policy:
        return self._policy

    @property
    def overlay(self) -> Path:
        return overlay_path(self.config_path, self.home.root)

    async def apply_policy(self, changes: dict, *, actor: str) -> Policy:
        """Validate and apply new policy numbers now, and keep them (the overlay file).
        Raises pydantic's ValidationError, naming the fields, and changes nothing. A refused
        change (invalid, or the overlay could not be kept) is audited too, with why."""
        before = self._policy.model_dump()
        try:
            new = merged_policy(self._policy, changes)
            kept = {**read_overlay(self.overlay), **{k: v for k, v in new.model_dump().items() if before[k] != v}}
            write_overlay(self.overlay, kept)
        except ValidationError as err:
            fields = field_errors(err)
            await self.audit.record(actor, "settings", "policy", "", "", "refused: invalid settings: "
                                    + ", ".join(f"{k}: {v}" for k, v in fields.items()), "", fields=fields)
            raise
        except OSError as err:
            await self.audit.record(actor, "settings", "policy", "", "",
                                    f"refused: not saved to {self.overlay}: {err.strerror or err}", "")
            raise
        await self.replace_policy(new)
        changed = {k: {"from": before[k], "to": v} for k, v in new.model_dump().items() if before[k] != v}
        await self.store.event("audit", {"who": actor, "what": "settings", "target": "policy", "before": "",
                                         "after": str(self.overlay), "outcome": "applied", "reason": "",
                                         "changed": changed})
        log.info("policy changed", extra={"actor": actor, "changed": changed, "overlay": str(self.overlay)})
        return new

    async def replace_policy(self, new: Policy) -> None:
        """The policy every part reads from now on; the monitor's deadlines follow at once."""
        self._policy = new
        for svc in self.sup.services.values():
            self.monitor.retime(svc.name, beat_timeout=new.beat_timeout if svc.spec.is_agent else None,
                                progress_timeout=new.progress_timeout, task_timeout=new.task_timeout)

    async def reload(self, *, dry_run: bool, actor: str, new: MeshConfig | None = None) -> dict:
        """`tron reload`: apply mesh.toml's difference (services/daemon/reload.py); ``new``: a
        change made here, not in the file (`tron scale`), applied the same way. Raises
        ReloadRefused, naming every error, and changes nothing."""
        if not self.brought_up.is_set():
            raise ReloadRefused(["the mesh is still starting: reload once `tron up` is done"], status=409)
        return await self.reloader.reload(dry_run=dry_run, actor=actor, new=new)

    async def reload_audited(self, *, actor: str, reason: str, request_id: str | None) -> dict:
        """An applied reload, in the audit trail whether it is applied or refused (with its
        plan); raises Refused."""
        async def act() -> dict:
            try:
                return await self.reload(dry_run=False, actor=actor)
            except ReloadRefused as err:
                raise Refused(err.status, "; ".join(err.errors)) from None

        return await self.audit.run(act, actor=actor, what="reload", target=str(self.config_path), state=lambda: "",
                                    reason=reason, request_id=request_id)

    def reload_on_signal(self) -> None:
        """SIGHUP: the same reload as `tron reload`, audited as the signal's; a refusal is
        logged (and audited: nothing was changed)."""
        async def run() -> None:
            try:
                await self.reload_audited(actor="SIGHUP", reason="signal", request_id=new_id("sighup-"))
            except Refused as err:
                log.error("reload refused: %s", err)

        self.background(run(), "reload (SIGHUP)")

    # -- assembly ---------------------------------------------------------------------------

    def _assemble(self, spawner: Spawner) -> None:
        kw = dict(clock=self.clock, policy=self.policy, background=self.background)
        self.sup = Supervisor(self.config, self.home, store=self.store, spawner=spawner, monitor=self.monitor,
                              metrics=self.metrics, client=self.client, config_path=self.config_path,
                              access=self.access, **kw)
        if isinstance(spawner, LocalSpawner):  # a prepared start's credential is written with it, ahead
            spawner.on_next, spawner.on_unused = self.sup.credential_ahead, self.access.drop_ahead
        self.ledger = Ledger(self.config, self.sup, self.store, self.client, **kw)
        self.spend = Spend(self.config, self.store, clock=self.clock, metrics=self.metrics)
        self.carrier = Carrier(self.config, self.sup, self.store, self.ledger, metrics=self.metrics, spend=self.spend,
                               **kw)
        self.router = AlertRouter(self.config, self.sup, self.store, self.carrier, self.client, metrics=self.metrics,
                                  **kw)
        self.audit = Audit(self.store)
        self.refusals = RefusalBudget()  # refused requests audited one by one, up to a rate per credential
        self.operators = Operators(self.sup, self.store, self.ledger, self.audit, background=self.background)

        self.breaker = Breaker(self.sup, self.store, clock=self.clock, policy=self.policy, metrics=self.metrics)
        self.carrier.breaker = self.breaker
        self.providers = ProviderDesk(self.config, self.sup, self.store, self.carrier, self.spend,
                                      metrics=self.metrics, **kw)
        self.carrier.provider_states = self.providers.ladder_states
        self.failback = Failback(self.config, self.sup, self.store, self.providers, metrics=self.metrics,
                                 background=self.background)
        self.tasks = TaskActions(self.sup, self.store, self.ledger, self.audit, background=self.background,
                                 client=self.client, desk=self.providers, carrier=self.carrier)
        self.sup.checks = ProbeChecks(self.client, self.sup.values, self.config.hosts)
        self.probes = Probes(self.sup, self.monitor, self.sup.checks, **kw)
        self.sup.on_signal = self.router.on_signal
        self.sup.on_healthy = self.ledger.redispatch
        self.sup.judge_beat = self.judge_beat
        self.notifier = self._notifier()

    def _notifier(self, start_at: int | None = None) -> Notifier:
        return Notifier(self.store, self.config.notify, clock=self.clock, background=self.background,
                        metrics=self.metrics, mesh=str(self.home.root), health=self.registry_health, start_at=start_at)

    async def renew_notifier(self) -> None:
        """``[[notify]]`` changed by a reload: the old receivers are let go (each one's place
        kept: an entry the file still has goes on from it) and the new list is followed; an entry
        new to the file starts with what happens from now on."""
        old = self.notifier
        if old is not None:
            await old.stop()
        latest = await last_event(self.store)
        self.notifier = self._notifier(start_at=latest["id"] if latest else 0)
        if old is not None and old.started:
            self.notifier.start()

    # -- lifecycle --------------------------------------------------------------------------

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self.lock.acquire()
        try:
            self.token = ensure_token(self.home.token_file)  # before anything is opened
        except UnsafeTokenFile as err:
            raise StartError(str(err)) from None
        self.access.load(self.token)
        if missing := missing_secrets(self.config.notify):
            raise StartError(missing[0])
        self.store_opened = True  # from here on shutdown closes it, even after an open() that failed half-way
        await self.store.open()
        logs.setup(DAEMON, comms_path=self.home.comms_log)
        self._assemble(self.spawner)
        try:
            await self.spawner.start(self.sup.on_exit)
        except SpawnError as err:  # a Ray cluster that cannot be joined: fail closed, say why
            raise StartError(str(err)) from None
        self._note_ownership()
        await self.sup.declare()
        await self.audit.load()
        await self.providers.recall()  # before any agent asks for a provider
        if self._run_monitor_thread:
            self.monitor.loop_seen = self.clock.now()
            self.background(self._loop_ticker(), "loop ticker")
            self.monitor_thread = MonitorThread(self.monitor, self._signal_from_thread, self.clock,
                                                on_stall=self._stall_from_thread)
            self.monitor_thread.start()
        await self.store.event("daemon_started", {"pid": os.getpid(), "config": str(self.config_path),
                                                  "home": str(self.home.root)})

    async def bring_up(self) -> None:
        """Adopt what an earlier daemon left running, start the rest, parents first. A
        service that cannot start does not hold the others back: it is a failure like any
        other, and the ladder has it."""
        await self.sup.adopt_or_close()
        self.access.readopt()  # the credentials of the incarnations re-adopted; the others' files go
        await self.sup.sweep_ghosts()
        await self.spawner.wait_ready(timeout=30)
        self.background(self._housekeeping(), "housekeeping")
        self.background(self.probes.loop(), "probes")
        self.notifier.start()  # from here on, what goes wrong reaches the [[notify]] receivers
        # Every service at once, each as soon as its own depends_on is met (systemd and
        # process-compose order by declared dependencies, not by the tree): a child needs
        # its parent only to talk to it, which the ladder's redelivery already covers.
        began = self.clock.now()
        todo = [self.sup[name] for name in self.config.start_order() if not self.sup[name].stopped]
        if self.config.mesh.start == "tree":
            for svc in todo:
                await self._bring_up_one(svc)
        else:
            await asyncio.gather(*(self._bring_up_one(svc) for svc in todo))
        log.info("bring-up done", extra={"seconds": round(self.clock.now() - began, 3)})
        self.brought_up.set()
        self.spawner.bring_up_done()
        await self.ledger.redeliver_pending()
        await self.router.redeliver_pending()

    async def _bring_up_one(self, svc) -> None:
        try:
            await self._dependencies_met(svc)
            async with svc.lock:
                if not svc.stopped and (svc.child is None or not svc.child.alive):
                    await self.sup.start(svc, reason="mesh_start")
            await self.sup.wait_settled(svc, self.policy().start_timeout + 1)
        except Exception as err:  # one service's surprise must not keep the rest of the mesh down
            log.exception("bring-up of %s failed", svc.name)
            await self.store.event("bring_up_failed", {"error": f"{type(err).__name__}: {err}"[:500]},
                                   agent=svc.name)

    async def _dependencies_met(self, svc) -> None:
        """depends_on, as process-compose has it: start after each dependency is started
        (healthy) or ready. Bounded by start_timeout: a dependency that never comes is
        recorded, and the service starts anyway rather than hold the mesh back."""
        for dep, condition in svc.spec.depends_on.items():
            other = self.sup[dep]
            # an incarnation that ended (backoff, stopped) has neither: its flags are its last start's
            met = ((lambda o=other: o.state == ServiceState.RUNNING and o.ready) if condition == "ready"
                   else (lambda o=other: o.state == ServiceState.RUNNING and o.healthy.is_set()))
            deadline = self.clock.now() + self.policy().start_timeout
            while not met() and self.clock.now() < deadline and not other.stopped:
                await self.clock.sleep(0.02)
            if not met():
                log.warning("%s starts without %s %s", svc.name, dep, condition, extra={"offender": svc.name})
                await self.store.event("dependency_not_met", {"dependency": dep, "condition": condition},
                                       agent=svc.name)

    async def shutdown(self) -> None:
        """Stop every service (children before parents), then the daemon itself."""
        if self.stopping:
            return
        self.stopping = True
        log.info("shutdown: stopping every service")
        if self.notifier is not None:  # at once: a receiver that hangs must not hold the shutdown
            await self.notifier.stop()
        for task in list(self._tasks):
            task.cancel()
        if self.sup is not None and self.sup.spawner is not None:
            self.sup.stopping = True
            await asyncio.gather(*(self.sup.stop(self.sup[name], reason="tron_down")
                                   for name in reversed(self.config.start_order())), return_exceptions=True)
            for svc in self.sup.services.values():
                self.sup.close_listener(svc)  # nothing of this mesh listens once it is down
            await self.sup.spawner.close()
        self.access.remove_now()  # the files of credentials that died in the last second
        if self.monitor_thread:
            self.monitor_thread.stop()
        try:
            if self.store_opened:
                await self.store.event("daemon_stopped", {"pid": os.getpid()})
                await self.store.close(grace=self.policy().stop_grace)
        except Exception as err:  # the registry may be the reason we are stopping
            log.error("registry not closed cleanly: %s", err)
        await self.client.close()
        if self.lock.held:  # a daemon refused at the lock must not touch the running one's files
            self.home.daemon_file.unlink(missing_ok=True)
            self.lock.release()

    def request_shutdown(self) -> None:
        self.shutdown_requested.set()

    def write_daemon_file(self, port: int) -> None:
        data = {"pid": os.getpid(), "port": port, "config": str(self.config_path or ""), "home": str(self.home.root)}
        tmp = self.home.daemon_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(data))
        tmp.replace(self.home.daemon_file)

    # -- plumbing -----------------------------------------------------------------------------

    async def _loop_ticker(self) -> None:
        """Tells the monitor thread the loop is alive: if this stops, beats are waiting
        unread and their silence is the daemon's, not the agents'."""
        while not self.stopping:
            self.monitor.loop_seen = self.clock.now()
            await self.clock.sleep(0.1)

    def _stall_from_thread(self, seconds: float) -> None:
        self._loop.call_soon_threadsafe(self.background, self._record_stall(seconds), "monitor stall")

    async def _record_stall(self, seconds: float) -> None:
        self.metrics.monitor_stalls.inc()
        log.error("the daemon itself stalled for %.2fs: every agent gets a fresh grace instead of an alert",
                  seconds, extra={"seconds": round(seconds, 3)})
        await self.store.event("monitor_stalled", {"seconds": round(seconds, 3)})

    def _signal_from_thread(self, signal: Signal) -> None:
        """Called on the monitor thread: hand over to the loop, nothing else."""
        self._loop.call_soon_threadsafe(self.background, self.router.on_signal(signal), f"signal {signal.service}")

    def background(self, coro, what: str) -> asyncio.Task:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)

        def done(t: asyncio.Task) -> None:
            self._tasks.discard(t)
            if not t.cancelled() and t.exception() is not None:
                log.error("background task %r failed", what, exc_info=t.exception())

        task.add_done_callback(done)
        return task

    async def _housekeeping(self) -> None:
        """Once a second: the watchdog; every other second, reap orphans we inherited."""
        ticks = 0
        while not self.stopping:
            await self.clock.sleep(1.0)
            ticks += 1
            if ticks % 2 == 0:
                tracked = {s.child.pid for s in self.sup.services.values() if s.child is not None}
                try:
                    reap_strays(tracked | self.sup.spawner.helper_pids() | failback.RUNNING)
                except OSError as err:  # no descriptor left to read /proc with (EMFILE): next time
                    log.error("reaping strays failed: %s", err)
            try:
                await self.router.watchdog_tick()
                await self.providers.tick()
                await self.failback.tick()
            except Exception:  # the watchdog must outlive any one bad tick
                log.exception("watchdog tick failed")
            if ticks % 60 == 0:
                self.store.trim()
            interval = self.config.registry.backup_interval
            if interval and ticks % max(1, int(interval)) == 0 and not registry_url(self.config):
                await self.backup()
            try:
                await self._recycle_tick()
            except Exception:  # one service's surprise must not stop the housekeeping
                log.exception("recycle tick failed")
            try:
                await self._log_tick()
            except OSError as err:  # a log we cannot rotate must not stop the housekeeping
                log.error("log housekeeping failed: %s", err)

    async def _recycle_tick(self) -> None:
        """Agents due to be recycled (max_tasks, restart_above_memory) are stopped
        gracefully and started again while they hold no task. (One that grows past its
        memory during a task is recycled at the task's next checkpoint: recycle_at_checkpoint.)"""
        for svc in self.sup.services.values():
            if not (svc.spec.max_tasks or svc.spec.restart_above_memory):
                continue
            due = await asyncio.to_thread(self.sup.recycle_due, svc)
            if due is None or await self.store.live_tasks(svc.name):
                continue
            reason, measured = due
            log.info("%s: recycled between tasks (%s)", svc.name, reason,
                     extra={"offender": svc.name, "reason": reason, "incarnation": svc.incarnation, **measured})
            await self.store.event("recycled", {"reason": reason, **measured}, agent=svc.name,
                                   incarnation=svc.incarnation)
            self.background(self.sup.replace(svc, svc.incarnation, delay=0.0, reason=reason, graceful=True),
                            f"recycle {svc.name}")

    async def recycle_at_checkpoint(self, svc, incarnation: str, task_id: str, step: int) -> bool:
        """An agent over ``restart_above_memory`` while it works on a task is recycled right
        after the task's checkpoint, which is in the registry by now: the old incarnation is
        killed (a graceful stop would race the next step, which might end the task in a
        failure on its way down) and the task resumes on the next from that checkpoint, as
        after any restart. Not a failure: no alert, no retry_history row, nothing counted
        against the task's restarts or the service's restart budget. True when it is."""
        if svc.incarnation != incarnation or svc.replacing is not None or svc.stopped \
                or incarnation in self._recycling or not svc.spec.restart_above_memory \
                or task_id in self._recycled_tasks:
            return False
        over = await asyncio.to_thread(self.sup.over_memory, svc)
        if over is None or svc.incarnation != incarnation or incarnation in self._recycling:
            return False
        self._recycling.add(incarnation)
        if len(self._recycled_tasks) >= RECYCLED_TASKS:
            self._recycled_tasks.clear()
        self._recycled_tasks.add(task_id)
        if not await self.store.flushed(5.0):
            # The registry lags (degraded): the checkpoint is not durable yet, so no kill; the next one decides.
            log.warning("%s: not recycled at checkpoint %s of %s: the registry has not recorded it yet", svc.name,
                        step, task_id, extra={"offender": svc.name, "task": task_id})
            self._recycling.discard(incarnation)
            self._recycled_tasks.discard(task_id)
            return False
        measured = {"reason": "memory_recycle", **over, "at": "checkpoint", "task_id": task_id, "checkpoint": step}
        log.info("%s: recycled at a checkpoint of %s (memory_recycle)", svc.name, task_id,
                 extra={"offender": svc.name, "incarnation": incarnation, "task": task_id, **measured})
        await self.store.event("recycled", measured, agent=svc.name, incarnation=incarnation, task_id=task_id)

        async def recycle() -> None:
            try:
                await self.sup.replace(svc, incarnation, delay=0.0, reason="memory_recycle")
            finally:
                self._recycling.discard(incarnation)

        self.background(recycle(), f"recycle {svc.name} at a checkpoint")
        return True

    async def _log_tick(self) -> None:
        """The daemon's own log and the comms log rotate like the services' (the log pump
        writes those); the pump's counters are read for /status, and a disk too full for
        logs is said once, loudly, when it starts and when it ends."""
        limits = self.config.logs
        rotate_if_large(self.home.comms_log, limits.max_bytes, limits.backups)
        rotate_if_large(self.home.log_file(DAEMON), limits.max_bytes, limits.backups, stdio=True)
        stats = await asyncio.to_thread(self.sup.spawner.log_stats)
        # No answer while the pump is being started again: as it was. No answer from a pump
        # that runs (stopped, stalled): said, once, and /status says so after PUMP_SILENT.
        pump = self.sup.spawner.log_pump_health()
        silent = stats is None and pump is not None and pump["state"] == "up"
        if silent and self.log_pump_silent_since is None:
            self.log_pump_silent_since = time.monotonic()
            log.error("the log pump (pid %s) does not answer: services' output waits in their pipes", pump["pid"])
        elif not silent and self.log_pump_silent_since is not None:
            self.log_pump_silent_since = None
            log.warning("the log pump answers again")
        full = bool(stats.get("disk_full")) if stats is not None else self.logs_disk_full
        if full != self.logs_disk_full:
            self.logs_disk_full = full
            if full:
                log.error("disk nearly full (under %s bytes free): service logs are no longer written; "
                          "supervision goes on", limits.min_free or "the 100 MB / 5 % default of")
            else:
                log.warning("room on the disk again: service logs are written again")
            await self.store.event("logs_disk_full" if full else "logs_resumed", {"min_free": limits.min_free})
        self.log_stats = stats if stats is not None else self.log_stats
        await self._log_pump_events()

    async def _log_pump_events(self) -> None:
        """The pump's deaths and restarts (said at error by the spawner as they happen) as
        events and metrics, one each."""
        pump = self.sup.spawner.log_pump_health()
        if pump is None:
            return
        seen = self.log_pump_seen
        if pump["died"] > seen["died"]:
            self.metrics.log_pump_deaths.inc(pump["died"] - seen["died"])
            await self.store.event("log_pump_died", {**(pump["last_death"] or {}), "deaths": pump["died"] - seen["died"]})
        if pump["restarts"] > seen["restarts"]:
            await self.store.event("log_pump_restarted", {"pid": pump["pid"], "held_pipes": pump["held_pipes"],
                                                          "restarts": pump["restarts"]})
        self.log_pump_seen = {"died": pump["died"], "restarts": pump["restarts"]}

    # -- beats --------------------------------------------------------------------------------

    async def on_beat(self, beat) -> Any:
        now = self.clock.now()
        svc = self.sup.services.get(beat.service)
        if beat.task_id and svc is not None and (beat.task_id != svc.task_id or beat.progress != svc.progress):
            # The task named must be this service's (read only when the task or its progress
            # changes, which is when the registry is written); its lease then moves to this
            # incarnation, the current one (the monitor refuses any other).
            task = await self.store.task(beat.task_id)
            if task is not None and task["agent"] != beat.service:
                self.metrics.beats_rejected.labels(verdict=str(Verdict.FOREIGN_TASK)).inc()
                return Verdict.FOREIGN_TASK
        if beat.task_id and self.ledger.just_finished(beat.task_id):
            # Sent before its task ended and read after: the agent is idle, whatever it says.
            beat = beat.model_copy(update={"task_id": None, "progress": None, "waiting": False})
        verdict = self.monitor.beat(beat.service, beat.incarnation, beat.seq, now, task_id=beat.task_id,
                                    progress=beat.progress, waiting=beat.waiting)
        if verdict is not Verdict.ACCEPTED:
            self.metrics.beats_rejected.labels(verdict=str(verdict)).inc()
            return verdict
        self.metrics.beats.inc()
        if beat.spans_dropped:
            self.metrics.spans_dropped_total(beat.service, beat.incarnation, beat.spans_dropped)
        svc = self.sup[beat.service]
        svc.last_beat = now
        if svc.state == ServiceState.STARTING:
            svc.beat_seen.set()  # it serves: its health check need not wait for the next poll
        if beat.task_id and (beat.task_id != svc.task_id or beat.progress != svc.progress):
            await self.store.task_progress(beat.task_id, beat.incarnation, beat.progress)
        svc.task_id, svc.progress = beat.task_id, beat.progress
        if beat.tasks is not None and now - svc.tasks_checked >= LOST_TASK_CHECK_EVERY:
            svc.tasks_checked = now  # at most once a second per agent: a beat stays O(1) in between
            await self._account_tasks(svc, beat.incarnation, set(beat.tasks), now)
        return verdict

    async def judge_beat(self, beat: Beat) -> tuple[int, dict]:
        """A beat judged (``on_beat``), and what POST /beat answers: the status and body."""
        verdict = await self.on_beat(beat)
        if verdict is Verdict.ACCEPTED:  # the interval follows settings changed at run time
            answer: dict = {"ok": True, "interval": self.policy().heartbeat_interval}
            if self.config.hosts:  # services placed on other machines: where each is now
                answer["hosts"] = self.config.hosts
            return 200, answer
        return VERDICT_STATUS[verdict], {"error": verdict_message(beat, verdict), "verdict": str(verdict)}

    async def on_beats(self, beats: list) -> list:
        """A batch of beats (``POST /beats``), each judged as ``on_beat`` would: the verdicts,
        in order. Most beats change nothing but their deadline (no task, or the same task at
        the same progress): those take a path with no registry read or write and one clock
        reading and one metric update for the whole batch; any other goes through ``on_beat``."""
        accepted = Verdict.ACCEPTED
        now = self.clock.now()
        services = self.sup.services
        just_finished = self.ledger.just_finished
        monitor_beat = self.monitor.beat
        verdicts = []
        n_accepted = 0
        for beat in beats:
            svc = services.get(beat.service)
            task_id = beat.task_id
            if svc is not None and (
                    beat.spans_dropped
                    or (task_id and (task_id != svc.task_id or beat.progress != svc.progress or just_finished(task_id)))
                    or (beat.tasks is not None and now - svc.tasks_checked >= LOST_TASK_CHECK_EVERY)):
                verdicts.append(await self.on_beat(beat))  # the registry is read or written: the one full path
                continue
            verdict = monitor_beat(beat.service, beat.incarnation, beat.seq, now, task_id=task_id,
                                   progress=beat.progress, waiting=beat.waiting)
            if verdict is accepted:
                n_accepted += 1
                svc.last_beat = now
                svc.task_id, svc.progress = task_id, beat.progress
            else:
                self.metrics.beats_rejected.labels(verdict=str(verdict)).inc()
            verdicts.append(verdict)
        if n_accepted:
            self.metrics.beats.inc(n_accepted)
        return verdicts

    async def _account_tasks(self, svc, incarnation: str, named: set[str], now: float) -> None:
        """No task runs forever, even one its agent lost (a result hand-off that died, a bug
        in a role): a task the registry has leased to this incarnation as running, that its
        beats have not named for ``lost_after`` seconds, is a ``task_lost`` alert, and the
        ladder restarts the agent with it, from its last checkpoint. So is a task handed to
        an agent (which takes every task it is given) that it never took: its POST /tasks
        refused it (a bug in the agent), and nobody would hand it over again while the agent
        stays healthy."""
        open_tasks = await self.store.open_tasks(svc.name)
        owed = {t["task_id"] for t in open_tasks  # what its beats must name: leased to it, or handed to it
                if t["status"] == TaskState.RUNNING and t["lease_incarnation"] == incarnation}
        if svc.spec.is_agent and not svc.switched_away:  # a switched-away one's replacement gets its tasks
            owed |= {t["task_id"] for t in open_tasks if t["status"] == TaskState.ASSIGNED}
        for task_id in [t for t in svc.unreported if t not in owed or t in named]:
            del svc.unreported[task_id]
        for task_id in owed - named:
            svc.unreported.setdefault(task_id, now)
        lost_after = max(LOST_TASK_GRACE, 4 * self.policy().heartbeat_interval)
        lost = sorted((since, task_id) for task_id, since in svc.unreported.items() if now - since >= lost_after)
        if not lost or svc.incarnation != incarnation or svc.replacing is not None:
            return
        since, task_id = lost[0]
        signal = self.monitor.raise_alert(svc.name, incarnation, Reason.TASK_LOST, now,
                                          {"task": task_id, "unnamed_for": round(now - since, 2)})
        if signal is not None:
            log.warning("task lost by its agent", extra={"offender": svc.name, "task": task_id,
                                                         "incarnation": incarnation})
            # Delivered on its own: the beat that found it (on a beat channel, every later beat of
            # this agent too) does not wait for its ancestors to answer.
            self.background(self.router.on_signal(dataclasses.replace(signal, task_id=task_id)),
                            f"task lost {svc.name}")

    # -- status -------------------------------------------------------------------------------

    def _note_ownership(self) -> None:
        """Where the home's cgroups are, for `tron down` and leak checks without a daemon
        (common/processes.py reads it): a process that rewrote its environment is still found."""
        note = self.home.run / "cgroup"
        info = self.sup.spawner.ownership() or {"mode": "marks"}
        if info.get("mode") == "cgroup":
            note.write_text(info["path"] + "\n")
        else:
            note.unlink(missing_ok=True)

    def _logs_summary(self) -> dict | None:
        """The log pump: its pid and state now, and its counters as of the last housekeeping
        tick (no I/O on the /status path). ``state``: ok, disk_full, restarting (it died; a
        new one is being started) or down (none runs). None: there is no pump."""
        pump = self.sup.spawner.log_pump_health()
        if pump is None:
            return None
        stats = self.log_stats or {}
        logs_ = stats.get("logs") or {}
        silent = self.log_pump_silent_since
        if pump["state"] != "up":
            state = pump["state"]
        elif silent is not None and time.monotonic() - silent >= PUMP_SILENT:
            state = "not_answering"
        else:
            state = "disk_full" if stats.get("disk_full") else "ok"
        return {"pid": pump["pid"], "state": state,
                "silent_s": round(time.monotonic() - silent, 1) if state == "not_answering" and silent else None,
                "died": pump["died"], "restarts": pump["restarts"],
                "held_pipes": pump["held_pipes"], "dropped": sum(v["dropped"] for v in logs_.values()),
                "rotations": sum(v["rotations"] for v in logs_.values()),
                "reopened": sum(v.get("reopened", 0) for v in logs_.values())}

    def status(self) -> dict[str, Any]:
        now = self.clock.now()
        cluster = self.cluster.status() if self.cluster is not None else None
        return {
            "daemon": {"pid": os.getpid(), "port": self.config.mesh.daemon_port, "home": str(self.home.root),
                       "uptime": round(now - self.started_at, 1),
                       "monitor_alive": bool(self.monitor_thread and self.monitor_thread.is_alive())},
            "services": self.sup.rows(),
            "fork_server": None if cluster else self.sup.spawner.status(),
            "cluster": cluster,
            "last_alert": self.router.last_alert,
            "policy": self.policy().model_dump(),
            "overlay": {"path": str(self.overlay), "keys": sorted(read_overlay(self.overlay))}
            if self.overlay.exists() else None,
            "crash_looping": [s.name for s in self.sup.services.values() if s.crash_looping],
            "registry": self.registry_health(),
            "spawning": "paused" if self.sup.spawning_paused else "running",
            "logs": self._logs_summary(),
            "http": self.http_guard.summary() if self.http_guard is not None else None,
            "ownership": self.sup.spawner.ownership(),
            **self.providers.summary(),
        }

    def public_status(self) -> dict:
        """GET /status without a credential: what a load balancer needs (up, each service's
        state, counts). No pid, incarnation, task, prompt or provider chain."""
        states = [(svc.name, str(svc.state)) for svc in self.sup.services.values()]
        counts: dict[str, int] = {}
        for _, state in states:
            counts[state] = counts.get(state, 0) + 1
        return {"daemon": {"up": True, "uptime": round(self.clock.now() - self.started_at, 1)},
                "services": [{"name": n, "state": s} for n, s in states], "counts": counts,
                "crash_looping": sum(1 for s in self.sup.services.values() if s.crash_looping),
                "registry": {k: v for k, v in self.registry_health().items() if k in ("state", "pending")},
                "detail": "send a token for the rest"}

    async def backup(self) -> dict:
        """A consistent copy of the registry now (SQLite's backup API, in a thread)."""
        from tron.registry import backup

        if registry_url(self.config):
            return {"status": "refused", "error": "the registry is on PostgreSQL: back it up with pg_dump "
                                                  "(or the server's own backups)"}

        try:
            path = await asyncio.to_thread(backup.take, self.home.registry_db, keep=self.config.registry.backup_keep)
        except Exception as err:  # a failed backup is reported, never fatal
            log.error("registry backup failed: %s", err)
            await self.store.event("backup_failed", {"error": str(err)[:300]})
            return {"status": "failed", "error": str(err)}
        await self.store.event("backup_taken", {"path": str(path), "bytes": path.stat().st_size})
        return {"status": "taken", "path": str(path)}

    def registry_health(self) -> dict:
        return self.store.health()

    def running(self) -> int:
        return sum(1 for s in self.sup.services.values() if s.state == ServiceState.RUNNING)
