"""The web UI's parts that need no browser: the event hub, sessions and their checks, the
alert bar's rule, the log tail, the event feed, the views and the action table (which
buttons each service, lane, task and the spawning switch is offered). The whole
UI in a real browser is tests/browser/test_ui.py."""

from __future__ import annotations

import json
from datetime import datetime, timezone

import pytest
from aiohttp.test_utils import make_mocked_request

from tron.common.clock import FakeClock
from tron.registry.memory import MemoryStore
from tron.services.daemon.ui.actions import buttons
from tron.services.daemon.ui.alertbar import AlertBar
from tron.services.daemon.ui.auth import Sessions
from tron.services.daemon.ui.feed import EventFeed
from tron.services.daemon.ui.logtail import LogTail
from tron.services.daemon.ui.render import Templates
from tron.services.daemon.ui.sse import Hub, HubFull, message
from tron.services.daemon.ui.views import chart_data, lanes, log_entry, registry_notice, task_moving, tree

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


async def test_one_credential_cannot_take_every_event_stream():
    """A viewer's session opening streams in a loop must leave room for the operator's page."""
    from tron.services.daemon.ui.sse import MAX_STREAMS_PER_CREDENTIAL

    hub = Hub(max_clients=MAX_STREAMS_PER_CREDENTIAL * 4)
    for _ in range(MAX_STREAMS_PER_CREDENTIAL):
        hub.open({"mesh"}, owner="dash")
    with pytest.raises(HubFull, match="dash"):
        hub.open({"mesh"}, owner="dash")
    operator = hub.open({"mesh"}, owner="operator")
    assert len(hub) == MAX_STREAMS_PER_CREDENTIAL + 1
    hub.close(operator)
    hub.open({"mesh"}, owner="operator")


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


def test_a_refused_code_is_told_apart_used_expired_superseded_or_unknown():
    from tron.services.daemon.ui.auth import MAX_CODES

    clock = FakeClock()
    sessions = Sessions(clock, cookie="tron_ui_6109")
    used = sessions.mint_code("ann@ui")
    assert sessions.redeem(used) is not None and sessions.redeem(used) is None
    late = sessions.mint_code("bob@ui")
    clock.advance(sessions.code_ttl + 0.1)
    assert sessions.redeem(late) is None
    first = sessions.mint_code("cy@ui")
    for _ in range(MAX_CODES):
        sessions.mint_code("dee@ui")
    assert sessions.redeem(first) is None
    assert sessions.refusal(used) == ("used", "ann@ui")
    assert sessions.refusal(late) == ("expired", "bob@ui")
    assert sessions.refusal(first) == ("superseded", "cy@ui")
    assert sessions.refusal(used[::-1]) == ("unknown", None)
    assert used not in repr(sessions.__dict__)  # spent codes are remembered by digest only


def test_refused_logins_past_the_limit_wait_and_are_counted_not_audited_one_by_one():
    from tron.services.daemon.ui.auth import REFUSAL_WINDOW, REFUSALS_AUDITED

    clock = FakeClock()
    sessions = Sessions(clock, cookie="tron_ui_6109")
    said = []
    for _ in range(REFUSALS_AUDITED):  # the first ones in a window: audited, each on its row
        said.append(sessions.refused())
        clock.advance(1.0)
    assert said == [(0.0, 0)] * REFUSALS_AUDITED
    wait, unaudited = sessions.refused()  # one more in the window: told to wait until the oldest leaves it
    assert (wait, unaudited) == (pytest.approx(REFUSAL_WINDOW - REFUSALS_AUDITED), 1)
    assert sessions.refused()[1] == 2
    good = sessions.mint_code("ann@ui")
    assert sessions.redeem(good) is not None  # a good code still logs in meanwhile
    clock.advance(REFUSAL_WINDOW - REFUSALS_AUDITED + 0.01)  # the oldest left the window
    assert sessions.refused() == (0.0, 2)  # audited again, with the count of those that were not
    assert sessions.refused() == (pytest.approx(0.99), 1)  # a sliding window: the next one leaves 1 s later


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


def test_a_later_failure_of_the_same_service_is_its_own_incident_and_does_not_reopen_this_one():
    bar = AlertBar(hold=5)
    bar.raised("a-1", "p1", "process_exit", ROW["created_at"], age=0.1)
    assert [i.open for i in bar.update(100.0, [], {"p1": {**DOWN, "last_failure": {"alert": "a-1"}}})] == [True]
    assert [i.open for i in bar.update(100.1, [], {"p1": {**RUNNING, "last_failure": {"alert": "a-1"}}})] == [False]
    # The new incarnation is killed in turn, within a-1's hold: a-2's incident, a-1 stays recovered.
    bar.raised("a-2", "p1", "process_exit", ROW["created_at"], age=0.1)
    down = {"p1": {**DOWN, "last_failure": {"alert": "a-2"}}}
    assert [(i.alert_id, i.open) for i in bar.update(101.0, [], down)] == [("a-2", True), ("a-1", False)]
    assert [i.alert_id for i in bar.update(105.2, [], down)] == ["a-2"]


def test_in_a_crash_wave_the_bar_shows_what_is_failing_now_first_and_counts_the_rest():
    """Twenty agents fail at once and come back one by one: the three incidents the bar shows
    are the newest still open, not the first ones raised (long recovered); the rest are counted,
    with how many of them are still open."""
    bar = AlertBar(hold=5)
    services = {}
    for n in range(6):
        bar.raised(f"a-{n}", f"p{n}", "process_exit", f"2025-01-01T00:00:0{n}.000Z", age=0.1)
        services[f"p{n}"] = {**(RUNNING if n in (0, 4) else DOWN), "last_failure": {"alert": f"a-{n}"}}
    shown = bar.update(100.0, [], services)
    assert [(i.alert_id, i.open) for i in shown] == [("a-5", True), ("a-3", True), ("a-2", True), ("a-1", True),
                                                     ("a-4", False), ("a-0", False)]
    html = Templates().render("_alert.html", incidents=shown, registry=None)
    assert [a for a in ("a-5", "a-3", "a-2", "a-1", "a-4", "a-0") if f'data-alert="{a}"' in html] == ["a-5", "a-3", "a-2"]
    assert "and 3 more (1 open)" in html
    services["p1"] = {**RUNNING, "last_failure": {"alert": "a-1"}}
    assert "and 3 more</span>" in Templates().render("_alert.html", incidents=bar.update(100.5, [], services),
                                                      registry=None)


def test_a_service_that_fails_again_before_it_is_back_is_never_shown_recovered():
    """A crash loop (a spawn that keeps failing, a service killed again while down): each
    failure is a new alert, but the service never ran in between, so no incident of it may
    say "recovered"; the bar shows the one failure that is going on."""
    bar = AlertBar(hold=5)
    bar.raised("a-1", "p1", "spawn_failed", ROW["created_at"], age=0.1)
    assert [(i.alert_id, i.open) for i in bar.update(100.0, [], {"p1": {**DOWN, "last_failure": {"alert": "a-1"}}})] \
        == [("a-1", True)]
    down = {"p1": {**DOWN, "last_failure": {"alert": "a-2"}}}
    assert [(i.alert_id, i.open) for i in bar.update(100.5, [], down)] == [("a-1", True)]  # a-2 not seen yet
    bar.raised("a-2", "p1", "spawn_failed", ROW["created_at"], age=0.1)
    assert [(i.alert_id, i.open) for i in bar.update(101.0, [], down)] == [("a-2", True)]
    assert [(i.alert_id, i.open) for i in bar.update(101.1, [], {"p1": {**RUNNING, "last_failure": {"alert": "a-2"}}})] \
        == [("a-2", False)]  # and once it runs again, that one is recovered


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


@pytest.mark.parametrize("fault", ["rows raise", "registry hangs"])
async def test_a_service_page_follows_its_log_and_rows_whatever_the_rest_of_the_live_view_does(tmp_path, fault):
    """A tick that raises (the rows, every time) is logged and tried again; a registry read that
    never returns (a lock, a journal that does not flush) holds up only itself. Either way the
    watched log is followed with no line lost, and with a registry that hangs the rows too."""
    import asyncio
    from types import SimpleNamespace

    from tron.common.paths import Home
    from tron.services.daemon.ui.live import Live

    row = {"name": "p1", "role": "programmer", "parent": None, "port": 9100, "state": "running", "pid": 7,
           "incarnation": "i-1", "restarts": 0, "provider": "anthropic", "last_beat_age": 0.5, "uptime": 3.0,
           "task": None, "progress": None, "crash_looping": False, "stopped": False, "last_failure": None,
           "ready": True, "paused": False}
    rows = [row]

    def read_rows():
        if fault == "rows raise":
            raise RuntimeError("a row that cannot be drawn")
        return [dict(r) for r in rows]

    async def never() -> list:
        await asyncio.Event().wait()
        return []

    clock = FakeClock()
    home = Home(tmp_path)
    home.logs.mkdir(parents=True)
    path = home.log_file("p1")
    path.write_text("before the page\n")
    store = SimpleNamespace(open_alerts=never, lanes=never, events=never)
    daemon = SimpleNamespace(clock=clock, stopping=False, home=home, cluster=None, store=store,
                             sup=SimpleNamespace(rows=read_rows, spawning_paused=False),
                             router=SimpleNamespace(last_alert=None), registry_health=lambda: {"state": "ok"})
    hub = Hub()
    page = hub.open({"svc:p1", "log:p1"})
    live = Live(daemon, hub, EventFeed(store.events), Templates())
    loop = asyncio.get_running_loop().create_task(live.run())

    async def tick() -> list[bytes]:
        for _ in range(20):  # let the loop reach its next sleep
            await asyncio.sleep(0)
        clock.advance(0.25)
        for _ in range(20):
            await asyncio.sleep(0)
        sent = []
        while not page.queue.empty():
            sent.append(page.queue.get_nowait())
        return sent

    try:
        await tick()
        with path.open("a") as f:
            f.write('{"msg": "serving", "incarnation": "i-1"}\n{"msg": "stopping", "incarnation": "i-1"}\n')
        rows[0] = {**row, "pid": 8, "incarnation": "i-2"}
        sent = b"".join(await tick() + await tick())
        logs = b"".join(m for m in sent.split(b"\n\n") if m.startswith(b"event: log\n"))
        assert b"serving" in logs and b"stopping" in logs and b"before the page" not in logs, sent
        if fault == "registry hangs":
            assert b"event: row\n" in sent and b"i-2" in sent, sent
    finally:
        daemon.stopping = True
        clock.advance(1)
        await asyncio.wait_for(loop, 5)


# -- the feed, views and actions -------------------------------------------------------------------------------------


async def test_the_feed_keeps_the_window_of_the_kinds_it_follows():
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
    assert [e["alert_id"] for e in fresh] == ["a-new"]  # the hour-old one is outside the window; runs are not followed
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


@pytest.mark.parametrize("state,stopped,paused,verbs", [
    ("running", False, False, ["restart", "stop", "pause"]),
    ("running", False, True, ["restart", "stop", "resume"]),
    ("backoff", False, False, ["restart", "stop", "pause"]),
    ("stopping", True, False, ["stop", "start", "pause"]),
    ("stopped", True, True, ["start", "resume"]),
])
def test_each_service_shows_the_buttons_that_apply_and_each_confirmation_names_it(state, stopped, paused, verbs):
    shown = buttons("service", {"name": "p1", "state": state, "stopped": stopped, "paused": paused})
    assert [b["verb"] for b in shown] == verbs
    assert all("p1" in b["confirm"] and b["url"] == f"/services/p1/{b['verb']}" and b["target"] == "p1"
               for b in shown)


@pytest.mark.parametrize("status,verbs", [
    ("assigned", ["retry", "hard-reset", "resume", "cancel"]),
    ("running", ["retry", "hard-reset", "resume", "cancel"]),
    ("escalated", ["retry", "hard-reset", "resume", "cancel"]),
    ("failed", ["retry", "hard-reset", "resume"]),       # retried within its run; nothing left to cancel
    ("cancelled", ["retry", "hard-reset", "resume"]),
    ("done", []),                                        # nothing to redo, nothing to cancel
])
def test_a_task_shows_only_the_actions_its_state_allows(status, verbs):
    shown = buttons("task", {"task_id": "r1.3", "agent": "programmer-1", "status": status})
    assert [b["verb"] for b in shown] == verbs
    for b in shown:
        assert "r1.3" in b["confirm"] and b["url"] == f"/tasks/r1.3/{b['verb']}" and b["target"] == "task r1.3"
    resume = [b for b in shown if b["verb"] == "resume"]
    # the step is typed beside the button; the confirmation names it (app.js fills it in)
    assert all(b["input"] == "from_step" and "from step {from_step}?" in b["confirm"] for b in resume)


def test_a_lane_and_the_spawning_switch_offer_the_opposite_of_their_state():
    assert [(b["verb"], b["url"]) for b in buttons("lane", {"lane": "programmer", "state": "paused"})] == \
        [("resume", "/lanes/programmer/resume")]
    [pause] = buttons("lane", {"lane": "programmer", "state": "open"})
    assert pause["verb"] == "pause" and "lane programmer" in pause["confirm"]
    assert [b["url"] for b in buttons("mesh", {"spawning": "running"})] == ["/spawning/pause"]
    assert [b["url"] for b in buttons("mesh", {"spawning": "paused"})] == ["/spawning/resume"]


def test_every_role_is_a_lane_open_unless_the_registry_says_otherwise():
    known = [{"lane": "programmer", "state": "paused", "fingerprint": "f1", "reason": "3 tasks failed",
              "changed_by": "breaker", "changed_at": "2025-01-01T00:00:00.000Z"}]
    shown = lanes(known, ["root", "programmer", "director", "programmer"])
    assert [(lane["lane"], lane["state"]) for lane in shown] == [("director", "open"), ("programmer", "paused"),
                                                                 ("root", "open")]
    assert shown[1] == known[0] and shown[0]["reason"] is None


def test_the_registry_bar_says_why_since_when_and_how_much_waits():
    assert registry_notice({"state": "ok", "pending": 0}) is None
    degraded = {"state": "degraded", "reason": "disk full", "since": "2025-01-01T00:00:00.000Z", "pending": 12}
    assert registry_notice(degraded) == {"reason": "disk full", "since": "2025-01-01T00:00:00.000Z", "pending": 12,
                                         "waiting": "12 rows waiting"}
    assert registry_notice({**degraded, "pending": 1})["waiting"] == "1 row waiting"
    html = Templates().render("_alert.html", incidents=[], registry=registry_notice(degraded))
    assert 'data-testid="registry-alert"' in html and "registry degraded:" in html and "12 rows waiting" in html
    assert "tron-alert" not in html
    assert Templates().render("_alert.html", incidents=[], registry=None).strip() == ""


@pytest.mark.parametrize("task_status,run_status,moving", [
    ("running", "running", True),
    ("done", "running", True),       # the run goes on: its result is still to come
    ("cancelled", "cancelled", False),
    ("done", "done", False),
    ("failed", None, False),         # a run the store no longer has
])
def test_a_task_page_keeps_looking_while_the_task_or_its_run_is_live(task_status, run_status, moving):
    run = {"status": run_status} if run_status else None
    assert task_moving({"status": task_status}, run) is moving


def test_a_mesh_row_marks_a_crash_looping_and_a_paused_service_and_offers_resume():
    row = {"name": "p1", "role": "programmer", "parent": "d1", "port": 9100, "state": "backoff", "pid": None,
           "incarnation": "i-1", "restarts": 4, "provider": "anthropic", "last_beat_age": None, "uptime": None,
           "task": None, "progress": None, "crash_looping": True, "stopped": False,
           "last_failure": {"reason": "process_exit", "at": 1.0}, "ready": False, "paused": True}
    html = Templates().render("_row.html", depth=2, s=row)
    assert 'data-mark="crash-looping"' in html and 'data-mark="paused"' in html and 'data-paused="true"' in html
    assert 'data-action="resume"' in html and 'data-action="pause"' not in html
    calm = Templates().render("_row.html", depth=2, s={**row, "crash_looping": False, "paused": False})
    assert "data-mark=\"crash-looping\"" not in calm and 'data-mark="paused"' not in calm
    assert 'data-action="pause"' in calm


async def test_the_daemon_refuses_a_host_name_it_does_not_know_on_every_endpoint():
    """DNS rebinding reaches the public endpoints too (/status names every service): a name
    that is not the daemon's own is a 403 before any handler; addresses and own names pass."""
    from aiohttp import web
    from aiohttp.test_utils import TestClient, TestServer

    from tron.services.daemon import api

    class Mesh:
        bind, advertise = "127.0.0.1", "tron-head.lan"

    class Config:
        mesh, hosts = Mesh(), {"worker": "10.0.0.7"}

    class D:
        config = Config()

    async def status(request):
        return web.json_response({"services": ["root"]})

    app = web.Application(middlewares=[api.host_guard])
    app[api.DAEMON_KEY] = D()
    app.router.add_get("/status", status)
    async with TestClient(TestServer(app)) as client:
        port = client.server.port
        for host, code in [(f"evil.test:{port}", 403), (f"EVIL.test:{port}", 403), (f"127.0.0.1:{port}", 200),
                           (f"localhost:{port}", 200), (f"[::1]:{port}", 200), (f"10.1.2.3:{port}", 200),
                           (f"tron-head.lan:{port}", 200)]:
            resp = await client.get("/status", headers={"Host": host})
            body = await resp.text()
            assert resp.status == code, (host, resp.status, body)
            if code == 403:
                assert "root" not in body and "evil.test" in body.lower(), body


def test_revoking_a_token_ends_the_sessions_it_opened_and_spends_its_codes():
    clock = FakeClock()
    sessions = Sessions(clock, cookie="tron_ui_6109")
    ops = sessions.redeem(sessions.mint_code("token:ops@ui", minted_by="ops"))
    mine = sessions.redeem(sessions.mint_code("ann@ui", minted_by="operator"))
    waiting = sessions.mint_code("token:ops@ui", minted_by="ops")
    assert ops is not None and mine is not None and len(sessions) == 2
    assert sessions.end_minted_by("ops") == 1
    assert len(sessions) == 1 and sessions.redeem(waiting) is None
    assert sessions.refusal(waiting) == ("revoked", "token:ops@ui")
    assert sessions.end_minted_by("ops") == 0


async def test_an_open_event_stream_ends_when_its_session_does():
    """Revoking the token that opened a session (or logging out, or the session's end) ends
    its open event stream too: a page left open must not go on receiving the mesh's rows
    and logs once its session is gone."""
    import asyncio
    from types import SimpleNamespace

    from aiohttp import web
    from aiohttp.test_utils import TestClient, TestServer

    from tron.services.daemon.ui import pages
    from tron.services.daemon.ui.context import UI_KEY, Ui

    sessions = Sessions(FakeClock(), cookie="tron_ui_6109")
    session = sessions.redeem(sessions.mint_code("token:ops@ui", minted_by="ops"))
    assert session is not None
    hub = Hub()
    daemon = SimpleNamespace(sup=SimpleNamespace(services={}))
    app = web.Application()
    app[UI_KEY] = Ui(daemon=daemon, sessions=sessions, hub=hub, feed=None,
                     live=SimpleNamespace(on_open=lambda client: None), templates=None)
    app.router.add_get("/ui/events", pages.events)
    async with TestClient(TestServer(app, host="127.0.0.1")) as client:
        resp = await client.get("/ui/events?topics=beats", cookies={sessions.cookie: session.sid})
        assert resp.status == 200
        assert await asyncio.wait_for(resp.content.readuntil(b"\n\n"), 5) == b"retry: 2000\n\n"
        hub.publish("beats", "beats", "{}")
        assert b"event: beats" in await asyncio.wait_for(resp.content.readuntil(b"\n\n"), 5)
        assert sessions.end_minted_by("ops") == 1  # `tron token revoke ops`
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 5
        while loop.time() < deadline and not resp.content.at_eof():
            hub.publish("beats", "beats", "{}")  # what the page would still be sent
            try:
                chunk = await asyncio.wait_for(resp.content.read(65536), 0.2)
            except TimeoutError:
                continue
            assert b"event: beats" not in chunk, "a revoked session's stream still got live data"
        assert resp.content.at_eof(), "the stream was still open 5 s after its session was revoked"
        assert len(hub) == 0


def test_a_credential_that_opens_sessions_and_codes_in_a_loop_logs_out_no_one_else():
    """A viewer's token may open read-only sessions: opening them in a loop must not log the
    operator out, nor supersede the login code `tron ui` just printed for the operator."""
    from tron.services.daemon.ui.auth import MAX_CODES, MAX_SESSIONS

    clock = FakeClock()
    sessions = Sessions(clock, cookie="tron_ui_6109")
    operator = sessions.redeem(sessions.mint_code("ann@ui", minted_by="operator"))
    pending = sessions.mint_code("ann@ui", minted_by="operator")
    for _ in range(MAX_SESSIONS * 2):
        assert sessions.redeem(sessions.mint_code("token:dash@ui", viewer=True, minted_by="dash")) is not None
    for _ in range(MAX_CODES * 2):
        sessions.mint_code("token:dash@ui", viewer=True, minted_by="dash")
    assert sessions.authorize(_request(sessions, operator.sid, operator.csrf))  # still logged in
    assert sessions.redeem(pending) is not None  # and the printed link still works
    assert len(sessions) == MAX_SESSIONS
