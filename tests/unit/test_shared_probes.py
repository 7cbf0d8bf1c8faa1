"""A probe of one replica of a shared port (services/daemon/probes.py ProbeChecks): its own
answer counts, its siblings' do not, and a probe that only ever reached its siblings is
inconclusive, which liveness and readiness skip. The kernel's answer of who accepted each
connection (acceptor.accepted_by) is scripted here; acceptor.py has its own tests."""

import asyncio
from types import SimpleNamespace

import pytest

from tron.common import probe_kinds
from tron.common.config import Probe
from tron.common.probe_kinds import Elsewhere, ProbeResult
from tron.services.daemon import acceptor, probes
from tron.services.daemon.probes import Inconclusive, ProbeChecks

HANG = "hang"


class Scripted:
    """A kind whose every attempt connects (asks ``ctx.mine``), then does what the script
    says for a connection of its own: pass, fail, or hang past the timeout."""

    def __init__(self, own: str) -> None:
        self.own, self.attempts = own, 0

    async def check(self, spec, svc, ctx) -> ProbeResult:
        self.attempts += 1
        if ctx.mine is not None and await ctx.mine(("127.0.0.1", 40000 + self.attempts)) is False:
            raise Elsewhere
        if self.own == HANG:
            await asyncio.sleep(10)
        return ProbeResult(self.own == "pass", self.own)


def replica(shared: bool = True):
    spec = SimpleNamespace(port=7401, replica_of="web" if shared else None, is_agent=False, socket="inherit",
                           replicas=3 if shared else 1)
    return SimpleNamespace(name="web.1", spec=spec, child=SimpleNamespace(pid=1, node=None, pids=lambda: [1]))


# whose: the kernel's answer for each connection in turn (True: this replica's, False: a
# sibling's, "wait": nobody accepts it within the timeout), the last one repeating.
@pytest.mark.parametrize("whose,own,want,detail", [
    ([True], "pass", True, "pass"),
    ([False, False, True], "pass", True, "pass"),  # made again until one is its own
    ([False, True], "fail", False, "fail"),  # its own answer fails as any probe
    ([True], HANG, False, "accepted, no answer within"),  # it took the connection and left it
    ([False], "pass", "inconclusive", "its siblings accepted all 9 connections"),  # 3 a replica
    ([False, "wait"], "pass", "inconclusive", "its siblings accepted all 1 connections within"),
    (["wait"], "pass", False, "no answer within"),  # nobody accepts at all: a failure
])
def test_only_the_replicas_own_connections_count(monkeypatch, whose, own, want, detail):
    kind = Scripted(own)
    monkeypatch.setattr(probe_kinds, "get", lambda name: kind)
    answers = iter(whose)
    last = [whose[0]]

    async def accepted_by(port, peer, pids, host="127.0.0.1"):
        last[0] = next(answers, last[0])
        if last[0] == "wait":
            await asyncio.sleep(10)
        return last[0]

    monkeypatch.setattr(acceptor, "accepted_by", accepted_by)
    checks = ProbeChecks(SimpleNamespace(plain=None), lambda svc: {})
    probe = Probe.model_validate({"tcp": {}, "timeout": 0.2})
    result = asyncio.run(checks.check(replica(), probe))
    if want == "inconclusive":
        assert isinstance(result, Inconclusive) and not result.passed
    else:
        assert not isinstance(result, Inconclusive) and result.passed is want
    assert detail in result.detail, result


def test_a_service_that_shares_no_port_is_never_asked_whose_its_connection_was(monkeypatch):
    kind = Scripted("pass")
    monkeypatch.setattr(probe_kinds, "get", lambda name: kind)

    async def accepted_by(*args, **kw):
        raise AssertionError("asked")

    monkeypatch.setattr(acceptor, "accepted_by", accepted_by)
    checks = ProbeChecks(SimpleNamespace(plain=None), lambda svc: {})
    assert asyncio.run(checks.check(replica(shared=False), Probe.model_validate({"tcp": {}}))).passed


@pytest.mark.parametrize("use", ["liveness", "readiness"])
def test_an_inconclusive_probe_moves_no_streak(use):
    """Three inconclusive liveness probes in a row raise no alert; readiness stays as it was."""
    probe = Probe.model_validate({"tcp": {}, "failure_threshold": 1})
    svc, loop, raised = _siblings_answer_every_probe(lambda: 0.0)
    for _ in range(3):
        loop._running.add(("web.1", use))
        asyncio.run(loop._run(svc, "i-1", use, probe))
    assert not raised and svc.ready is True and not loop._streak and not loop._running


async def _value(v):
    return v


def _siblings_answer_every_probe(now):
    """Replica web.1 (running, ready), the probe loop that judges it, whose every attempt is
    inconclusive, at the clock ``now()``; and the alerts it raises."""
    svc = SimpleNamespace(name="web.1", incarnation="i-1", state="running", ready=True, last_beat=None,
                          spec=SimpleNamespace(is_agent=False), child=None)
    raised: list = []
    sup = SimpleNamespace(on_signal=None, stopping=False, services={"web.1": svc})
    monitor = SimpleNamespace(raise_alert=lambda *a, **kw: raised.append(a))
    checks = SimpleNamespace(check=lambda svc, probe: _value(Inconclusive(False, "its siblings accepted all 9")))
    loop = probes.Probes(sup, monitor, checks, clock=SimpleNamespace(now=now), policy=lambda: None, background=None)
    return svc, loop, raised


# A run of probes that reached only the replica's siblings, as (time, "sibs" | "own"), and
# the probes (by index) that count as failures.
@pytest.mark.parametrize("run,failures", [
    ([(t * 6.0, "sibs") for t in range(11)], [10]),  # the 11th: 11 probes over 60 s
    ([(t * 6.0, "sibs") for t in range(10)], []),  # 10 probes, 54 s: not yet
    ([(t * 0.5, "sibs") for t in range(100)], []),  # 100 probes in 49.5 s: not a minute
    ([(t * 0.5, "sibs") for t in range(130)], list(range(120, 130))),  # then each one more is a failure
    ([(t * 30.0, "sibs") for t in range(10)], [9]),  # ten probes, 270 s
    ([(0.0, "sibs"), *[(t * 10.0, "sibs") for t in range(1, 6)], (60.0, "own"),
      *[(60.0 + t * 10.0, "sibs") for t in range(1, 10)]], []),  # its own answer ended the run
])
def test_a_replica_its_siblings_beat_to_every_connection_for_a_minute_fails(run, failures):
    unheard = probes.Unheard()
    got = []
    for i, (t, whose) in enumerate(run):
        if whose == "own":
            unheard.heard(("web.1", "liveness"))
        elif unheard.failure(("web.1", "liveness"), "i-1", t, "its siblings accepted all 9 connections"):
            got.append(i)
    assert got == failures


def test_a_new_incarnation_starts_its_own_run():
    unheard = probes.Unheard(seconds=10, probes=2)
    assert unheard.failure(("web.1", "liveness"), "i-1", 0.0, "") is None
    assert unheard.failure(("web.1", "liveness"), "i-2", 20.0, "") is None  # i-1's run is not i-2's
    assert "in 10s" in unheard.failure(("web.1", "liveness"), "i-2", 30.0, "")


def test_a_replica_that_accepts_nothing_for_a_minute_fails_liveness():
    """Inconclusive probes move no streak for a minute; then each is a failure, and
    failure_threshold of them raise the liveness alert, saying why."""
    probe = Probe.model_validate({"tcp": {}, "interval": 5.0, "failure_threshold": 3})
    now = [0.0]
    svc, loop, raised = _siblings_answer_every_probe(lambda: now[0])
    for t in range(15):  # every 5 s: the 13th probe (60 s) is the first failure, the 15th the third
        now[0] = t * 5.0
        asyncio.run(loop._run(svc, "i-1", "liveness", probe))
        assert bool(raised) == (t == 14), (t, raised)
    service, incarnation, reason, _, detail = raised[0]
    assert (service, incarnation, reason) == ("web.1", "i-1", "liveness_failed")
    assert "accepts nothing" in detail["last_error"] and detail["failures"] == 3


def test_a_replica_that_accepts_nothing_for_a_minute_is_not_ready():
    """Readiness the same way: a minute of its siblings' answers, then failure_threshold
    failures, and it is not ready (readiness never restarts: liveness does)."""
    probe = Probe.model_validate({"tcp": {}, "interval": 10.0, "failure_threshold": 2})
    now = [0.0]
    svc, loop, raised = _siblings_answer_every_probe(lambda: now[0])
    for t in range(12):  # every 10 s: the 10th probe (90 s: ten of them) fails first, the 11th second
        now[0] = t * 10.0
        asyncio.run(loop._run(svc, "i-1", "readiness", probe))
        assert svc.ready is (t < 10), t
    assert not raised
