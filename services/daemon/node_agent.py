"""The Tron node agent: one per Ray node, a detached, named Ray actor with Ray's restarts
off (``max_restarts=0``): the ladder stays the daemon's.

It runs the local spawner (and its fork server) for the services placed on its node, so
a restart there is the local path (tens of milliseconds), not Ray's. Pids, process trees,
listening sockets and the node's own clock never leave it: the daemon sees a child's pid
and start time, its exit when it comes, and decides with its own clock.

A node agent keeps a home of its own on its node (logs, the token file, a copy of the mesh
file, the fork server's socket) and rewrites the paths of each service's environment to
it; ``TRON_MESH`` still names the daemon's home, so census and leak checks on one machine
find everything. Every service it starts gets ``TRON_NODE_PID``: an agent whose node agent
is gone (the node was lost, its work re-placed) exits instead of lingering on the port.

Beats: the node agent runs a beat relay (services/daemon/beat_relay.py) when the daemon
hands it a relay credential; every service it starts gets ``TRON_BEAT_URL``, beats there,
and the relay sends the node's beats to the daemon as one ``POST /beats`` per interval.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import tempfile
import time
from pathlib import Path

NAMESPACE = "tron"
# s after setup: the node is "up" for its fork server, whose heir imports the SDKs WARM_AFTER_UP s
# later (spawner.py); told before 5 s idle, the server does not warm up in place by itself.
NODE_WARM_AFTER = 2.0
PORT_WAIT = 5.0  # seconds a spawn waits for its port to be free on this node


def actor_name(node_id: str) -> str:
    return f"tron-node-{node_id[:12]}"


SCRATCH_PREFIX = "tron-node-"


def scratch_dir(tmp: Path | None = None) -> Path:
    """A private (0700) directory for a node agent's fork-server socket, named after the
    agent's pid (``tron-node-<pid>-<random>``), so that one left by an agent that was killed
    (Ray ends its actors with SIGKILL: no ``shutdown``) is known and swept by the next."""
    sweep_scratch(tmp)
    return Path(tempfile.mkdtemp(prefix=f"{SCRATCH_PREFIX}{os.getpid()}-", dir=tmp))


def sweep_scratch(tmp: Path | None = None) -> list[Path]:
    """Remove the scratch directories of node agents that are gone: ours by name (the pid in
    it), owned by this user, the pid no longer alive. Returns what was removed."""
    gone: list[Path] = []
    for d in Path(tmp or tempfile.gettempdir()).glob(f"{SCRATCH_PREFIX}*-*"):
        pid = d.name[len(SCRATCH_PREFIX):].split("-", 1)[0]
        try:
            if not pid.isdigit() or not d.is_dir() or d.is_symlink() or d.stat().st_uid != os.getuid():
                continue
            os.kill(int(pid), 0)
            continue  # its agent still runs (or the pid is someone else's now: left alone)
        except ProcessLookupError:
            shutil.rmtree(d, ignore_errors=True)
            gone.append(d)
        except OSError:  # not ours to signal, or unreadable: left alone
            continue
    return gone


class NodeAgent:
    def __init__(self) -> None:
        self.spawner = None
        self.children: dict[int, object] = {}  # pid -> Child
        self.listeners: dict[int, socket.socket] = {}  # port -> the socket held for it
        self.home: Path | None = None
        self.paths: dict[str, str] = {}
        self.scratch: Path | None = None  # a short directory for the fork server's socket, if the home is deep
        self.relay = None  # the beat relay (services/daemon/beat_relay.py), when the daemon asked for one
        self.fence = None  # the node's lease, enforced here (services/daemon/fencing.py), when the relay has one
        self._setting_up = asyncio.Lock()  # one setup at a time: a second one never finds the spawner half made

    # -- set-up ----------------------------------------------------------------------------

    async def setup(self, home: str, config_text: str, env: dict[str, str], fork_server: bool,
                    relay: dict | None = None) -> dict:
        """Make the node's home and config copy; start the spawner, and the beat relay if
        ``relay`` ({"daemon_url", "token", "interval"}) says so. A daemon started again calls
        this once more: the relay then takes its new credential.

        One call at a time: a second one (a mesh's daemon while the setup that the daemon of
        a mesh gone down sent still runs) waits, then finds the spawner ready. An agent set up
        for another home (that mesh went down and left it) is set up again for this one when
        it runs nothing, and refuses when it runs that mesh's services."""
        async with self._setting_up:
            if self.spawner is not None and self.home != Path(home):
                await self._leave_home(home)
            return await self._setup(home, config_text, env, fork_server, relay)

    async def _leave_home(self, home: str) -> None:
        """End what this agent holds for the mesh at ``self.home``, which runs nothing here."""
        if live := [c for c in self.children.values() if c.alive]:
            raise RuntimeError(f"the node agent runs {len(live)} service(s) of the mesh at {self.home}: "
                               f"not set up for {home}")
        for port in list(self.listeners):
            await self.close_listener(port)
        await self.spawner.close()
        self.spawner, self.children = None, {}
        if self.scratch is not None:
            shutil.rmtree(self.scratch, ignore_errors=True)
            self.scratch = None

    async def _setup(self, home: str, config_text: str, env: dict[str, str], fork_server: bool,
                     relay: dict | None) -> dict:
        from tron.common.paths import Home
        from tron.services.daemon.spawner import ForkServerClient, LocalSpawner

        if relay is not None:
            await self._relay(relay)
            if relay.get("lease"):
                self._fence(relay["lease"])
        if self.spawner is not None:
            return self.describe()
        self.home = Path(home)
        h = Home(self.home)
        for d in (h.root, h.logs, h.run):
            d.mkdir(parents=True, exist_ok=True)
        config = h.run / "mesh.toml"
        config.write_text(config_text)
        self.paths = {"TRON_HOME": str(h.root), "TRON_CONFIG": str(config)}
        self.logs = h.logs
        forkserver = None
        if fork_server:
            forkserver = ForkServerClient(self._socket_path(h.run / "forkserver.sock"), h.log_file("forkserver"), h.root,
                                          {**os.environ, **env, **self.paths})
        self.spawner = LocalSpawner(forkserver=forkserver)
        self._exits: dict[int, asyncio.Future] = {}
        await self.spawner.start(self._exited)
        if forkserver is not None:
            await forkserver.wait_ready(timeout=60)
            # Nobody tells a node when its mesh is up: its fork server's warm heir (spawner.py
            # ``_hand_to_heir``) starts a while after, before the server would warm up in place.
            asyncio.get_running_loop().call_later(NODE_WARM_AFTER, self.spawner.bring_up_done)
        return self.describe()

    def _socket_path(self, wanted: Path) -> Path:
        """The fork server's socket: in the node's home, or, when that path is longer than
        a unix socket's 107 bytes, in a private (0700) directory of the node's /tmp."""
        from tron.services.daemon.forkserver import SOCKET_PATH_MAX

        if len(os.fsencode(str(wanted))) <= SOCKET_PATH_MAX:
            return wanted
        self.scratch = scratch_dir()
        return self.scratch / "forkserver.sock"

    async def _relay(self, relay: dict) -> None:
        from tron.services.daemon.beat_relay import BeatRelay

        if self.relay is None:
            self.relay = BeatRelay(relay["daemon_url"], relay["token"], relay["interval"])
            await self.relay.start()
        else:
            self.relay.daemon_url, self.relay.token = relay["daemon_url"].rstrip("/"), relay["token"]

    def _fence(self, lease: float) -> None:
        """Hold the daemon's lease from now; the relay renews it, and its lapse ends every child."""
        from tron.services.daemon.fencing import NodeFence

        if self.fence is None:
            self.fence = NodeFence(lease, self._fenced)
        self.fence.lease.duration = lease
        self.relay.on_taken = self.fence.renewed
        self.relay.on_daemon_down = self.fence.daemon_down
        self.fence.start()

    async def _fenced(self) -> int:
        """The lease lapsed: every child ends at once, whole, and its held socket is released (the
        daemon may start its replacement elsewhere as soon as the lease has run out there too)."""
        from tron.common.processes import kill_tree, tree_of

        ended = 0
        for child in list(self.children.values()):
            if child.alive:
                child.expected_exit = True
                kill_tree(tree_of(child.pid, child.incarnation), child.pid)
                ended += 1
        for port in list(self.listeners):
            await self.close_listener(port)
        return ended

    def describe(self) -> dict:
        import ray

        ctx = ray.get_runtime_context()
        fs = self.spawner.status() if self.spawner else None
        return {"node_id": ctx.get_node_id(), "pid": os.getpid(), "ip": ray.util.get_node_ip_address(),
                "home": str(self.home), "fork_server": fs, "children": len(self.children),
                "relay": self.relay.status() if self.relay is not None else None,
                "lease": self.fence.status() if self.fence is not None else None}

    # -- processes ----------------------------------------------------------------------------

    async def spawn(self, spec: dict, listen: tuple[int, int] | None) -> dict:
        from tron.services.daemon.listeners import ListenerError
        from tron.services.daemon.spawner import SpawnError, SpawnSpec

        if self.fence is not None and self.fence.refusal():
            await self.relay.flush()  # the daemon is asking: renewed at once when its HTTP can be reached
            if why := self.fence.refusal():
                return {"ok": False, "error": why}
        env = {**spec["env"], **self.paths, "TRON_NODE_PID": str(os.getpid())}
        if spec.get("credential"):  # the incarnation's own, in a 0600 file of this node's home
            from tron.common.paths import write_token

            cred = self.home / "run" / "creds" / f"{spec['name']}~{spec['incarnation']}"
            write_token(cred, spec["credential"])
            os.chmod(cred.parent, 0o700)
            env["TRON_TOKEN_FILE"] = str(cred)
            if self.relay is not None:  # admitted before it starts: its first beat may come at once
                self.relay.admit(spec["name"], spec["incarnation"], spec["credential"])
                env["TRON_BEAT_URL"] = self.relay.url
        log_path = Path(spec["log"])  # the daemon's log file when this node shares its disk
        if not log_path.parent.is_dir():
            log_path = self.logs / log_path.name
        try:
            listen_fd = None if listen is None else (await self._listener(*listen)).fileno()
            child = await self.spawner.spawn(SpawnSpec(
                name=spec["name"], incarnation=spec["incarnation"], argv=spec["argv"], env=env,
                cwd=Path(spec["cwd"]) if Path(spec["cwd"]).is_dir() else self.home, log=log_path,
                module=spec.get("module"), user=spec.get("user"), listen_fd=listen_fd))
        except (SpawnError, ListenerError) as err:
            if self.relay is not None:
                self.relay.forget(spec["name"], spec["incarnation"])
            return {"ok": False, "error": str(err)}
        self.children[child.pid] = child
        self._exits[child.pid] = asyncio.get_running_loop().create_future()
        return {"ok": True, "pid": child.pid, "create_time": child.create_time, "mode": child.mode}

    async def _listener(self, port: int, backlog: int) -> socket.socket:
        """The service's held socket on this node. A port still held by what ran on a lost
        node of this same machine frees within one beat (its agent exits): wait for it."""
        from tron.services.daemon.listeners import ListenerError, open_listener

        if port in self.listeners:
            return self.listeners[port]
        deadline = time.monotonic() + PORT_WAIT
        while True:
            try:
                self.listeners[port] = open_listener(port, backlog, _node_address())
                return self.listeners[port]
            except ListenerError:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.05)

    def _exited(self, child) -> None:
        if self.home is not None:  # its credential dies with it
            (self.home / "run" / "creds" / f"{child.name}~{child.incarnation}").unlink(missing_ok=True)
        if self.relay is not None:
            self.relay.forget(child.name, child.incarnation)
        fut = self._exits.get(child.pid)
        if fut is not None and not fut.done():
            fut.set_result({"exit_code": child.exit_code, "exit_signal": child.exit_signal})

    async def wait_exit(self, pid: int) -> dict:
        """Returns when the child exits (the daemon awaits this for every child it has)."""
        fut = self._exits.get(pid)
        if fut is None:
            return {"exit_code": None, "exit_signal": None, "unknown": True}
        result = await asyncio.shield(fut)
        self.children.pop(pid, None)
        return result

    async def stop(self, pid: int, grace: float, sig: int = signal.SIGTERM) -> None:
        child = self.children.get(pid)
        if child is not None:
            await self.spawner.stop(child, grace, sig)

    async def kill(self, pid: int) -> None:
        child = self.children.get(pid)
        if child is not None:
            await self.spawner.kill(child)

    async def inventory(self) -> dict:
        """Live children and held sockets, for a new daemon to adopt."""
        return {"children": [{"name": c.name, "incarnation": c.incarnation, "pid": c.pid,
                              "create_time": c.create_time} for c in self.children.values() if c.alive],
                "listening": sorted(self.listeners)}

    async def close_listener(self, port: int) -> None:
        sock = self.listeners.pop(port, None)
        if sock is not None:
            sock.close()

    async def lose(self) -> None:
        """A drill's node loss: everything this agent runs dies at once, then the agent
        itself, as when the machine goes (services/daemon/ray_spawner.py ``lose``)."""
        from tron.common.processes import kill_tree, tree_of

        for child in list(self.children.values()):
            child.expected_exit = True
            kill_tree(tree_of(child.pid, child.incarnation), child.pid)
        if self.scratch is not None:
            shutil.rmtree(self.scratch, ignore_errors=True)
        os._exit(1)

    # -- a service's log and a drill's signal, for the daemon (services/daemon/reach.py) ----------

    def _log_path(self, daemon_path: str) -> Path:
        """Where this node writes a service's log: the daemon's file when this node shares
        its disk, else the same name in this node's home (as ``spawn`` chose)."""
        path = Path(daemon_path)
        return path if path.parent.is_dir() or self.home is None else self.logs / path.name

    async def read_log(self, daemon_path: str, cursor: dict) -> dict:
        """One bounded chunk of a service's log on this node (services/daemon/logread.py)."""
        from tron.services.daemon.logread import read_log

        return await asyncio.to_thread(read_log, self._log_path(daemon_path), **cursor)

    async def signal_child(self, pid: int, incarnation: str, sig: int) -> dict:
        """A drill's fault on a child this agent runs (SIGKILL, SIGSTOP, SIGCONT): sent as a
        crash or a hang would come, so the daemon sees an exit it did not ask for."""
        child = self.children.get(pid)
        if child is None or child.incarnation != incarnation or not child.alive:
            return {"ok": False, "error": f"pid {pid} is no live child of this node agent for {incarnation}"}
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return {"ok": False, "error": f"pid {pid} is gone"}
        return {"ok": True}

    async def processes(self, pid: int, incarnation: str) -> list[str]:
        """What is left on this node of one incarnation's process tree (a drill's check)."""
        from tron.common.processes import describe, tree_of

        return describe(tree_of(pid, incarnation))

    async def shutdown(self) -> None:
        """The mesh is going down: every child is already stopped; end the helpers."""
        for port in list(self.listeners):
            await self.close_listener(port)
        if self.spawner is not None:
            await self.spawner.close()
        if self.fence is not None:
            await self.fence.close()
        if self.relay is not None:
            await self.relay.close()
        if self.scratch is not None:
            shutil.rmtree(self.scratch, ignore_errors=True)


def _node_address() -> str:
    """Where this node's services listen: loopback on a loopback cluster; else every address,
    since the daemon and the other nodes reach them at the node's (the hosts map) and a CLI on
    the node at 127.0.0.1 (the mesh token guards them as on one machine)."""
    import ray

    return "127.0.0.1" if ray.util.get_node_ip_address() in ("127.0.0.1", "localhost") else "0.0.0.0"
