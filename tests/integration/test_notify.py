"""Issue 23, item 5: notifications that reach people. A real mesh with `[[notify]]`
entries pointing at real aiohttp receivers started here on free loopback ports; each
receiver checks every signature with the secret the mesh has in its environment. The
events are real: an operator drains a provider (`provider_opened`) and the daemon sends it."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time

import pytest
from aiohttp import web

from tron.common import notify
from tests.harness import rewrite_mesh, wait_for

pytestmark = pytest.mark.integration

SECRET = "notify-secret-for-the-tests"


class Receiver:
    """An HTTP receiver on its own thread and event loop. ``plan`` answers in turn (an int:
    that status; "hang": never), then 200. Each request is kept with its arrival time,
    whether its signature is right, and when it was answered (None while it hangs)."""

    def __init__(self, plan=()) -> None:
        self.plan = list(plan)
        self.got: list[dict] = []
        self._lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="notify receiver", daemon=True)
        self._release: asyncio.Event | None = None

    def __enter__(self) -> "Receiver":
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(10)
        return self

    async def _start(self) -> None:
        self._release = asyncio.Event()
        app = web.Application()
        app.router.add_post("/hook", self._handle)
        self._runner = web.AppRunner(app, shutdown_timeout=0.5)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{self._runner.addresses[0][1]}/hook"

    async def _handle(self, request: web.Request) -> web.Response:
        raw = await request.read()
        got = {"at": time.monotonic(), "body": json.loads(raw), "headers": dict(request.headers),
               "signed": notify.verify(raw, SECRET, request.headers.get(notify.SIGNATURE_HEADER)), "answered": None}
        with self._lock:
            self.got.append(got)
            step = self.plan.pop(0) if self.plan else 200
        if step == "hang":
            await self._release.wait()  # only when the test ends
            step = 200
        got["answered"] = time.monotonic()
        return web.json_response({"ok": step < 300}, status=step)

    def __exit__(self, *exc) -> None:
        self._loop.call_soon_threadsafe(self._release.set)
        asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._loop.close()

    def of(self, kind: str) -> list[dict]:
        with self._lock:
            return [g for g in self.got if g["body"]["kind"] == kind]


def closed_port() -> int:
    """A loopback port nothing listens on (bound, then let go)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def hook(url: str, **kw) -> dict:
    return {"url": url, "secret_env": "TRON_NOTIFY_SECRET", **kw}


def up(mesh_factory, *entries: dict):
    mesh = mesh_factory(notify=list(entries))
    mesh.env["TRON_NOTIFY_SECRET"] = SECRET
    mesh.up()
    return mesh


def notify_log(mesh) -> list[dict]:
    proc = mesh.tron("notify", "log", "--json", "--limit", "200", check=True)
    return [r["payload"] for r in json.loads(proc.stdout)]


def attempts(mesh, entry: int, kind: str) -> list[dict]:
    """The delivery attempts of one entry for one kind, oldest first."""
    return [p for p in reversed(notify_log(mesh)) if p.get("notify") == entry and p.get("kind") == kind]


def drain(mesh, provider: str = "anthropic") -> None:
    proc = mesh.tron("provider", "drain", provider, "--reason", "notification test")
    assert proc.returncode == 0 and "drained" in proc.stdout, proc.stderr


def test_a_provider_opened_arrives_signed_and_the_log_lists_it_delivered(mesh_factory):
    with Receiver() as rx:
        mesh = up(mesh_factory, hook(rx.url, events=["provider_opened", "permanent_failure"]))
        drain(mesh)
        [got] = wait_for(lambda: rx.of("provider_opened"), 10, "provider_opened at the receiver")
        assert got["signed"], got["headers"]
        body = got["body"]
        assert (body["payload"]["provider"], body["payload"]["to"], body["mesh"]) == \
               ("anthropic", "open", str(mesh.home)), body
        assert got["headers"][notify.EVENT_HEADER] == "provider_opened"
        assert got["headers"][notify.DELIVERY_HEADER] == f"{body['id']}.0"
        assert "X-Tron-Token" not in got["headers"]  # the mesh token never leaves the mesh
        [row] = wait_for(lambda: attempts(mesh, 0, "provider_opened"), 30, "the delivery in `tron notify log`")
        assert (row["event_id"], row["attempt"], row["status"], row["outcome"]) == (body["id"], 1, 200, "delivered")
        assert row["to"] == rx.url.removesuffix("/hook")  # origin only: no path, no query
        text = mesh.tron("notify", "log", check=True).stdout
        assert "provider_opened" in text and "delivered" in text, text

        # `tron notify test`: a test event through the daemon, signed, audited.
        proc = mesh.tron("notify", "test", "--entry", "0", check=True)
        assert "queued" in proc.stdout, proc.stdout
        [test] = wait_for(lambda: rx.of("test"), 10, "the test notification")
        assert test["signed"] and test["headers"][notify.EVENT_HEADER] == "test"
        audit = json.loads(mesh.tron("audit", "--json", check=True).stdout)
        assert [(a["payload"]["what"], a["payload"]["outcome"]) for a in audit
                if a["payload"]["what"] == "notify_test"] == [("notify_test", "queued")]
        assert mesh.tron("notify", "test", "--entry", "7").returncode == 2  # no such entry: refused


def test_a_receiver_answering_500_twice_gets_the_retries(mesh_factory):
    with Receiver([500, 500]) as rx:
        mesh = up(mesh_factory, hook(rx.url, events=["provider_opened"]))
        drain(mesh)
        rows = wait_for(lambda: (r := attempts(mesh, 0, "provider_opened")) and r[-1]["outcome"] == "delivered" and r,
                        20, "the third attempt to deliver")
        assert [(r["attempt"], r["status"], r["outcome"]) for r in rows] == [
            (1, 500, "retrying"), (2, 500, "retrying"), (3, 200, "delivered")], rows
        assert len(rx.of("provider_opened")) == 3 and all(g["signed"] for g in rx.got)
        # The same delivery id on every attempt: a receiver can tell a retry from a new event.
        assert len({g["headers"][notify.DELIVERY_HEADER] for g in rx.got}) == 1
        gaps = [b["at"] - a["at"] for a, b in zip(rx.got, rx.got[1:])]
        assert gaps[0] >= 0.35 and gaps[1] >= 0.75, gaps  # backoff 0.5 s, then 1 s (+-20 %)


def test_a_hanging_receiver_delays_no_restart(mesh_factory):
    with Receiver(["hang"]) as hung, Receiver() as fine:
        mesh = up(mesh_factory, hook(hung.url, timeout=120), hook(fine.url))
        drain(mesh)
        wait_for(lambda: hung.of("provider_opened") and fine.of("provider_opened"), 10, "both receivers asked")
        old = mesh.kill("programmer-1")
        killed = time.monotonic()
        back = mesh.wait_replaced("programmer-1", old, timeout=15)
        healthy = time.monotonic()
        # The restart came while the hanging receiver still held its delivery.
        assert hung.got[0]["answered"] is None
        assert attempts(mesh, 0, "provider_opened") == []  # no attempt of it has ended
        assert back["pid"] != old and healthy - killed < 10.0, healthy - killed  # a generous bound; typical 0.1 s
        assert [r["outcome"] for r in attempts(mesh, 1, "provider_opened")] == ["delivered"]
        started = time.monotonic()
        assert mesh.down().returncode == 0
        assert time.monotonic() - started < 20  # nor does it hold `tron down` (stop_grace is 3 s)
        assert hung.got[0]["answered"] is None


def test_the_daemon_keeps_working_with_an_unreachable_receiver(mesh_factory):
    nowhere = f"http://127.0.0.1:{closed_port()}/hook"
    with Receiver() as fine:
        mesh = up(mesh_factory, hook(nowhere, max_attempts=3, timeout=1), hook(fine.url))
        drain(mesh)
        rows = wait_for(lambda: (r := attempts(mesh, 0, "provider_opened")) and r[-1]["outcome"] == "gave_up" and r,
                        20, "the unreachable receiver to be given up on")
        assert [(r["attempt"], r["outcome"]) for r in rows] == [(1, "retrying"), (2, "retrying"), (3, "gave_up")]
        assert all(isinstance(r["status"], str) and r["status"] for r in rows), rows  # the error, not a code
        assert fine.of("provider_opened") and fine.got[0]["signed"]
        old = mesh.kill("programmer-1")
        mesh.wait_replaced("programmer-1", old, timeout=15)
        assert mesh.status()["daemon"]["pid"]
        metrics = mesh.http("GET", mesh.url("daemon") + "/metrics", token=False)[1]
        assert 'tron_notify_deliveries_total{outcome="gave_up"} 1.0' in metrics, metrics


def test_a_reload_that_changes_the_receivers_sends_to_the_new_ones_only_and_from_then_on(mesh_factory):
    """`tron reload` with other [[notify]] entries: the new receiver gets what happens after the
    reload and nothing from before, the old one nothing more (an operator cuts a wrong or
    compromised receiver off without a restart); an entry whose secret the daemon lacks
    refuses the reload, and the receivers stay as they were."""
    def opened(rx) -> list[str]:
        return [g["body"]["payload"]["provider"] for g in rx.of("provider_opened")]

    with Receiver() as old_rx, Receiver() as new_rx:
        mesh = up(mesh_factory, hook(old_rx.url, events=["provider_opened"]))
        drain(mesh, "anthropic")
        wait_for(lambda: opened(old_rx) == ["anthropic"], 10, "anthropic's drain at the old receiver")
        rewrite_mesh(mesh, notify=[hook(new_rx.url, events=["provider_opened"])])
        proc = mesh.tron("reload", check=True)
        assert "notify" in proc.stdout and "applied" in proc.stdout, proc.stdout
        drain(mesh, "ollama")
        wait_for(lambda: opened(new_rx) == ["ollama"], 10, "ollama's drain at the new receiver")
        assert opened(old_rx) == ["anthropic"]  # nothing after the reload
        assert "queued" in mesh.tron("notify", "test", "--entry", "0", check=True).stdout
        wait_for(lambda: new_rx.of("test"), 10, "the test notification at the new receiver")
        assert old_rx.of("test") == [] and opened(new_rx) == ["ollama"]  # and nothing from before it
        # A receiver that cannot be signed for: refused, named, nothing changes.
        rewrite_mesh(mesh, notify=[hook(old_rx.url, secret_env="TRON_NOTIFY_SECRET_UNSET")])
        refused = mesh.tron("reload")
        assert refused.returncode != 0 and "TRON_NOTIFY_SECRET_UNSET" in refused.stderr, refused.stdout + refused.stderr
        assert mesh.tron("provider", "restore", "ollama", "--reason", "back").returncode == 0
        drain(mesh, "ollama")
        wait_for(lambda: opened(new_rx) == ["ollama", "ollama"], 10, "the second drain at the new receiver still")
        assert opened(old_rx) == ["anthropic"]
