"""Nodes with their own network stack, for the namespace tier (tests/integration/test_netns_cluster.py).

``NetNode`` is one Linux network namespace joined to the root namespace by a veth pair: the
host side ``10.<a>.<b>.1/24`` in the root namespace, the node side ``10.<a>.<b>.2/24`` inside,
names unique per run (a namespace ``tron-<pid>-<hex>``, veths ``tv<hex>h``/``tv<hex>n``: 15
bytes at most). ``run``/``popen`` execute inside it (``ip netns exec``). Faults on its link:
``link(False)`` (both ends lose carrier), ``netem("loss 5% delay 100ms")`` on both ends, ``clear()``.

``close`` is idempotent and ends everything that runs inside the namespace (``ip netns pids``),
then deletes the namespace; its veth goes with it. ``capability()`` says why the tier cannot run
here (not root, no iproute2, namespaces refused), or None; ``netem_capability()`` the same
for ``tc netem`` (a kernel module some kernels lack).
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
    """Why namespaces with veths cannot be made here (None: they can): tried for real, once."""
    if os.geteuid() != 0:
        return "not root: `ip netns add` needs CAP_SYS_ADMIN and CAP_NET_ADMIN"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"no `{tool}` (apt-get install iproute2)"
    try:
        probe = NetNode()
    except (subprocess.CalledProcessError, OSError) as err:
        said = err.stderr.strip() if isinstance(err, subprocess.CalledProcessError) else str(err)
        return f"`ip netns`/veth do not work here: {said}"
    try:
        if probe.run("true").returncode != 0:
            return "`ip netns exec` does not run a program"
    finally:
        probe.close()
    return None


def netem_capability() -> str | None:
    """Why ``tc netem`` cannot shape a veth here (None: it can): kernels built without
    sch_netem (CONFIG_NET_SCH_NETEM) answer "Specified qdisc kind is unknown"."""
    if os.geteuid() != 0 or shutil.which("tc") is None:
        return "not root, or no `tc` (apt-get install iproute2)"
    probe = NetNode()
    try:
        probe.netem("loss 1%")
    except subprocess.CalledProcessError as err:
        return f"`tc qdisc ... netem` does not work on this kernel ({os.uname().release}): {err.stderr.strip()}"
    finally:
        probe.close()
    return None


class NetNode:
    def __init__(self) -> None:
        tag = f"{os.getpid() % 0xFFFF:04x}{random.randrange(0x100):02x}"
        self.name = f"tron-{os.getpid()}-{tag}"
        self.host_if, self.node_if = f"tv{tag}h", f"tv{tag}n"
        a, b = random.randrange(64, 250), random.randrange(1, 250)  # 10.64-249.x: clear of common LANs
        self.host_ip, self.node_ip = f"10.{a}.{b}.1", f"10.{a}.{b}.2"
        self._closed = False
        _ip("netns", "add", self.name)
        try:
            _ip("link", "add", self.host_if, "type", "veth", "peer", "name", self.node_if)
            _ip("link", "set", self.node_if, "netns", self.name)
            _ip("addr", "add", f"{self.host_ip}/24", "dev", self.host_if)
            _ip("link", "set", self.host_if, "up")
            for args in (("addr", "add", f"{self.node_ip}/24", "dev", self.node_if), ("link", "set", self.node_if, "up"),
                         ("link", "set", "lo", "up")):
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
        """The host side's link up or down (down: the node side loses carrier too: a partition)."""
        _ip("link", "set", self.host_if, "up" if up else "down")

    def netem(self, spec: str) -> None:
        """``tc netem`` (e.g. "loss 5% delay 100ms") on both ends of the link: each direction."""
        args = ["qdisc", "replace", "dev", None, "root", "netem", *spec.split()]
        subprocess.run(["tc", *[self.host_if if a is None else a for a in args]], capture_output=True, text=True,
                       check=True, timeout=30)
        subprocess.run(self.argv("tc", *[self.node_if if a is None else a for a in args]), capture_output=True,
                       text=True, check=True, timeout=30)

    def clear(self) -> None:
        """No netem, link up."""
        subprocess.run(["tc", "qdisc", "del", "dev", self.host_if, "root"], capture_output=True, timeout=30)
        subprocess.run(self.argv("tc", "qdisc", "del", "dev", self.node_if, "root"), capture_output=True, timeout=30)
        self.link(True)

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
            _ip("netns", "del", self.name, check=False)
            _ip("link", "del", self.host_if, check=False)  # gone with the namespace; a half-made one may not be

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
