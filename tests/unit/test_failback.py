"""Failback's rule (common/failback.py), table-driven: when a service moved off its own
provider goes home, and when the daemon probes a provider nobody calls."""

from __future__ import annotations

import pytest

from tron.common.failback import Away, Health, Plan, plan
from tron.common.states import ProviderState

C, H, OPEN = ProviderState.CLOSED, ProviderState.HALF_OPEN, ProviderState.OPEN
AFTER = 60.0
NOW = 1000.0
P1 = Away("programmer-1", "ollama", "anthropic")
P2 = Away("programmer-2", "ollama", "anthropic")
BUSY = Away("programmer-3", "ollama", "anthropic", settled=False)  # a root's switch under way, a replacement
OPENAI = Away("writer", "anthropic", "openai")

CASES = [
    # (why, away, health, after, probing, expected)
    ("closed long enough: every settled service of that home goes back",
     [P1, P2], {"anthropic": Health(C, NOW - 61)}, AFTER, (),
     Plan(home=(("programmer-1", "anthropic"), ("programmer-2", "anthropic")))),
    ("closed, but not for long enough yet: nothing",
     [P1], {"anthropic": Health(C, NOW - 59)}, AFTER, (), Plan()),
    ("exactly `after`: it goes",
     [P1], {"anthropic": Health(C, NOW - AFTER)}, AFTER, (), Plan(home=(("programmer-1", "anthropic"),))),
    ("a service something else is moving is left alone",
     [P1, BUSY], {"anthropic": Health(C, NOW - 600)}, AFTER, (), Plan(home=(("programmer-1", "anthropic"),))),
    ("only unsettled services away: nothing, not even a probe",
     [BUSY], {"anthropic": Health(H, NOW - 1)}, AFTER, (), Plan()),
    ("still open: nothing",
     [P1], {"anthropic": Health(OPEN, NOW - 600)}, AFTER, (), Plan()),
    ("half-open, no probe out: the daemon probes it",
     [P1, P2], {"anthropic": Health(H, NOW - 1)}, AFTER, (), Plan(probe=("anthropic",))),
    ("half-open with a probe out already (anyone's): nothing",
     [P1], {"anthropic": Health(H, NOW - 1, probe_out=True)}, AFTER, (), Plan()),
    ("half-open, the daemon's probe still running: not a second one",
     [P1], {"anthropic": Health(H, NOW - 1)}, AFTER, ("anthropic",), Plan()),
    ("two homes: each decided on its own",
     [P1, OPENAI], {"anthropic": Health(C, NOW - 100), "openai": Health(H, NOW - 1)}, AFTER, (),
     Plan(home=(("programmer-1", "anthropic"),), probe=("openai",))),
    ("a home the board does not know: nothing",
     [P1], {}, AFTER, (), Plan()),
    ("failback off (after = 0): nothing, however long it has been closed",
     [P1], {"anthropic": Health(C, 0.0)}, 0.0, (), Plan()),
    ("closed long enough, but the service left it only now (a root's switch for a hung call): it waits",
     [Away("programmer-1", "ollama", "anthropic", since=NOW - 10), P2], {"anthropic": Health(C, NOW - 600)}, AFTER,
     (), Plan(home=(("programmer-2", "anthropic"),))),
    ("nobody away: nothing",
     [], {"anthropic": Health(H, NOW - 1)}, AFTER, (), Plan()),
]


@pytest.mark.parametrize("why, away, health, after, probing, expected", CASES, ids=[c[0] for c in CASES])
def test_plan(why, away, health, after, probing, expected):
    assert plan(away, health, NOW, after, frozenset(probing)) == expected


# -- the daemon carrying it out (services/daemon/failback.py), on stubs and a fake clock ----------


@pytest.fixture
async def rig(tmp_path):
    from tests.unit.test_daemon import POLICY, Rig
    from tron.common.config import parse_mesh

    config = parse_mesh({"mesh": {"daemon_port": 7000}, "policy": POLICY,
                         "providers": {"failback_after": 10.0, "cooldown": 5.0, "cooldown_max": 30.0},
                         "services": {"root": {"role": "root", "port": 7002},
                                      "worker": {"role": "programmer", "port": 7003, "parent": "root"}}})
    r = Rig(tmp_path, config)
    await r.start()
    r.probes = []

    async def probe(provider, settings):
        r.probes.append(provider)
        return r.probe_answer

    r.probe_answer = {"ok": True, "model": "m", "tokens": 3}
    r.daemon.failback.probe = probe
    yield r
    await r.stop()


async def _away(rig, *names):
    for name in names:
        await rig.daemon.providers.set_provider(rig.svc(name), "ollama")


async def _run(rig, seconds: float, cond=None) -> float:
    """Advance the fake clock a quarter second at a time, the providers' and failback's ticks
    run at each (the housekeeping's own once-a-second ticks wait on threads, in real time),
    for ``seconds`` or until ``cond()``; how long that took."""
    waited = 0.0
    while waited < seconds and not (cond is not None and cond()):
        await rig.advance(0.25)
        await rig.daemon.providers.tick()
        await rig.daemon.failback.tick()
        await rig.settle()
        waited += 0.25
    assert cond is None or cond(), f"not within {seconds}s"
    return waited


async def _open_anthropic(rig):
    board = rig.daemon.providers.board
    for _ in range(3):
        board.failed("anthropic", rig.clock.now(), reason="api_error")
    assert board["anthropic"].state == ProviderState.OPEN


async def test_a_service_moved_off_a_healthy_provider_goes_home_in_place_after_failback_after(rig):
    """An operator approved a task on ollama (anthropic healthy all along): 10 s of anthropic
    closed later, the worker is back on it, the same incarnation, and its next task starts there."""
    await _away(rig, "worker")
    worker = rig.svc("worker")
    old = worker.incarnation
    assert rig.daemon.failback.state()["away"] == {"worker": {"on": "ollama", "home": "anthropic"}}
    await _run(rig, 9.0)
    assert worker.provider == "ollama"  # away for 9 s only
    assert await _run(rig, 2.0, lambda: worker.provider == "anthropic") >= 0.75
    assert (worker.provider, worker.incarnation, worker.switched_away) == ("anthropic", old, False)
    [event] = await rig.store.events(kind="provider_failback")
    assert (event["agent"], event["payload"]["from"], event["payload"]["to"]) == ("worker", "ollama", "anthropic")
    assert (await rig.store.agent("worker"))["provider"] == "anthropic"  # what a daemon started again reads back
    assert rig.probes == []  # closed: nothing to probe
    assert rig.daemon.failback.state()["away"] == {}


async def test_a_provider_nobody_calls_is_probed_when_half_open_and_closes_then_they_go_home(rig):
    await _away(rig, "worker", "root")  # nobody on anthropic: no call of theirs would probe it
    await _open_anthropic(rig)
    await _run(rig, 4.0)
    assert rig.probes == []  # its cooldown is not over
    await _run(rig, 2.0, lambda: rig.probes)
    assert rig.probes == ["anthropic"]
    board = rig.daemon.providers.board
    assert board["anthropic"].state == ProviderState.CLOSED
    [probed] = await rig.store.events(kind="provider_probed")
    assert (probed["payload"]["outcome"], probed["payload"]["state"]) == ("ok", "closed")
    assert rig.svc("worker").provider == "ollama"  # healthy for failback_after first
    await _run(rig, 9.0)
    assert rig.svc("worker").provider == "ollama"
    await _run(rig, 2.0, lambda: {rig.svc(n).provider for n in ("worker", "root")} == {"anthropic"})
    assert rig.probes == ["anthropic"]


async def test_a_failed_probe_opens_it_again_for_longer_and_nobody_moves(rig):
    rig.probe_answer = {"ok": False, "failure": {"reason": "api_error", "retryable": True}}
    await _away(rig, "worker", "root")
    await _open_anthropic(rig)
    await _run(rig, 6.5, lambda: rig.probes)
    h = rig.daemon.providers.board["anthropic"]
    assert h.state == ProviderState.OPEN and h.until - rig.clock.now() == pytest.approx(10.0)  # the cooldown doubled
    await _run(rig, 9.0)
    assert rig.probes == ["anthropic"]  # not before that longer cooldown is over
    await _run(rig, 2.0, lambda: len(rig.probes) == 2)
    assert rig.svc("worker").provider == "ollama"


async def test_a_probe_with_no_verdict_closes_nothing_and_the_next_waits_cooldown_max(rig):
    """A bad key says nothing of the provider's health: it stays half-open, nobody goes home,
    and the daemon does not spawn a probe a second."""
    rig.probe_answer = {"ok": False, "failure": {"reason": "authentication_error", "retryable": False}}
    await _away(rig, "worker", "root")
    await _open_anthropic(rig)
    await _run(rig, 6.5, lambda: rig.probes)
    assert rig.daemon.providers.board["anthropic"].state == ProviderState.HALF_OPEN
    await _run(rig, 29.0)
    assert rig.probes == ["anthropic"]
    await _run(rig, 2.0, lambda: len(rig.probes) == 2)
    assert rig.svc("worker").provider == "ollama"


async def test_a_service_the_root_is_switching_is_not_moved_back_under_it(rig):
    """The root switched the worker to ollama and its replacement is not under way yet: the
    incarnation still on anthropic is switched away; failback must not undo the root's switch."""
    worker = rig.svc("worker")
    worker.provider = "ollama"  # what Carrier._move does first; spawned_provider stays anthropic
    assert worker.switched_away
    await _run(rig, 12.0)
    assert worker.provider == "ollama" and await rig.store.events(kind="provider_failback") == []
