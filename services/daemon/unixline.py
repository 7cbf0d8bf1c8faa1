"""One JSON request line over a unix socket, descriptors alongside (SCM_RIGHTS), and its
answer line: how the daemon talks to its helpers (the fork server, the log pump). ``ask``
(blocking) and ``ask_async`` (on the event loop) are the daemon's side, ``receive`` the
helper's."""

from __future__ import annotations

import json
import os
import socket


def ask(sock_path: str, req: dict, *, timeout: float, fds: tuple[int, ...] = ()) -> dict | None:
    """The answer, parsed; None when the helper closed without one. Raises OSError (not
    there, timed out) and ValueError (not JSON)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        conn.settimeout(timeout)
        conn.connect(sock_path)
        socket.send_fds(conn, [json.dumps(req).encode() + b"\n"], list(fds))
        data = b""
        while not data.endswith(b"\n"):
            chunk = conn.recv(1 << 16)
            if not chunk:
                break
            data += chunk
    return json.loads(data) if data else None


def ask_fds(sock_path: str, req: dict, *, timeout: float, max_fds: int = 253) -> tuple[dict | None, list[int]]:
    """``ask``, and the descriptors sent with the answer (the caller closes them)."""
    fds: list[int] = []
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        conn.settimeout(timeout)
        conn.connect(sock_path)
        conn.sendall(json.dumps(req).encode() + b"\n")
        data = b""
        while not data.endswith(b"\n"):
            chunk, got, _, _ = socket.recv_fds(conn, 1 << 16, max_fds - len(fds))
            for fd in got:  # ours to hold, not to leak into what we spawn (3.11's recv_fds drops its flags
                os.set_inheritable(fd, False)  # argument, so MSG_CMSG_CLOEXEC cannot ask for it)
            fds += got
            if not chunk:
                break
            data += chunk
    try:
        return (json.loads(data) if data else None), fds
    except ValueError:
        for fd in fds:
            os.close(fd)
        raise


async def ask_async(sock_path: str, req: dict, *, timeout: float, fds: tuple[int, ...] = ()) -> dict | None:
    """``ask`` on the running loop, without a worker thread: a restart waits for no thread
    of the pool (six here, which twenty concurrent restarts queued behind). Raises OSError
    (not there, refused, timed out) and ValueError (not JSON)."""
    answer, conn = await ask_keep_async(sock_path, req, timeout=timeout, fds=fds)
    conn.close()
    return answer


async def ask_keep_async(sock_path: str, req: dict, *, timeout: float,
                         fds: tuple[int, ...] = ()) -> tuple[dict | None, socket.socket]:
    """``ask_async``, and the connection stays open for ``ask_on_async`` (the caller closes
    it): a fork server's standby waits on it for its spawn."""
    import asyncio  # here: the fork server imports this module before anything heavy

    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    conn.setblocking(False)
    try:
        async with asyncio.timeout(timeout):
            await asyncio.get_running_loop().sock_connect(conn, sock_path)
        return await ask_on_async(conn, req, timeout=timeout, fds=fds), conn
    except BaseException:
        conn.close()
        raise


async def ask_on_async(conn: socket.socket, req: dict, *, timeout: float, fds: tuple[int, ...] = (),
                       rest: bytearray | None = None) -> dict | None:
    """One request line and its answer on an open, non-blocking connection. What came
    after the answer's line (the connection goes on: a standby's first beat) is added to
    ``rest``."""
    import asyncio

    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(timeout):
            line = json.dumps(req).encode() + b"\n"
            # The descriptors go with the first bytes; a fresh socket's buffer takes the whole
            # line, and what it did not is sent after them.
            sent = socket.send_fds(conn, [line], list(fds))
            if sent < len(line):
                await loop.sock_sendall(conn, line[sent:])
            data = b""
            while b"\n" not in data:
                chunk = await loop.sock_recv(conn, 1 << 16)
                if not chunk:
                    break
                data += chunk
    except TimeoutError:
        raise OSError(f"no answer within {timeout}s") from None
    line, _, after = data.partition(b"\n")
    if rest is not None:
        rest += after
    return json.loads(line) if line else None


def receive(conn: socket.socket, max_fds: int) -> tuple[bytes, list[int]]:
    """One request line, and the descriptors sent with it (up to ``max_fds``)."""
    data, fds, _, _ = socket.recv_fds(conn, 1 << 16, max_fds)
    while data and not data.endswith(b"\n"):
        more = conn.recv(1 << 16)
        if not more:
            break
        data += more
    return data, list(fds)
