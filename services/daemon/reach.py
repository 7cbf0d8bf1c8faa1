"""A service's log and a drill's fault, reached wherever the service runs.

On one machine the daemon reads the service's log file and signals its pid itself. On a
Ray cluster (``[cluster] engine = "ray"``) the process and its log are on another node:
the daemon asks that node's agent (services/daemon/ray_spawner.py ``read_log``,
``signal_child``, ``processes``, which call services/daemon/node_agent.py). Either way the
answer has the same shape, so ``tron logs``, the web UI's log pane and ``tron drill
kill|hang`` never need to know where a service runs, and never act on a pid of the
machine they happen to run on.

    GET  /services/{name}/log        a chunk of its log from a cursor (logread.py)
    POST /services/{name}/signal     a drill's fault: kill | stop | cont, for one incarnation
    GET  /services/{name}/processes  what is left of one incarnation's process tree
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from typing import Literal

from pydantic import Field

from tron.common.models import IdStr, Msg
from tron.common.processes import describe, same_process, tree_of
from tron.services.daemon.audit import Refused
from tron.services.daemon.logread import MAX_CHUNK, MAX_LINES, read_log
from tron.services.daemon.spawner import ClusterControl, SpawnError

SIGNALS = {"kill": signal.SIGKILL, "stop": signal.SIGSTOP, "cont": signal.SIGCONT}


class LogQuery(Msg):
    """``GET /services/{name}/log``: no cursor for the last ``lines``; a cursor to go on."""

    inode: int | None = Field(None, ge=0)
    offset: int | None = Field(None, ge=0)
    node: str = Field("", max_length=64, pattern=r"^[0-9a-f]*$")  # where the cursor was read ("" this machine)
    lines: int = Field(20, ge=0, le=MAX_LINES)
    max_bytes: int = Field(MAX_CHUNK, ge=1024, le=MAX_CHUNK)
    skip_over: int | None = Field(None, ge=1024)  # fallen further behind: skip to the newest max_bytes


class SignalRequest(Msg):
    """``POST /services/{name}/signal``: a drill's fault, for the incarnation the drill saw."""

    signal: Literal["kill", "stop", "cont"]
    incarnation: IdStr
    reason: str = Field("drill", min_length=1, max_length=256)
    request_id: IdStr | None = None


class ProcessesQuery(Msg):
    incarnation: IdStr
    pid: int = Field(ge=1, le=2**31)
    node: str = Field("", max_length=64, pattern=r"^[0-9a-f]*$")


def node_of(daemon, name: str) -> str | None:
    """The Ray node a service runs on (or ran on last); None: this machine."""
    svc = daemon.sup.services[name]
    if svc.child is not None and svc.child.node:
        return svc.child.node
    return daemon.cluster.node_placed(name) if daemon.cluster is not None else None


def _remote(daemon) -> ClusterControl:
    if daemon.cluster is None:
        raise Refused(400, "a node was named, but this mesh runs on one machine ([cluster] engine is \"local\")")
    return daemon.cluster


async def service_log(daemon, name: str, q: LogQuery) -> dict:
    """A chunk of ``name``'s log, from its node's file (SpawnError: that node cannot be asked)."""
    node = node_of(daemon, name)
    cursor = {"inode": q.inode, "offset": q.offset, "lines": q.lines, "max_bytes": q.max_bytes,
              "skip_over": q.skip_over, "moved": q.inode is not None and q.node != (node or "")}
    path = daemon.home.log_file(name)
    if node is None:
        answer = await asyncio.to_thread(read_log, path, **cursor)
    else:
        answer = await _remote(daemon).read_log(node, str(path), cursor)
    return {"service": name, "node": node or "", **answer}


async def signal_service(daemon, name: str, req: SignalRequest) -> dict:
    """Send a drill's signal to the incarnation the drill saw, through its spawner: the pid
    on this machine, or the node agent's child on a Ray node. Refused (409) when that
    incarnation is no longer the one running: a drill never hits its successor."""
    svc = daemon.sup.services[name]
    child = svc.child
    if child is None or not child.alive or svc.incarnation != req.incarnation or child.incarnation != req.incarnation:
        raise Refused(409, f"{name} is not running incarnation {req.incarnation} (now: {svc.incarnation}, "
                           f"{svc.state}): nothing was signalled")
    sig = SIGNALS[req.signal]
    sent = time.monotonic()  # not the injected clock: a drill on this machine starts its own from it
    if child.node:
        try:
            answer = await _remote(daemon).signal_child(child, sig)
        except SpawnError as err:
            raise Refused(503, str(err)) from None
        if not answer.get("ok"):
            raise Refused(409, f"node {child.node[:8]}: {answer.get('error')}")
    else:
        if not same_process(child.pid, child.create_time):
            raise Refused(409, f"pid {child.pid} of {name} is gone already: nothing was signalled")
        os.kill(child.pid, sig)
    return {"status": f"signalled {req.signal}", "service": name, "incarnation": child.incarnation,
            "pid": child.pid, "node": child.node or "", "signal": int(sig), "sent_mono": sent}


async def leftover_processes(daemon, name: str, q: ProcessesQuery) -> list[str]:
    """What is left of one incarnation's tree, read on the node it ran on."""
    if q.node:
        try:
            return await _remote(daemon).processes(q.node, q.pid, q.incarnation)
        except SpawnError as err:
            raise Refused(503, str(err)) from None
    return await asyncio.to_thread(lambda: describe(tree_of(q.pid, q.incarnation)))
