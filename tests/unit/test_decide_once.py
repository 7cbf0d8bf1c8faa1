"""One decision per failure (issue 26, item 5): the parent decides once, on the view the
daemon sent with the alert; the daemon carries the decision out after checking only that
it still stands (the alert still open, the incarnation still the one that failed), with
no view rebuilt and nothing decided again. The daemon's parts on stubs, as in
tests/unit/test_daemon.py (fake clock, in-memory store, no process, no sleeping).

The worker fails with a task in flight: the parent decides that (an idle failure's one
answer the daemon carries at once, and tells the parent after: test_daemon.py)."""

from __future__ import annotations

import pytest

from tron.common import ladder
from tron.common.ladder import ChildFailed, LadderView, Restart
from tron.common.models import RestartRequest
from tron.services.daemon import carrier as carrier_module
from tests.unit.test_daemon import Rig, _task_for, mesh


@pytest.fixture
async def rig(tmp_path, monkeypatch):
    r = Rig(tmp_path, mesh())
    await r.start()
    # What the daemon does on its own: every view it builds, every decision it takes.
    r.views, r.daemon_decisions = [], []
    real_view = r.daemon.carrier.view

    async def view(*args, **kwargs):
        r.views.append(kwargs["decider"])
        return await real_view(*args, **kwargs)

    def decide(*args, **kwargs):
        r.daemon_decisions.append(args[0])
        return ladder.decide(*args, **kwargs)

    monkeypatch.setattr(r.daemon.carrier, "view", view)
    monkeypatch.setattr(carrier_module, "decide", decide)
    yield r
    await r.stop()


async def crash_busy(rig: Rig) -> str:
    """The worker dies while it runs a task: a failure its parent decides."""
    await _task_for(rig, "worker", "r-1.0")
    return await rig.crash("worker")


def parent(rig: Rig, decisions: list):
    """The worker's parent (root) as common/agent.py's decide_and_act is: it decides on the
    view that came with the alert, then asks the daemon for the restart."""
    async def answer(url, alert):
        view = LadderView.model_validate(alert["view"])
        event = ChildFailed(alert["alert_id"], alert["service"], alert["incarnation"], alert["reason"], True,
                            alert["task_id"])
        decision = ladder.decide(event, view, view.now, view.policy)
        decisions.append(decision)
        assert isinstance(decision, Restart)
        req = RestartRequest(service=event.service, replaces=event.incarnation, alert_id=event.alert_id,
                             reason=event.reason, case=decision.case, delay=decision.delay,
                             with_task=decision.with_task, requested_by="root")
        return {"action": "restart", "restart": await rig.daemon.carrier.restart(req)}
    return answer


async def test_a_crash_is_decided_once_by_the_parent_and_carried_out_without_a_second_view(rig):
    decisions = []
    rig.answer = parent(rig, decisions)
    old = await crash_busy(rig)
    await rig.until_running("worker")
    assert [d.case for d in decisions] == ["restart_with_task"]
    assert rig.views == ["root"]  # the one sent with the alert: neither the restart nor the answer rebuilt it
    assert rig.daemon_decisions == []  # the daemon decided nothing: it checked the request still stood
    [row] = await rig.restarts("worker")
    assert (row["requested_by"], row["case_id"]) == ("root", "restart_with_task")
    assert rig.svc("worker").incarnation != old
    alert = await rig.store.alert(row["alert_id"])
    assert alert["status"] in ("handled", "delivered")  # taken: it did not go on to the daemon


async def test_a_decision_that_no_longer_stands_is_refused_not_decided_again(rig):
    decisions = []
    rig.answer = parent(rig, decisions)
    old = await crash_busy(rig)
    await rig.until_running("worker")
    [row] = await rig.restarts("worker")
    views = list(rig.views)
    req = RestartRequest(service="worker", replaces=old, alert_id=row["alert_id"], reason="process_exit",
                         case="restart_with_task", requested_by="root")
    again = await rig.daemon.carrier.restart(req)  # the same decision once more: its alert is closed
    stale = await rig.daemon.carrier.restart(req.model_copy(update={"alert_id": "a-other"}))  # gone incarnation
    assert (again["status"], again["case"]) == ("duplicate", "duplicate_request")
    assert (stale["status"], stale["case"]) == ("stale", "stale_request")
    assert rig.views == views and rig.daemon_decisions == []
    assert len(await rig.restarts("worker")) == 1


def carrying_parent(rig: Rig, decisions: list, *, tamper: dict | None = None):
    """The worker's parent as common/ladder_parent.py answers an alert marked ``carry``: a
    plain restart is the answer (``{"carry": RestartRequest}``), not a POST of its own.
    ``tamper``: fields of that request changed, as a confused or hostile answer would."""
    async def answer(url, alert):
        assert alert["carry"] is True  # the daemon says it carries what it is answered with
        view = LadderView.model_validate(alert["view"])
        event = ChildFailed(alert["alert_id"], alert["service"], alert["incarnation"], alert["reason"], True,
                            alert["task_id"])
        decision = ladder.decide(event, view, view.now, view.policy)
        decisions.append(decision)
        req = RestartRequest(service=event.service, replaces=event.incarnation, alert_id=event.alert_id,
                             reason=event.reason, case=decision.case, delay=decision.delay,
                             with_task=decision.with_task, requested_by="root")
        return {"action": "restart", "case": decision.case,
                "carry": req.model_copy(update=tamper or {}).model_dump(mode="json")}
    return answer


async def test_a_restart_the_parent_answers_with_is_carried_by_the_daemon(rig):
    """One HTTP exchange less on every restart: the parent's decision comes back as the
    answer to the alert, and the daemon carries it as its POST /control/restart would be
    (checked only for still standing; nothing decided again, no second view)."""
    decisions = []
    rig.answer = carrying_parent(rig, decisions)
    old = await crash_busy(rig)
    await rig.until_running("worker")
    assert [d.case for d in decisions] == ["restart_with_task"]
    assert rig.views == ["root"] and rig.daemon_decisions == []
    [row] = await rig.restarts("worker")
    assert (row["requested_by"], row["case_id"], row["decided_by"]) == ("root", "restart_with_task", "policy")
    assert rig.svc("worker").incarnation != old
    assert (await rig.store.alert(row["alert_id"]))["status"] in ("handled", "delivered")
    assert [url for url, _ in rig.posts if "/control/" in url] == []  # nothing posted besides the alert


@pytest.mark.parametrize("tamper", [{"alert_id": "a-someone-else"}, {"replaces": "i-another"},
                                    {"requested_by": "web"}, {"service": "web"}],
                         ids=["another alert", "another incarnation", "asked by another", "another service"])
async def test_a_carried_restart_that_is_not_the_alerts_own_is_not_carried(rig, tamper):
    """Only this alert's restart, of the incarnation that failed, asked by the parent the
    alert went to, is carried; anything else is not, the alert goes on to the next ancestor
    (here the daemon, which decides itself), and the worker is still brought back once."""
    decisions = []
    rig.answer = carrying_parent(rig, decisions, tamper=tamper)
    old = await crash_busy(rig)
    await rig.until_running("worker")
    assert rig.daemon_decisions, "the daemon, the last ancestor, decided"
    rows = await rig.restarts("worker")
    assert [r["requested_by"] for r in rows] == ["daemon"], rows
    assert rig.svc("worker").incarnation != old
    assert await rig.restarts("web") == []


async def test_a_carried_restart_that_fails_sends_the_alert_on_as_a_failed_request_would(rig, monkeypatch):
    """Carrying the parent's restart raises (a bug, say): said in the log, and the alert
    goes on to the next ancestor (here the daemon) as when the parent's own POST failed;
    the worker is still brought back, once."""
    decisions = []
    rig.answer = carrying_parent(rig, decisions)
    real = rig.daemon.carrier.restart

    async def restart(req):
        if req.requested_by == "root":
            raise RuntimeError("carrying failed")
        return await real(req)

    monkeypatch.setattr(rig.daemon.carrier, "restart", restart)
    old = await crash_busy(rig)
    took = await rig.until_running("worker")
    assert rig.daemon_decisions and [r["requested_by"] for r in await rig.restarts("worker")] == ["daemon"]
    assert rig.svc("worker").incarnation != old
    # at once, not after the watchdog's decision deadline (an alert left undelivered)
    assert took <= 1.0 and await rig.store.events(kind="watchdog_decides") == []
