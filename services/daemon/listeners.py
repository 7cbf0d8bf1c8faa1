"""Listening sockets the daemon holds across restarts (systemd's socket activation).

The daemon binds a service's port once and hands the socket to every incarnation as fd 3
with ``LISTEN_FDS=1``, ``LISTEN_PID`` (the incarnation's own pid) and ``LISTEN_FDNAMES``.
While one incarnation is dead and the next not yet accepting, callers wait in the
kernel's backlog instead of being refused. When the backlog is full, Linux drops the new
SYN (``tcp_abort_on_overflow`` = 0) and the client retransmits it (1 s later; then 1 s
apart for ``tcp_syn_linear_timeouts`` tries on Linux 6.x, doubling after): a caller sees a
delay, never a refusal. A program that calls listen() again on the socket it is handed
(uvicorn and every asyncio server do, with their own backlog) sets the backlog itself:
give it the same number (``uvicorn --backlog N``).

After a daemon restart the socket is recovered from the adopted incarnation's fd 3
(``pidfd_getfd``, Linux 5.6); when that is impossible it is bound again once the old
incarnation is gone, and the daemon says which.
"""

from __future__ import annotations

import ctypes
import errno
import os
import socket

from tron.services.daemon.sockdiag import listening_inodes

LISTEN_FD = 3  # SD_LISTEN_FDS_START
SYS_PIDFD_GETFD = 438  # x86_64 and arm64 alike (the generic syscall table)


class ListenerError(Exception):
    """The port cannot be bound: the message names it and who holds it."""


def open_listener(port: int, backlog: int, host: str = "127.0.0.1") -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(backlog)
    except OSError as err:
        sock.close()
        if err.errno == errno.EADDRINUSE:
            raise ListenerError(f"port {port} is already in use{holder_of(port)}") from None
        raise ListenerError(f"cannot listen on {host}:{port}: {err.strerror}") from None
    return sock


def holder_of(port: int) -> str:
    """' by pid N (name)' for the process listening on ``port``, when it can be found."""
    inodes = {f"socket:[{i}]" for i in listening_inodes(port)}
    if not inodes:
        return ""
    for pid in (int(p) for p in os.listdir("/proc") if p.isdigit()):
        try:
            if any(os.readlink(f"/proc/{pid}/fd/{fd}") in inodes for fd in os.listdir(f"/proc/{pid}/fd")):
                with open(f"/proc/{pid}/comm") as f:
                    return f" by pid {pid} ({f.read().strip()})"
        except OSError:
            continue
    return ""


def recover_listener(pid: int, port: int) -> socket.socket | None:
    """The listening socket an adopted incarnation holds at fd 3, duplicated into the
    daemon; None when it cannot be taken (gone, not permitted, not our socket)."""
    libc = ctypes.CDLL(None, use_errno=True)
    try:
        pidfd = os.pidfd_open(pid)
    except OSError:
        return None
    try:
        fd = libc.syscall(SYS_PIDFD_GETFD, pidfd, LISTEN_FD, 0)
    finally:
        os.close(pidfd)
    if fd < 0:
        return None
    try:
        sock = socket.socket(fileno=fd)
    except OSError:
        os.close(fd)
        return None
    try:
        listening = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
        bound = sock.getsockname()
    except OSError:
        listening, bound = 0, None
    if sock.type != socket.SOCK_STREAM or not listening or not isinstance(bound, tuple) or bound[1] != port:
        sock.close()
        return None
    return sock


def listen_env(name: str) -> dict[str, str]:
    """What an incarnation is told besides LISTEN_PID (which only it can know)."""
    return {"LISTEN_FDS": "1", "LISTEN_FDNAMES": name}
