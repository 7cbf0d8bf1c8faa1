"""Nodes with their own network stack, for the namespace tier (tests/integration/test_netns_cluster.py).

``NetNode`` is one Linux network namespace joined to the root namespace by a point-to-point
link: the host side ``10.<a>.<b>.1`` in the root namespace, the node side ``10.<a>.<b>.2``
inside, names unique per run (a namespace ``tron-<pid>-<hex>``, devices ``tv<hex>h``/``tv<hex>n``:
15 bytes at most). ``run``/``popen`` execute inside it (``ip netns exec``).

The link is two TUN devices and a userspace forwarder (tests/linkemu.py), not a veth pair:
kernels built without ``sch_netem`` (this machine's and CI's) cannot shape a veth, and the
forwarder drops and delays packets itself. Faults on the link: ``link(False)`` (the host side
down, as `tron drill partition` does: nothing passes either way), ``impair(loss, delay)``
(a fraction of packets lost and each held ``delay`` seconds, both directions), ``clear()``.

``close`` is idempotent and ends everything that runs inside the namespace (``ip netns pids``),
then the forwarder (its devices go with it) and deletes the namespace. ``capability()`` says
why the tier cannot run here (not root, no iproute2, namespaces or TUN refused), or None.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import time

import json
import sys
from pathlib import Path

import psutil

from tests.harness import RAY_WORKER_PORTS


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30, check=check)


def capability() -> str | None:
    """Why namespaces joined by a TUN link cannot be made here (None: they can): tried for real, once."""
    if os.geteuid() != 0:
        return "not root: `ip netns add` needs CAP_SYS_ADMIN and CAP_NET_ADMIN"
    if shutil.which("ip") is None:
        return "no `ip` (apt-get install iproute2)"
    if not os.path.exists("/dev/net/tun"):
        return "no /dev/net/tun (modprobe tun)"
    try:
        probe = NetNode()
    except (subprocess.CalledProcessError, OSError, RuntimeError) as err:
        said = err.stderr.strip() if isinstance(err, subprocess.CalledProcessError) else str(err)
        return f"`ip netns`/TUN devices do not work here: {said}"
    try:
        if probe.run("true").returncode != 0:
            return "`ip netns exec` does not run a program"
    finally:
        probe.close()
    return None


LINKEMU = str(Path(__file__).with_name("linkemu.py"))


class NetNode:
    def __init__(self) -> None:
        tag = f"{os.getpid() % 0xFFFF:04x}{random.randrange(0x100):02x}"
        self.name = f"tron-{os.getpid()}-{tag}"
        self.host_if, self.node_if = f"tv{tag}h", f"tv{tag}n"
        a, b = random.randrange(64, 250), random.randrange(1, 250)  # 10.64-249.x: clear of common LANs
        self.host_ip, self.node_ip = f"10.{a}.{b}.1", f"10.{a}.{b}.2"
        self._closed = False
        self._emu: subprocess.Popen | None = None
        _ip("netns", "add", self.name)
        try:
            self._emu = subprocess.Popen([sys.executable, LINKEMU, self.name, self.host_if, self.node_if],
                                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                         text=True, bufsize=1)
            if self._emu.stdout.readline().strip() != "ready":
                self._emu.wait(10)
                raise RuntimeError(f"the link emulator did not start: {self._emu.stderr.read().strip()}")
            _ip("addr", "add", self.host_ip, "peer", f"{self.node_ip}/32", "dev", self.host_if)
            _ip("link", "set", self.host_if, "up")
            for args in (("addr", "add", self.node_ip, "peer", f"{self.host_ip}/32", "dev", self.node_if),
                         ("link", "set", self.node_if, "up"), ("link", "set", "lo", "up")):
                _ip("-n", self.name, *args)
        except BaseException:
            self.close()
            raise

    # -- running inside ---------------------------------------------------------------------

    def argv(self, *argv: str) -> list[str]:
        return ["ip", "netns", "exec", self.name, *argv]

    def run(self, *argv: str, **kw) -> subprocess.CompletedProcess:
        return subprocess.run(self.argv(*argv), capture_output=True, text=True, timeout=kw.pop("timeout", 60), **kw)

    def popen(self, *argv: str, **kw) -> subprocess.Popen:
        return subprocess.Popen(self.argv(*argv), start_new_session=True, **kw)

    def pids(self) -> list[int]:
        """Every process whose network namespace is this one."""
        out = _ip("netns", "pids", self.name, check=False).stdout
        return [int(p) for p in out.split()]

    # -- faults on its link -------------------------------------------------------------------

    def link(self, up: bool) -> None:
        """The host side's device up or down (down: nothing passes either way: a partition)."""
        _ip("link", "set", self.host_if, "up" if up else "down")

    def impair(self, loss: float = 0.0, delay: float = 0.0) -> None:
        """A fraction ``loss`` of the packets lost and each held ``delay`` seconds, in each direction."""
        self._control(f"set {loss} {delay * 1000}")

    def clear(self) -> None:
        """No loss, no delay, the link up."""
        self._control("clear")
        self.link(True)

    def _control(self, line: str) -> None:
        self._emu.stdin.write(line + "\n")
        self._emu.stdin.flush()
        said = self._emu.stdout.readline().strip()
        if said != "ok":
            raise RuntimeError(f"the link emulator refused {line!r}: {said or 'it ended'}")

    # -- teardown -----------------------------------------------------------------------------

    def kill_all(self, timeout: float = 15.0) -> list[int]:
        """SIGKILL everything inside the namespace, until nothing is left; returns what was there."""
        seen: set[int] = set()
        deadline = time.monotonic() + timeout
        while (pids := self.pids()) and time.monotonic() < deadline:
            seen.update(pids)
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.05)
        procs = []
        for pid in seen:
            try:
                procs.append(psutil.Process(pid))
            except psutil.NoSuchProcess:
                continue
        alive = [p.pid for p in psutil.wait_procs(procs, timeout=5)[1] if p.status() != psutil.STATUS_ZOMBIE]
        if self.pids() or alive:
            raise RuntimeError(f"processes still alive in {self.name}: {self.pids() or alive}")
        return sorted(seen)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self.kill_all()
        finally:
            if self._emu is not None:  # its devices end with it (TUN devices nobody made persistent)
                self._emu.stdin.close()
                try:
                    self._emu.wait(10)
                except subprocess.TimeoutExpired:
                    self._emu.kill()
                    self._emu.wait()
                self._emu.stdout.close()
                self._emu.stderr.close()
            _ip("netns", "del", self.name, check=False)
            _ip("link", "del", self.host_if, check=False)  # gone with the forwarder; a half-made one may not be

    def exists(self) -> bool:
        listed = _ip("netns", "list", check=False).stdout.split()
        return self.name in listed or _ip("link", "show", self.host_if, check=False).returncode == 0


# -- a Ray cluster across the namespace --------------------------------------------------------

# Ray notices a dead node in 0.5 s x 3 here (its defaults, 3 s x 5, would make a partition test ~16 s
# longer); and a node that does not answer at all (a partition, not a dead raylet, which refuses at
# once) fails one check after health_check_timeout_ms, 10 s by default: 1 s here.
FAST_HEALTH = {"health_check_period_ms": 500, "health_check_failure_threshold": 3,
               "health_check_initial_delay_ms": 0, "health_check_timeout_ms": 1000}
PORTS = {"min_worker_port": RAY_WORKER_PORTS[0], "max_worker_port": RAY_WORKER_PORTS[1]}
RAY = str(Path(sys.executable).parent / "ray")


class NetCluster:
    """The head (this namespace) and a worker node in ``self.net``; ``worker()`` (re)starts it."""

    def __init__(self, net: NetNode) -> None:
        from ray.cluster_utils import Cluster

        self.net = net
        self.head = Cluster(initialize_head=True, connect=False, head_node_args={
            "num_cpus": 1, "resources": {"head": 1}, "node_ip_address": net.host_ip, "include_dashboard": False,
            "_system_config": FAST_HEALTH, **PORTS})
        self.address = self.head.address
        self.proc: subprocess.Popen | None = None
        self.log = open(Path(self.head.head_node.get_session_dir_path()) / "netns-worker.log", "ab")

    def worker(self) -> str:
        """The worker node's Ray node id, starting a raylet in the namespace when none is alive there."""
        found = self._alive_worker()
        if found:
            return found
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)
        self.net.kill_all()  # what the dead raylet left (its workers, a node agent, their children)
        self.proc = self.net.popen(RAY, "start", "--block", "--address", self.address, "--node-ip-address",
                                   self.net.node_ip, "--num-cpus", "1", "--resources", json.dumps({"gpu_box": 1}),
                                   "--min-worker-port", str(PORTS["min_worker_port"]),
                                   "--max-worker-port", str(PORTS["max_worker_port"]),
                                   stdout=self.log, stderr=subprocess.STDOUT)
        from tron.scripts.client import wait_for

        return wait_for(self._alive_worker, 90, "the namespace's Ray node to join", interval=0.2)

    def _alive_worker(self) -> str | None:
        # Ray's node table, as Cluster.wait_for_nodes reads it (this process never joins the cluster)
        nodes = self.head.global_state.node_table()
        return next((n["NodeID"] for n in nodes if n["NodeManagerAddress"] == self.net.node_ip and n["Alive"]), None)

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.net.kill_all()
        self.head.shutdown()
        self.log.close()
