"""Probes of programs that do not beat, as Kubernetes has them.

A probe is one kind from the registry in common/probe_kinds (one module each):
``http`` (a status in range), ``tcp`` (connect, optionally send and expect: redis
PING/+PONG), ``exec`` (a command that exits 0: pg_isready) or ``grpc`` (the gRPC health
service answers SERVING). Three uses:

- startup (or, without one, readiness, then liveness): the new incarnation is healthy
  once it passes ``success_threshold`` times in a row, and only if the listener on its
  port belongs to its own process tree (not to workers a killed master left behind);
- liveness: ``failure_threshold`` failures in a row raise a TRON alert (the ladder
  restarts it);
- readiness: ``failure_threshold`` failures in a row mark the service not ready
  (``depends_on: ready`` waits for it), ``success_threshold`` successes in a row ready
  again. With a startup probe, a new incarnation is not ready until its readiness
  probe has passed that many times.

Liveness and readiness wait out their ``initial_delay`` from the incarnation's start.

A replica of a program shares its port with its siblings: its probe counts only a connection
its own processes accepted, one that reached only its siblings says nothing of it
(``Inconclusive``), and a minute of nothing else (``Unheard``) is a failure: it accepts nothing.

A command's main process found stopped (SIGSTOP, ``T`` in /proc) that many checks in a
row is a liveness failure too: a stopped nginx master behind live workers answers HTTP.
One loop serves every probe; every error of any kind is a failed probe and no exception
ends the loop. The mesh token is never sent to a program that is not ours.
"""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Callable

import psutil

from tron.common.clock import Clock
from tron.common.config import STOPPED_CADENCE, Policy, Probe
from tron.common.http import MeshClient
from tron.common.models import Reason
from tron.common.monitor import Monitor
from tron.common.states import ServiceState
from tron.common import probe_kinds
from tron.common.probe_kinds import ProbeContext, ProbeResult
from tron.common.processes import status_of
from tron.services.daemon import acceptor
from tron.services.daemon.supervisor import Service, Supervisor

log = logging.getLogger("tron.probes")
__all__ = ["STOPPED_CADENCE", "Inconclusive", "ProbeChecks", "Probes", "Unheard"]


# Connections one probe of a replica makes at most, hoping one lands on it: three per
# replica, at least 8 (with N replicas taking them fairly, all of 3N land on its siblings
# 2.6% of the time for 3 replicas, 4% for 10), at most 32.
def max_elsewhere(replicas: int) -> int:
    return min(32, max(8, 3 * replicas))


class Inconclusive(ProbeResult):
    """An attempt that reached only the replica's siblings: not a pass (a replica is not
    healthy or ready on its siblings' answers) and not a failure (it held no connection it
    failed to answer): a liveness or readiness streak ignores it, until its siblings have
    taken every probe's connections for long (``Unheard``)."""


# A replica whose siblings took every connection of its probes, ALONE_PROBES probes in a row
# over ALONE_SECONDS at least, accepts nothing: its loop is blocked (a handler that never
# returns, a deadlock) while its siblings serve the port. Each further such probe is a
# failure. A healthy replica under load loses a probe's 8-32 connections to its siblings now
# and then (4.5% of probes with 3 replicas, 9% with 10: benchmarks/shared_probe.py), never
# ten in a row for a minute.
ALONE_PROBES = 10
ALONE_SECONDS = 60.0
ALONE_SECONDS_KNOB = "TRON_TEST_ALONE_SECONDS"  # a test knob: a shorter minute


class Unheard:
    """Per (service, probe use): since when, and how many probes in a row, only its siblings
    answered (the replica's own answer, of any kind, ends the run)."""

    def __init__(self, seconds: float = ALONE_SECONDS, probes: int = ALONE_PROBES) -> None:
        self.seconds, self.probes = seconds, probes
        self._runs: dict[tuple[str, str], tuple[str, float, int]] = {}  # -> (incarnation, since, probes)

    def heard(self, key: tuple[str, str]) -> None:
        self._runs.pop(key, None)

    def failure(self, key: tuple[str, str], incarnation: str, now: float, detail: str) -> str | None:
        """One more inconclusive probe: what failed when the run is long enough to be a failure, else None."""
        seen, since, count = self._runs.get(key, (incarnation, now, 0))
        if seen != incarnation:
            since, count = now, 0
        count += 1
        self._runs[key] = (incarnation, since, count)
        if count < self.probes or now - since < self.seconds:
            return None
        return (f"it accepted none of the connections of its last {count} probes in {now - since:.0f}s "
                f"(its siblings took them all: it accepts nothing); last: {detail}")


class ProbeChecks:
    """One attempt of a probe against one service: (passed, what happened)."""

    def __init__(self, client: MeshClient, values: Callable[[Service], dict[str, str]],
                 hosts: dict[str, str] | None = None) -> None:
        self.client = client
        self.values = values  # the service's {placeholders}
        self.hosts = {} if hosts is None else hosts  # services placed on other machines (MeshConfig.hosts)

    async def check(self, svc: Service, probe: Probe) -> ProbeResult:
        """One attempt. A replica that shares its port with its siblings is asked until a
        connection lands on it (the kernel hands each to whichever replica accepts first), at
        most ``max_elsewhere`` connections within the probe's timeout: its own answer (or its
        silence on a connection it accepted) is its result; none of its own is ``Inconclusive``,
        which says nothing of it either way."""
        kind = probe_kinds.get(probe.kind)
        host = self.hosts.get(svc.name, "127.0.0.1")
        verdicts: list[bool | None] = []  # whose each connection was, as ``mine`` said
        ctx = ProbeContext(host=host, values=self.values(svc), timeout=probe.timeout, plain=lambda: self.client.plain,
                           mine=self._mine(svc, verdicts) if host == "127.0.0.1" else None)
        elsewhere = 0
        try:
            async with asyncio.timeout(probe.timeout):
                while True:
                    try:
                        return await kind.check(probe.check, svc, ctx)
                    except probe_kinds.Elsewhere:
                        elsewhere += 1
                        if elsewhere >= max_elsewhere(svc.spec.replicas):
                            return Inconclusive(False, f"its siblings accepted all {elsewhere} connections")
        except TimeoutError:
            if verdicts and verdicts[-1] is True:  # it took the connection and did not answer on it
                return ProbeResult(False, f"accepted, no answer within {probe.timeout}s")
            if elsewhere:
                return Inconclusive(False, f"its siblings accepted all {elsewhere} connections within {probe.timeout}s")
            return ProbeResult(False, f"no answer within {probe.timeout}s")
        except Exception as err:  # a probe error of any kind is a failed probe
            return ProbeResult(False, f"{type(err).__name__}: {err}"[:200])

    @staticmethod
    def _mine(svc: Service, verdicts: list[bool | None]):
        """For a replica taking its connections from the socket its siblings take theirs from:
        whether a connection was accepted by its own processes (acceptor.py), each answer
        also appended to ``verdicts``. None for any other service."""
        spec, child = svc.spec, svc.child
        if not spec.replica_of or spec.is_agent or spec.socket != "inherit" or child is None or child.node is not None:
            return None

        async def mine(local: tuple[str, int]) -> bool | None:
            verdicts.append(None)
            verdicts[-1] = await acceptor.accepted_by(spec.port, (local[0], local[1]), child.pids)
            return verdicts[-1]

        return mine

    def probe_port(self, svc: Service, probe: Probe) -> int | None:
        """The loopback port the probe asks (None: it asks none, or another host)."""
        return probe_kinds.get(probe.kind).port(probe.check, svc, self.values(svc))


class Probes:
    """The loop of liveness and readiness probes (and the stopped-process check)."""

    def __init__(self, sup: Supervisor, monitor: Monitor, checks: ProbeChecks, *, clock: Clock,
                 policy: Callable[[], Policy], background) -> None:
        self.sup = sup
        self.monitor = monitor
        self.checks = checks
        self.clock = clock
        self.policy = policy
        self.background = background
        self._due: dict[tuple[str, str], float] = {}
        self._running: set[tuple[str, str]] = set()
        # (service, use) -> (incarnation, result of the streak, its length)
        self._streak: dict[tuple[str, str], tuple[str, bool, int]] = {}
        self.unheard = Unheard(float(os.environ.get(ALONE_SECONDS_KNOB) or ALONE_SECONDS))

    async def loop(self) -> None:
        while not self.sup.stopping:
            now = self.clock.now()
            for svc in self.sup.services.values():
                if svc.state != ServiceState.RUNNING or svc.spec.is_agent:
                    continue
                for use, probe in self._uses(svc):
                    key = (svc.name, use)
                    if key in self._running or self._due.get(key, 0.0) > now:
                        continue
                    if use != "stopped" and now < (svc.started_at or 0.0) + probe.initial_delay:
                        continue
                    self._due[key] = now + probe.interval
                    self._running.add(key)
                    self.background(self._run(svc, svc.incarnation, use, probe), f"{use} probe {svc.name}")
            await self.clock.sleep(0.05)

    @staticmethod
    def _uses(svc: Service):
        spec = svc.spec
        if spec.liveness is not None:
            yield "liveness", spec.liveness
        if spec.readiness is not None:
            yield "readiness", spec.readiness
        # Every command: is its main process stopped? At the liveness probe's cadence.
        yield "stopped", spec.liveness or STOPPED_CADENCE

    async def _run(self, svc: Service, incarnation: str, use: str, probe: Probe) -> None:
        key = (svc.name, use)
        try:
            if use == "stopped":
                ok, what = self._not_stopped(svc)
            else:
                result = await self.checks.check(svc, probe)
                if isinstance(result, Inconclusive):
                    failed = self.unheard.failure(key, incarnation, self.clock.now(), result.detail)
                    if failed is None:
                        log.debug("%s probe of %s: %s", use, svc.name, result.detail)
                        return
                    ok, what = False, failed
                else:
                    self.unheard.heard(key)
                    ok, what = result
        finally:
            self._running.discard(key)
        if svc.incarnation != incarnation or svc.state != ServiceState.RUNNING:
            return
        seen, result, before = self._streak.get(key, (incarnation, ok, 0))
        streak = (before if (seen, result) == (incarnation, ok) else 0) + 1
        self._streak[key] = (incarnation, ok, streak)
        if use == "readiness":
            if svc.ready != ok and streak >= (probe.success_threshold if ok else probe.failure_threshold):
                svc.ready = ok
                log.info("%s is %s (%d %s in a row)", svc.name, "ready" if ok else "not ready", streak,
                         "passes" if ok else f"failures: {what}")
            return
        if ok:
            if use == "liveness":
                svc.last_beat = self.clock.now()
            return
        failures = streak
        log.info("%s probe of %s failed (%d of %d): %s", use, svc.name, failures, probe.failure_threshold, what)
        if failures < probe.failure_threshold:
            return
        self._streak.pop(key, None)
        detail = {"probe": use if use != "stopped" else "process_state", "failures": failures, "last_error": what}
        signal = self.monitor.raise_alert(svc.name, incarnation, Reason.LIVENESS_FAILED, self.clock.now(), detail)
        if signal is not None and self.sup.on_signal is not None:
            await self.sup.on_signal(signal)

    @staticmethod
    def _not_stopped(svc: Service) -> tuple[bool, str]:
        if svc.child is None or not svc.child.alive:
            return True, "not running"
        if svc.child.node is not None:
            return True, "on another node"  # its /proc is there: liveness probes watch it
        status = status_of(svc.child.pid)
        if status is None:
            return True, "gone"
        return status != psutil.STATUS_STOPPED, f"main process {svc.child.pid} is {status}"
