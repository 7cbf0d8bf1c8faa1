"""What an operator can do to services, lanes and the mesh. Each is audited (audit.py).

    restart | stop | start NAME   a deliberate stop is never undone by the ladder: a stopped
                                  service stays stopped across failures and daemon restarts.
                                  A restart stops the old incarnation as `tron stop` does (its
                                  stop_signal, stop_grace, then SIGKILL); ``force`` kills at once
    pause | resume NAME           no new tasks for the service; the running ones finish
    lane pause | resume LANE      the breaker's switch, by hand (common/lanes.py)
    spawning pause | resume       the incident switch: no new process starts anywhere; a
                                  restart waits (in backoff) until spawning resumes

Spawning is *not* paused by itself while the registry is degraded: recovery must not
depend on the registry (registry/journal.py), and a paused spawner would leave services
down for as long as a disk stays full.
"""

from __future__ import annotations

import logging

from tron.common.states import AlertState, LaneState, RetryType, ServiceState, TaskState
from tron.registry.protocol import Store
from tron.services.daemon.audit import Audit, Refused
from tron.services.daemon.breaker import lane_agent
from tron.services.daemon.ledger import Ledger
from tron.services.daemon.supervisor import Service, Supervisor, new_id

log = logging.getLogger("tron.daemon")
S = ServiceState
SERVICE_VERBS = ("restart", "stop", "start", "pause", "resume")

__all__ = ["Operators", "Refused", "SERVICE_VERBS"]


def admit_restart(svc: Service) -> str:
    """Admit one restart of the current incarnation (an operator's, or a task retry's): the
    guard and the claim in one step, with no await between them. A second request for the
    same incarnation is refused (409) naming the one admitted."""
    if svc.replacing is not None:
        raise Refused(409, f"{svc.name} is already being restarted ({svc.state})")
    if svc.admitted is not None and svc.admitted[0] == svc.incarnation:
        raise Refused(409, f"a restart of {svc.name} ({svc.incarnation}) was already admitted ({svc.admitted[1]})")
    ref = new_id("op-")
    svc.admitted = (svc.incarnation or "", ref)
    return ref


class Operators:
    def __init__(self, sup: Supervisor, store: Store, ledger: Ledger, audit: Audit, *, background) -> None:
        self.sup = sup
        self.store = store
        self.ledger = ledger
        self.audit = audit
        self.background = background
        self._busy: dict[str, str] = {}  # service -> the restart, stop or start under way
        self._verbs = {"restart": self._restart, "stop": self._stop, "start": self._start, "pause": self._pause,
                       "resume": self._resume}  # SERVICE_VERBS, each to its handler

    async def act(self, verb: str, name: str, *, actor: str, reason: str, request_id: str | None = None,
                  force: bool = False) -> dict:
        """``force`` (restart only): kill the old incarnation at once instead of stopping it."""
        svc = self.sup[name]
        options = {"force": force} if verb == "restart" else {}
        return await self.audit.run(lambda: self._one_at_a_time(verb, svc, actor=actor, reason=reason, **options),
                                    actor=actor, what=verb, target=name, agent=name, reason=reason,
                                    request_id=request_id, state=lambda: self._state_of(svc))

    async def _one_at_a_time(self, verb: str, svc: Service, *, actor: str, reason: str, **options) -> dict:
        """A restart, stop or start of a service is admitted while no other one is under way
        (claimed in the same step as the check): a concurrent one is a 409 naming it."""
        handler = self._verbs.get(verb)
        if handler is None:
            raise Refused(400, f"unknown verb {verb!r}: one of {', '.join(SERVICE_VERBS)}")
        if verb not in ("restart", "stop", "start"):
            return await handler(svc, actor=actor, reason=reason)
        if self._busy.get(svc.name):
            raise Refused(409, f"a {self._busy[svc.name]} of {svc.name} is under way: try again when it is done")
        self._busy[svc.name] = verb
        try:
            return await handler(svc, actor=actor, reason=reason, **options)
        finally:
            self._busy.pop(svc.name, None)

    @staticmethod
    def _state_of(svc: Service) -> str:
        return f"{svc.state}{' paused' if svc.paused else ''}"

    # -- services ---------------------------------------------------------------------------

    async def _restart(self, svc: Service, *, actor: str, reason: str, force: bool = False) -> dict:
        if svc.stopped or svc.state in (S.STOPPED, S.STOPPING):
            raise Refused(409, f"{svc.name} is stopped; `tron start {svc.name}` brings it back")
        if self.sup.spawning_paused:
            raise Refused(409, "spawning is paused (`tron spawning resume`)")
        if self.sup.retry_now(svc):  # the ladder's restart is already admitted: it stops waiting
            return {"status": "retrying_now", "cause": svc.spawn_cause, "replaces": svc.replacing}
        ref = admit_restart(svc)  # no await between the guard and the claim: one admission
        tasks = await self.store.open_tasks(svc.name)
        await self.store.record_retry(
            alert_id=ref, agent_id=svc.name, retry_type=RetryType.OPERATOR_RESTART, reason=reason,
            detail={"actor": actor, "state": str(svc.state), "force": force}, case="operator_restart",
            task_id=tasks[0]["task_id"] if tasks else None, run_id=tasks[0]["run_id"] if tasks else None,
            from_provider=svc.provider, decided_by="operator", requested_by=actor)
        incarnation = svc.incarnation
        # The operator's restart is a planned one: the program shuts down cleanly (PostgreSQL
        # without crash recovery). The ladder's restarts kill: that process has failed already.
        self.background(self.sup.replace(svc, incarnation, delay=0.0, reason=f"operator_restart:{reason}",
                                         graceful=not force), f"operator restart {svc.name}")
        return {"status": "restarting", "replaces": incarnation, "ref": ref, "force": force}

    async def _stop(self, svc: Service, *, actor: str, reason: str) -> dict:
        if svc.stopped and svc.state == S.STOPPED:
            return {"status": "already_stopped"}
        if svc.stopped:  # another stop is under way: one stop, one set of failed tasks
            raise Refused(409, f"{svc.name} is already being stopped ({svc.state})")
        svc.stopped = True
        await self.store.set_agent(svc.name, stopped=True)
        await self.sup.stop(svc, reason=f"operator_stop:{reason}")
        # No task waits forever on a service an operator stopped: its live tasks fail,
        # and their parents hear of it.
        for task in await self.store.live_tasks(svc.name):
            await self.ledger.finish_task(task["task_id"], TaskState.FAILED, None, "service_stopped",
                                          {"agent": svc.name, "by": actor}, None)
        return {"status": "stopped"}

    async def _start(self, svc: Service, *, actor: str, reason: str) -> dict:
        if not svc.stopped and svc.waiting_out_spawn_failure:
            # It could not start (a missing binary, a port taken...) and waits up to
            # spawn_failed_backoff_max: the operator says it is fixed, so try now.
            if self.sup.spawning_paused:
                raise Refused(409, "spawning is paused (`tron spawning resume`)")
            cause = svc.spawn_cause
            if self.sup.retry_now(svc):
                return {"status": "retrying_now", "cause": cause, "replaces": svc.replacing}
        if not svc.stopped and svc.state != S.STOPPED:
            return {"status": "already_running", "state": str(svc.state)}
        if self.sup.spawning_paused:
            raise Refused(409, "spawning is paused (`tron spawning resume`)")
        svc.stopped = False
        await self.store.set_agent(svc.name, stopped=False)
        async with svc.lock:
            if svc.state == S.STOPPED:
                await self.sup.start(svc, reason=f"operator_start:{reason}")
        return {"status": "starting", "incarnation": svc.incarnation}

    async def _pause(self, svc: Service, *, actor: str, reason: str) -> dict:
        if svc.paused:
            return {"status": "already_paused"}
        svc.paused = True
        await self.store.set_agent(svc.name, paused=True)
        return {"status": "paused", "running_tasks": [t["task_id"] for t in await self.store.live_tasks(svc.name)]}

    async def _resume(self, svc: Service, *, actor: str, reason: str) -> dict:
        if not svc.paused:
            return {"status": "not_paused"}
        svc.paused = False
        await self.store.set_agent(svc.name, paused=False)
        return {"status": "resumed"}

    # -- lanes and spawning ---------------------------------------------------------------------

    async def lane(self, verb: str, lane: str, *, actor: str, reason: str, request_id: str | None = None) -> dict:
        roles = {svc.spec.role for svc in self.sup.services.values()}
        if lane not in roles:
            raise Refused(404, f"no lane {lane!r}: lanes are roles ({', '.join(sorted(roles))})")
        new = LaneState.PAUSED if verb == "pause" else LaneState.OPEN

        async def state() -> str:
            row = await self.store.lane(lane)
            return row["state"] if row else str(LaneState.OPEN)

        async def act() -> dict:
            if await state() == new:
                return {"status": f"already_{new}", "lane": lane}
            row = await self.store.lane(lane)
            await self.store.set_lane(lane, new, fingerprint=(row or {}).get("fingerprint"),
                                      reason=reason, by=actor)
            if new == LaneState.OPEN:  # the breaker's alert for this lane is handled now
                for alert in await self.store.open_alerts():
                    if alert["agent"] == lane_agent(lane):
                        await self.store.mark_alert(alert["alert_id"], AlertState.HANDLED,
                                                    decision=f"lane resumed by {actor}")
            return {"status": str(new), "lane": lane}

        return await self.audit.run(act, actor=actor, what=f"lane_{verb}", target=lane, reason=reason,
                                    request_id=request_id, state=state)

    async def spawning(self, verb: str, *, actor: str, reason: str, request_id: str | None = None) -> dict:
        async def act() -> dict:
            paused = verb == "pause"
            if self.sup.spawning_paused == paused:
                return {"status": f"already_{'paused' if paused else 'running'}"}
            self.sup.spawning_paused = paused
            if not paused:
                self.sup.spawning_resumed.set()
            else:
                self.sup.spawning_resumed.clear()
            log.warning("spawning %s by %s: %s", "paused" if paused else "resumed", actor, reason)
            return {"status": "paused" if paused else "resumed"}

        return await self.audit.run(act, actor=actor, what=f"spawning_{verb}", target="mesh", reason=reason,
                                    request_id=request_id,
                                    state=lambda: "paused" if self.sup.spawning_paused else "running")
