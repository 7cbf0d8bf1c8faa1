"""Provider health and the governor, rule by rule, on an injected clock (no sleeping)."""

from __future__ import annotations

import pytest

from tron.common.config import ProviderLimits, ProvidersConfig
from tron.common.provider_health import Board
from tron.common.states import IllegalTransition, ProviderState

C = ProviderState.CLOSED
O = ProviderState.OPEN  # noqa: E741 - the three states, one letter each, as in the tables
H = ProviderState.HALF_OPEN


def board(**kw) -> Board:
    return Board(ProvidersConfig(**kw))


def fail(b: Board, now: float, name="anthropic", **kw):
    assert b.acquire(name, now).go
    return b.failed(name, now, reason=kw.pop("reason", "overloaded_error"), **kw)


@pytest.mark.parametrize("failures,state", [(1, C), (2, C), (3, O), (4, O)])
def test_opens_after_the_threshold_of_failures_in_a_row(failures, state):
    b = board(fail_threshold=3)
    for i in range(failures):
        if b.state("anthropic", 10.0 + i * 0.01) == O:
            break
        fail(b, 10.0 + i * 0.01)
    assert b.state("anthropic", 10.1) == state


def test_a_success_ends_the_streak():
    b = board(fail_threshold=3)
    fail(b, 1.0)
    fail(b, 1.1)
    assert b.acquire("anthropic", 1.2).go
    b.succeeded("anthropic", 1.2)
    fail(b, 1.3)
    fail(b, 1.4)
    assert b.state("anthropic", 1.5) == C


def test_open_refuses_then_one_probe_then_closes_on_success():
    b = board(fail_threshold=1, cooldown=5.0)
    changes = fail(b, 0.0)
    assert [(c.old, c.new) for c in changes] == [(C, O)]
    grant = b.acquire("anthropic", 4.9)
    assert not grant.go and grant.open and "open" in grant.why
    probe = b.acquire("anthropic", 5.0)
    assert probe.go and probe.probe
    second = b.acquire("anthropic", 5.1)
    assert not second.go and not second.open and second.wait > 0  # one probe at a time
    changes = b.succeeded("anthropic", 5.2)
    assert [(c.old, c.new) for c in changes] == [(H, C)]
    assert b.acquire("anthropic", 5.3).go


@pytest.mark.parametrize("failed_probes,cooldown", [(0, 5.0), (1, 10.0), (2, 20.0), (3, 30.0), (6, 30.0)])
def test_each_failed_probe_doubles_the_cooldown_up_to_its_cap(failed_probes, cooldown):
    b = board(fail_threshold=1, cooldown=5.0, cooldown_max=30.0)
    now = 0.0
    fail(b, now)
    for _ in range(failed_probes):
        now = now + b.wait_left("anthropic", now)
        assert b.acquire("anthropic", now).probe
        b.failed("anthropic", now, reason="api_error")
    assert b.wait_left("anthropic", now) == pytest.approx(cooldown)


def test_a_probe_whose_agent_vanished_is_given_up_after_its_timeout():
    b = board(fail_threshold=1, cooldown=1.0, timeout=2.0)
    fail(b, 0.0)
    assert b.acquire("anthropic", 1.0).probe
    assert not b.acquire("anthropic", 2.0).go
    assert b.acquire("anthropic", 1.0 + 2.0 + 5.0 + 0.01).probe


def test_retry_after_holds_the_whole_mesh_at_once_and_in_flight_answers_change_nothing():
    b = board(fail_threshold=3, start_window=0)
    for _ in range(10):
        assert b.acquire("anthropic", 0.0).go  # ten requests in flight
    changes = b.failed("anthropic", 0.01, reason="rate_limit_error", retry_after=3.0)
    assert [(c.new, c.until) for c in changes] == [(O, pytest.approx(3.01))]
    for _ in range(9):  # the other nine come back with the same 429: no new hold, no streak
        assert b.failed("anthropic", 0.02, reason="rate_limit_error", retry_after=3.0) == []
    h = b["anthropic"]
    assert (h.kind, h.failures, h.inflight) == ("hold", 1, 0)
    wait = b.acquire("anthropic", 1.0)
    assert not wait.go and not wait.open and wait.wait == pytest.approx(2.01)
    assert b.short_hold("anthropic", 1.0)
    assert b.acquire("anthropic", 3.02).probe


def test_a_hold_longer_than_wait_before_switch_is_not_short():
    b = board(wait_before_switch=5.0)
    fail(b, 0.0, reason="usage_limit", retry_after=3600.0)
    grant = b.acquire("anthropic", 1.0)
    assert grant.open and not b.short_hold("anthropic", 1.0)


def test_probe_after_probe_rate_limited_becomes_an_outage():
    b = board(fail_threshold=2, cooldown=5.0, wait_before_switch=5.0)
    fail(b, 0.0, reason="rate_limit_error", retry_after=1.0)
    assert b.acquire("anthropic", 1.0).probe
    b.failed("anthropic", 1.0, reason="rate_limit_error", retry_after=1.0)
    assert b["anthropic"].kind == "outage"
    assert b.wait_left("anthropic", 1.0) >= 5.0


@pytest.mark.parametrize("limits,state", [
    ({"requests_remaining": 0, "requests_reset_s": 2.0}, O),
    ({"tokens_remaining": 0, "tokens_reset_s": 1.5}, O),
    ({"requests_remaining": 4, "requests_reset_s": 2.0}, C),
    ({}, C),
])
def test_headers_that_say_nothing_is_left_hold_until_the_reset(limits, state):
    b = board()
    assert b.acquire("anthropic", 0.0).go
    b.succeeded("anthropic", 0.0, limits=limits)
    assert b.state("anthropic", 0.1) == state


def test_concurrency_and_requests_per_minute():
    b = board(limits={"anthropic": ProviderLimits(concurrency=2, rpm=3)})
    assert b.acquire("anthropic", 0.0).go and b.acquire("anthropic", 0.0).go
    assert not b.acquire("anthropic", 0.0).go  # two in flight
    b.succeeded("anthropic", 0.1)
    assert b.acquire("anthropic", 0.2).go
    b.succeeded("anthropic", 0.3)
    b.succeeded("anthropic", 0.3)
    refused = b.acquire("anthropic", 1.0)  # three sent this minute
    assert not refused.go and refused.wait == pytest.approx(59.0)
    assert b.acquire("anthropic", 60.01).go


def test_tokens_per_minute():
    b = board(limits={"ollama": ProviderLimits(tpm=1000)})
    assert b.acquire("ollama", 0.0).go
    b.succeeded("ollama", 0.0, tokens=1200)
    assert not b.acquire("ollama", 30.0).go
    assert b.acquire("ollama", 60.01).go


def test_drain_holds_until_restore_and_a_drained_provider_never_probes():
    b = board()
    b.drain("ollama", 0.0, "drained by ops")
    assert b.acquire("ollama", 10_000.0).open
    assert b.wait_left("ollama", 10_000.0) is None
    assert [(c.old, c.new) for c in b.restore("ollama", 10_001.0, "restored by ops")] == [(O, C)]
    assert b.acquire("ollama", 10_001.0).go


def test_a_request_error_is_not_an_outage_and_a_cancelled_call_frees_the_probe():
    b = board(fail_threshold=1, cooldown=1.0)
    fail(b, 0.0)
    assert b.acquire("anthropic", 1.0).probe
    b.released("anthropic")
    assert b.acquire("anthropic", 1.1).probe


def test_illegal_transitions_are_refused():
    b = board()
    with pytest.raises(IllegalTransition):
        b._to(b["anthropic"], H, 0.0, "no")


def test_slow_start_ramps_a_new_or_recovered_provider_one_call_per_success():
    b = board(start_window=2, ramp_to=4, fail_threshold=1, cooldown=1.0)
    assert b.acquire("anthropic", 0.0).go and b.acquire("anthropic", 0.0).go
    assert not b.acquire("anthropic", 0.0).go  # two in flight before anything is known
    b.succeeded("anthropic", 0.1)  # window 3
    assert b.acquire("anthropic", 0.1).go and b.acquire("anthropic", 0.1).go
    assert not b.acquire("anthropic", 0.1).go
    b.succeeded("anthropic", 0.2)  # window 4 = ramp_to: no limit of ours any more
    assert b["anthropic"].window is None
    assert all(b.acquire("anthropic", 0.3).go for _ in range(20))
    b.failed("anthropic", 0.4, reason="api_error")  # opens
    assert b.acquire("anthropic", 1.5).probe
    b.succeeded("anthropic", 1.6)  # closed again: ramped from the start
    assert b["anthropic"].window == 2


def test_slow_start_off():
    b = board(start_window=0)
    assert all(b.acquire("anthropic", 0.0).go for _ in range(100))


def test_calls_of_a_killed_incarnation_stop_counting():
    b = board(start_window=2, timeout=30.0)
    assert b.acquire("anthropic", 0.0, "i-old").go and b.acquire("anthropic", 0.0, "i-old").go
    assert not b.acquire("anthropic", 1.0, "i-new").go  # the hung calls hold the window
    b.drop_holders(lambda holder: holder == "i-old")
    assert b.acquire("anthropic", 1.0, "i-new").go


def test_a_call_never_reported_stops_counting_after_its_timeout():
    b = board(start_window=1, timeout=30.0)
    assert b.acquire("anthropic", 0.0, "i-1").go
    assert not b.acquire("anthropic", 34.9, "i-2").go
    assert b.acquire("anthropic", 35.01, "i-2").go


def test_an_outcome_releases_its_own_holders_call():
    b = board(start_window=0)
    b.acquire("anthropic", 0.0, "i-1")
    b.acquire("anthropic", 0.0, "i-2")
    b.succeeded("anthropic", 0.1, holder="i-2")
    assert [p[0] for p in b["anthropic"].permits] == ["i-1"]


def test_a_read_that_ticks_keeps_the_transition_for_the_events():
    b = board(fail_threshold=1, cooldown=1.0)
    fail(b, 0.0)
    assert b.state("anthropic", 2.0) == H  # a read (GET /providers, a view) found the cooldown over
    [change] = b.take()
    assert (change.old, change.new) == (O, H)
    assert b.take() == []


def test_the_budget_hint_names_what_can_be_raised():
    from tron.services.daemon.providers import raise_hint

    task = {"run_id": "r-1", "task_id": "r-1.0"}
    assert raise_hint(["run_usd 0.52 of 0.5"], task).startswith("tron run budget r-1")
    hint = raise_hint(["task_tokens 900 of 800", "run_usd 0.52 of 0.5"], task)
    assert "task_tokens" in hint and "[budgets]" in hint and "tron task fail r-1.0" in hint
    assert "tron run budget r-1" in hint  # both remedies, each for its own limit
    service = raise_hint(["service_usd 2 of 1"], task)
    assert "service_usd" in service and "tron reload" in service and "tron run budget" not in service, service


OPENED = {"provider": "anthropic", "from": "closed", "to": "open", "reason": "overloaded", "kind": "outage",
          "until_s": 20.0}


@pytest.mark.parametrize("why, last, at, now, expected", [
    ("open with 20 s of cooldown left at 100: open until 120, as it would have been",
     OPENED, 100.0, 105.0, (ProviderState.OPEN, "outage", 120.0)),
    ("its cooldown ran out while no daemon ran: open until now, so the next tick probes it",
     OPENED, 100.0, 130.0, (ProviderState.OPEN, "outage", 130.0)),
    ("half-open (a probe was out): probed again at once",
     {**OPENED, "to": "half_open", "until_s": None}, 100.0, 105.0, (ProviderState.OPEN, "outage", 105.0)),
    ("a rate-limit hold keeps its end",
     {**OPENED, "kind": "hold", "until_s": 8.0}, 100.0, 101.0, (ProviderState.OPEN, "hold", 108.0)),
    ("drained by an operator: until an operator restores it",
     {**OPENED, "kind": "drained", "until_s": None}, 100.0, 105.0, (ProviderState.OPEN, "drained", None)),
    ("recorded before a reboot (a later monotonic reading): a cooldown from now",
     OPENED, 5000.0, 105.0, (ProviderState.OPEN, "outage", 105.0 + 15.0)),
    ("closed: nothing to take back",
     {**OPENED, "to": "closed", "until_s": None}, 100.0, 105.0, (ProviderState.CLOSED, None, None)),
])
def test_a_new_daemon_takes_a_provider_back_as_the_one_before_left_it(why, last, at, now, expected):
    b = board(cooldown=15.0, cooldown_max=60.0)
    b.recall("anthropic", last, at, now)
    h = b["anthropic"]
    assert (h.state, h.kind, h.until) == expected, why
    if h.state == ProviderState.OPEN and h.kind != "drained":
        until = h.until
        if until > now:
            assert not b.acquire("anthropic", now).go  # nobody is sent into it
        assert b.acquire("anthropic", until).probe, why  # its cooldown over: one probe, as before


def test_recall_changes_nothing_a_daemon_already_knows():
    b = board(cooldown=15.0)
    for _ in range(3):
        fail(b, 10.0)
    assert b["anthropic"].state == ProviderState.OPEN
    assert b.recall("anthropic", {**OPENED, "to": "closed"}, 0.0, 11.0) == []
    assert b.recall("anthropic", OPENED, 0.0, 11.0) == []


def test_a_provider_kept_open_across_several_daemon_restarts_says_so_once():
    """Each new daemon took back the drained reason and added its suffix again: after three
    restarts `tron provider list` said "(as before the daemon restarted)" three times."""
    last = {**OPENED, "kind": "drained", "until_s": None, "reason": "drained by token:operator: maintenance"}
    for _ in range(3):
        b = board()
        b.recall("anthropic", last, 100.0, 105.0)
        last = {**last, "reason": b["anthropic"].reason}
    assert last["reason"] == "drained by token:operator: maintenance (as before the daemon restarted)"
