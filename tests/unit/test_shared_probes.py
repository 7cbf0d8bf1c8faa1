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
    svc = SimpleNamespace(name="web.1", incarnation="i-1", state="running", ready=True, last_beat=None,
                          spec=SimpleNamespace(is_agent=False), child=None)
    raised = []
    sup = SimpleNamespace(on_signal=None, stopping=False, services={"web.1": svc})
    monitor = SimpleNamespace(raise_alert=lambda *a, **kw: raised.append(a))
    checks = SimpleNamespace(check=lambda svc, probe: _value(Inconclusive(False, "its siblings accepted all 8")))
    loop = probes.Probes(sup, monitor, checks, clock=SimpleNamespace(now=lambda: 0.0), policy=lambda: None,
                         background=None)
    for _ in range(3):
        loop._running.add(("web.1", use))
        asyncio.run(loop._run(svc, "i-1", use, probe))
    assert not raised and svc.ready is True and not loop._streak and not loop._running


async def _value(v):
    return v
