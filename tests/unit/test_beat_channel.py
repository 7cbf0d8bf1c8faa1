"""A new incarnation's first beat on its standby's connection (services/daemon/beat_channel.py,
common/service.py): judged as POST /beat judges it, answered on the line, refused when it
speaks for anyone else, and never in the way: a channel that does not carry the beat leaves
it to HTTP."""

from __future__ import annotations

import asyncio
import json
import os
import socket

import pytest

from tron.common.http import MeshHTTPError
from tron.common.models import Beat
from tron.common.service import _beat_on, beat_channel
from tron.services.daemon import unixline
from tron.services.daemon.beat_channel import first_beat


def _pair() -> tuple[socket.socket, socket.socket]:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    ours.setblocking(False)
    theirs.setblocking(False)
    return ours, theirs


def _beat(service: str = "programmer-1", incarnation: str = "i-new", seq: int = 0) -> Beat:
    return Beat(service=service, incarnation=incarnation, pid=4242, seq=seq)


class Judge:
    def __init__(self, status: int = 200, answer: dict | None = None) -> None:
        self.beats: list[Beat] = []
        self.status, self.answer = status, answer or {"ok": True, "interval": 1.0}

    async def __call__(self, beat: Beat) -> tuple[int, dict]:
        self.beats.append(beat)
        return self.status, self.answer


def _answer_of(sock: socket.socket) -> dict:
    sock.setblocking(True)
    sock.settimeout(5)
    data = b""
    while not data.endswith(b"\n"):
        chunk = sock.recv(1 << 16)
        if not chunk:
            break
        data += chunk
    return json.loads(data)


@pytest.mark.parametrize("sent, head, judged, status", [
    ("beat", b"", True, 200),                        # the beat, judged, answered as POST /beat
    ("", "beat", True, 200),                         # read already with the hand-over's answer
    ("other service", b"", False, 403),              # speaks for another service: refused, not judged
    ("other incarnation", b"", False, 403),          # ... or another incarnation of its own
    ("garbage", b"", False, 400),                    # not a beat
])
def test_the_first_beat_is_judged_only_for_its_own_incarnation(sent, head, judged, status):
    lines = {"beat": _beat(), "other service": _beat(service="programmer-2"),
             "other incarnation": _beat(incarnation="i-old")}

    def line(what):
        if not what:
            return b""
        return b"{not json\n" if what == "garbage" else lines[what].model_dump_json().encode() + b"\n"

    async def main():
        ours, theirs = _pair()
        judge = Judge()
        theirs.sendall(line(sent))
        took = await first_beat(ours, "programmer-1", "i-new", judge, timeout=5, head=line(head))
        assert ours.fileno() == -1  # closed, whatever happened
        return took, judge, _answer_of(theirs)

    took, judge, answer = asyncio.run(main())
    assert took is judged
    assert [b.seq for b in judge.beats] == ([0] if judged else [])
    assert answer["status"] == status
    if judged:
        assert answer["answer"] == {"ok": True, "interval": 1.0}


def test_no_beat_on_the_channel_is_no_beat_taken():
    async def main():
        ours, theirs = _pair()
        theirs.close()  # the incarnation died before it beat
        closed = await first_beat(ours, "programmer-1", "i-new", Judge(), timeout=5)
        ours2, theirs2 = _pair()
        silent = await first_beat(ours2, "programmer-1", "i-new", Judge(), timeout=0.05)  # it beats over HTTP
        theirs2.close()
        return closed, silent

    assert asyncio.run(main()) == (False, False)


def test_the_agent_sends_its_first_beat_and_reads_the_daemons_answer():
    async def main():
        ours, theirs = _pair()
        judge = Judge(answer={"ok": True, "interval": 0.5, "hosts": {"x": "10.0.0.2"}})
        daemon = asyncio.ensure_future(first_beat(theirs, "programmer-1", "i-new", judge, timeout=5))
        answer = await _beat_on(ours, _beat(), timeout=5)
        return answer, await daemon, judge, ours.fileno()

    answer, took, judge, fd = asyncio.run(main())
    assert answer == {"ok": True, "interval": 0.5, "hosts": {"x": "10.0.0.2"}}
    assert took and judge.beats[0].pid == 4242 and fd == -1


def test_a_refused_first_beat_is_the_same_error_as_over_http():
    async def main():
        ours, theirs = _pair()
        judge = Judge(409, {"error": "incarnation i-new of programmer-1 is not the current one",
                            "verdict": "stale_incarnation"})
        daemon = asyncio.ensure_future(first_beat(theirs, "programmer-1", "i-new", judge, timeout=5))
        try:
            with pytest.raises(MeshHTTPError) as err:
                await _beat_on(ours, _beat(), timeout=5)
        finally:
            await daemon
        return err.value

    err = asyncio.run(main())
    assert err.status == 409 and err.json()["verdict"] == "stale_incarnation"  # heartbeat_loop exits on it


@pytest.mark.parametrize("daemon_says", [b"", b"half a line", b"[1, 2]\n", b"{\"status\": 200}\n"])
def test_a_channel_that_does_not_carry_the_beat_leaves_it_to_http(daemon_says):
    async def main():
        ours, theirs = _pair()
        theirs.sendall(daemon_says)
        theirs.close()
        return await _beat_on(ours, _beat(), timeout=5), ours.fileno()

    assert asyncio.run(main()) == (None, -1)


def test_an_unanswered_first_beat_does_not_hold_the_agent():
    async def main():
        ours, theirs = _pair()
        try:
            return await _beat_on(ours, _beat(), timeout=0.05)
        finally:
            theirs.close()

    assert asyncio.run(main()) is None


def test_the_channel_is_found_by_its_variable_and_only_if_it_is_a_unix_stream(monkeypatch):
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    r, w = os.pipe()
    try:
        monkeypatch.setenv("TRON_BEAT_FD", str(ours.fileno()))
        found = beat_channel()
        assert found is not None and found.fileno() == ours.fileno() and "TRON_BEAT_FD" not in os.environ
        found.detach()
        monkeypatch.setenv("TRON_BEAT_FD", str(r))  # a pipe: someone else's, left open
        assert beat_channel() is None and os.fstat(r)
        monkeypatch.setenv("TRON_BEAT_FD", "9999")  # nothing there
        assert beat_channel() is None
        assert "TRON_BEAT_FD" not in os.environ and beat_channel() is None  # each call took the variable
    finally:
        for fd in (r, w):
            os.close(fd)
        ours.close()
        theirs.close()


def test_what_follows_an_answer_on_the_line_is_kept_for_the_channel():
    async def main():
        ours, theirs = _pair()
        theirs.sendall(b'{"ok": true}\n{"service": "programmer-1"')  # the standby's answer, then its beat begins
        rest = bytearray()
        answer = await unixline.ask_on_async(ours, {"module": "x"}, timeout=5, rest=rest)
        ours.close()
        theirs.close()
        return answer, bytes(rest)

    assert asyncio.run(main()) == ({"ok": True}, b'{"service": "programmer-1"')
