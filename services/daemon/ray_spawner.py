"""The Ray spawner: agents placed on the nodes of a Ray cluster, restarted by Tron.

``[cluster] engine = "ray"`` swaps this in for ``LocalSpawner``. Ray does placement and
nothing else: on each Ray node runs one Tron node agent (services/daemon/node_agent.py),
a detached, named actor with ``max_restarts=0``, and the node agent runs the local
spawner and fork server for the services placed there. A kill -9 on a node is noticed by
that node's pidfd and restarted through the same node agent: the local path, tens of
milliseconds. Ray's own restarts stay off, so the ladder, its counts and its registry rows
stay the daemon's.

Placement, per service, among the live nodes that have its ``resources``: the node named
by ``node`` (a Ray node id or its first characters, or the node's address) whenever it is
there (a service moved off a lost node goes back at its next restart); else where it ran
last; else the node with the fewest of our services (spread).

A node is lost when its node agent dies (``RayActorError`` on the call awaiting a child's
exit) or Ray reports the node dead. Every child on it then exits as far as the daemon is
concerned ("node lost" in the alert), the ladder restarts it, and placement puts it on a
surviving node; its tasks resume from their checkpoints like after any restart.

Beats: each node agent gets a relay credential of its own (``relays.mint_relay``) and runs a
beat relay; the daemon is told every incarnation started or adopted through it
(``relays.relay_runs``), which is all that credential may beat for, and a lost node's
credential dies with it (services/daemon/beat_relay.py, services/daemon/access.py).

Cross-node facts: a child's pid and start time are its node's; the daemon never reads
/proc for a child whose ``node`` is set, and every deadline is the daemon's own clock.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import psutil

from tron.common.config import MeshConfig
from tron.services.daemon.node_agent import NAMESPACE, actor_name
from tron.common.processes import resident_bytes
from tron.services.daemon.ray_private import join_at_loopback
from tron.services.daemon.spawner import Child, ExitCallback, SpawnError, SpawnSpec

log = logging.getLogger("tron.ray")

CALL_TIMEOUT = 30.0  # a node agent that does not answer a spawn or stop in this long is lost
NODE_POLL = 1.0  # seconds between two reads of Ray's node table
AGENT_RETRY = 30.0  # a node whose agent died gets a new one no sooner (Ray may not know it is dead yet)


@dataclass
class Node:
    node_id: str
    ip: str
    resources: dict[str, float]
    alive: bool = True
    agent: object | None = None  # the node agent's actor handle
    joining: object | None = None  # a node agent created (or found) whose setup has not answered: close() ends it too
    info: dict = field(default_factory=dict)  # what its setup(), then its describe() each poll, said: pid, home, fork server
    describing: bool = False  # a describe() call to its agent is in flight
    cordoned: bool = False  # lost in a drill: nothing is placed here until it is restored
    retry_at: float = 0.0  # after a loss, no new node agent there before this (monotonic)
    children: set[int] = field(default_factory=set)
    starting: int = 0  # spawns placed here and not answered yet: the spread counts them (a mesh starts at once)
    lost_at: float = 0.0  # when it was last lost (monotonic): its fence runs out a lease after its last renewal

    @property
    def short(self) -> str:
        return self.node_id[:8]


class RemoteListener:
    """The listening socket a node agent holds for a service (``Supervisor.listener``):
    the fd stays on its node; ``fileno()`` only says "hand the held socket over"."""

    def __init__(self, spawner: "RaySpawner", port: int, backlog: int) -> None:
        self.spawner, self.port, self.backlog = spawner, port, backlog

    def fileno(self) -> int:
        return -1

    def close(self) -> None:
        self.spawner.close_listener(self.port)


def _credential(env: dict[str, str]) -> str | None:
    """The incarnation's own credential (the daemon's file), for the node to write into its
    home: the node never holds the operator's token."""
    path = env.get("TRON_TOKEN_FILE")
    try:
        return Path(path).read_text().strip() if path else None
    except OSError:
        return None


class Relays(Protocol):
    """What the spawner needs of the daemon's access rules (services/daemon/access.py)."""

    def mint_relay(self, name: str) -> str: ...

    def relay_runs(self, name: str, service: str, incarnation: str) -> None: ...

    def revoke_relay(self, name: str) -> None: ...

    def last_renewal(self, name: str) -> float | None: ...


def relay_name(node: Node) -> str:
    return f"node-{node.short}"


class RaySpawner:
    engine = "ray"

    def __init__(self, *, config: MeshConfig, home_root: Path, config_path: Path | None,
                 marks: dict[str, str], relays: Relays | None = None) -> None:
        self.on_exit: ExitCallback | None = None  # start() names who hears of exits
        self.relays = relays  # None: the node agents' services beat to the daemon themselves
        self.config = config
        self.cluster = config.cluster
        self.home_root = home_root
        self.config_path = config_path
        self.marks = marks
        self.nodes: dict[str, Node] = {}
        self.placed: dict[str, str] = {}  # service -> the node it runs on (or ran on last)
        self.listening: dict[int, str] = {}  # port -> the node whose agent holds its socket
        self.inventory: dict[tuple[str, int], tuple[str, dict]] = {}  # (service, pid) -> node, row
        self._tasks: set[asyncio.Task] = set()
        self._local_ips = _local_addresses()
        self.address: str | None = None

    # -- the cluster --------------------------------------------------------------------------

    async def start(self, on_exit: ExitCallback) -> None:
        import ray

        self.on_exit = on_exit
        extra = join_at_loopback(self.cluster.address)
        try:
            info = await asyncio.to_thread(
                ray.init, address=self.cluster.address, namespace=NAMESPACE, log_to_driver=False,
                logging_level=logging.WARNING, include_dashboard=False, ignore_reinit_error=True, **extra)
        except Exception as err:  # ConnectionError, a bad address, a version mismatch
            raise SpawnError(f"cannot join the Ray cluster at {self.cluster.address!r}: {err}") from None
        self.address = getattr(info, "address_info", {}).get("gcs_address") or self.cluster.address
        await self._refresh_nodes()
        await asyncio.gather(*(self._ensure_agent(n) for n in self.nodes.values() if n.alive))
        if not any(n.agent for n in self.nodes.values()):
            raise SpawnError("no node of the Ray cluster could start a Tron node agent")
        self._spawn_task(self._watch_nodes())

    async def _refresh_nodes(self) -> list[Node]:
        """Read Ray's node table; returns the nodes that died since the last read."""
        import ray

        died = []
        for row in await asyncio.to_thread(ray.nodes):
            nid = row["NodeID"]
            node = self.nodes.get(nid)
            if node is None:
                if not row.get("Alive"):
                    continue
                node = self.nodes[nid] = Node(nid, row.get("NodeManagerAddress", "127.0.0.1"),
                                              dict(row.get("Resources") or {}))
                log.info("ray node %s (%s) joined", node.short, node.ip)
            elif node.alive and not row.get("Alive"):
                died.append(node)
            node.alive = bool(row.get("Alive"))
            node.resources = dict(row.get("Resources") or node.resources)
        return died

    async def _watch_nodes(self) -> None:
        while True:
            await asyncio.sleep(NODE_POLL)
            try:
                for node in await self._refresh_nodes():
                    self._lost(node, "Ray reports the node dead")
                for node in list(self.nodes.values()):
                    if node.alive and node.agent is None and not node.cordoned and time.monotonic() >= node.retry_at:
                        await self._ensure_agent(node)
                for node in self.nodes.values():  # what each agent says now: its fork server may have been started again
                    if node.agent is not None and not node.describing:
                        self._spawn_task(self._describe(node))
            except asyncio.CancelledError:
                raise
            except Exception as err:  # Ray's GCS briefly unreachable: read again next time
                log.warning("ray node table not read: %s", err)

    async def _ensure_agent(self, node: Node) -> object | None:
        """The node's Tron node agent, started (or found, after a daemon restart) and set up."""
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        from tron.services.daemon.node_agent import NodeAgent

        if node.agent is not None:
            return node.agent
        try:
            handle = ray.remote(NodeAgent).options(
                name=actor_name(node.node_id), namespace=NAMESPACE, lifetime="detached", max_restarts=0,
                num_cpus=0, get_if_exists=True,
                scheduling_strategy=NodeAffinitySchedulingStrategy(node.node_id, soft=False)).remote()
            node.joining = handle
            home = self.cluster.node_home.format(home=self.home_root) + f"/{node.short}"
            relay = None if self.relays is None else {
                "daemon_url": self.config.daemon_url, "token": self.relays.mint_relay(relay_name(node)),
                "interval": self.config.policy.heartbeat_interval, "lease": self.config.lease}
            node.info = await asyncio.wait_for(handle.setup.remote(
                home, self._config_text(), self.marks, self.config.mesh.fork_server, relay), 90)
            rows = await asyncio.wait_for(handle.inventory.remote(), CALL_TIMEOUT)
        except Exception as err:
            node.joining = None
            log.error("no Tron node agent on ray node %s: %s", node.short, err)
            return None
        node.agent, node.joining = handle, None
        for row in rows["children"]:
            self.inventory[(row["name"], row["pid"])] = (node.node_id, row)
        for port in rows["listening"]:
            self.listening[port] = node.node_id
        log.info("node agent on %s: pid %s, home %s", node.short, node.info.get("pid"), node.info.get("home"))
        return handle

    async def _describe(self, node: Node) -> None:
        """``node.info`` afresh from its agent. One that does not answer keeps what it said last:
        a lost agent is noticed on the paths that wait for its children."""
        agent, node.describing = node.agent, True
        try:
            info = await asyncio.wait_for(agent.describe.remote(), CALL_TIMEOUT)
        except asyncio.CancelledError:
            raise
        except Exception as err:
            log.debug("node agent on %s not described: %s", node.short, err)
            return
        finally:
            node.describing = False
        if node.agent is agent:
            node.info = info

    def _config_text(self) -> str:
        try:
            return Path(self.config_path).read_text() if self.config_path else ""
        except OSError:
            return ""

    def _spawn_task(self, coro) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # -- placement ------------------------------------------------------------------------------

    def place(self, name: str) -> Node:
        spec = self.config.services.get(name)
        live = [n for n in self.nodes.values() if n.alive and n.agent is not None and not n.cordoned]
        want = dict(spec.resources) if spec else {}
        fits = [n for n in live if all(n.resources.get(k, 0.0) >= v for k, v in want.items())]
        if spec is not None and spec.node:  # where it belongs, whenever that node is there
            named = [n for n in fits if n.node_id.startswith(spec.node) or n.ip == spec.node]
            if named:
                return named[0]
        last = self.nodes.get(self.placed.get(name, ""))
        if last in fits:
            return last
        if not fits:
            raise SpawnError(f"no live Ray node can take {name}"
                             + (f" (resources {want})" if want else "") + f": {len(live)} node(s) alive")
        return min(fits, key=lambda n: (len(n.children) + n.starting, n.node_id))

    def node_of(self, child: Child) -> Node | None:
        return self.nodes.get(child.node or "")

    # -- the Spawner contract ---------------------------------------------------------------------

    async def spawn(self, spec: SpawnSpec) -> Child:
        node = self.place(spec.name)
        if self.relays is not None:  # before it starts: its first beat may reach the relay's next batch at once
            self.relays.relay_runs(relay_name(node), spec.name, spec.incarnation)
        svc = self.config.services.get(spec.name)
        listen = None
        if spec.listen_fd is not None and svc is not None:
            listen = (svc.port, svc.backlog)
            old = self.listening.get(svc.port)
            if old and old != node.node_id and (other := self.nodes.get(old)) and other.agent is not None:
                self._spawn_task(_quietly(other.agent.close_listener.remote(svc.port)))
            self.listening[svc.port] = node.node_id
        wire = {"name": spec.name, "incarnation": spec.incarnation, "argv": spec.argv, "env": spec.env,
                "cwd": str(spec.cwd), "log": str(spec.log), "module": spec.module, "user": spec.user,
                "credential": _credential(spec.env)}
        node.starting += 1
        try:
            answer = await asyncio.wait_for(node.agent.spawn.remote(wire, listen), CALL_TIMEOUT)
        except Exception as err:
            self._lost(node, f"spawn call failed: {err}")
            raise SpawnError(f"node {node.short} lost while starting {spec.name}: {err}") from None
        finally:
            node.starting -= 1
        if not answer.get("ok"):
            raise SpawnError(f"on node {node.short}: {answer.get('error')}")
        child = Child(spec.name, spec.incarnation, answer["pid"], answer["create_time"],
                      mode=f"{answer['mode']}@{node.short}", node=node.node_id)
        self._placed_on(child, node)
        return child

    def _placed_on(self, child: Child, node: Node) -> None:
        if self.relays is not None:
            self.relays.relay_runs(relay_name(node), child.name, child.incarnation)
        self.placed[child.name] = node.node_id
        node.children.add(child.pid)
        if node.ip in ("127.0.0.1", "localhost", "::1"):  # a loopback cluster; else other nodes reach it there too
            self.config.hosts.pop(child.name, None)
        else:
            self.config.hosts[child.name] = node.ip
        self._spawn_task(self._await_exit(child, node))

    async def _await_exit(self, child: Child, node: Node) -> None:
        try:
            result = await node.agent.wait_exit.remote(child.pid)
            child.exit_code, child.exit_signal = result.get("exit_code"), result.get("exit_signal")
        except asyncio.CancelledError:
            raise
        except Exception as err:  # RayActorError: the node agent, and its node, are gone
            child.lost = True
            self._lost(node, f"node agent gone: {type(err).__name__}")
            await self._fenced(node)
        node.children.discard(child.pid)
        if not child.exited.is_set():
            child.exited.set()
            if self.on_exit is not None:
                self.on_exit(child)

    def _lost(self, node: Node, why: str) -> None:
        if node.agent is None:
            return
        node.lost_at = time.monotonic()
        node.retry_at = node.lost_at + AGENT_RETRY
        log.error("ray node %s (%s) lost: %s; its services are placed elsewhere", node.short, node.ip, why)
        node.agent = None
        if self.relays is not None:
            self.relays.revoke_relay(relay_name(node))
        for port, holder in list(self.listening.items()):
            if holder == node.node_id:
                del self.listening[port]

    async def _fenced(self, node: Node) -> None:
        """Before a lost node's service counts as gone (and is started elsewhere): the lease
        its node agent held runs out, and with it the node has ended its children itself."""
        if self.relays is None or node.cordoned:  # cordoned: a drill's loss, whose node agent ended every child first
            return
        from tron.common.lease import fence_wait

        wait = fence_wait(self.relays.last_renewal(relay_name(node)), node.lost_at, self.config.lease, time.monotonic())
        if wait > 0:
            log.info("ray node %s lost: its lease runs %.2fs more; its services are started elsewhere after it",
                     node.short, wait)
            await asyncio.sleep(wait)

    def reserve(self, name: str) -> str | None:
        return None  # a node agent starts each incarnation itself

    def release(self, name: str) -> None:
        pass  # nothing is prepared here for a next start

    def adopt(self, name: str, incarnation: str, pid: int, create_time: float) -> Child | None:
        """A child an earlier daemon started, still run by its node agent."""
        found = self.inventory.pop((name, pid), None)
        if found is None:
            return None
        node_id, row = found
        node = self.nodes.get(node_id)
        if node is None or node.agent is None or row["incarnation"] != incarnation \
                or abs(row["create_time"] - (create_time or 0.0)) > 0.01:
            return None
        child = Child(name, incarnation, pid, row["create_time"], mode=f"adopted@{node.short}", node=node_id)
        self._placed_on(child, node)
        return child

    async def stop(self, child: Child, grace: float, sig: int = signal.SIGTERM) -> None:
        child.expected_exit = True
        await self._end(child, "stop", grace + 10, grace, int(sig))

    async def kill(self, child: Child) -> None:
        child.expected_exit = True
        await self._end(child, "kill", 15)

    async def _end(self, child: Child, verb: str, timeout: float, *args) -> None:
        node = self.node_of(child)
        if child.alive and node is not None and node.agent is not None:
            try:
                await asyncio.wait_for(getattr(node.agent, verb).remote(child.pid, *args), timeout)
                await asyncio.wait_for(asyncio.shield(child.exited.wait()), 5)
                return
            except asyncio.TimeoutError:
                log.error("%s: node %s did not end pid %s in %.0fs", child.name, node.short, child.pid, timeout)
            except Exception as err:
                self._lost(node, f"{verb} call failed: {err}")
        if child.alive:  # its node is gone: so is the process, as far as anyone can act on it
            if node is not None:  # once the lease it may still hold there has run out
                await self._fenced(node)
            child.exited.set()

    def leftovers(self, child: Child) -> list[int]:
        return []  # trees live on their nodes: the node agent ends them whole

    def listen(self, port: int, backlog: int) -> RemoteListener:
        return RemoteListener(self, port, backlog)

    def recover_listener(self, pid: int, port: int) -> RemoteListener | None:
        if port not in self.listening:
            return None
        svc = next((s for s in self.config.services.values() if s.port == port), None)
        return RemoteListener(self, port, svc.backlog if svc else 128)

    def close_listener(self, port: int) -> None:
        node = self.nodes.get(self.listening.pop(port, ""))
        if node is not None and node.agent is not None:
            self._spawn_task(_quietly(node.agent.close_listener.remote(port)))

    def helper_pids(self) -> set[int]:
        return set()

    # What the daemon's machine cannot tell of processes on other nodes: honest defaults.

    async def wait_ready(self, timeout: float) -> bool:
        return True  # each node's fork server is its node agent's

    def bring_up_done(self) -> None:
        pass  # a node's fork server warms up on its own (no request for a while)

    def ghosts(self, home_root: str, owners: set[int]) -> dict[int, str]:
        return {}  # trees live on their nodes: the node agent ends them whole

    def resident(self, child: Child) -> int:
        return resident_bytes(child.pids())  # read here: right on a one-machine cluster only

    def is_listening(self, port: int) -> bool:
        return True  # on another node: cannot tell from here, its health check asks it

    def port_holder(self, port: int) -> dict | None:
        return None

    def listener_is_ours(self, child: Child, port: int) -> bool:
        return True  # its /proc is on its node

    async def sync_log(self, path: Path) -> None:
        return None  # each node writes its own logs

    def log_stats(self) -> dict | None:
        return None

    def log_pump_pid(self) -> int | None:
        return None

    def log_pump_health(self) -> dict | None:
        return None

    def ownership(self) -> dict | None:
        return None

    def status(self) -> dict:
        nodes = [self._node_status(n) for n in self.nodes.values()]
        return {"engine": "ray", "address": self.address, "pid": None, "ready": any(n["agent_pid"] for n in nodes),
                "nodes": nodes}

    def _node_status(self, n: Node) -> dict:
        fs = (n.info.get("fork_server") or {}) if n.agent else {}
        return {"node": n.node_id, "ip": n.ip, "alive": n.alive, "cordoned": n.cordoned,
                "agent_pid": n.info.get("pid") if n.agent else None,
                "fork_server": fs.get("pid"), "fork_server_warm": bool(fs.get("warm")), "fork_server_heir": fs.get("heir"),
                "services": sorted(s for s, nid in self.placed.items() if nid == n.node_id),
                "resources": {k: v for k, v in n.resources.items() if not k.startswith("node:")}}

    # -- drills ---------------------------------------------------------------------------------

    def find_node(self, key: str) -> Node | None:
        matches = [n for n in self.nodes.values() if n.node_id.startswith(key) or n.ip == key]
        return matches[0] if len(matches) == 1 else None

    async def lose(self, node: Node) -> dict:
        """A drill's node loss: every process the node agent runs dies at once, as when the
        machine does, then the agent itself; nothing is placed there until ``restore``."""
        node.cordoned = True
        agent, pids = node.agent, sorted(node.children)
        if agent is None:
            return {"node": node.node_id, "services": [], "note": "no node agent ran there"}
        services = sorted(s for s, nid in self.placed.items() if nid == node.node_id)
        try:
            await asyncio.wait_for(agent.lose.remote(), CALL_TIMEOUT)
        except Exception as err:  # the agent ended itself mid-call: that is the point
            log.debug("node agent on %s ended during lose(): %s", node.short, type(err).__name__)
        return {"node": node.node_id, "services": services, "pids": pids}

    async def restore(self, node: Node) -> None:
        node.cordoned = False
        if node.alive and node.agent is None:
            await self._ensure_agent(node)

    # -- a service's log and a drill's signal through its node agent (services/daemon/reach.py) --

    def agent_on(self, node_id: str | None) -> Node:
        """The node whose agent is asked, or SpawnError saying why none can be."""
        node = self.nodes.get(node_id or "")
        if node is None or node.agent is None:
            raise SpawnError(f"node {(node_id or '?')[:8]} has no node agent (lost, or not started yet)")
        return node

    log_timeout = 5.0  # a log read the node agent has not answered in this long is given up (the reader asks again)

    def node_placed(self, name: str) -> str | None:
        return self.placed.get(name)

    async def read_log(self, node_id: str, daemon_path: str, cursor: dict) -> dict:
        node = self.agent_on(node_id)
        try:
            return await asyncio.wait_for(node.agent.read_log.remote(daemon_path, cursor), self.log_timeout)
        except Exception as err:  # RayActorError, a timeout: the node went while we asked
            raise SpawnError(f"node {node.short} did not answer for the log: {type(err).__name__}: {err}") from None

    async def signal_child(self, child: Child, sig: int) -> dict:
        node = self.agent_on(child.node)
        try:
            return await asyncio.wait_for(node.agent.signal_child.remote(child.pid, child.incarnation, int(sig)),
                                          CALL_TIMEOUT)
        except Exception as err:
            raise SpawnError(f"node {node.short} did not take the signal: {type(err).__name__}: {err}") from None

    async def processes(self, node_id: str, pid: int, incarnation: str) -> list[str]:
        node = self.agent_on(node_id)
        try:
            return await asyncio.wait_for(node.agent.processes.remote(pid, incarnation), CALL_TIMEOUT)
        except Exception as err:
            raise SpawnError(f"node {node.short} did not answer for the processes: {type(err).__name__}: {err}") \
                from None

    async def close(self) -> None:
        import ray

        for task in list(self._tasks):
            task.cancel()
        for node in self.nodes.values():  # a node that joined as the mesh went down: its agent, mid-setup, goes too
            if node.agent is None and node.joining is not None:
                try:
                    ray.kill(node.joining, no_restart=True)
                except Exception as err:
                    log.debug("ray.kill of the node agent being set up on %s: %s", node.short, err)
                node.joining = None
        for node in self.nodes.values():
            if node.agent is None:
                continue
            try:
                await asyncio.wait_for(node.agent.shutdown.remote(), 15)
            except Exception as err:
                log.warning("node agent on %s did not shut down cleanly: %s", node.short, err)
            try:
                ray.kill(node.agent, no_restart=True)
            except Exception as err:  # already gone with its node, or Ray itself is going away
                log.debug("ray.kill of the node agent on %s: %s", node.short, err)
            node.agent = None
        await asyncio.to_thread(ray.shutdown)


async def _quietly(ref) -> None:
    try:
        await asyncio.wait_for(ref, CALL_TIMEOUT)
    except Exception as err:
        log.debug("node agent call failed: %s", err)


def _local_addresses() -> set[str]:
    found = {"127.0.0.1", "localhost", "::1"}
    try:
        for addrs in psutil.net_if_addrs().values():
            found |= {a.address for a in addrs if a.family in (socket.AF_INET, socket.AF_INET6)}
    except (OSError, psutil.Error) as err:  # loopback is still known to be ours
        log.warning("cannot read this machine's addresses: %s", err)
    return found
