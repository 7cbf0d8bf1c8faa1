"""Which sockets listen on a TCP port, asked of the kernel by netlink (sock_diag, what
``ss -ltn`` uses). Reading /proc/net/tcp makes the kernel print every TCP socket on the
machine: 11 ms on a host with 1,700 of them, paid on every start check. A sock_diag dump of
listening sockets only is a few dozen entries. Falls back to /proc where netlink is not
allowed (some containers)."""

from __future__ import annotations

import os
import socket
import struct

NETLINK_SOCK_DIAG = 4
SOCK_DIAG_BY_FAMILY = 20
NLM_F_REQUEST, NLM_F_DUMP = 0x1, 0x300
NLMSG_ERROR, NLMSG_DONE = 2, 3
TCP_LISTEN = 10
_HEADER = struct.Struct("=IHHII")  # nlmsghdr: len, type, flags, seq, pid
_REQUEST = struct.Struct("=BBBBI48s")  # inet_diag_req_v2: family, protocol, ext, pad, states, sockid
_MSG = struct.Struct("=BBBB2s2s16s16sI8sIIIII")  # inet_diag_msg, up to the inode


def _dump(family: int) -> list[tuple[int, int]]:
    """(port, inode) of every listening TCP socket of one address family."""
    request = _REQUEST.pack(family, socket.IPPROTO_TCP, 0, 0, 1 << TCP_LISTEN, b"\0" * 48)
    header = _HEADER.pack(_HEADER.size + len(request), SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST | NLM_F_DUMP, 1, 0)
    out = []
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_SOCK_DIAG) as nl:
        nl.settimeout(1.0)
        nl.sendto(header + request, (0, 0))
        while True:
            data = nl.recv(65536)
            offset = 0
            while offset + _HEADER.size <= len(data):
                length, kind, _, _, _ = _HEADER.unpack_from(data, offset)
                if kind == NLMSG_DONE:
                    return out
                if kind == NLMSG_ERROR or length < _HEADER.size:
                    raise OSError("sock_diag refused the dump")
                fields = _MSG.unpack_from(data, offset + _HEADER.size)
                out.append((struct.unpack("!H", fields[4])[0], fields[14]))
                offset += (length + 3) & ~3


def _from_proc(port: int) -> set[str]:
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                lines = f.read().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) > 9 and fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                inodes.add(fields[9])
    return inodes


_netlink_ok = hasattr(socket, "AF_NETLINK") and os.path.exists("/proc/net/netlink")


def listening_inodes(port: int) -> set[str]:
    """Inodes of the sockets listening on TCP ``port`` (IPv4 and IPv6), as strings, the
    way /proc/<pid>/fd names them (socket:[inode])."""
    global _netlink_ok
    if _netlink_ok:
        try:
            return {str(inode) for family in (socket.AF_INET, socket.AF_INET6)
                    for p, inode in _dump(family) if p == port}
        except OSError:
            _netlink_ok = False  # not allowed here: /proc from now on
    return _from_proc(port)


TCP_ESTABLISHED = 1
_NOCOOKIE = b"\xff" * 8  # INET_DIAG_NOCOOKIE: any socket with this address
_ERRNO = struct.Struct("=i")


def connection(local: tuple[str, int], remote: tuple[str, int]) -> tuple[int, int] | None:
    """(state, inode) of the IPv4 TCP socket at ``local`` connected to ``remote`` (inode 0:
    no process holds it yet, as a connection waiting in a listener's queue); None when there
    is none. One exact lookup by netlink, not a dump of every socket (acceptor.py asks it
    every few ms while a connection waits); /proc/net/tcp where netlink is not allowed."""
    found = _find(local, remote)
    return found[:2] if found else None


def owner(local: tuple[str, int], remote: tuple[str, int]) -> int | None:
    """The Unix user id that made the IPv4 TCP socket at ``local`` connected to ``remote``:
    on loopback, the user of the process at the other end of a connection we accepted (its
    ``local`` is our peer's address). None when there is no such socket."""
    found = _find(local, remote)
    return found[2] if found else None


def _find(local: tuple[str, int], remote: tuple[str, int]) -> tuple[int, int, int] | None:
    global _netlink_ok
    if _netlink_ok:
        try:
            return _lookup(local, remote)
        except OSError:
            _netlink_ok = False  # not allowed here: /proc from now on
    return _connection_from_proc(local, remote)


def _hex(host: str, port: int) -> str:
    """An IPv4 address as /proc/net/tcp writes it (the address in host order, hex)."""
    return f"{struct.unpack('<I', socket.inet_aton(host))[0]:08X}:{port:04X}"


def _connection_from_proc(local: tuple[str, int], remote: tuple[str, int],
                          table: str = "/proc/net/tcp") -> tuple[int, int, int] | None:
    want_local, want_remote = _hex(*local), _hex(*remote)
    with open(table) as f:
        next(f, None)
        for line in f:
            fields = line.split()
            if len(fields) > 9 and fields[1] == want_local and fields[2] == want_remote:
                return int(fields[3], 16), int(fields[9]), int(fields[7])
    return None


def _lookup(local: tuple[str, int], remote: tuple[str, int]) -> tuple[int, int, int] | None:
    sockid = (struct.pack("!HH", local[1], remote[1]) + socket.inet_aton(local[0]) + b"\0" * 12
              + socket.inet_aton(remote[0]) + b"\0" * 12 + struct.pack("=I", 0) + _NOCOOKIE)
    request = _REQUEST.pack(socket.AF_INET, socket.IPPROTO_TCP, 0, 0, 0xFFFFFFFF, sockid)
    header = _HEADER.pack(_HEADER.size + len(request), SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST, 1, 0)
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_SOCK_DIAG) as nl:
        nl.settimeout(1.0)
        nl.sendto(header + request, (0, 0))
        data = nl.recv(65536)
    _, kind, _, _, _ = _HEADER.unpack_from(data, 0)
    if kind == NLMSG_ERROR:
        err = -_ERRNO.unpack_from(data, _HEADER.size)[0]
        if err == 0 or err == 2:  # ENOENT: no such socket
            return None
        raise OSError(err, os.strerror(err))
    fields = _MSG.unpack_from(data, _HEADER.size)
    if struct.unpack("!H", fields[5])[0] != remote[1]:
        return None  # the lookup fell back to the listener: the connection itself is gone
    return fields[1], fields[14], fields[13]
