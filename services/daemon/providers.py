"""The provider desk: the daemon's side of provider health, the governor and parked tasks.

Every agent asks here before it calls a provider (``acquire``) and says how the call
ended (``outcome``). The board (common/provider_health.py) keeps each provider's state;
a failure is decided by the ladder (``ProviderFailed`` in common/ladder.py) on a view that
carries every provider's state, and the answer goes back to the agent in the same
response: retry in place after a delay, switch provider in place, park, or fail. No
process is killed for a provider's trouble. A parked task's agent waits here
(``park``), long-polled, and goes on within a moment of any provider of its chain
coming back, or fails when ``park_max`` passes.

Waiters (acquire, park) sleep on one asyncio.Event that every change of the board sets:
a provider closing wakes every parked task at once.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Callable, Mapping

from tron.common.clock import Clock
from tron.common.config import DAEMON, MeshConfig, Policy
from tron.common.ladder import (Approval, CallAsked, Decision, Fail, Ignore, LadderView, ParkCheck, Park, ProviderFailed,
                                ProviderRules, ProviderStatus, Resume, RetryInPlace, ServiceView, SwitchProvider, TaskView,
                                decide)
from tron.common.models import PermanentFailure, ProviderCall, ProviderOutcome
from tron.common.provider_health import Board, Change
from tron.common.providers import NON_RETRYABLE
from tron.common.states import ProviderState, RetryType, TaskState
from tron.registry.protocol import Store
from tron.services.daemon.metrics import DaemonMetrics
from tron.services.daemon.spend import Spend
from tron.services.daemon.supervisor import Supervisor, new_id

log = logging.getLogger("tron.daemon")
LONG_POLL = 20.0  # an acquire or park request is answered within this, then asked again
STATE_VALUE = {ProviderState.CLOSED: 0, ProviderState.HALF_OPEN: 1, ProviderState.OPEN: 2}


@dataclass(frozen=True)
class CallFailure:
    """A failed call's report (``ProviderFailure.to_dict``), as the board and the ladder read
    it: the reason, whether retrying can help, and the wait the provider asked for."""

    reason: str
    retryable: bool
    retry_after: float | None

    @classmethod
    def of(cls, failure: Mapping[str, object]) -> CallFailure:
        reason = str(failure.get("reason") or "unexpected_error")[:128]
        after = failure.get("retry_after")
        return cls(reason, bool(failure.get("retryable", True)) and reason not in NON_RETRYABLE,
                   float(after) if isinstance(after, (int, float)) and after >= 0 else None)

    @property
    def says_provider(self) -> bool:
        """Whether it counts against the provider's health, mesh-wide. A bad key or a bad
        request says nothing of it; nor does an exception the SDK layer could not name
        (unexpected_error:TypeError), as likely the agent's own bug as the provider's."""
        return self.retryable and not self.reason.startswith("unexpected_error")


def raise_hint(over: list[str], task: dict) -> str:
    """What an operator can do about the limits reached: a run's budget is raised at run
    time (`tron run budget`); a task's or a service's comes from [budgets] in mesh.toml,
    which `tron reload` applies (the task goes on within a moment); or the task ends."""
    run = [o for o in over if o.startswith("run_")]
    rest = [o.split()[0] for o in over if not o.startswith("run_")]
    steps = [f"tron run budget {task['run_id']} --usd N (or --tokens N)"] if run else []
    if rest:
        steps.append(f"raise {', '.join(rest)} in [budgets] of mesh.toml, then tron reload")
    return "; ".join(steps or ["raise the budget"]) + f"; or end it: tron task fail {task['task_id']}"


TRANSITION_EVENTS = {ProviderState.OPEN: "provider_opened", ProviderState.CLOSED: "provider_closed",
                     ProviderState.HALF_OPEN: "provider_half_open"}


class ProviderDesk:
    def __init__(self, config: MeshConfig, sup: Supervisor, store: Store, carrier, spend: Spend, *, clock: Clock,
                 metrics: DaemonMetrics, policy: Callable[[], Policy], background) -> None:
        self.spend = spend
        self.approvals: dict[str, Approval] = {}  # task id -> an operator's `tron task approve`
        self.config = config
        self.sup = sup
        self.store = store
        self.carrier = carrier
        self.clock = clock
        self.metrics = metrics
        self.policy = policy
        self.background = background
        names = list(dict.fromkeys([*config.providers.chain, config.providers.default,
                                    *(s.provider for s in config.services.values() if s.provider)]))
        self.board = Board(config.providers, names, now=clock.now())
        self._changed = asyncio.Event()
        self.parked: dict[str, tuple[str, str]] = {}  # task id -> (its service, what it waits for)
        self.park_started: dict[str, float] = {}  # task id -> when its current wait began
        self.hints: dict[str, str] = {}  # task id parked at a budget -> how an operator lets it go on
        for name in names:
            self.metrics.provider_state.labels(provider=name).set(0)

    def hint(self, task_id: str, kind: str) -> dict[str, str]:
        """``{"hint": ...}``: how an operator lets a task parked at a budget go on, when known."""
        text = self.hints.get(task_id) if kind == "budget_exceeded" else None
        return {"hint": text} if text else {}

    async def recall(self) -> None:
        """At the daemon's start: each provider as the daemon before left it (its last
        transition event). A board begun closed sent every task parked for an outage straight
        back into it, each failed call a step of its ladder: two daemon restarts during an
        outage failed them for good, long before ``park_max``."""
        last: dict[str, tuple[dict, float]] = {}
        for row in await self.store.latest_events(list(TRANSITION_EVENTS.values()), limit=10_000):
            payload = row.get("payload") or {}
            name = payload.get("provider")
            if isinstance(name, str) and name in self.board.providers and name not in last:
                last[name] = (payload, float(row.get("mono") or -1.0))
        now = self.clock.now()
        changes = [c for name, (payload, at) in last.items() for c in self.board.recall(name, payload, at, now)]
        for c in changes:
            log.warning("provider %s is %s again, as the daemon before left it: %s", c.provider, c.new, c.reason,
                        extra={"provider": c.provider})
        await self.announce(changes, by="recall")

    # -- changes ------------------------------------------------------------------------------

    async def announce(self, changes: list[Change], *, by: str = "health") -> None:
        """Record and publish what changed (and what a tick changed meanwhile); wake every waiter."""
        changes = self.board.take() + list(changes)
        for c in changes:
            self.metrics.provider_state.labels(provider=c.provider).set(STATE_VALUE[c.new])
            kind = TRANSITION_EVENTS[c.new]
            payload = {"provider": c.provider, "from": str(c.old), "to": str(c.new), "reason": c.reason,
                       "kind": self.board[c.provider].kind, "by": by,
                       "until_s": None if c.until is None else round(c.until - self.clock.now(), 3)}
            if c.new == ProviderState.OPEN:
                self.metrics.provider_opens.labels(provider=c.provider).inc()
                log.error("provider opened", extra=payload)
            else:
                log.warning(kind.replace("_", " "), extra=payload)
            await self.store.event(kind, payload)
        if changes:
            self.wake()

    def wake(self) -> None:
        """Something a waiter decides on changed (a provider, a budget, an approval): every
        waiter looks again now."""
        self._changed.set()
        self._changed = asyncio.Event()

    async def _wait_change(self, seconds: float) -> None:
        if seconds <= 0:
            return
        event = self._changed
        try:
            await asyncio.wait_for(event.wait(), seconds)
        except asyncio.TimeoutError:
            pass

    async def tick(self) -> None:
        """Once a second (the housekeeping loop): cooldowns that ended become probes; held
        parked tasks are looked at."""
        self.board.tick(self.clock.now())
        await self.announce([])
        await self.tick_held()

    # -- what the ladder sees -----------------------------------------------------------------------

    def _live(self) -> set[str]:
        return {svc.incarnation for svc in self.sup.services.values() if svc.incarnation}

    def rules(self) -> ProviderRules:
        p = self.config.providers
        return ProviderRules(on_all_down=p.on_all_down, wait_before_switch=p.wait_before_switch, park_max=p.park_max)

    def ladder_states(self) -> tuple[dict[str, ProviderStatus], ProviderRules]:
        """Each provider's health and the rules on it, as every ladder view carries them
        (Carrier.view): a process failure's switch passes over a known outage too."""
        return {n: ProviderStatus(**s) for n, s in self.board.states(self.clock.now()).items()}, self.rules()

    async def view(self, service: str, task_id: str | None) -> LadderView:
        return await self.carrier.view(service, decider=DAEMON, task_id=task_id)

    def status(self) -> list[dict]:
        return self.board.snapshot(self.clock.now())

    def summary(self) -> dict:
        """For /status (no token): each provider's state and why, and the parked tasks."""
        states = self.board.states(self.clock.now())
        return {"providers": [{"provider": n, **s} for n, s in states.items()],
                "parked": [{"task_id": t, "agent": a, "kind": k, **self.hint(t, k)}
                           for t, (a, k) in sorted(self.parked.items())]}

    # -- the governor ---------------------------------------------------------------------------

    async def acquire(self, req: ProviderCall) -> dict:
        """May this call go to its provider? Waits (long-polled) through a short hold, a
        probe in flight or a full concurrency budget; an open provider is a failure the
        ladder decides at once."""
        parked = await self.check_budget(req)
        if parked is not None:
            return parked
        deadline = self.clock.now() + LONG_POLL
        while True:
            now = self.clock.now()
            self.board.tick(now)
            await self.announce([])
            live = self._live()
            self.board.drop_holders(lambda holder: bool(holder) and holder not in live)
            grant = self.board.acquire(req.provider, now, req.incarnation)
            if grant.go:
                return {"action": "go", "provider": req.provider, "probe": grant.probe}
            if grant.open:
                self.metrics.provider_refused.labels(provider=req.provider).inc()
                return await self.decide(ProviderFailed(new_id("pf-"), req.service, req.incarnation, req.provider,
                                                        "provider_open", True, None, req.task_id),
                                         detail={"why": grant.why})
            left = deadline - now
            if left <= 0:
                return {"action": "wait", "delay": 0.0, "why": grant.why}
            await self._wait_change(min(grant.wait or 0.05, left))

    async def outcome(self, out: ProviderOutcome) -> dict:
        now = self.clock.now()
        if out.usage is not None:
            task = await self.store.task(out.task_id) if out.task_id else None
            await self.spend.record(out.usage, agent=out.service, incarnation=out.incarnation, task=task, ok=out.ok)
        if out.cancelled:
            self.board.released(out.provider, out.incarnation)
            self.wake()
            return {"action": "done"}
        if out.ok:
            self.park_started.pop(out.task_id or "", None)
            tokens = out.tokens or (out.usage.input_tokens + out.usage.output_tokens if out.usage else 0)
            await self.announce(self.board.succeeded(out.provider, now, tokens=tokens, limits=out.limits,
                                                     admitted=out.admitted, holder=out.incarnation))
            self.wake()  # a call in flight fewer: the next waiter may go
            return {"action": "done"}
        failure = out.failure or {}
        f = CallFailure.of(failure)
        # One that does not count against the provider's health is still bounded by the ladder.
        if f.says_provider:
            changes = self.board.failed(out.provider, now, reason=f.reason, retry_after=f.retry_after,
                                        limits=failure.get("limits") or out.limits, error=failure,
                                        admitted=out.admitted, holder=out.incarnation)
        else:
            changes = []
            if out.admitted:
                self.board.released(out.provider, out.incarnation)
        self.metrics.provider_failures.labels(provider=out.provider, reason=f.reason).inc()
        await self.announce(changes)
        return await self.decide(ProviderFailed(new_id("pf-"), out.service, out.incarnation, out.provider, f.reason,
                                                f.retryable, f.retry_after, out.task_id),
                                 detail={k: v for k, v in failure.items() if k != "provider"})

    # -- decisions ---------------------------------------------------------------------------------

    async def decide(self, event: ProviderFailed, *, detail: dict) -> dict:
        view = await self.view(event.service, event.task_id)
        decision = decide(event, view, view.now, view.policy)
        log.info("decision", extra={"offender": event.service, "decider": DAEMON, "case": decision.case,
                                    "decision": type(decision).__name__, "task": event.task_id,
                                    "provider": event.provider, "reason": event.reason})
        return await self.carry_out(decision, event, view, detail)

    async def carry_out(self, d: Decision, event: ProviderFailed, view: LadderView, detail: dict) -> dict:
        svc = self.sup[event.service]
        task = await self.store.task(event.task_id) if event.task_id else None
        run_id = task["run_id"] if task else None
        row_detail = {**detail, "providers": {n: s.model_dump() for n, s in view.providers.items()}}
        if isinstance(d, Ignore):
            return {"action": "abandon", "case": d.case, "why": d.why}
        if isinstance(d, RetryInPlace):
            await self.store.record_retry(
                alert_id=event.key, agent_id=event.service, retry_type=RetryType.PROVIDER_RETRY, reason=event.reason,
                detail={**row_detail, "delay": round(d.delay, 4)}, case=d.case, task_id=event.task_id, run_id=run_id,
                from_provider=event.provider, to_provider=event.provider, requested_by=event.service)
            self.metrics.provider_retries.labels(provider=event.provider).inc()
            return {"action": "retry", "case": d.case, "delay": d.delay, "provider": event.provider}
        if isinstance(d, SwitchProvider):
            await self.store.record_retry(
                alert_id=event.key, agent_id=event.service, retry_type=RetryType.LLM_CHANGE, reason=event.reason,
                detail={**row_detail, "in_place": True, "delay": round(d.delay, 4)}, case=d.case,
                task_id=event.task_id, run_id=run_id, from_provider=event.provider, to_provider=d.to_provider,
                requested_by=event.service)
            self.metrics.provider_switches.inc()
            log.warning("provider switch", extra={"offender": event.service, "from": event.provider,
                                                  "to": d.to_provider, "task": event.task_id, "case": d.case,
                                                  "in_place": True})
            if event.task_id:
                await self.store.set_task_provider(event.task_id, d.to_provider)
            await self.set_provider(svc, d.to_provider)
            return {"action": "switch", "case": d.case, "provider": d.to_provider, "delay": d.delay}
        if isinstance(d, Park):  # the call's own error goes with it: the operator asked sees why
            return await self.park_here(d, event.service, task, requested_by=event.service,
                                        incarnation=event.incarnation, error=event.reason)
        if isinstance(d, Fail):
            answer = await self.fail(event, d, detail=row_detail)
            return {"action": "fail", "case": d.case, "reason": d.reason, "recorded": answer.get("status")}
        raise AssertionError(f"a provider failure cannot be decided as {d!r}")

    async def park_here(self, d: Park, service: str, task: dict | None, *, requested_by: str,
                        incarnation: str, error: str | None = None) -> dict:
        """The task waits in its agent (which polls ``park``) for what ``d.kind`` names."""
        if task is None:
            return {"action": "abandon", "why": "no task to park"}
        self.approvals.pop(task["task_id"], None)  # an answer to an earlier wait is no answer to this one
        # park_max counts from the first park of an outage: a probe that fails and parks the
        # task again does not start the clock over (it stops at the task's next good call).
        self.park_started.setdefault(task["task_id"], self.clock.now())
        if await self.store.park_task(task["task_id"], d.reason, d.kind, lease=incarnation):
            self.metrics.tasks_parked.inc()
            log.error("task parked", extra={"offender": service, "task": task["task_id"], "reason": d.reason,
                                            "kind": d.kind})
            if d.kind == "awaiting_operator":
                await self.carrier.awaiting_operator(task, service, d.reason, case=d.case, requested_by=requested_by,
                                                     error=error)
            elif d.kind == "budget_exceeded":
                run = await self.store.run(task["run_id"])
                spend = await self.spend.view(service, task, run)
                self.hints[task["task_id"]] = raise_hint(spend.over(), task)
                while len(self.hints) > 10_000:  # (shown only while its task is parked at a budget)
                    del self.hints[next(iter(self.hints))]
                await self.store.event("budget_exceeded", {"reason": d.reason, "spend": spend.model_dump(),
                                                           "raise": self.hints[task["task_id"]]},
                                       agent=service, task_id=task["task_id"], run_id=task["run_id"])
                self.background(self.carrier.ledger.notify_parked(task["run_id"], task["task_id"], d.kind, d.reason),
                                "notify gateway (parked)")
        self.parked[task["task_id"]] = (service, d.kind)
        return {"action": "park", "case": d.case, "kind": d.kind, "reason": d.reason,
                "park_max": self.rules().park_max}

    async def check_budget(self, req: ProviderCall) -> dict | None:
        """Before a call: within the budgets of its task, run and service? If not, the task
        parks (its agent stays up) until an operator raises the budget or ends it."""
        task = await self.store.task(req.task_id) if req.task_id else None
        run = await self.store.run(task["run_id"]) if task else None
        if not self.spend.applies(run):
            return None
        view = LadderView(now=self.clock.now(), policy=self.policy(), decider=DAEMON, top=True,
                          service=ServiceView(name=req.service, incarnation=req.incarnation, provider=req.provider),
                          task=TaskView(task_id=task["task_id"], status=task["status"]) if task else None,
                          spend=await self.spend.view(req.service, task, run))
        d = decide(CallAsked(new_id("c-"), req.service, req.task_id), view, view.now, view.policy)
        if isinstance(d, Park):
            return await self.park_here(d, req.service, task, requested_by=req.service,
                                        incarnation=req.incarnation)
        return None

    async def fail(self, event: ProviderFailed, d: Fail, *, detail: dict) -> dict:
        self.parked.pop(event.task_id or "", None)
        self.park_started.pop(event.task_id or "", None)
        self.approvals.pop(event.task_id or "", None)
        chain_down = d.case in ("all_providers_down", "park_expired")
        return await self.carrier.fail(PermanentFailure(
            alert_id=event.key, service=event.service, task_id=event.task_id, reason=d.reason[:128], case=d.case,
            detail={**detail, "last_reason": "all_providers_down" if chain_down else event.reason,
                    "failure_class": "provider", "chain_exhausted": chain_down},
            decided_by="policy", requested_by=DAEMON))

    async def set_provider(self, svc, provider: str) -> None:
        """The service's provider, changed in place: its running incarnation takes the calls
        on it (each call names its provider), so no restart is owed, and it is not switched
        away (Service.switched_away): the tasks handed to it (a held task resumed, an
        approved one) are not deferred for a replacement that never comes. One switched away
        already (the root's switch, its restart under way or about to be) stays so: the
        incarnation about to be replaced must not get the task."""
        was_away = svc.switched_away
        if svc.provider != provider:
            svc.provider = provider
            await self.store.set_agent(svc.name, provider=provider)
        if not was_away:
            svc.spawned_provider = provider

    # -- parked tasks ------------------------------------------------------------------------------

    async def park(self, req: ProviderCall) -> dict:
        """A parked task's agent waits here: answered ``resume`` (on a provider that is not
        open), ``fail`` (park_max passed; recorded), ``abandon`` (the task is no longer
        parked), or ``park`` again after the long poll."""
        deadline = self.clock.now() + LONG_POLL
        while True:
            svc = self.sup.services.get(req.service)
            if svc is None or svc.incarnation != req.incarnation:
                # Stopped, replaced or scaled away while it waited: its task is the next
                # incarnation's (or a sibling's) now, and it must not resume it here.
                return {"action": "abandon", "why": f"{req.incarnation} is no longer {req.service}'s incarnation"}
            self.board.tick(self.clock.now())
            await self.announce([])
            task = await self.store.task(req.task_id) if req.task_id else None
            if task is not None and task["agent"] != req.service:
                return {"action": "abandon", "why": f"task {req.task_id} is {task['agent']}'s, not {req.service}'s"}
            event, view = await self.park_view(req.service, task, req.task_id or "-")
            now = view.now
            d = decide(event, view, view.now, view.policy)
            if isinstance(d, Resume):
                return await self._resume(req, d)
            if isinstance(d, Fail):
                self.approvals.pop(req.task_id or "", None)
                log.error("parked task failed", extra={"task": req.task_id, "reason": d.reason, "case": d.case})
                answer = await self.fail(ProviderFailed(event.key, req.service, req.incarnation, req.provider,
                                                        d.reason, True, None, req.task_id), d,
                                         detail={"parked_for": round(event.parked_for, 3)})
                return {"action": "fail", "case": d.case, "reason": d.reason, "recorded": answer.get("status")}
            if d.case == "park_task_gone":
                self.parked.pop(req.task_id, None)
                status = task["status"] if task else None
                return {"action": "resume" if status == TaskState.RUNNING else "abandon", "case": d.case,
                        "provider": (task or {}).get("provider") or req.provider, "why": d.why}
            limit = view.rules.park_max if event.kind == "providers" else view.policy.operator_timeout
            left = min(deadline - now, limit - event.parked_for)
            if deadline - now <= 0:
                return {"action": "park", "case": d.case, "why": d.why}
            waits = [b for b in (self.board.wait_left(p, now) for p in view.chain) if b is not None]
            await self._wait_change(max(0.01, min([left, *waits, 1.0])))

    async def park_view(self, service: str, task: dict | None, task_id: str) -> tuple[ParkCheck, LadderView]:
        """A parked task as the ladder sees it: what it waits for, for how long, and the
        state of that (providers, its spend, an operator's answer)."""
        since = self.park_started.get(task_id, task.get("held_since") if task else None)
        now = self.clock.now()
        kind = (task or {}).get("parked_reason") or "providers"
        event = ParkCheck(new_id("pk-"), service, task_id, now - since if isinstance(since, (int, float)) else 0.0,
                          kind)
        view = await self.view(service, task_id if task else None)
        update: dict = {"approval": self.approvals.get(task_id)}
        if kind == "budget_exceeded" and task is not None:
            update["spend"] = await self.spend.view(service, task, await self.store.run(task["run_id"]))
        return event, view.model_copy(update=update)

    async def approve(self, task: dict, approval: Approval) -> None:
        """`tron task approve`: the task's parked agent (or the daemon's tick, for a held task)
        takes it up on the next look, within a moment."""
        self.approvals[task["task_id"]] = approval
        self.wake()

    async def tick_held(self) -> None:
        """Tasks parked with nobody polling for them (held by the top for an operator, or
        whose agent died while parked): the daemon looks at them itself, so that an
        operator's answer or the timeout ends them even so."""
        live = self._live()
        parked = await self.store.parked_tasks()
        # What /status shows: every parked task, whoever parked it (this daemon or an earlier one).
        self.parked = {t["task_id"]: (t["agent"], t["parked_reason"] or "providers") for t in parked}
        for task in parked:
            if task["lease_incarnation"] in live:
                continue  # its agent polls /providers/park itself
            event, view = await self.park_view(task["agent"], task, task["task_id"])
            d = decide(event, view, view.now, view.policy)
            if isinstance(d, Fail):
                await self.fail(ProviderFailed(event.key, task["agent"], task["lease_incarnation"] or "-",
                                               task.get("provider") or self.config.providers.default, d.reason,
                                               True, None, task["task_id"]), d,
                                detail={"parked_for": round(event.parked_for, 3)})
            elif isinstance(d, Resume):
                await self._resume_held(task, d)

    async def _resume_held(self, task: dict, d: Resume) -> None:
        """A held task goes back to its service: assigned again, on the provider it was given,
        and handed to the current incarnation (or the next one)."""
        self.approvals.pop(task["task_id"], None)
        self.parked.pop(task["task_id"], None)
        self.park_started.pop(task["task_id"], None)
        svc = self.sup[task["agent"]]
        if not await self.store.release_task(task["task_id"], d.provider):
            return
        self.metrics.tasks_resumed.inc()
        log.warning("held task resumed", extra={"task": task["task_id"], "provider": d.provider, "case": d.case})
        await self.set_provider(svc, d.provider)
        if svc.state == "running" and svc.replacing is None:
            row = await self.store.task(task["task_id"])
            self.background(self.carrier.ledger.dispatch(svc, row, resumed=True), f"resume {task['task_id']}")

    async def _resume(self, req: ProviderCall, d: Resume) -> dict:
        self.parked.pop(req.task_id or "", None)
        self.approvals.pop(req.task_id or "", None)
        if not await self.store.unpark_task(req.task_id, d.provider):
            return {"action": "abandon", "why": f"task {req.task_id} was not parked"}
        self.metrics.tasks_resumed.inc()
        log.warning("parked task resumed", extra={"task": req.task_id, "provider": d.provider,
                                                  "offender": req.service})
        await self.set_provider(self.sup[req.service], d.provider)
        return {"action": "resume", "case": d.case, "provider": d.provider}

    # -- operators -----------------------------------------------------------------------------------

    async def drain(self, name: str, *, actor: str, reason: str) -> dict:
        changes = self.board.drain(name, self.clock.now(), f"drained by {actor}" + (f": {reason}" if reason else ""))
        await self.announce(changes, by=actor)
        return {"status": "drained" if changes else "already_drained", "provider": name}

    async def restore(self, name: str, *, actor: str, reason: str) -> dict:
        changes = self.board.restore(name, self.clock.now(), f"restored by {actor}" + (f": {reason}" if reason else ""))
        await self.announce(changes, by=actor)
        return {"status": "restored" if changes else "already_closed", "provider": name}
