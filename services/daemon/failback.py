"""Failback, carried out: services moved off their own provider go home once it is proven
healthy again, and the daemon probes a provider when no call of anybody's proves it (the
rule, pure, is common/failback.py).

Once a second (the housekeeping loop) ``tick`` reads the board and the agent services, asks
``failback.plan``, moves the services it names back in place (the provider desk's own
in-place change: no restart; the tasks they run keep their provider, their next ones start at
home) with a ``provider_failback`` event each, and starts the probes it names. A probe is one
real completion in a process of its own (common/providers/probe.py), in the environment an
agent of that provider gets, holding the board's probe slot (for a half-open provider) as an
agent's first call after a cooldown would, for as long as the probe may take: its verdict
closes the provider, or counts as a failure (a half-open one opens again for a longer
cooldown), announced like any other change, and ``provider_probed`` records it. A probe with
no verdict on the provider's health (a bad key, a bad request, a process that failed or
overran) closes nothing, and the next one waits ``cooldown_max``; after any other, ``cooldown``.

A service that has to leave its provider again within ``RETURN_WINDOW`` of going home waits
twice as long the next time (up to 64 times ``failback_after``): a flapping provider is not
chased.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
from typing import Awaitable, Callable, Mapping

from tron.common import failback
from tron.common.config import MeshConfig
from tron.common.models import Usage
from tron.common.providers import ProviderSettings
from tron.common.redaction import redact
from tron.common.states import ServiceState
from tron.registry.protocol import Store
from tron.services.daemon.metrics import DaemonMetrics
from tron.services.daemon.providers import CallFailure
from tron.services.daemon.supervisor import child_environ

log = logging.getLogger("tron.daemon")
PROBER = "daemon:probe"  # the board's holder of the daemon's probe
SPENDER = "tron-daemon"  # the service a probe's tokens are recorded under (llm_usage.agent)
Probe = Callable[[str, ProviderSettings, Mapping[str, str]], Awaitable[dict]]
RUNNING: set[int] = set()  # the probes' pids: the housekeeping's reaper leaves them to their waiter
RETURN_WINDOW = 600.0  # s: moved off again this soon after going home, a service waits twice as long next time


def probe_bound(settings: ProviderSettings) -> float:
    """How long a probe's process may run: its interpreter and SDK import (seconds on a loaded
    machine) and its own call, which times out at ``timeout_s`` + 1."""
    return settings.timeout_s + 15.0


async def probe_in_process(provider: str, settings: ProviderSettings, env: Mapping[str, str]) -> dict:
    """Run common/providers/probe.py: its one JSON line; a process that overran ``probe_bound``
    or answered nothing is a probe with no verdict."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tron.common.providers.probe", provider, stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, start_new_session=True, env=dict(env))
    RUNNING.add(proc.pid)
    try:
        out, err = await asyncio.wait_for(proc.communicate(settings.model_dump_json().encode()),
                                          probe_bound(settings))
    except asyncio.TimeoutError:
        proc.kill()
        await proc.wait()
        return {"ok": False, "no_verdict": True,
                "failure": {"reason": "probe_overran", "message": f"no answer within {probe_bound(settings):g}s"}}
    except asyncio.CancelledError:  # the daemon stops: the probe does not outlive it
        proc.kill()
        raise
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
        self.went_home: dict[str, float] = {}  # service -> when it last went home
        self.streak: dict[str, int] = {}  # service -> times in a row it had to leave again soon after

    def _away(self, now: float) -> list[failback.Away]:
        out = []
        after = self.config.providers.failback_after
        for svc in self.sup.services.values():
            if not svc.spec.is_agent or not svc.provider or svc.name not in self.config.services:
                continue  # (one a reload is removing is still supervised for a moment)
            home = self.config.provider_of(svc.name)
            if svc.provider == home:
                continue
            settled = (svc.state == ServiceState.RUNNING and not svc.stopped and svc.replacing is None
                       and not svc.switched_away)
            if (svc.name, svc.provider) not in self.away_since:  # it left just now
                self.away_since[(svc.name, svc.provider)] = now
                back = self.went_home.get(svc.name)
                self.streak[svc.name] = self.streak.get(svc.name, 0) + 1 \
                    if back is not None and now - back < RETURN_WINDOW else 0
            streak = min(self.streak.get(svc.name, 0), 6)
            out.append(failback.Away(svc.name, svc.provider, home, settled, self.away_since[(svc.name, svc.provider)],
                                     after * 2 ** streak if streak else None))
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
            health[name] = failback.Health(h.state, h.since, h.probe_until is not None and now < h.probe_until,
                                           h.last_ok)
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
        self.went_home[svc.name] = self.desk.clock.now()
        self.away_since.pop((svc.name, was), None)  # should it leave again, its time away starts then
        self.metrics.provider_failbacks.labels(provider=provider).inc()
        await self.store.event("provider_failback", {"from": was, "to": provider, "closed_for": round(closed_for, 1)},
                               agent=svc.name, incarnation=svc.incarnation)
        log.info("%s goes back to %s (closed for %.0fs); it ran on %s", svc.name, provider, closed_for, was,
                 extra={"offender": svc.name, "from": was, "to": provider})

    def _env(self, provider: str) -> dict[str, str]:
        """What an agent of ``provider`` gets to reach it: the daemon's environment without its
        own secrets, with the ``env`` of a service that belongs on it (a key set per service)."""
        env = child_environ(self.config)
        for name, spec in self.config.services.items():
            if spec.is_agent and self.config.provider_of(name) == provider:
                env.update(spec.env)
                break
        return env

    async def _probe(self, provider: str) -> None:
        board, clock = self.desk.board, self.desk.clock
        settings = self.config.provider_settings()
        try:
            now = clock.now()
            grant = board.acquire(provider, now, PROBER)
            if not grant.go:
                return  # opened meanwhile, at its limits, or someone else's probe is out
            if grant.probe:  # the slot is ours for as long as our probe may take, not an agent's call
                board[provider].probe_until = now + probe_bound(settings) + 1.0
            started = now
            try:
                answer = await self.probe(provider, settings, self._env(provider))
            except Exception as err:  # the probe's machinery, not the provider
                answer = {"ok": False, "no_verdict": True, "failure": {"reason": "probe_failed", "message": str(err)}}
            now = clock.now()
            failure = answer.get("failure") or {}
            f = CallFailure.of(failure)
            reason, message = f.reason, redact(str(failure.get("message") or ""))[:300]
            quiet = self.config.providers.cooldown
            if answer.get("ok"):
                outcome = "ok"
                changes = board.succeeded(provider, now, holder=PROBER)
                await self._spent(provider, answer)
            elif answer.get("no_verdict") or not f.says_provider:
                outcome, quiet = "no_verdict", self.config.providers.cooldown_max
                board.released(provider, PROBER)  # a bad key or a broken probe says nothing of its health
                changes = []
                log.warning("probe of %s: no verdict (%s): %s", provider, reason, message,
                            extra={"provider": provider, "outcome": outcome})
            else:
                outcome = "failed"
                changes = board.failed(provider, now, reason=reason, holder=PROBER, retry_after=f.retry_after)
            self.quiet_until[provider] = now + quiet
            self.metrics.provider_probes.labels(provider=provider, outcome=outcome).inc()
            await self.store.event("provider_probed", {
                "provider": provider, "outcome": outcome, "reason": reason if outcome != "ok" else None,
                "message": message if outcome != "ok" else None, "seconds": round(now - started, 3),
                "state": str(board[provider].state)})
            if outcome != "no_verdict":
                log.info("probe of %s: %s", provider, outcome if outcome == "ok" else f"{outcome} ({reason})",
                         extra={"provider": provider, "outcome": outcome})
            await self.desk.announce(changes, by="probe")
        finally:
            self.probing.discard(provider)

    async def _spent(self, provider: str, answer: dict) -> None:
        """A probe's tokens are spend like any call's: a row of its own (service ``tron-daemon``,
        source ``probe``), priced, in `tron cost` and the token metrics; no task's or run's."""
        if not isinstance(answer.get("usage"), dict):
            return
        try:
            usage = Usage(provider=provider, model=str(answer.get("model") or "unknown"),
                          duration_ms=answer.get("duration_ms"), step="failback_probe", **(answer.get("usage") or {}))
            await self.desk.spend.record(usage, agent=SPENDER, incarnation=None, task=None, ok=True, source="probe")
        except Exception as err:  # a probe that worked is not undone by its bookkeeping: said, not raised
            log.warning("probe of %s: its usage was not recorded: %s: %s", provider, type(err).__name__, err)

    def state(self) -> dict[str, object]:
        """For /status: who is away from home, and the probes out."""
        return {"after": self.config.providers.failback_after,
                "away": {a.service: {"on": a.provider, "home": a.home} for a in self._away(self.desk.clock.now())},
                "probing": sorted(self.probing)}

