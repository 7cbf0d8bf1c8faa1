"""Which replica accepted a connection, for replicas that share one listening socket.

A replicated program's replicas take their connections from the one socket the daemon
holds (``socket = "inherit"``): the kernel hands each new connection to whichever replica
accepts first. A probe sent to that port is therefore answered by *some* replica, and an
answer proves nothing about the replica being probed: one still importing, hung, or gone
would be reported healthy by its siblings. So a probe of such a replica counts only when the
connection it made was accepted by that replica's own processes.

The kernel says who: it finds the server side of the probe's connection (local address
the port, remote address the probe's own; one exact sock_diag lookup, /proc/net/tcp where
netlink is not allowed), with inode 0 while it waits in the listening socket's queue and
the inode of the accepted socket once a process took it; that inode is then among the
accepting process's descriptors (/proc/PID/fd).
"""

from __future__ import annotations

import asyncio
import itertools
from typing import Callable, Iterable

from tron.common.processes import holds_socket
from tron.services.daemon import sockdiag

# s between looks while the connection waits to be accepted: a process that serves takes
# it within a fraction of a millisecond, one that is busy or not serving yet may never.
POLLS = (0.0002, 0.0005, 0.001)
POLL = 0.002


def server_inode(port: int, peer: tuple[str, int], host: str = "127.0.0.1") -> int | None:
    """The inode of the server side of the connection from ``peer`` to ``host:port``: 0 while
    no process has accepted it yet, None when there is no such connection, or it was closed
    before a process could be told apart (refused, or accepted and closed at once)."""
    found = sockdiag.connection((host, port), peer)
    if found is None:
        return None
    state, inode = found
    return inode if inode or state == sockdiag.TCP_ESTABLISHED else None


async def accepted_by(port: int, peer: tuple[str, int], pids: Callable[[], Iterable[int]],
                      host: str = "127.0.0.1") -> bool | None:
    """Whether the connection from ``peer`` to ``host:port`` was accepted by one of ``pids()``
    (waits until some process accepts it: the probe's timeout bounds the wait). None when
    the connection is gone before anyone could be told apart."""
    for look in itertools.count():
        inode = server_inode(port, peer, host)
        if inode is None:
            return None
        if inode:
            break
        await asyncio.sleep(POLLS[look] if look < len(POLLS) else POLL)
    # Accepted: the descriptor is installed a moment after the socket gets its inode.
    ours, wanted = set(pids()), {str(inode)}
    for _ in range(3):
        if holds_socket(ours, wanted) is True:
            return True
        await asyncio.sleep(POLL)
    return False
