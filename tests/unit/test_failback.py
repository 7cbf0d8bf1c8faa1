"""Failback's rule (common/failback.py), table-driven: when a service moved off its own
provider goes home, and when the daemon probes a provider nobody calls."""

from __future__ import annotations

import pytest

from tron.common.failback import Away, Health, Plan, plan
from tron.common.states import ProviderState

C, H, OPEN = ProviderState.CLOSED, ProviderState.HALF_OPEN, ProviderState.OPEN
AFTER = 60.0
NOW = 1000.0
LEFT = NOW - 100  # when the services below left anthropic
P1 = Away("programmer-1", "ollama", "anthropic", since=LEFT)
P2 = Away("programmer-2", "ollama", "anthropic", since=LEFT)
BUSY = Away("programmer-3", "ollama", "anthropic", settled=False, since=LEFT)  # a root's switch under way
OPENAI = Away("writer", "anthropic", "openai", since=LEFT)
OK = NOW - 5  # a call went through 5 s ago (after they left)

CASES = [
    # (why, away, health, after, probing, expected)
    ("closed since before they left, a call through since: every settled one goes back",
     [P1, P2], {"anthropic": Health(C, NOW - 600, last_ok=OK)}, AFTER, (),
     Plan(home=(("programmer-1", "anthropic"), ("programmer-2", "anthropic")))),
    ("closed, but no call has gone through since they left (a root's switch for a hung call): probe it",
     [P1], {"anthropic": Health(C, NOW - 600, last_ok=LEFT - 1)}, AFTER, (), Plan(probe=("anthropic",))),
    ("closed and never called: probe it",
     [P1], {"anthropic": Health(C, NOW - 600)}, AFTER, (), Plan(probe=("anthropic",))),
    ("proven by a probe that closed it a moment ago: it goes (its time away was the wait)",
     [P1], {"anthropic": Health(C, NOW - 1, last_ok=NOW - 1)}, AFTER, (), Plan(home=(("programmer-1", "anthropic"),))),
    ("away exactly `after`: due",
     [Away("programmer-1", "ollama", "anthropic", since=NOW - AFTER)], {"anthropic": Health(C, NOW - 600, last_ok=OK)},
     AFTER, (), Plan(home=(("programmer-1", "anthropic"),))),
    ("away for less than `after`: not due, nothing, not even a probe",
     [Away("programmer-1", "ollama", "anthropic", since=NOW - 30)], {"anthropic": Health(H, NOW - 1)}, AFTER, (),
     Plan()),
    ("proven, but the service left only 30 s ago: it waits",
     [Away("programmer-1", "ollama", "anthropic", since=NOW - 30), P2],
     {"anthropic": Health(C, NOW - 600, last_ok=OK)}, AFTER, (), Plan(home=(("programmer-2", "anthropic"),))),
    ("a service that flapped waits its own, longer, `after`",
     [Away("programmer-1", "ollama", "anthropic", since=LEFT, after=240.0), P2],
     {"anthropic": Health(C, NOW - 600, last_ok=OK)}, AFTER, (), Plan(home=(("programmer-2", "anthropic"),))),
    ("a service something else is moving is left alone",
     [P1, BUSY], {"anthropic": Health(C, NOW - 600, last_ok=OK)}, AFTER, (),
     Plan(home=(("programmer-1", "anthropic"),))),
    ("only unsettled services away: nothing, not even a probe",
     [BUSY], {"anthropic": Health(H, NOW - 1)}, AFTER, (), Plan()),
    ("still open: nothing",
     [P1], {"anthropic": Health(OPEN, NOW - 600)}, AFTER, (), Plan()),
    ("half-open, no probe out: the daemon probes it",
     [P1, P2], {"anthropic": Health(H, NOW - 1)}, AFTER, (), Plan(probe=("anthropic",))),
    ("half-open with a probe out already (an agent's first call): nothing",
     [P1], {"anthropic": Health(H, NOW - 1, probe_out=True)}, AFTER, (), Plan()),
    ("half-open, the daemon's probe still running (or its quiet spell): not another",
     [P1], {"anthropic": Health(H, NOW - 1)}, AFTER, ("anthropic",), Plan()),
    ("closed without a call since, the daemon's probe running: not another",
     [P1], {"anthropic": Health(C, NOW - 600)}, AFTER, ("anthropic",), Plan()),
    ("two homes: each decided on its own",
     [P1, OPENAI], {"anthropic": Health(C, NOW - 100, last_ok=OK), "openai": Health(H, NOW - 1)}, AFTER, (),
     Plan(home=(("programmer-1", "anthropic"),), probe=("openai",))),
    ("a home the board does not know: nothing",
     [P1], {}, AFTER, (), Plan()),
    ("failback off (after = 0): nothing",
     [P1], {"anthropic": Health(C, 0.0, last_ok=OK)}, 0.0, (), Plan()),
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

    async def probe(provider, settings, env):
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


async def test_a_service_moved_off_a_provider_the_board_never_saw_fail_goes_home_after_a_probe_proves_it(rig):
    """An operator approved a task on ollama; anthropic closed all along, but nobody has called
    it since. Once the worker has been away failback_after, the daemon probes anthropic (a
    closed state alone proves nothing), and on its answer the worker is home: in place, the same
    incarnation; its row says so for a daemon started again."""
    await _away(rig, "worker")
    worker = rig.svc("worker")
    old = worker.incarnation
    assert rig.daemon.failback.state()["away"] == {"worker": {"on": "ollama", "home": "anthropic"}}
    await _run(rig, 9.0)
    assert (worker.provider, rig.probes) == ("ollama", [])  # not due yet: no probe either
    await _run(rig, 2.0, lambda: worker.provider == "anthropic")
    assert rig.probes == ["anthropic"]
    assert (worker.incarnation, worker.switched_away) == (old, False)
    [event] = await rig.store.events(kind="provider_failback")
    assert (event["agent"], event["payload"]["from"], event["payload"]["to"]) == ("worker", "ollama", "anthropic")
    assert (await rig.store.agent("worker"))["provider"] == "anthropic"
    assert rig.daemon.failback.state()["away"] == {}


async def test_a_probe_that_proves_a_provider_records_its_tokens_as_spend(rig):
    """A probe is a real call: its tokens are a priced llm_usage row of the daemon's own, not
    a task's or a run's; a failed probe used none and writes none."""
    worker = rig.svc("worker")
    await _away(rig, "worker")
    rig.probe_answer = {"ok": False, "failure": {"reason": "overloaded", "retryable": True, "status": 529}}
    await _run(rig, 12.0, lambda: rig.probes)
    assert worker.provider == "ollama"
    assert await rig.store.usage(agent="tron-daemon") == []
    rig.probe_answer = {"ok": True, "model": "claude-haiku-4-5", "tokens": 13, "duration_ms": 4.5,
                        "usage": {"input_tokens": 11, "output_tokens": 2, "cache_read_tokens": 0,
                                  "cache_write_tokens": 0}}
    await _run(rig, 40.0, lambda: worker.provider == "anthropic")
    [row] = await rig.store.usage(agent="tron-daemon")
    assert (row["provider"], row["model"], row["source"], row["step"], row["task_id"], row["run_id"]) == \
        ("anthropic", "claude-haiku-4-5", "probe", "failback_probe", None, None), row
    assert (row["input_tokens"], row["output_tokens"], row["ok"], row["duration_ms"]) == (11, 2, 1, 4.5), row


async def test_a_call_of_another_agent_proves_the_provider_and_no_probe_is_needed(rig):
    await _away(rig, "worker")
    await _run(rig, 3.0)
    rig.daemon.providers.board.succeeded("anthropic", rig.clock.now())  # root's call went through
    await _run(rig, 8.0, lambda: rig.svc("worker").provider == "anthropic")
    assert rig.probes == []


async def test_a_provider_nobody_calls_is_probed_half_open_once_they_are_due_and_its_answer_sends_them_home(rig):
    await _away(rig, "worker", "root")
    await _open_anthropic(rig)  # half-open 5 s later, but nobody is due before 10 s
    await _run(rig, 9.0)
    assert rig.probes == []
    await _run(rig, 2.0, lambda: rig.probes)
    board = rig.daemon.providers.board
    assert board["anthropic"].state == ProviderState.CLOSED
    [probed] = await rig.store.events(kind="provider_probed")
    assert (probed["payload"]["outcome"], probed["payload"]["state"]) == ("ok", "closed")
    await _run(rig, 0.5, lambda: {rig.svc(n).provider for n in ("worker", "root")} == {"anthropic"})
    assert rig.probes == ["anthropic"]


async def test_a_failed_probe_opens_it_again_for_longer_and_nobody_moves(rig):
    rig.probe_answer = {"ok": False, "failure": {"reason": "api_error", "retryable": True}}
    await _away(rig, "worker", "root")
    await _open_anthropic(rig)
    await _run(rig, 11.0, lambda: rig.probes)
    h = rig.daemon.providers.board["anthropic"]
    assert h.state == ProviderState.OPEN and h.until - rig.clock.now() == pytest.approx(10.0)  # the cooldown doubled
    await _run(rig, 9.0)
    assert rig.probes == ["anthropic"]  # not before that longer cooldown is over
    await _run(rig, 2.0, lambda: len(rig.probes) == 2)
    assert rig.svc("worker").provider == "ollama"


async def test_a_probe_with_no_verdict_closes_nothing_and_the_next_waits_cooldown_max(rig):
    """A bad key says nothing of the provider's health: nobody goes home, and the daemon does
    not spawn a probe a second."""
    rig.probe_answer = {"ok": False, "failure": {"reason": "authentication_error", "retryable": False,
                                                 "message": "invalid x-api-key"}}
    await _away(rig, "worker")
    await _run(rig, 11.0, lambda: rig.probes)
    [probed] = await rig.store.events(kind="provider_probed")
    assert (probed["payload"]["outcome"], probed["payload"]["message"]) == ("no_verdict", "invalid x-api-key")
    await _run(rig, 29.0)
    assert rig.probes == ["anthropic"]
    await _run(rig, 2.0, lambda: len(rig.probes) == 2)
    assert rig.svc("worker").provider == "ollama"


async def test_a_service_the_root_is_switching_is_not_moved_back_under_it(rig):
    """The root switched the worker to ollama and its replacement is not under way yet: the
    incarnation still on anthropic is switched away, and failback must not undo the root's
    switch. The root, moved in place, goes home meanwhile."""
    worker = rig.svc("worker")
    worker.provider = "ollama"  # what Carrier._move does first; spawned_provider stays anthropic
    assert worker.switched_away
    await _away(rig, "root")
    await _run(rig, 12.0, lambda: rig.svc("root").provider == "anthropic")
    assert worker.provider == "ollama" and [e["agent"] for e in await rig.store.events(kind="provider_failback")] \
        == ["root"]


async def test_a_service_that_has_to_leave_again_soon_after_it_went_home_waits_twice_as_long(rig):
    await _away(rig, "worker")
    await _run(rig, 12.0, lambda: rig.svc("worker").provider == "anthropic")
    await _away(rig, "worker")  # anthropic failed it again at once
    rig.daemon.providers.board.succeeded("anthropic", rig.clock.now() + 0.25)  # and then answered
    await _run(rig, 19.0)
    assert rig.svc("worker").provider == "ollama"  # 20 s this time, not 10
    await _run(rig, 2.0, lambda: rig.svc("worker").provider == "anthropic")


async def test_a_task_handed_over_again_keeps_its_own_provider(rig):
    """A task the ladder moved to ollama, on a service failback has sent home since: a new
    incarnation gets it on ollama, not on the service's anthropic (no switch of the task's
    spent or undone without a row)."""
    from tests.unit.test_daemon import _task_for

    await _task_for(rig, agent="worker", task_id="r-1.0")
    await rig.store.set_task_provider("r-1.0", "ollama")
    assign = await rig.daemon.ledger.assignment(await rig.store.task("r-1.0"), "anthropic")
    assert assign.provider == "ollama"
    await rig.store.upsert_task({"task_id": "r-1.1", "run_id": "r-1", "agent": "worker", "parent_agent": "gateway",
                                 "kind": "run", "prompt": "p"})
    assert (await rig.daemon.ledger.assignment(await rig.store.task("r-1.1"), "anthropic")).provider == "anthropic"


# -- the probe's process (common/providers/probe.py via probe_in_process) --------------------------


@pytest.fixture
def silent_port():
    """A port that accepts connections and never answers."""
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(16)
    yield s.getsockname()[1]
    s.close()


def _probe_env() -> dict[str, str]:
    import os

    return {k: v for k, v in os.environ.items() if k not in ("OLLAMA_HOST", "ANTHROPIC_API_KEY", "OPENAI_API_KEY")}


async def test_a_probe_of_a_provider_that_never_answers_comes_back_failed_and_leaves_no_process(silent_port):
    from tron.common.providers import ProviderSettings
    from tron.services.daemon import failback

    settings = ProviderSettings(sim_url=f"http://127.0.0.1:{silent_port}", timeout_s=1.0)
    answer = await failback.probe_in_process("ollama", settings, _probe_env())
    assert answer["ok"] is False and answer["failure"]["reason"] == "timeout" and "no_verdict" not in answer, answer
    assert failback.RUNNING == set()


async def test_a_probe_cancelled_with_the_daemon_is_killed(silent_port):
    import asyncio

    import psutil

    from tron.common.providers import ProviderSettings
    from tron.services.daemon import failback

    settings = ProviderSettings(sim_url=f"http://127.0.0.1:{silent_port}", timeout_s=30.0)
    task = asyncio.ensure_future(failback.probe_in_process("ollama", settings, _probe_env()))
    for _ in range(100):
        await asyncio.sleep(0.01)
        if failback.RUNNING:
            break
    [pid] = failback.RUNNING
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    proc = psutil.Process(pid)
    assert proc.wait(5) is not None or not proc.is_running()
    assert failback.RUNNING == set()
