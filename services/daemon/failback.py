"""Failback, carried out: services moved off their own provider go home once it is healthy
again, and a provider nobody calls any more is probed by the daemon (the rule, pure, is
common/failback.py).

Once a second (the housekeeping loop) ``tick`` reads the board and the agent services, asks
``failback.plan``, moves the services it names back in place (the provider desk's own
in-place change: no restart; the tasks they run keep their provider, their next ones start at
home) with a ``provider_failback`` event each, and starts the probes it names. A probe is one
real completion in a process of its own (common/providers/probe.py), holding the board's probe
slot as an agent's first call after a cooldown would: its verdict closes the provider or opens
it again for a longer cooldown, announced like any other change (``provider_probed`` records
it). A probe with no verdict on the provider's health (a bad key, a bad request, a process that
failed) closes nothing, and the next one waits ``cooldown_max``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
from typing import Awaitable, Callable

from tron.common import failback
from tron.common.config import MeshConfig
from tron.common.providers import NON_RETRYABLE, ProviderSettings
from tron.common.redaction import redact
from tron.common.states import ServiceState
from tron.registry.protocol import Store
from tron.services.daemon.metrics import DaemonMetrics

log = logging.getLogger("tron.daemon")
PROBER = "daemon:probe"  # the board's holder of the daemon's probe
Probe = Callable[[str, ProviderSettings], Awaitable[dict]]
RUNNING: set[int] = set()  # the probes' pids: the housekeeping's reaper leaves them to their waiter


async def probe_in_process(provider: str, settings: ProviderSettings) -> dict:
    """Run common/providers/probe.py: its one JSON line, or a failure with no verdict."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tron.common.providers.probe", provider, stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, start_new_session=True)
    RUNNING.add(proc.pid)
    try:
        out, err = await asyncio.wait_for(proc.communicate(settings.model_dump_json().encode()),
                                          settings.timeout_s + 15.0)  # its own call times out at timeout_s + 1
    except asyncio.TimeoutError:
        proc.kill()
        await proc.wait()
        return {"ok": False, "failure": {"reason": "timeout", "retryable": True, "message": "the probe hung"}}
    finally:
        RUNNING.discard(proc.pid)
    try:
        answer = json.loads(out.decode().strip().splitlines()[-1])
        if isinstance(answer, dict) and "ok" in answer:
            return answer
    except (ValueError, IndexError):
        pass
    return {"ok": False, "no_verdict": True,
            "failure": {"reason": "probe_failed", "message": redact(err.decode(errors="replace"))[-300:]}}


class Failback:
    def __init__(self, config: MeshConfig, sup, store: Store, desk, *, metrics: DaemonMetrics, background,
                 probe: Probe = probe_in_process) -> None:
        self.config = config
        self.sup = sup
        self.store = store
        self.desk = desk  # ProviderDesk: its board, its in-place provider change, its announcements
        self.metrics = metrics
        self.background = background
        self.probe = probe
        self.probing: set[str] = set()
        self.quiet_until: dict[str, float] = {}  # provider -> no probe before (after one with no verdict)
        self.away_since: dict[tuple[str, str], float] = {}  # (service, provider it is on) -> first seen there

    def _away(self, now: float) -> list[failback.Away]:
        out = []
        for svc in self.sup.services.values():
            if not svc.spec.is_agent or not svc.provider:
                continue
            home = self.config.provider_of(svc.name)
            if svc.provider == home:
                continue
            settled = (svc.state == ServiceState.RUNNING and not svc.stopped and svc.replacing is None
                       and not svc.switched_away)
            since = self.away_since.setdefault((svc.name, svc.provider), now)
            out.append(failback.Away(svc.name, svc.provider, home, settled, since))
        seen = {(a.service, a.provider) for a in out}
        for key in [k for k in self.away_since if k not in seen]:  # home again, or gone
            del self.away_since[key]
        return out

    async def tick(self) -> None:
        after = self.config.providers.failback_after
        if after <= 0:
            return
        board = self.desk.board
        now = self.desk.clock.now()
        away = self._away(now)
        if not away:
            return
        board.tick(now)
        health = {}
        for name in {a.home for a in away}:
            h = board[name]
            health[name] = failback.Health(h.state, h.since, h.probe_until is not None and now < h.probe_until)
        quiet = frozenset(p for p, until in self.quiet_until.items() if now < until)
        plan = failback.plan(away, health, now, after, frozenset(self.probing) | quiet)
        for name, provider in plan.home:
            await self._go_home(self.sup[name], provider, closed_for=now - health[provider].since)
        for provider in plan.probe:
            self.probing.add(provider)
            self.background(self._probe(provider), f"probe {provider}")

    async def _go_home(self, svc, provider: str, *, closed_for: float) -> None:
        was = svc.provider
        await self.desk.set_provider(svc, provider)
        self.metrics.provider_failbacks.labels(provider=provider).inc()
        await self.store.event("provider_failback", {"from": was, "to": provider, "closed_for": round(closed_for, 1)},
                               agent=svc.name, incarnation=svc.incarnation)
        log.info("%s goes back to %s (closed for %.0fs); it ran on %s", svc.name, provider, closed_for, was,
                 extra={"offender": svc.name, "from": was, "to": provider})

    def _settings(self) -> ProviderSettings:
        p = self.config.providers
        return ProviderSettings(sim_url=self.config.sim_url, anthropic_model=p.anthropic_model,
                                ollama_model=p.ollama_model, openai_model=p.openai_model, models=p.models,
                                timeout_s=p.timeout, max_tokens=p.max_tokens)

    async def _probe(self, provider: str) -> None:
        board, clock = self.desk.board, self.desk.clock
        try:
            grant = board.acquire(provider, clock.now(), PROBER)
            if not grant.go:
                return  # closed or opened again meanwhile, or someone else's probe is out
            if not grant.probe:
                board.released(provider, PROBER)
                return
            started = clock.now()
            try:
                answer = await self.probe(provider, self._settings())
            except Exception as err:  # the probe's machinery, not the provider
                answer = {"ok": False, "no_verdict": True, "failure": {"reason": "probe_failed", "message": str(err)}}
            now = clock.now()
            failure = answer.get("failure") or {}
            reason = str(failure.get("reason") or "unexpected_error")[:128]
            if answer.get("ok"):
                outcome = "ok"
                changes = board.succeeded(provider, now, holder=PROBER)
            elif answer.get("no_verdict") or reason in NON_RETRYABLE or reason.startswith("unexpected_error"):
                outcome = "no_verdict"  # a bad key or a broken probe says nothing of the provider's health
                board.released(provider, PROBER)
                changes = []
                self.quiet_until[provider] = now + self.config.providers.cooldown_max
            else:
                outcome = "failed"
                retry_after = failure.get("retry_after")
                changes = board.failed(provider, now, reason=reason, holder=PROBER,
                                       retry_after=float(retry_after) if isinstance(retry_after, (int, float)) else None)
            self.metrics.provider_probes.labels(provider=provider, outcome=outcome).inc()
            await self.store.event("provider_probed", {"provider": provider, "outcome": outcome, "reason": reason
                                                       if outcome != "ok" else None, "seconds": round(now - started, 3),
                                                       "state": str(board[provider].state)})
            log.info("probe of %s: %s", provider, outcome if outcome == "ok" else f"{outcome} ({reason})",
                     extra={"provider": provider, "outcome": outcome})
            await self.desk.announce(changes, by="probe")
        finally:
            self.probing.discard(provider)

    def state(self) -> dict[str, object]:
        """For /status: who is away from home, and the probes out."""
        return {"after": self.config.providers.failback_after,
                "away": {a.service: {"on": a.provider, "home": a.home} for a in self._away(self.desk.clock.now())},
                "probing": sorted(self.probing)}

