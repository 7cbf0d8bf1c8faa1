"""Notifications (common/notify.py, services/daemon/notify.py): the pure rules as tables,
then the notifier on the in-memory store against a real aiohttp receiver on a loopback
port (port 0, read back), with the real clock and a poll of 10 ms: no mocks."""

from __future__ import annotations

import asyncio
import json
import time

import pytest
from aiohttp import web

from tron.common import notify
from tron.common.clock import MonotonicClock
from tron.common.config import ConfigError, parse_mesh
from tron.common.notify import EVENT_KINDS, NotifyEntry, Outcome
from tron.registry.memory import MemoryStore
from tron.services.daemon.metrics import DaemonMetrics
from tron.services.daemon.notify import Notifier, last_event

SECRET = "it-is-a-secret"
SERVICES = {"web": {"command": ["web-server"], "port": 7001}}


@pytest.fixture(autouse=True)
def secret_env(monkeypatch):
    monkeypatch.setenv("TRON_NOTIFY_SECRET", SECRET)


def entry(url: str = "http://127.0.0.1:9/hook", **kw) -> NotifyEntry:
    return NotifyEntry(url=url, secret_env="TRON_NOTIFY_SECRET", **kw)


# -- the pure rules --------------------------------------------------------------------------


def test_the_signature_is_the_known_hmac_of_the_exact_body():
    body = b'{"id":42,"kind":"provider_opened"}'
    # openssl dgst -sha256 -hmac it-is-a-secret
    assert notify.sign(body, SECRET) == "sha256=be17a541023d36f28815574ad1a396b66c4215fc180ae96bbc5dbbda7a88756d"


@pytest.mark.parametrize("body, secret, header, ok", [
    (b'{"id":1}', SECRET, notify.sign(b'{"id":1}', SECRET), True),
    (b'{"id":2}', SECRET, notify.sign(b'{"id":1}', SECRET), False),  # the body changed
    (b'{"id":1} ', SECRET, notify.sign(b'{"id":1}', SECRET), False),  # one byte more
    (b'{"id":1}', "another", notify.sign(b'{"id":1}', SECRET), False),  # the wrong secret
    (b'{"id":1}', SECRET, None, False),
    (b'{"id":1}', SECRET, "", False),
    (b'{"id":1}', SECRET, "sha1=abc", False),
    (b'{"id":1}', SECRET, "sha256=\u00e9", False),  # not ASCII: wrong, no exception
])
def test_verify(body, secret, header, ok):
    assert notify.verify(body, secret, header) is ok


@pytest.mark.parametrize("events, kind, wanted", [
    (EVENT_KINDS, "provider_opened", True),
    (EVENT_KINDS, "registry_degraded", True),
    (EVENT_KINDS, "child_restart", False),  # not a kind people are told of
    (("permanent_failure",), "permanent_failure", True),
    (("permanent_failure",), "provider_opened", False),
    (("permanent_failure",), "test", True),  # a test reaches every entry
    (EVENT_KINDS, "notify_delivery", False),  # never about itself
])
def test_wanted(events, kind, wanted):
    assert notify.wanted(entry(events=events), kind) is wanted


def test_an_entry_wants_every_kind_by_default():
    assert entry().events == EVENT_KINDS


@pytest.mark.parametrize("attempt, r, delay", [
    (1, 0.5, 0.5), (2, 0.5, 1.0), (3, 0.5, 2.0), (6, 0.5, 16.0), (7, 0.5, 30.0), (50, 0.5, 30.0),
    (1, 0.0, 0.4), (1, 1.0, 0.6),  # +-20 %
    (7, 1.0, 30.0),  # jitter never lifts it over the cap
])
def test_backoff(attempt, r, delay):
    assert notify.backoff(attempt, rng=lambda: r) == pytest.approx(delay)


@pytest.mark.parametrize("status, attempt, retry_after, outcome, delay", [
    (200, 1, None, Outcome.DELIVERED, 0.0),
    (204, 3, None, Outcome.DELIVERED, 0.0),
    (500, 1, None, Outcome.RETRYING, 0.5),
    (503, 2, None, Outcome.RETRYING, 1.0),
    (429, 1, 7.0, Outcome.RETRYING, 7.0),  # Retry-After honoured
    (503, 1, 0.0, Outcome.RETRYING, 0.0),
    ("timeout", 1, None, Outcome.RETRYING, 0.5),
    ("ClientConnectorError: refused", 2, None, Outcome.RETRYING, 1.0),
    (500, 6, None, Outcome.GAVE_UP, 0.0),  # max_attempts reached
    ("timeout", 6, None, Outcome.GAVE_UP, 0.0),
    (400, 1, None, Outcome.GAVE_UP, 0.0),  # never on other 4xx
    (401, 1, None, Outcome.GAVE_UP, 0.0),
    (404, 1, 5.0, Outcome.GAVE_UP, 0.0),
    (301, 1, None, Outcome.GAVE_UP, 0.0),  # redirects are not followed
])
def test_next_step(status, attempt, retry_after, outcome, delay):
    step = notify.next_step(status, attempt, 6, retry_after_s=retry_after, rng=lambda: 0.5)
    assert (step.outcome, step.delay) == (outcome, pytest.approx(delay))


@pytest.mark.parametrize("header, seconds", [
    (None, None), ("", None), ("soon", None), ("5", 5.0), ("0", 0.0), ("2.5", 2.5), ("86400", 300.0),
    ("Wed, 21 Oct 2015 07:28:10 GMT", 10.0),  # an HTTP date, against the wall time given
    ("Wed, 21 Oct 2015 07:27:00 GMT", 0.0),  # already past
])
def test_retry_after(header, seconds):
    wall = 1445412480.0  # 2015-10-21T07:28:00Z
    assert notify.retry_after(header, wall=wall) == (None if seconds is None else pytest.approx(seconds))


def _message(kind: str, **payload) -> dict:
    row = {"id": 7, "kind": kind, "ts": "2026-01-02T03:04:05.000Z", "agent": "programmer-1", "run_id": "run-1",
           "task_id": "run-1.0", "payload": payload, "drill": None}
    return notify.message(row, mesh="/srv/tron")


@pytest.mark.parametrize("kind, payload, line", [
    ("provider_opened", {"provider": "anthropic", "reason": "3 failures"},
     "[/srv/tron] provider_opened: provider anthropic is open (no calls go to it): 3 failures"),
    ("permanent_failure", {"reason": "max_provider_switches_exceeded"},
     "[/srv/tron] permanent_failure: programmer-1: task run-1.0 failed for good: max_provider_switches_exceeded"),
    ("crash_loop_started", {}, "[/srv/tron] crash_loop_started: programmer-1 is crash-looping: ?"),
    ("something_new", {}, "[/srv/tron] something_new: something new"),
])
def test_summary_is_one_line(kind, payload, line):
    assert notify.summary(_message(kind, **payload)) == line


def test_the_slack_shape():
    msg = _message("provider_opened", provider="anthropic", reason="3 failures")
    slack = json.loads(notify.body(msg, "slack"))
    assert set(slack) == {"text", "blocks"}
    assert slack["text"] == notify.summary(msg) and "\n" not in slack["text"]
    section, context = slack["blocks"]
    assert section == {"type": "section", "text": {"type": "mrkdwn", "text": slack["text"]}}
    assert context["type"] == "context" and "`run-1.0`" in context["elements"][0]["text"]


def test_the_json_body_has_every_field():
    msg = _message("provider_opened", provider="anthropic")
    assert set(json.loads(notify.body(msg, "json"))) == {"id", "kind", "ts", "agent", "run_id", "task_id", "payload",
                                                         "mesh", "drill"}


# -- config ----------------------------------------------------------------------------------


def _config(notify_entries):
    return parse_mesh({"services": SERVICES, "notify": notify_entries})


@pytest.mark.parametrize("raw, message", [
    ({"url": "http://127.0.0.1:9/x", "secret_env": "TRON_NOTIFY_SECRET", "events": ["provider_opened", "lunch"]},
     "notify.0.events.1: Input should be"),
    ({"url": "http://127.0.0.1:9/x", "secret_env": "TRON_NOTIFY_SECRET", "secret": "inline"},
     "notify.0.secret: unknown key"),
    ({"url": "https://me:pw@hooks.example/x", "secret_env": "TRON_NOTIFY_SECRET"},
     "notify.0.url: a password in the URL"),
    ({"url": "ftp://example/x", "secret_env": "TRON_NOTIFY_SECRET"}, "notify.0.url: 'ftp://example/x' is not"),
    ({"url": "http://127.0.0.1:9/x", "secret_env": "TRON_NOTIFY_SECRET", "format": "xml"}, "notify.0.format"),
    ({"url": "http://127.0.0.1:9/x", "secret_env": "TRON_NOTIFY_SECRET", "max_attempts": 0},
     "notify.0.max_attempts"),
    ({"url": "http://127.0.0.1:9/x"}, "notify.0.secret_env: Field required"),
])
def test_config_refuses(raw, message):
    with pytest.raises(ConfigError, match=message.replace(".", r"\.").replace("(", r"\(")):
        _config([raw])


def test_config_takes_entries_and_no_notify_by_default():
    assert parse_mesh({"services": SERVICES}).notify == []
    two = _config([{"url": "http://127.0.0.1:9/a", "secret_env": "TRON_NOTIFY_SECRET"},
                   {"url": "https://hooks.example/b?k=v", "secret_env": "TRON_NOTIFY_SECRET", "format": "slack",
                    "events": ["lane_paused"], "timeout": 1.5, "max_attempts": 2}])
    assert [e.format for e in two.notify] == ["json", "slack"]
    assert two.notify[1].where == "https://hooks.example"  # what delivery rows record: no path, no query


# -- the notifier, on the memory store, against a real receiver ---------------------------------


class Receiver:
    """A real HTTP receiver on a free loopback port that checks every signature. ``plan``
    answers in turn (an int: that status; "hang": never); then 200."""

    def __init__(self, plan=()) -> None:
        self.plan = list(plan)
        self.got: list[dict] = []
        self.bad_signatures = 0
        self.release = asyncio.Event()

    async def handle(self, request: web.Request) -> web.Response:
        raw = await request.read()
        if not notify.verify(raw, SECRET, request.headers.get(notify.SIGNATURE_HEADER)):
            self.bad_signatures += 1
        self.got.append({"body": json.loads(raw), "headers": dict(request.headers)})
        step = self.plan.pop(0) if self.plan else 200
        if step == "hang":
            await self.release.wait()
            step = 200
        return web.json_response({}, status=step)

    async def __aenter__(self) -> "Receiver":
        app = web.Application()
        app.router.add_post("/hook", self.handle)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}/hook"
        return self

    async def __aexit__(self, *exc) -> None:
        self.release.set()
        await self.runner.cleanup()

    def kinds(self) -> list[str]:
        return [g["body"]["kind"] for g in self.got]


class Rig:
    def __init__(self, store: MemoryStore | None = None) -> None:
        self.store = store or MemoryStore()
        self.tasks: set[asyncio.Task] = set()
        self.health = {"state": "ok"}
        self.notifiers: list[Notifier] = []

    def background(self, coro, what: str) -> asyncio.Task:
        task = asyncio.ensure_future(coro)
        self.tasks.add(task)
        return task

    def notifier(self, *entries: NotifyEntry, queue_size: int = 256) -> Notifier:
        n = Notifier(self.store, list(entries), clock=MonotonicClock(), background=self.background,
                     metrics=DaemonMetrics(), mesh="/srv/tron", health=lambda: self.health, rng=lambda: 0.0,
                     poll=0.01, queue_size=queue_size)
        self.notifiers.append(n)
        return n

    async def rows(self, kind: str) -> list[dict]:
        return [r for r in await self.store.events(0, 10_000) if r["kind"] == kind]

    async def close(self) -> None:
        for n in self.notifiers:
            await n.stop()


@pytest.fixture
async def rig():
    made = Rig()
    yield made
    await made.close()  # a failed test leaves no session open


async def until(predicate, timeout: float = 30.0, what: str = "condition"):  # polled: a quick pass stays quick
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        await asyncio.sleep(0.005)
    raise AssertionError(f"timed out waiting for {what}")


async def started(rig: Rig, n: Notifier) -> Notifier:
    await rig.store.event("daemon_started", {})
    n.start()
    await until(lambda: n._resumed, what="the notifier to resume")
    return n


async def test_wanted_events_arrive_signed_in_order_and_each_attempt_is_recorded(rig):
    async with Receiver() as rx:
        await rig.store.event("provider_opened", {"provider": "old"})  # before the daemon: not re-sent
        n = await started(rig, rig.notifier(entry(rx.url, events=("provider_opened", "permanent_failure"))))
        await rig.store.event("provider_opened", {"provider": "anthropic"})
        await rig.store.event("child_restart", {})  # not wanted
        await rig.store.event("permanent_failure", {"reason": "x"}, agent="programmer-1", task_id="t1", run_id="r1")
        await until(lambda: len(rx.got) == 2, what="two deliveries")
        assert rx.kinds() == ["provider_opened", "permanent_failure"] and rx.bad_signatures == 0
        first = rx.got[0]
        assert first["body"]["payload"]["provider"] == "anthropic" and first["body"]["mesh"] == "/srv/tron"
        assert first["headers"][notify.EVENT_HEADER] == "provider_opened"
        assert first["headers"][notify.DELIVERY_HEADER] == f"{first['body']['id']}.0"
        assert "X-Tron-Token" not in first["headers"]
        done = await until(lambda: _n_rows(rig, "notify_delivery", 2), what="two delivery rows")
        assert [(r["payload"]["kind"], r["payload"]["attempt"], r["payload"]["status"], r["payload"]["outcome"])
                for r in done] == [("provider_opened", 1, 200, "delivered"), ("permanent_failure", 1, 200, "delivered")]
        assert done[1]["task_id"] == "t1" and done[1]["payload"]["to"].startswith("http://127.0.0.1:")
        await n.stop()
        await n.stop()  # idempotent


async def _n_rows(rig: Rig, kind: str, n: int) -> list[dict] | None:
    rows = await rig.rows(kind)
    return rows if len(rows) >= n else None


async def test_5xx_is_retried_with_backoff_4xx_is_not(rig):
    async with Receiver([500, 503, 200, 404]) as rx:
        n = await started(rig, rig.notifier(entry(rx.url)))
        await rig.store.event("provider_opened", {"provider": "a"})
        await rig.store.event("provider_opened", {"provider": "b"})
        rows = await until(lambda: _n_rows(rig, "notify_delivery", 4), what="four attempts")
        assert [(r["payload"]["status"], r["payload"]["outcome"], r["payload"]["attempt"]) for r in rows] == [
            (500, "retrying", 1), (503, "retrying", 2), (200, "delivered", 3), (404, "gave_up", 1)]
        assert rows[0]["payload"]["retry_in"] == pytest.approx(0.4)  # backoff(1) with the rng at 0
        await n.stop()


async def test_a_hung_receiver_holds_up_only_its_own_queue_and_a_full_queue_drops_its_oldest(rig):
    async with Receiver(["hang"]) as hung, Receiver() as fine:
        n = await started(rig, rig.notifier(entry(hung.url, timeout=60), entry(fine.url), queue_size=2))
        for i in range(5):  # one at a time: a burst larger than a queue is dropped from every queue
            await rig.store.event("provider_opened", {"provider": f"p{i}"})
            await until(lambda: len(fine.got) == i + 1, what=f"the healthy receiver to get p{i}")
        assert len(hung.got) == 1  # p0 is on the wire; p1, p2 were dropped, p3 and p4 wait
        drops = await until(lambda: _n_rows(rig, "notify_dropped", 2), what="two drops")
        assert [d["payload"]["notify"] for d in drops] == [0, 0]
        hung.release.set()
        await until(lambda: len(hung.got) == 3, what="the hung receiver to catch up")
        assert [g["body"]["payload"]["provider"] for g in hung.got] == ["p0", "p3", "p4"]
        await n.stop()


async def test_a_new_daemon_resumes_where_the_last_stopped_and_a_new_entry_starts_now(rig):
    async with Receiver() as rx, Receiver(["hang"]) as slow:
        first = await started(rig, rig.notifier(entry(rx.url), entry(slow.url, timeout=60)))
        await rig.store.event("provider_opened", {"provider": "a"})
        await until(lambda: len(rx.got) == 1 and len(slow.got) == 1, what="both to get a")
        # rx's answer read (a receiver has the message before its sender has the answer; on a
        # loaded machine the stop came in between, and a went to rx again, b never to slow)
        await until(lambda: first.outlets[0].sending is None, what="rx's delivery to be over")
        await first.stop()  # slow never answered: a is sent to it again by the next daemon, not to rx

        async with Receiver() as new:
            second = await started(rig, rig.notifier(entry(rx.url), entry(slow.url, timeout=60), entry(new.url)))
            await rig.store.event("provider_opened", {"provider": "b"})
            await until(lambda: len(new.got) == 1 and len(rx.got) == 2, what="b everywhere")
            await until(lambda: len(slow.got) == 3, what="the slow receiver to get a again, then b")
            assert [g["body"]["payload"]["provider"] for g in rx.got] == ["a", "b"]
            assert [g["body"]["payload"]["provider"] for g in new.got] == ["b"]
            assert [g["body"]["payload"]["provider"] for g in slow.got] == ["a", "a", "b"]
            await second.stop()


async def test_a_daemon_stopped_before_any_delivery_was_over_leaves_its_place_to_the_next(rig):
    """The first daemon of a home stops while its one message is still on its way (the
    receiver hangs): no place ever moved, but the next daemon must not start at its own start,
    past that message. It is sent again."""
    async with Receiver(["hang"]) as slow:
        first = await started(rig, rig.notifier(entry(slow.url, timeout=60)))
        await rig.store.event("provider_opened", {"provider": "a"})
        await until(lambda: len(slow.got) == 1, what="slow to get a")
        await first.stop()
        second = await started(rig, rig.notifier(entry(slow.url, timeout=60)))
        await until(lambda: len(slow.got) == 2, what="a sent again by the next daemon")
        assert [g["body"]["payload"]["provider"] for g in slow.got] == ["a", "a"]
        await second.stop()


async def test_registry_degraded_is_sent_at_once_and_its_stored_twin_is_not_sent_again(rig):
    async with Receiver() as rx:
        n = await started(rig, rig.notifier(entry(rx.url)))
        rig.health = {"state": "degraded", "reason": "disk full", "since": "t", "last_error": "OSError", "pending": 3}
        await until(lambda: len(rx.got) == 1, what="the direct registry_degraded")
        assert rx.got[0]["body"]["kind"] == "registry_degraded" and rx.got[0]["body"]["id"] is None
        assert rx.got[0]["body"]["payload"]["reason"] == "disk full"
        rig.health = {"state": "ok"}
        await rig.store.event("registry_degraded", {"reason": "disk full"})  # written once it recovers
        await rig.store.event("provider_opened", {"provider": "a"})
        await until(lambda: len(rx.got) == 2, what="the next event")
        assert rx.kinds() == ["registry_degraded", "provider_opened"]
        await n.stop()


async def test_a_test_event_goes_to_the_entry_named(rig):
    async with Receiver() as a, Receiver() as b:
        n = await started(rig, rig.notifier(entry(a.url, events=("lane_paused",)), entry(b.url)))
        await rig.store.event("notify_test", {"entry": 1})
        await rig.store.event("notify_test", {"entry": None})
        await until(lambda: len(a.got) == 1 and len(b.got) == 2, what="the tests")
        assert a.kinds() == ["test"] and b.kinds() == ["test", "test"]
        await n.stop()


@pytest.mark.parametrize("ids", [[], [1], [1, 2, 3, 9, 17, 1000], list(range(1, 300)), [64], [63, 65]])
async def test_last_event_finds_the_newest(ids):
    store = MemoryStore()
    for i in range(1, (max(ids) if ids else 0) + 1):
        await store.event("notify_cursor" if i in ids else "other", {"n": i})
    found = await last_event(store, "notify_cursor")
    assert (found["id"] if found else None) == (max(ids) if ids else None)


def test_a_missing_secret_is_said_by_the_entry_not_refused_by_the_mesh_file(monkeypatch):
    monkeypatch.delenv("TRON_NO_SUCH_SECRET", raising=False)
    config = _config([{"url": "http://127.0.0.1:9/hook?key=k", "secret_env": "TRON_NO_SUCH_SECRET"}])
    why = config.notify[0].missing_secret()
    assert why is not None and "TRON_NO_SUCH_SECRET is not set" in why and "key=k" not in why
    monkeypatch.setenv("TRON_NO_SUCH_SECRET", "s3cret")
    assert config.notify[0].missing_secret() is None
