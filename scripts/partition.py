"""A real network partition for `tron drill partition` (scripts/drills.py): the link that
carries a node's traffic, taken down on this machine and brought back up, whatever ends the
drill (its end, an error, Ctrl-C, SIGTERM; only a SIGKILL of the CLI leaves it down, and
`ip link set DEV up` brings it back).

The link is the device of this machine's route to the node (``ip route get``). It must be a
link of that node's own (a veth of a network namespace, a point-to-point or a dedicated NIC):
taking down the device of the default route or loopback would cut this machine off, and is
refused.
"""

from __future__ import annotations

import contextlib
import re
import signal
import subprocess


class PartitionError(Exception):
    """The partition cannot be made here; the message says why."""


def _ip(*args: str) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    except FileNotFoundError:
        raise PartitionError("no `ip` command on this machine (apt-get install iproute2)") from None


def link_to(address: str) -> str:
    """The device this machine reaches ``address`` through, if it may be cut for a partition."""
    route = _ip("-o", "route", "get", address)
    found = re.search(r"\bdev (\S+)", route.stdout)
    if route.returncode != 0 or not found:
        raise PartitionError(f"no route to {address} on this machine: {route.stderr.strip() or route.stdout.strip()}")
    dev = found.group(1)
    if dev == "lo":
        raise PartitionError(f"{address} is this machine (reached through lo): a node on loopback shares this "
                             "machine's network and cannot be partitioned from it")
    default = _ip("-o", "route", "show", "default").stdout
    if re.search(rf"\bdev {re.escape(dev)}\b", default):
        raise PartitionError(f"{address} is reached through {dev}, which also carries this machine's default "
                             "route: taking it down would cut this machine off; partition a node with a link of its "
                             "own (a veth, a dedicated interface)")
    return dev


def set_link(dev: str, up: bool) -> None:
    done = _ip("link", "set", dev, "up" if up else "down")
    if done.returncode != 0:
        raise PartitionError(f"ip link set {dev} {'up' if up else 'down'}: {done.stderr.strip()} (root needed)")


def _interrupted(signum, frame) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


@contextlib.contextmanager
def cut(dev: str):
    """``dev`` down inside the block, up again when it ends however it ends (SIGTERM included)."""
    previous = signal.signal(signal.SIGTERM, _interrupted)
    try:
        set_link(dev, False)
        try:
            yield dev
        finally:
            set_link(dev, True)
    finally:
        signal.signal(signal.SIGTERM, previous)
