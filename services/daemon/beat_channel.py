"""An agent's first beat on its standby's connection, not over HTTP.

A standby (forkserver.py) waits on a Unix connection to the daemon for its spawn. The daemon
asks it to keep that connection (the spawn line's ``"channel"``): the agent's runtime finds
it at ``TRON_BEAT_FD`` and sends its first beat there, one JSON line, as soon as it serves
(common/service.py); the beat is judged exactly as ``POST /beat`` judges it, and the answer
goes back on the line (``{"status": 200, "answer": <POST /beat's body>}``, or the status and
body a refused beat has), then both ends close it. Every later beat goes over HTTP.

Why: a first beat is what tells the daemon a new incarnation serves (supervisor.py), so it is
on every restart's path. Over HTTP it cost the new incarnation a client session, a TCP
connection and a request (~2 ms of CPU here), and the daemon's loop an accept and a request
through its whole middleware stack; in a crash wave twenty of those queue on that one loop.

Trust: only this incarnation holds the other end (the daemon forked it and handed it its
spawn there), and it may speak for itself only: a beat that names another service or
incarnation is refused (403), as ``POST /beat`` refuses one its credential does not cover.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
from collections.abc import Awaitable, Callable

from pydantic import ValidationError

from tron.common.models import MAX_BODY, Beat

log = logging.getLogger("tron.daemon")

Judge = Callable[[Beat], Awaitable[tuple[int, dict]]]


async def read_line(conn: socket.socket, limit: int = MAX_BODY, head: bytes = b"") -> bytes:
    """One line (without its newline) from a non-blocking connection, after ``head`` (read
    from it already); b"" when it closed first. Raises ValueError past ``limit`` bytes."""
    loop = asyncio.get_running_loop()
    data = head
    while b"\n" not in data:
        chunk = await loop.sock_recv(conn, 1 << 16)
        if not chunk:
            return b""
        data += chunk
        if len(data) > limit:
            raise ValueError(f"a line longer than {limit} bytes")
    return data.split(b"\n", 1)[0]


async def first_beat(conn: socket.socket, service: str, incarnation: str, judge: Judge, *,
                     timeout: float, head: bytes = b"") -> bool:
    """Read the first beat of ``service``/``incarnation`` on ``conn`` (after ``head``, read
    from it already), judge it and answer; closes ``conn``. True when a beat was judged;
    False when none came within ``timeout`` (the incarnation died, or beats over HTTP from
    the start) or it was not one."""
    try:
        async with asyncio.timeout(timeout):
            line = await read_line(conn, head=head)
            if not line:
                return False
            try:
                beat = Beat.model_validate_json(line)
            except ValidationError as err:
                log.warning("%s: a first beat on its standby's channel that is not one: %s", service,
                            str(err).splitlines()[0], extra={"offender": service, "incarnation": incarnation})
                await _answer(conn, 400, {"error": "malformed beat"})
                return False
            if (beat.service, beat.incarnation) != (service, incarnation):
                await _answer(conn, 403, {"error": f"this channel is {service}/{incarnation}'s, not "
                                                   f"{beat.service}/{beat.incarnation}'s"})
                return False
            status, answer = await judge(beat)
            await _answer(conn, status, answer)
            return True
    except (TimeoutError, OSError, ValueError) as err:
        if not isinstance(err, TimeoutError):
            log.debug("%s: its standby's channel failed: %s", service, err)
        return False
    finally:
        conn.close()


async def _answer(conn: socket.socket, status: int, answer: dict) -> None:
    line = json.dumps({"status": status, "answer": answer}).encode() + b"\n"
    await asyncio.get_running_loop().sock_sendall(conn, line)
