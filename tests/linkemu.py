"""A userspace link between the root network namespace and a node's, with loss and delay.

Some kernels (this machine's, CI's) are built without ``sch_netem``, so ``tc netem`` cannot shape
a veth. This program replaces the veth pair by two TUN devices (IP packets, no packet info): one
in the root namespace, one inside the node's namespace, and copies packets between them. Each
packet is dropped with the configured probability, or held for the configured delay (a heap of
due times, at most ``QUEUE`` packets per direction: beyond that, dropped like a full qdisc).

    python tests/linkemu.py NETNS HOST_IF NODE_IF

It creates the root side ``HOST_IF`` in the namespace it runs in, enters ``/run/netns/NETNS``
(``setns``) to create ``NODE_IF`` there, and goes back: it is no process of the node's namespace
(``ip netns pids`` does not list it, and ending the node's processes leaves the link alone).
Addresses and ``up`` are the caller's (``ip addr``). Both devices belong to this process: they
disappear when it exits.

Control, on stdin, one line each, answered ``ok`` (or ``error: ...``) on stdout:
``set LOSS DELAY_MS`` (LOSS a fraction, 0..1), ``down`` (drop everything), ``up``, ``clear``
(no loss, no delay, up). EOF on stdin ends it. The first line on stdout is ``ready`` once both
devices exist. Either device set down (``ip link set DEV down``, as `tron drill partition` does)
also drops everything in both directions, as a veth pair's peer loses carrier.

Standard library only.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import heapq
import os
import random
import selectors
import socket
import struct
import sys
import time

TUNSETIFF = 0x400454CA
IFF_TUN, IFF_NO_PI = 0x0001, 0x1000
IFF_UP = 0x1
SIOCGIFFLAGS = 0x8913
CLONE_NEWNET = 0x40000000
QUEUE = 4096  # packets held per direction
MTU = 65535


def open_tun(name: str) -> int:
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH22x", name.encode(), IFF_TUN | IFF_NO_PI))
    except OSError:
        os.close(fd)
        raise
    return fd


def setns(fd: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


def is_up(sock: socket.socket, name: str) -> bool:
    """The device's administrative state, asked in the namespace ``sock`` was made in."""
    try:
        answer = fcntl.ioctl(sock.fileno(), SIOCGIFFLAGS, struct.pack("16sH22x", name.encode(), 0))
    except OSError:
        return False
    return bool(struct.unpack("16sH22x", answer)[1] & IFF_UP)


class Direction:
    """Packets read from ``src``, written to ``dst`` when due."""

    def __init__(self, src: int, dst: int) -> None:
        self.src, self.dst = src, dst
        self.held: list[tuple[float, int, bytes]] = []
        self.seq = 0

    def take(self, link: Link) -> None:
        while True:
            try:
                packet = os.read(self.src, MTU)
            except BlockingIOError:
                return
            except OSError as err:  # the device went down under us
                if err.errno in (errno.EIO, errno.EBADFD):
                    return
                raise
            if not link.passes() or len(self.held) >= QUEUE:
                continue
            self.seq += 1
            heapq.heappush(self.held, (time.monotonic() + link.delay, self.seq, packet))

    def flush(self, link: Link) -> float | None:
        """Write what is due; the seconds until the next packet is (None: nothing held)."""
        now = time.monotonic()
        while self.held and self.held[0][0] <= now:
            _, _, packet = heapq.heappop(self.held)
            if link.open():
                try:
                    os.write(self.dst, packet)
                except OSError:  # a down device, a full queue: the packet is lost, as on a wire
                    pass
        return self.held[0][0] - now if self.held else None


class Link:
    def __init__(self, host_if: str, node_if: str, host_sock: socket.socket, node_sock: socket.socket) -> None:
        self.loss, self.delay, self.down = 0.0, 0.0, False
        self.names = ((host_sock, host_if), (node_sock, node_if))

    def open(self) -> bool:
        return not self.down and all(is_up(sock, name) for sock, name in self.names)

    def passes(self) -> bool:
        return self.open() and (self.loss <= 0 or random.random() >= self.loss)

    def control(self, line: str) -> str:
        words = line.split()
        if words == ["down"]:
            self.down = True
        elif words == ["up"]:
            self.down = False
        elif words == ["clear"]:
            self.loss, self.delay, self.down = 0.0, 0.0, False
        elif len(words) == 3 and words[0] == "set":
            try:
                loss, delay = float(words[1]), float(words[2]) / 1000
            except ValueError:
                return f"error: not numbers: {line.strip()!r}"
            if not (0 <= loss <= 1 and 0 <= delay <= 60):
                return f"error: loss must be 0..1 and delay 0..60000 ms: {line.strip()!r}"
            self.loss, self.delay = loss, delay
        else:
            return f"error: unknown command {line.strip()!r} (set LOSS DELAY_MS | down | up | clear)"
        return "ok"


def main(netns: str, host_if: str, node_if: str) -> int:
    try:  # a wire, not one more process competing for a loaded machine's CPU: ahead of the meshes' processes
        os.setpriority(os.PRIO_PROCESS, 0, -10)
    except OSError:
        pass
    here = os.open("/proc/self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    there = os.open(f"/run/netns/{netns}", os.O_RDONLY | os.O_CLOEXEC)
    host_fd = open_tun(host_if)
    host_sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    setns(there)
    try:
        node_fd = open_tun(node_if)
        node_sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    finally:
        setns(here)
    os.close(here)
    os.close(there)
    link = Link(host_if, node_if, host_sock, node_sock)
    ways = {host_fd: Direction(host_fd, node_fd), node_fd: Direction(node_fd, host_fd)}
    sel = selectors.DefaultSelector()
    for fd in ways:
        sel.register(fd, selectors.EVENT_READ)
    stdin = sys.stdin.fileno()
    sel.register(stdin, selectors.EVENT_READ)
    pending = b""
    print("ready", flush=True)
    while True:
        waits = [w for w in (d.flush(link) for d in ways.values()) if w is not None]
        for key, _ in sel.select(max(0.0, min(waits)) if waits else None):
            if key.fd == stdin:
                chunk = os.read(stdin, 4096)
                if not chunk:
                    return 0
                pending += chunk
                while b"\n" in pending:
                    line, pending = pending.split(b"\n", 1)
                    print(link.control(line.decode(errors="replace")), flush=True)
            else:
                ways[key.fd].take(link)


if __name__ == "__main__":
    if len(sys.argv) != 4:
        sys.exit("usage: linkemu.py NETNS HOST_IF NODE_IF")
    sys.exit(main(*sys.argv[1:]))
