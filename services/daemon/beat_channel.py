"""An agent's beats on a connection of its own to the daemon, not over HTTP.

An agent the fork server starts gets a Unix connection to the daemon: a standby's (forkserver.py),
kept after its spawn was handed over on it, or one end of a socket pair sent with the spawn
request (the spawn line's ``"channel"``). The agent's runtime finds it at ``TRON_BEAT_FD`` and
beats there, one JSON line each, from its first beat on (common/service.py); each is judged
exactly as ``POST /beat`` judges it, and the answer goes back on the line (``{"seq": <the beat's>,
"status": 200, "answer": <POST /beat's body>}``, or the status and body a refused beat has). If the channel
fails (the daemon was started again, a malformed line), the agent beats over HTTP from then on.

Why: the first beat is what tells the daemon a new incarnation serves (supervisor.py), so it is
on every restart's path. Over HTTP it cost the new incarnation a client session, a TCP
connection and a request (~2 ms of CPU here), and the daemon's loop an accept and a request
through its whole middleware stack; in a crash wave twenty of those queue on that one loop.
And every beat after it cost the daemon ~1 ms of its loop: a hundred agents kept it 10 % busy.

Trust: only this incarnation holds the other end (the daemon handed it over at its start, not
inherited by what it runs), and it may speak for itself only: a beat that names another service
or incarnation is refused (403), as ``POST /beat`` refuses one its credential does not cover.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
from collections.abc import Awaitable, Callable

from pydantic import ValidationError

from tron.common.models import MAX_BODY, Beat

log = logging.getLogger("tron.daemon")

Judge = Callable[[Beat], Awaitable[tuple[int, dict]]]


async def serve_beats(conn: socket.socket, service: str, incarnation: str, judge: Judge, *,
                      first_within: float, head: bytes = b"", taken: Callable[[], None] | None = None) -> int:
    """Judge and answer the beats of ``service``/``incarnation`` on ``conn`` (after ``head``,
    read from it already) until it closes; closes ``conn``. The first must come within
    ``first_within`` seconds (else the incarnation beats over HTTP, or is gone). A line that
    is not a beat (400) or a beat that speaks for anyone else (403) is answered and ends the
    channel: the incarnation beats over HTTP from then on. ``taken`` is called for each beat
    accepted. Returns how many were judged."""
    judged = 0
    try:
        # A stream: the connection stays registered with the loop between beats.
        reader, writer = await asyncio.open_unix_connection(sock=conn, limit=MAX_BODY)
    except OSError:
        conn.close()
        return judged
    if head:
        reader.feed_data(head)
    try:
        while True:
            try:
                async with asyncio.timeout(None if judged else first_within):
                    line = await reader.readline()
            except (TimeoutError, OSError, ValueError) as err:  # ValueError: a line past the limit
                if not isinstance(err, TimeoutError):
                    log.debug("%s: its beat channel failed: %s", service, err)
                return judged
            if not line.endswith(b"\n"):
                return judged  # closed (a last line cut short is no beat)
            try:
                beat = Beat.model_validate_json(line)
            except ValidationError as err:
                log.warning("%s: a line on its beat channel that is not a beat: %s", service, str(err).splitlines()[0],
                            extra={"offender": service, "incarnation": incarnation})
                _answer(writer, 400, {"error": "malformed beat: this channel is closed, beat over HTTP"})
                return judged
            if (beat.service, beat.incarnation) != (service, incarnation):
                _answer(writer, 403, {"error": f"this channel is {service}/{incarnation}'s, not "
                                               f"{beat.service}/{beat.incarnation}'s"})
                return judged
            # Shielded: the channel ended (its incarnation replaced) never cuts a judgement short,
            # as a POST /beat under way is not cut short either. An error in it is the daemon's,
            # not the channel's: it is raised (and logged by whoever runs this).
            status, answer = await asyncio.shield(judge(beat))
            judged += 1
            if taken is not None and status == 200:
                taken()
            try:
                _answer(writer, status, answer, seq=beat.seq)
            except OSError:
                return judged
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()


def _answer(writer: asyncio.StreamWriter, status: int, answer: dict, *, seq: int | None = None) -> None:
    """``seq``: the beat's (an answer the agent waited for in vain is passed over by the next
    one); None for a refusal of the line itself, which ends the channel. A few hundred bytes
    once a beat interval: the kernel's buffer takes them, nothing waits for a drain (an agent
    that reads none of them fills its own end, and its beats then time out)."""
    writer.write(json.dumps({"seq": seq, "status": status, "answer": answer}).encode() + b"\n")
