"""The Unix user at the other end of a request, as the kernel says: what an audit row names
beside the credential. The operator's token is one file any of its readers may use, and a
copied token acts as its owner's; the user behind the connection cannot be claimed.

On loopback TCP (the CLI, a browser on this machine) the peer's socket is looked up by
netlink (``sockdiag.owner``: the user that made it); on a Unix socket, ``SO_PEERCRED``. A
peer on another machine (a node's relay) has no user here: None."""

from __future__ import annotations

import ipaddress
import socket
import struct

from aiohttp import web

from tron.common.processes import user_label
from tron.services.daemon import sockdiag

_CRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


def unix_user(request: web.BaseRequest) -> str | None:
    """``name (uid N)`` of whoever made the request's connection, if it is on this machine."""
    transport = request.transport
    sock = transport.get_extra_info("socket") if transport is not None else None
    if sock is None:
        return None
    try:
        if sock.family == socket.AF_UNIX:
            uid: int | None = _CRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _CRED.size))[1]
        elif sock.family == socket.AF_INET:
            peer, local = transport.get_extra_info("peername"), transport.get_extra_info("sockname")
            if not peer or not local or not ipaddress.ip_address(peer[0]).is_loopback:
                return None
            uid = sockdiag.owner((peer[0], peer[1]), (local[0], local[1]))
        else:
            return None
    except (OSError, ValueError, struct.error):
        return None
    return None if uid is None else user_label(uid)
