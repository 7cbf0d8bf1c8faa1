"""Probes of programs that do not beat: is the running incarnation still serving?

One loop serves every probe (not a task per service): each running service with a
liveness probe is checked on its own interval; ``failure_threshold`` failures in a row
raise a TRON alert, which enters the ladder like any other. Every error of a probe, of
whatever kind, is a failed probe; no exception ends the loop. The mesh token is never
sent to a program that is not ours.
"""

from __future__ import annotations

import logging
from typing import Callable

from common.clock import Clock
from common.config import Policy
from common.http import MeshClient
from common.models import Reason
from common.monitor import Monitor
from common.states import ServiceState
from services.daemon.supervisor import Service, Supervisor

log = logging.getLogger("tron.probes")


class Probes:
    def __init__(self, sup: Supervisor, monitor: Monitor, client: MeshClient, *, clock: Clock,
                 policy: Callable[[], Policy], background) -> None:
        self.sup = sup
        self.monitor = monitor
        self.client = client
        self.clock = clock
        self.policy = policy
        self.background = background
        self._due: dict[str, float] = {}
        self._failures: dict[str, tuple[str, int]] = {}  # name -> (incarnation, failures in a row)
        self._running: set[str] = set()

    async def loop(self) -> None:
        while not self.sup.stopping:
            now = self.clock.now()
            for svc in self.sup.services.values():
                probe = svc.spec.liveness
                if probe is None or svc.state != ServiceState.RUNNING or svc.name in self._running:
                    continue
                if self._due.get(svc.name, 0.0) > now:
                    continue
                self._due[svc.name] = now + probe.interval
                self._running.add(svc.name)
                self.background(self._probe(svc, svc.incarnation), f"probe {svc.name}")
            await self.clock.sleep(0.05)

    async def _probe(self, svc: Service, incarnation: str) -> None:
        probe = svc.spec.liveness
        try:
            await self.client.get(svc.spec.health_url, timeout=probe.timeout, token=False)
            ok, error = True, ""
        except Exception as err:  # any failure of any kind is a failed probe
            ok, error = False, f"{type(err).__name__}: {err}"[:200]
        finally:
            self._running.discard(svc.name)
        if svc.incarnation != incarnation:
            return
        if ok:
            self._failures.pop(svc.name, None)
            svc.last_beat = self.clock.now()
            return
        seen, before = self._failures.get(svc.name, (incarnation, 0))
        failures = (before if seen == incarnation else 0) + 1
        self._failures[svc.name] = (incarnation, failures)
        log.info("probe of %s failed (%d of %d): %s", svc.name, failures, probe.failure_threshold, error)
        if failures >= probe.failure_threshold:
            self._failures.pop(svc.name, None)
            signal = self.monitor.raise_alert(svc.name, incarnation, Reason.LIVENESS_FAILED, self.clock.now(),
                                              {"failures": failures, "last_error": error})
            if signal is not None and self.sup.on_signal is not None:
                await self.sup.on_signal(signal)
