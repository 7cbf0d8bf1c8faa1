"""A cgroup per incarnation: what a service owns, whatever its processes do.

A process can leave its process group, rewrite its environment (redis-server
--daemonize yes) or double-fork to init's side of the tree; it cannot leave its cgroup.
So, as systemd does for a unit, each incarnation runs in a cgroup of its own, under a
subtree of the daemon's own cgroup named after the home:

    <daemon's cgroup>/tron-<home's name>-<hash>/<service>.<incarnation>

Ownership is ``cgroup.procs`` (every process of the incarnation, daemonized or not); a
kill is one write to ``cgroup.kill`` (cgroup v2, Linux 5.14), or, without it, freezing
the cgroup and SIGKILLing every pid in it, so nothing forks meanwhile.

Layouts: cgroup v2 alone; the hybrid layout (a cgroup2 mount, often with no controllers,
beside the v1 controllers: these machines); v1 alone (the freezer hierarchy owns, no
cgroup.kill). Limits go where their controller is: ``memory_max``, ``pids_max`` and
``cpu_max`` in v2 when the unified hierarchy has the controller, else in the v1
``memory``, ``pids`` and ``cpu`` hierarchies, in a cgroup of the same relative path. An
out-of-memory kill is read from the kernel's count (v2 ``memory.events``, v1
``memory.oom_control``: ``oom_kill N``), never guessed from a SIGKILL.

Where nothing can be made (no permission, a container without delegation) ``detect``
says why, and the spawner falls back to process group + environment mark + subreaper.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger("tron.cgroups")

V1_LIMITS = ("memory", "pids", "cpu")  # the v1 hierarchies limits may be written in
CPU_PERIOD_US = 100_000


def _mounts() -> dict[str, Path]:
    """{"unified": path of the cgroup2 mount, "<controller>": path of its v1 hierarchy}."""
    found: dict[str, Path] = {}
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return found
    for line in lines:
        left, _, right = line.partition(" - ")
        parts, rparts = left.split(), right.split()
        if len(parts) < 5 or len(rparts) < 3:
            continue
        fstype, point, options = rparts[0], Path(parts[4]), rparts[2].split(",")
        if fstype == "cgroup2":
            found.setdefault("unified", point)
        elif fstype == "cgroup":
            for opt in options:
                if opt in ("memory", "pids", "cpu", "freezer"):
                    found.setdefault(opt, point)
    return found


def _own_paths() -> dict[str, str]:
    """The daemon's own cgroup in each hierarchy: {"unified": "/x", "memory": "/y", ...}."""
    own: dict[str, str] = {}
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return own
    for line in lines:
        num, controllers, path = line.split(":", 2)
        if num == "0" and controllers == "":
            own["unified"] = path
        for c in controllers.split(","):
            if c:
                own[c] = path
    return own


def subtree_name(home: Path) -> str:
    """tron-<home's name>-<8 hex of its path>: readable, and two homes never share one."""
    digest = hashlib.sha256(str(home.resolve()).encode()).hexdigest()[:8]
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", home.resolve().name)[:40] or "home"
    return f"tron-{name}-{digest}"


def _write(path: Path, value: str) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        os.write(fd, value.encode())
    finally:
        os.close(fd)


def _pids(procs: Path) -> list[int]:
    try:
        return [int(x) for x in procs.read_text().split()]
    except (OSError, ValueError):
        return []


@dataclass
class Cgroup:
    """One incarnation's cgroup: the owning directory and the limit directories."""

    owner: Path  # cgroup.procs here is the incarnation's every process
    limits: dict[str, Path] = field(default_factory=dict)  # v1 controller -> its directory (hybrid, v1)
    v2: bool = True

    @property
    def dirs(self) -> list[Path]:
        return [self.owner, *self.limits.values()]

    def procs_files(self) -> list[str]:
        """Where a new process writes its pid to join (the owner first)."""
        return [str(d / "cgroup.procs") for d in self.dirs]

    def pids(self) -> list[int]:
        return _pids(self.owner / "cgroup.procs")

    def oom_kills(self) -> int:
        """How many processes the kernel killed here for memory (0 when it cannot tell)."""
        for path in (self.owner / "memory.events", self.limits.get("memory", Path("/nonexistent")) /
                     "memory.oom_control"):
            try:
                text = path.read_text()
            except OSError:
                continue
            m = re.search(r"^oom_kill (\d+)$", text, re.M)
            if m:
                return int(m.group(1))
        return 0

    def memory_current(self) -> int | None:
        for path in (self.owner / "memory.current", self.limits.get("memory", Path("/nonexistent")) /
                     "memory.usage_in_bytes"):
            try:
                return int(path.read_text())
            except (OSError, ValueError):
                continue
        return None

    def kill(self) -> None:
        """SIGKILL every process of the cgroup at once: cgroup.kill, else freeze + kill."""
        kill_file = self.owner / "cgroup.kill"
        if self.v2 and kill_file.exists():
            try:
                _write(kill_file, "1")
                return
            except OSError as err:
                log.warning("cgroup.kill of %s failed (%s): freezing and killing each", self.owner, err)
        freeze = self.owner / ("cgroup.freeze" if self.v2 else "freezer.state")
        try:
            _write(freeze, "1" if self.v2 else "FROZEN")
        except OSError:
            freeze = None  # no freezer: a fork between the read and the kill is caught by the next round
        for pid in self.pids():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if freeze is not None:  # SIGKILL is delivered on thaw
            try:
                _write(freeze, "0" if self.v2 else "THAWED")
            except OSError:
                pass

    def remove(self) -> bool:
        """rmdir every directory of it (only an empty cgroup can go); True when gone."""
        gone = True
        for d in self.dirs:
            try:
                d.rmdir()
            except FileNotFoundError:
                pass
            except OSError:
                gone = False
        return gone


@dataclass
class Limits:
    memory_max: int | None = None  # bytes
    cpu_max: float | None = None  # a share of one core: 0.5 = half a core, 2 = two cores
    pids_max: int | None = None

    def __bool__(self) -> bool:
        return any(v is not None for v in (self.memory_max, self.cpu_max, self.pids_max))


class CgroupTree:
    """The home's subtree, in each hierarchy it uses; makes and finds incarnation cgroups."""

    def __init__(self, root: Path, limit_roots: dict[str, Path], v2: bool, v2_controllers: set[str]) -> None:
        self.root = root
        self.limit_roots = limit_roots
        self.v2 = v2
        self.v2_controllers = v2_controllers

    @property
    def layout(self) -> str:
        if not self.v2:
            return "v1"
        return "hybrid" if self.limit_roots else "v2"

    def describe(self) -> dict:
        return {"path": str(self.root), "layout": self.layout,
                "limits": sorted(self.v2_controllers | set(self.limit_roots))}

    def _name(self, service: str, incarnation: str) -> str:
        return f"{service}.{incarnation}"

    def find(self, service: str, incarnation: str) -> Cgroup | None:
        """An incarnation's cgroup, when it exists (adoption after a daemon restart)."""
        name = self._name(service, incarnation)
        owner = self.root / name
        if not owner.is_dir():
            return None
        return Cgroup(owner, {c: r / name for c, r in self.limit_roots.items() if (r / name).is_dir()}, self.v2)

    def make(self, service: str, incarnation: str, limits: Limits) -> Cgroup:
        """A new, empty cgroup for one incarnation, its limits written. Raises OSError."""
        name = self._name(service, incarnation)
        owner = self.root / name
        owner.mkdir(exist_ok=True)
        group = Cgroup(owner, {}, self.v2)
        v1 = {"memory": limits.memory_max, "pids": limits.pids_max, "cpu": limits.cpu_max}
        for controller, value in v1.items():
            if value is None:
                continue
            if self.v2 and controller in self.v2_controllers:
                self._limit_v2(owner, controller, value)
            elif controller in self.limit_roots:
                d = self.limit_roots[controller] / name
                d.mkdir(exist_ok=True)
                group.limits[controller] = d
                self._limit_v1(d, controller, value)
            else:
                raise OSError(f"no {controller} controller here to set {controller}_max with")
        if limits.memory_max is None and "memory" in self.limit_roots and "memory" not in self.v2_controllers:
            # No limit, but the OOM count of a machine-wide shortage is read from here too.
            d = self.limit_roots["memory"] / name
            d.mkdir(exist_ok=True)
            group.limits["memory"] = d
        return group

    @staticmethod
    def _limit_v2(d: Path, controller: str, value) -> None:
        if controller == "memory":
            _write(d / "memory.max", str(int(value)))
            try:
                _write(d / "memory.swap.max", "0")  # a limit that swaps is not a limit
            except OSError:
                pass
        elif controller == "pids":
            _write(d / "pids.max", str(int(value)))
        elif controller == "cpu":
            _write(d / "cpu.max", f"{max(1000, int(value * CPU_PERIOD_US))} {CPU_PERIOD_US}")

    @staticmethod
    def _limit_v1(d: Path, controller: str, value) -> None:
        if controller == "memory":
            _write(d / "memory.limit_in_bytes", str(int(value)))
            try:
                _write(d / "memory.memsw.limit_in_bytes", str(int(value)))
            except OSError:
                pass
        elif controller == "pids":
            _write(d / "pids.max", str(int(value)))
        elif controller == "cpu":
            _write(d / "cpu.cfs_period_us", str(CPU_PERIOD_US))
            _write(d / "cpu.cfs_quota_us", str(max(1000, int(value * CPU_PERIOD_US))))

    def all_pids(self) -> list[int]:
        """Every process in the home's subtree (the census)."""
        found: list[int] = []
        for procs in self.root.glob("*/cgroup.procs"):
            found += _pids(procs)
        return found

    def sweep(self, keep: set[str]) -> None:
        """Remove the empty cgroups of incarnations that are no more."""
        for d in [*self.root.iterdir(), *(p for r in self.limit_roots.values() for p in r.iterdir())]:
            if d.is_dir() and d.name not in keep:
                try:
                    d.rmdir()
                except OSError:
                    pass

    def remove(self) -> None:
        """The whole subtree, when nothing is left in it (a daemon that stopped its mesh)."""
        remove_empty([self.root, *self.limit_roots.values()])


def remove_empty(roots: list[Path]) -> int:
    """Each of ``roots`` that exists, its incarnations' directories first: only empty ones
    can go (one with a live incarnation in it stays). Returns how many were removed."""
    removed = 0
    for root in dict.fromkeys(r for r in roots if r.is_dir()):
        for d in [*root.iterdir(), root]:
            if d.is_dir():
                try:
                    d.rmdir()
                    removed += 1
                except OSError:  # not empty: a process is still in it
                    pass
    return removed


def remove_leftovers(home: Path) -> int:
    """The cgroups a home's daemon left behind when it did not stop its mesh itself (it was
    killed): once `tron down` has ended every process of the home, each empty one goes, in
    every hierarchy it may be in (the path the daemon noted in run/cgroup, and this
    process's own places). Nothing is made here, and only empty ones can go. Returns how
    many directories were removed."""
    mounts, own = _mounts(), _own_paths()
    name = subtree_name(home)
    roots: list[Path] = []
    try:
        roots.append(Path((home / "run" / "cgroup").read_text().strip()))
    except OSError:
        pass
    roots += [mounts[c] / own[c].lstrip("/") / name for c in ("unified", "freezer", *V1_LIMITS)
              if c in mounts and c in own]
    return remove_empty([r for r in roots if r.name == name])


def detect(home: Path) -> tuple[CgroupTree | None, str]:
    """The home's cgroup subtree, made if needed; or None and why it cannot be."""
    mounts, own = _mounts(), _own_paths()
    name = subtree_name(home)
    if "unified" in mounts and "unified" in own:
        root = mounts["unified"] / own["unified"].lstrip("/") / name
        v2 = True
    elif "freezer" in mounts and "freezer" in own:
        root = mounts["freezer"] / own["freezer"].lstrip("/") / name
        v2 = False
    else:
        return None, "no cgroup filesystem is mounted here"
    try:
        root.mkdir(exist_ok=True)
        probe = root / f"probe.{os.getpid()}"
        probe.mkdir(exist_ok=True)
        probe.rmdir()
    except OSError as err:
        return None, f"cannot make cgroups under {root.parent}: {err.strerror or err}"
    controllers: set[str] = set()
    if v2:
        try:
            available = set((root / "cgroup.controllers").read_text().split())
        except OSError:
            available = set()
        for c in ("memory", "pids", "cpu") if available else ():
            if c in available:
                try:
                    _write(root / "cgroup.subtree_control", f"+{c}")
                    controllers.add(c)
                except OSError:
                    pass
    limit_roots: dict[str, Path] = {}
    for c in V1_LIMITS:
        if c in controllers or c not in mounts or c not in own:
            continue
        d = mounts[c] / own[c].lstrip("/") / name
        try:
            d.mkdir(exist_ok=True)
            limit_roots[c] = d
        except OSError:
            pass
    return CgroupTree(root, limit_roots, v2, controllers), ""


def join(procs_files: list[str], pid: int | None = None) -> None:
    """Move a process (by default: itself, in a new process before exec) into its
    incarnation's cgroup. Each move waits out a grace period of the kernel's RCU when no
    other move ran just before: milliseconds, which is why a gate is moved ahead of time
    (gate.py)."""
    me = str(pid or os.getpid()).encode()
    for path in procs_files:
        fd = os.open(path, os.O_WRONLY)
        try:
            os.write(fd, me)
        finally:
            os.close(fd)


def wait_empty(group: Cgroup, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while group.pids():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.002)
    return True
