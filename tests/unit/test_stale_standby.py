"""A standby that answers "stale" (the code changed since its server read it) gets its
server told to check (spawner.py ``ForkServerClient._stale_standby``): the server exits if
it is out of date too (the integration test in test_standby.py), serves on if it read the
code later (an heir), and is ended if it does not answer. Never left waiting, unasked."""

from __future__ import annotations

import asyncio

import pytest

from tron.services.daemon.spawner import ForkServerClient


class Proc:
    def __init__(self) -> None:
        self.killed = False

    def poll(self) -> int | None:
        return -9 if self.killed else None

    def kill(self) -> None:
        self.killed = True


@pytest.mark.parametrize("answer, ready, killed", [
    ({"ok": True}, True, False),  # it read the new code (an heir): it serves on
    ({"ok": False, "stale": True, "error": "app.py changed"}, False, False),  # it exits; _on_exit starts a fresh one
    (None, False, True),  # no answer: ended, and _on_exit starts a fresh one
])
def test_a_stale_standby_has_its_server_checked(monkeypatch, answer, ready, killed):
    fs = ForkServerClient("/nonexistent/forkserver.sock", "/dev/null", "/", {})
    asked = []

    async def request(req, *, timeout, fds=(), path=None):
        asked.append(req)
        return answer

    monkeypatch.setattr(fs, "_request", request)
    fs.proc, fs.ready = Proc(), True  # type: ignore[assignment]

    async def main() -> None:
        fs._stale_standby()
        assert fs.ready is False  # nothing more goes to it until it has answered
        fs._stale_standby()  # a second stale standby meanwhile: one check
        await fs._checking

    asyncio.run(main())
    assert asked == [{"op": "check_code"}]
    assert fs.ready is ready and fs.proc.killed is killed
