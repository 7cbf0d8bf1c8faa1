"""An agent's beats on its own connection to the daemon (services/daemon/beat_channel.py,
common/service.py): judged as POST /beat judges them, each answered on the line with the beat
it answers, refused when one speaks for anyone else, and never in the way: a channel that
fails leaves the beats to HTTP."""

from __future__ import annotations

import asyncio
import json
import os
import socket

import pytest

from tron.common.http import MeshHTTPError
from tron.common.models import Beat
from tron.common.service import BeatChannel, beat_channel
from tron.services.daemon import unixline
from tron.services.daemon.beat_channel import serve_beats


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


def _answers(sock: socket.socket) -> list[dict]:
    """Every answer line the daemon's end wrote, up to its close."""
    sock.setblocking(True)
    sock.settimeout(5)
    data = b""
    while chunk := sock.recv(1 << 16):
        data += chunk
    return [json.loads(line) for line in data.splitlines()]


@pytest.mark.parametrize("sent, head, judged, status", [
    ("beat", b"", 1, 200),                           # the beat, judged, answered as POST /beat
    ("", "beat", 1, 200),                            # read already with the hand-over's answer
    ("other service", b"", 0, 403),                  # speaks for another service: refused, not judged
    ("other incarnation", b"", 0, 403),              # ... or another incarnation of its own
    ("garbage", b"", 0, 400),                        # not a beat
])
def test_a_beat_is_judged_only_for_its_own_incarnation(sent, head, judged, status):
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
        theirs.shutdown(socket.SHUT_WR)  # the incarnation says no more: the channel ends after it
        took = await serve_beats(ours, "programmer-1", "i-new", judge, first_within=5, head=line(head))
        assert ours.fileno() == -1  # closed, whatever happened
        return took, judge, _answers(theirs)

    took, judge, answers = asyncio.run(main())
    assert took == judged and [b.seq for b in judge.beats] == [0] * judged
    assert [a["status"] for a in answers] == [status]
    if judged:
        assert answers[0] == {"seq": 0, "status": 200, "answer": {"ok": True, "interval": 1.0}}
    else:
        assert answers[0]["seq"] is None  # the line itself refused: the channel is over


def test_beats_are_judged_in_order_until_the_incarnation_closes_its_end():
    async def main():
        ours, theirs = _pair()
        judge = Judge()
        counted = []
        daemon = asyncio.ensure_future(serve_beats(ours, "programmer-1", "i-new", judge, first_within=5,
                                                   taken=lambda: counted.append(1)))
        agent = BeatChannel(theirs)
        answers = [await agent.beat(_beat(seq=n), timeout=5) for n in range(3)]
        agent.close()
        return await daemon, answers, judge, len(counted)

    took, answers, judge, counted = asyncio.run(main())
    assert took == 3 == counted and [b.seq for b in judge.beats] == [0, 1, 2]
    assert answers == [{"ok": True, "interval": 1.0}] * 3


def test_no_beat_on_the_channel_is_no_beat_taken():
    async def main():
        ours, theirs = _pair()
        theirs.close()  # the incarnation died before it beat
        closed = await serve_beats(ours, "programmer-1", "i-new", Judge(), first_within=5)
        ours2, theirs2 = _pair()
        silent = await serve_beats(ours2, "programmer-1", "i-new", Judge(), first_within=0.05)  # it beats over HTTP
        theirs2.close()
        return closed, silent

    assert asyncio.run(main()) == (0, 0)


def test_the_agent_reads_the_daemons_answer_to_each_beat():
    async def main():
        ours, theirs = _pair()
        judge = Judge(answer={"ok": True, "interval": 0.5, "hosts": {"x": "10.0.0.2"}})
        daemon = asyncio.ensure_future(serve_beats(theirs, "programmer-1", "i-new", judge, first_within=5))
        agent = BeatChannel(ours)
        answer = await agent.beat(_beat(), timeout=5)
        agent.close()
        return answer, await daemon, judge

    answer, took, judge = asyncio.run(main())
    assert answer == {"ok": True, "interval": 0.5, "hosts": {"x": "10.0.0.2"}}
    assert took == 1 and judge.beats[0].pid == 4242


def test_a_refused_beat_is_the_same_error_as_over_http():
    async def main():
        ours, theirs = _pair()
        judge = Judge(409, {"error": "incarnation i-new of programmer-1 is not the current one",
                            "verdict": "stale_incarnation"})
        daemon = asyncio.ensure_future(serve_beats(theirs, "programmer-1", "i-new", judge, first_within=5))
        agent = BeatChannel(ours)
        try:
            with pytest.raises(MeshHTTPError) as err:
                await agent.beat(_beat(), timeout=5)
        finally:
            agent.close()
            await daemon
        return err.value

    err = asyncio.run(main())
    assert err.status == 409 and err.json()["verdict"] == "stale_incarnation"  # heartbeat_loop exits on it


def test_an_answer_that_comes_too_late_is_passed_over_by_the_next_beat():
    async def main():
        ours, theirs = _pair()
        agent = BeatChannel(ours)
        with pytest.raises(TimeoutError):  # as an HTTP beat that timed out: the channel stays
            await agent.beat(_beat(seq=0), timeout=0.05)
        late = {"seq": 0, "status": 200, "answer": {"late": True}}
        due = {"seq": 1, "status": 200, "answer": {"late": False}}
        theirs.sendall((json.dumps(late) + "\n" + json.dumps(due) + "\n").encode())
        answer = await agent.beat(_beat(seq=1), timeout=5)
        agent.close()
        theirs.close()
        return answer

    assert asyncio.run(main()) == {"late": False}


def test_a_refusal_of_the_line_itself_ends_the_channel_and_the_beat_goes_over_http():
    async def main():
        ours, theirs = _pair()
        daemon = asyncio.ensure_future(serve_beats(theirs, "programmer-1", "i-new", Judge(), first_within=5))
        agent = BeatChannel(ours)
        answer = await agent.beat(_beat(service="programmer-2"), timeout=5)  # 403 from the daemon: not its to send
        return answer, ours.fileno(), await daemon

    assert asyncio.run(main()) == (None, -1, 0)


async def test_an_agent_beats_on_its_channel_and_over_http_once_the_channel_fails():
    from tron.common.clock import FakeClock
    from tron.common.service import heartbeat_loop
    from tests.unit.test_sdk import make_ctx

    ctx, clock = make_ctx(), FakeClock()
    ours, theirs = _pair()
    judge = Judge()
    daemon = asyncio.ensure_future(serve_beats(theirs, ctx.name, ctx.env.incarnation, judge, first_within=5))
    loop = asyncio.ensure_future(heartbeat_loop(ctx, clock, channel=BeatChannel(ours)))

    async def until(what, ok):
        deadline = asyncio.get_running_loop().time() + 5
        while not ok():
            assert asyncio.get_running_loop().time() < deadline, f"waited in vain for {what}"
            await asyncio.sleep(0.005)

    try:
        await until("the first beat on the channel", lambda: len(judge.beats) == 1)
        clock.advance(1.0)
        await until("the second", lambda: len(judge.beats) == 2)
        daemon.cancel()  # the daemon's end goes away (as when the daemon is started again)
        await until("the channel closed", lambda: theirs.fileno() == -1)
        clock.advance(1.0)
        await until("the third beat over HTTP", lambda: ctx.client.sent("POST", "/beat"))
        clock.advance(1.0)
        await until("the fourth", lambda: len(ctx.client.sent("POST", "/beat")) == 2)
    finally:
        loop.cancel()
    assert [b.seq for b in judge.beats] == [0, 1]
    assert [b.seq for b in ctx.client.sent("POST", "/beat")] == [2, 3]  # that same beat, then the next, over HTTP


@pytest.mark.parametrize("daemon_says", [b"", b"half a line", b"[1, 2]\n", b"{\"status\": 200}\n"])
def test_a_channel_that_fails_leaves_the_beats_to_http(daemon_says):
    async def main():
        ours, theirs = _pair()
        theirs.sendall(daemon_says)
        theirs.close()
        return await BeatChannel(ours).beat(_beat(), timeout=5), ours.fileno()

    assert asyncio.run(main()) == (None, -1)


def test_the_channel_is_found_by_its_variable_and_only_if_it_is_a_unix_stream(monkeypatch):
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    r, w = os.pipe()
    try:
        monkeypatch.setenv("TRON_BEAT_FD", str(ours.fileno()))
        found = beat_channel()
        assert found is not None and found.sock.fileno() == ours.fileno() and "TRON_BEAT_FD" not in os.environ
        found.sock.detach()
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
