"""The web UI's parts that need no browser: the event hub, sessions and their checks, the
alert bar's rule, the log tail, the event feed, the views and the action table. The whole
UI in a real browser is tests/browser/test_ui.py."""

from __future__ import annotations

import json
from datetime import datetime, timezone

import pytest
from aiohttp.test_utils import make_mocked_request

from common.clock import FakeClock
from registry.memory import MemoryStore
from services.daemon.ui.actions import buttons
from services.daemon.ui.alertbar import AlertBar
from services.daemon.ui.auth import Sessions
from services.daemon.ui.feed import EventFeed
from services.daemon.ui.logtail import LogTail
from services.daemon.ui.sse import Hub, HubFull, message
from services.daemon.ui.views import chart_data, log_entry, tree


# -- the event hub -----------------------------------------------------------------------------------


def test_a_message_gives_every_line_its_own_data_field():
    assert message("mesh", "<tr>\r\n<td>a</td>\r</tr>") == b"event: mesh\ndata: <tr>\ndata: <td>a</td>\ndata: </tr>\n\n"


async def test_publish_reaches_subscribers_only_and_a_slow_client_is_dropped_not_waited_for():
    hub = Hub(queue_size=3)
    fast, slow, other = hub.open({"mesh"}), hub.open({"mesh"}), hub.open({"log:x"})
    cut = []
    slow.abort = lambda: cut.append("slow")
    assert hub.topics() == {"mesh", "log:x"}
    for i in range(3):
        assert hub.publish("mesh", "mesh", str(i)) == 2
        fast.queue.get_nowait()
    assert hub.publish("mesh", "mesh", "3") == 1  # slow is full: dropped, and nobody waited
    assert slow.dropped and slow not in hub.clients and hub.dropped == 1
    assert slow.queue.get_nowait() is None and cut == ["slow"]  # its handler ends, even mid-write
    assert other.queue.empty() and len(hub) == 2
    hub.close(slow)  # idempotent: the handler's finally closes it again
    assert len(hub) == 2 and hub.topics() == {"mesh", "log:x"}


async def test_the_hub_refuses_past_its_limit_and_ends_every_stream_at_shutdown():
    hub = Hub(max_clients=2)
    a, b = hub.open({"mesh"}), hub.open({"mesh"})
    with pytest.raises(HubFull):
        hub.open({"mesh"})
    hub.close_all()
    assert (a.queue.get_nowait(), b.queue.get_nowait(), len(hub)) == (None, None, 0)
    with pytest.raises(HubFull):
        hub.open({"mesh"})


# -- sessions ---------------------------------------------------------------------------------------------


class _Peer:
    def __init__(self, host: str) -> None:
        self.host = host

    def get_extra_info(self, name: str, default=None):
        return (self.host, 40000) if name == "peername" else default


def _request(sessions: Sessions, sid: str | None = None, csrf: str | None = None, *, peer: str = "127.0.0.1",
             host: str = "127.0.0.1:6109"):
    headers = {"Host": host}
    if sid:
        headers["Cookie"] = f"{sessions.cookie}={sid}"
    if csrf:
        headers["X-CSRF-Token"] = csrf
    return make_mocked_request("POST", "/services/x/restart", headers=headers, transport=_Peer(peer))


def test_a_login_code_works_once_and_not_after_it_expires():
    clock = FakeClock()
    sessions = Sessions(clock, cookie="tron_ui_6109")
    code = sessions.mint_code("ann@ui")
    session = sessions.redeem(code)
    assert session is not None and session.actor == "ann@ui"
    assert sessions.redeem(code) is None
    late = sessions.mint_code("ann@ui")
    clock.advance(sessions.code_ttl + 0.1)
    assert sessions.redeem(late) is None


def test_the_api_lets_a_session_in_only_with_its_csrf_header_from_loopback():
    clock = FakeClock()
    sessions = Sessions(clock, cookie="tron_ui_6109")
    s = sessions.redeem(sessions.mint_code("ann@ui"))
    assert sessions.authorize(_request(sessions, s.sid, s.csrf))
    assert not sessions.authorize(_request(sessions, s.sid))                     # cookie alone
    assert not sessions.authorize(_request(sessions, s.sid, s.csrf[::-1]))       # wrong token
    assert not sessions.authorize(_request(sessions, None, s.csrf))              # header alone
    assert not sessions.authorize(_request(sessions, s.sid, s.csrf, peer="10.0.0.5"))
    assert not sessions.authorize(_request(sessions, s.sid, s.csrf, host="evil.example:6109"))  # DNS rebinding
    assert sessions.authorize(_request(sessions, s.sid, s.csrf, peer="::1", host="localhost:6109"))
    clock.advance(sessions.session_ttl + 1)
    assert not sessions.authorize(_request(sessions, s.sid, s.csrf)) and len(sessions) == 0


# -- the alert bar ----------------------------------------------------------------------------------------------


RUNNING = {"state": "running", "stopped": False}
DOWN = {"state": "backoff", "stopped": False}
ROW = {"alert_id": "a-1", "agent": "p1", "reason": "process_exit", "created_at": "2025-01-01T00:00:00.000Z"}


@pytest.mark.parametrize("open_rows,service,shown_open", [
    ([ROW], RUNNING, True),                                 # not handled yet
    ([], DOWN, True),                                       # handled, not back yet
    ([], {"state": "stopped", "stopped": True}, False),     # handled, and an operator stopped it: over
    ([], RUNNING, False),                                   # handled and back: over (held a moment)
])
def test_an_alert_is_open_until_handled_and_its_service_is_back(open_rows, service, shown_open):
    bar = AlertBar(hold=5)
    bar.raised("a-1", "p1", "process_exit", ROW["created_at"], age=0.1)
    [inc] = bar.update(100.0, open_rows, {"p1": service})
    assert inc.open is shown_open


def test_a_recovery_faster_than_a_frame_is_still_shown_then_goes():
    bar = AlertBar(hold=5)
    bar.raised("a-1", "p1", "process_exit", ROW["created_at"], age=0.2)
    assert [i.open for i in bar.update(100.0, [], {"p1": RUNNING})] == [False]
    assert len(bar.update(104.9, [], {"p1": RUNNING})) == 1
    assert bar.update(105.1, [], {"p1": RUNNING}) == []


def test_old_news_is_not_raised_but_an_open_alert_always_shows():
    bar = AlertBar(fresh=30)
    bar.raised("a-0", "p1", "process_exit", ROW["created_at"], age=31)
    assert bar.update(100.0, [], {"p1": RUNNING}) == []
    assert [i.alert_id for i in bar.update(101.0, [ROW], {"p1": RUNNING})] == ["a-1"]


# -- the log tail -------------------------------------------------------------------------------------------------


def test_the_tail_follows_appends_whole_lines_only_and_starts_again_after_truncation(tmp_path):
    path = tmp_path / "p1.log"
    path.write_text("old 1\nold 2\npart")
    tail = LogTail(path)
    assert tail.backlog() == ["old 1", "old 2"]
    assert tail.read_new() == []
    with path.open("a") as f:
        f.write("ial\nnew 1\nnew")
    assert tail.read_new() == ["partial", "new 1"]
    with path.open("a") as f:
        f.write(" 2\n")
    assert tail.read_new() == ["new 2"]
    path.write_text("after\n")  # truncated (and shorter than before)
    assert tail.read_new() == ["-- p1.log was replaced or truncated; reading it from the start --", "after"]


def test_a_burst_larger_than_a_read_is_skipped_with_a_notice(tmp_path):
    path = tmp_path / "p1.log"
    path.write_text("")
    tail = LogTail(path)
    with path.open("a") as f:
        f.write("x" * 99 + "\n" + "tail line\n")
    lines = tail.read_new(max_bytes=20)
    assert lines[0].startswith("-- 90 bytes skipped") and lines[-1] == "tail line"


def test_a_log_that_appears_later_is_read_from_its_start(tmp_path):
    path = tmp_path / "later.log"
    tail = LogTail(path)
    assert tail.read_new() == [] and tail.backlog() == []
    path.write_text('{"ts": "2025-01-01T00:00:00.000Z", "level": "info", "msg": "serving", "pid": 7}\n')
    [line] = tail.read_new()
    entry = log_entry(line)
    assert (entry["level"], entry["msg"], entry["fields"]) == ("info", "serving", "pid=7")
    assert log_entry("Traceback (most recent call last):")["level"] == "raw"


# -- the feed, views and actions -------------------------------------------------------------------------------------


async def test_the_feed_keeps_the_window_and_the_latest_runs_with_their_tasks():
    store = MemoryStore()
    now = datetime(2025, 1, 1, 12, tzinfo=timezone.utc).timestamp()
    feed = EventFeed(store.events, wall=lambda: now, window=600)
    written = [("2025-01-01T11:00:00.000Z", "alert_raised", {"agent": "p1", "alert_id": "a-old"}),
               ("2025-01-01T11:59:00.000Z", "alert_raised", {"agent": "p1", "alert_id": "a-new"}),
               ("2025-01-01T11:59:01.000Z", "run_created", {"run_id": "r1"}),
               ("2025-01-01T11:59:02.000Z", "task_assigned", {"agent": "root", "run_id": "r1", "task_id": "r1.0"})]
    for ts, kind, ids in written:
        await store.event(kind, {"reason": "process_exit"}, **ids)
        store.events_[-1]["ts"] = ts  # as if written then
    fresh = await feed.poll()
    assert [e["alert_id"] for e in fresh] == ["a-new"]  # the hour-old one is outside the window
    assert feed.runs() == ["r1"] and feed.tasks_of("r1") == ["r1.0"] and feed.tasks_of("r0") is None
    assert await feed.poll() == []
    await store.event("recovered", {"seconds": 0.1}, agent="p1")
    store.events_[-1]["ts"] = "2025-01-01T11:59:30.000Z"
    assert [e["kind"] for e in await feed.poll()] == ["recovered"]
    assert [e["kind"] for e in feed.recent(agent="p1")] == ["recovered", "alert_raised"]


def test_the_tree_puts_each_parent_before_its_children():
    rows = [{"name": n, "parent": p} for n, p in
            [("root", "daemon"), ("b", "root"), ("a", "root"), ("b1", "b"), ("sim", "daemon")]]
    assert [(r["name"], d) for d, r in tree(rows)] == [("root", 1), ("b", 2), ("b1", 3), ("a", 2), ("sim", 1)]


def test_charts_count_per_minute_and_place_each_recovery():
    now = 10_000.0
    events = [{"kind": "alert_raised", "at": now - 30, "payload": {"reason": "process_exit"}},
              {"kind": "alert_raised", "at": now - 90, "payload": {"reason": "heartbeat_timeout"}},
              {"kind": "child_restart", "at": now - 29, "payload": {}},
              {"kind": "recovered", "at": now - 28, "payload": {"seconds": 0.25}},
              {"kind": "alert_raised", "at": now - 4000, "payload": {"reason": "process_exit"}}]
    data = chart_data(events, now, window=600, bucket=60)
    assert len(data["x"]) == 10 and data["x"][-1] <= now < data["x"][-1] + 60
    assert {d["label"]: sum(d["values"]) for d in data["detections"]} == {"heartbeat_timeout": 1, "process_exit": 1}
    assert data["detections"][1]["values"][-1] == 1
    assert data["recoveries"] == {"x": [now - 28], "y": [0.25]}
    assert data["summary"]["restarts"] == {"child_restart": 1, "operator_restart": 0}
    json.dumps(data)  # what the page is sent


@pytest.mark.parametrize("state,stopped,verbs", [
    ("running", False, ["restart", "stop"]),
    ("backoff", False, ["restart", "stop"]),
    ("stopping", True, ["stop", "start"]),
    ("stopped", True, ["start"]),
])
def test_each_service_shows_the_buttons_that_apply_and_each_confirmation_names_it(state, stopped, verbs):
    shown = buttons("service", {"name": "p1", "state": state, "stopped": stopped})
    assert [b["verb"] for b in shown] == verbs
    assert all("p1" in b["confirm"] and b["url"] == f"/services/p1/{b['verb']}" for b in shown)

