"""One contract, both ``Spawner`` backends: real processes (``LocalSpawner``) and the
stub. A child spawns alive; an exit it did not ask for is reported once with its status;
stop and kill end it and are reported as expected; a missing program is a SpawnError;
adoption needs the same pid and start time."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path

import pytest

from tron.common.processes import same_process
from tron.services.daemon.spawner import LocalSpawner, SpawnError, SpawnSpec
from tron.services.daemon.stub_spawner import StubSpawner

SLEEPER = [sys.executable, "-c", "import time; time.sleep(60)"]


class Backend:
    def __init__(self, kind: str, tmp: Path) -> None:
        self.exits = []
        self.spawner = LocalSpawner() if kind == "local" else StubSpawner()
        # What start() does with its callback, without making the test process a subreaper.
        self.spawner.on_exit = self.exits.append
        self.kind = kind
        self.tmp = tmp

    def spec(self, name: str, argv=SLEEPER) -> SpawnSpec:
        return SpawnSpec(name=name, incarnation=f"i-{name}", argv=argv,
                         env={**os.environ, "TRON_INCARNATION": f"i-{name}"}, cwd=self.tmp,
                         log=self.tmp / f"{name}.log")

    async def crash(self, name: str, code: int):
        """A child that exits by itself with ``code``."""
        if self.kind == "local":
            return await self.spawner.spawn(self.spec(name, [sys.executable, "-c", f"raise SystemExit({code})"]))
        child = await self.spawner.spawn(self.spec(name))
        self.spawner.crash(child, code=code)
        return child

    async def reported(self, n: int) -> list:
        for _ in range(500):
            if len(self.exits) >= n:
                return self.exits
            await asyncio.sleep(0.01)
        raise AssertionError(f"{n} exits expected, saw {len(self.exits)}")


@pytest.fixture(params=["local", "stub"])
async def backend(request, tmp_path):
    b = Backend(request.param, tmp_path)
    yield b
    for child in list(getattr(b.spawner, "children", {}).values()):
        await b.spawner.kill(child)


async def test_no_start_is_prepared_ahead_without_cgroups(backend):
    """reserve() hands out a prepared incarnation id only where a gate was made (cgroups:
    tests/integration/test_gate.py); otherwise the supervisor makes a new id."""
    child = await backend.spawner.spawn(backend.spec("r"))
    try:
        assert backend.spawner.reserve("r") is None
    finally:
        await backend.spawner.kill(child)


async def test_a_spawned_child_is_alive_with_a_pid(backend):
    child = await backend.spawner.spawn(backend.spec("a"))
    try:
        assert child.alive and child.pid > 0 and child.incarnation == "i-a"
        if backend.kind == "local":
            assert same_process(child.pid, child.create_time)
    finally:
        await backend.spawner.kill(child)


async def test_an_exit_nobody_asked_for_is_reported_once_with_its_status(backend):
    child = await backend.crash("b", 3)
    [seen] = await backend.reported(1)
    assert seen is child and not child.alive and child.exit_code == 3 and not child.expected_exit
    await asyncio.sleep(0.05)
    assert len(backend.exits) == 1


async def test_stop_and_kill_end_the_child_as_expected(backend):
    a = await backend.spawner.spawn(backend.spec("c"))
    b = await backend.spawner.spawn(backend.spec("d"))
    await backend.spawner.stop(a, grace=2.0)
    await backend.spawner.kill(b)
    await backend.reported(2)
    assert not a.alive and not b.alive and a.expected_exit and b.expected_exit
    assert b.exit_signal == signal.SIGKILL
    if backend.kind == "local":
        assert a.exit_signal == signal.SIGTERM
        assert not same_process(a.pid, None) and not same_process(b.pid, None)


async def test_a_missing_program_is_a_spawn_error_that_names_it(backend):
    if backend.kind == "stub":
        backend.spawner.failures["e"] = "command not found: ghost-bin"
    with pytest.raises(SpawnError, match="command not found: ghost-bin"):
        await backend.spawner.spawn(backend.spec("e", ["ghost-bin", "--serve"]))


async def test_adoption_needs_the_same_pid_and_start_time(backend):
    child = await backend.spawner.spawn(backend.spec("f"))
    try:
        assert backend.spawner.adopt("f", "i-f2", child.pid, child.create_time + 5) is None
        adopted = backend.spawner.adopt("f", "i-f", child.pid, child.create_time)
        assert adopted is not None and adopted.pid == child.pid and adopted.mode == "adopted"
    finally:
        await backend.spawner.kill(child)


TREE_SCENARIO = """
import asyncio, json, os, signal, sys, uuid
from pathlib import Path
from tron.common.processes import tree_of
from tron.services.daemon.spawner import LocalSpawner, SpawnSpec

WORKERS = (
    "import subprocess, sys, time\\n"
    "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\\n"
    "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'], start_new_session=True)\\n"
    "time.sleep(60)\\n")

async def main():
    exits = []
    spawner = LocalSpawner()
    await spawner.start(exits.append)  # the daemon's position: a child subreaper
    tmp = Path(sys.argv[1])
    incarnation = "i-" + uuid.uuid4().hex[:12]
    spec = SpawnSpec(name="g", incarnation=incarnation, argv=[sys.executable, "-c", WORKERS],
                     env={**os.environ, "TRON_INCARNATION": incarnation}, cwd=tmp, log=tmp / "g.log")
    child = await spawner.spawn(spec)
    for _ in range(300):
        if len(tree_of(child.pid, child.incarnation)) == 3:
            break
        await asyncio.sleep(0.02)
    out = {"before": len(tree_of(child.pid, child.incarnation))}
    os.kill(child.pid, signal.SIGKILL)  # the master dies; its workers do not
    while not exits:
        await asyncio.sleep(0.01)
    out["after_leader_died"] = len(tree_of(child.pid, child.incarnation))
    await spawner.kill(child)
    out["after_kill"] = len(tree_of(child.pid, child.incarnation, everywhere=True))
    print(json.dumps(out))

asyncio.run(main())
"""


def test_the_whole_tree_ends_even_when_its_leader_died_first(tmp_path):
    """Real processes, in a process of its own that is a subreaper as the daemon is: a
    master whose workers outlive it (nginx, postgres), one of them outside the process
    group; kill ends every one of them."""
    import json
    import subprocess

    proc = subprocess.run([sys.executable, "-c", TREE_SCENARIO, str(tmp_path)], capture_output=True, text=True,
                          timeout=60, cwd=Path(__file__).resolve().parents[2])
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == {"before": 3, "after_leader_died": 2, "after_kill": 0}


# -- the whole interface: what the daemon asks, each backend answers (no probing) ------------


def _backends_of_the_protocol():
    from tron.services.daemon.fault_injection import DieAfterFork
    from tron.services.daemon.ray_spawner import RaySpawner

    return [LocalSpawner, StubSpawner, RaySpawner, DieAfterFork]


@pytest.mark.parametrize("backend", _backends_of_the_protocol(), ids=lambda b: b.__name__)
def test_every_backend_speaks_the_whole_spawner_protocol(backend):
    """Every method of ``Spawner``, with the same parameters (names, kinds) and the same
    async-ness: the daemon calls each without asking whether it is there."""
    import inspect

    from tron.services.daemon.spawner import Spawner

    methods = {n: m for n, m in vars(Spawner).items() if not n.startswith("_") and callable(m)}
    assert {"start", "ghosts", "listener_is_ours", "sync_log", "ownership"} <= set(methods)
    for name, declared in methods.items():
        have = getattr(backend, name, None)
        assert callable(have), f"{backend.__name__} lacks Spawner.{name}"
        assert inspect.iscoroutinefunction(have) == inspect.iscoroutinefunction(declared), f"{backend.__name__}.{name}"
        want = list(inspect.signature(declared).parameters.values())[1:]
        params = inspect.signature(have).parameters
        for p in want:
            assert p.name in params and params[p.name].kind == p.kind, f"{backend.__name__}.{name}: {p.name}"


def test_the_ray_spawner_is_the_cluster_control():
    import inspect

    from tron.services.daemon.ray_spawner import RaySpawner
    from tron.services.daemon.spawner import ClusterControl

    for name, declared in vars(ClusterControl).items():
        if name.startswith("_") or not callable(declared):
            continue
        assert inspect.iscoroutinefunction(getattr(RaySpawner, name)) == inspect.iscoroutinefunction(declared), name


async def test_without_helpers_a_backend_says_so(backend):
    """No fork server, no log pump, no process of the home: the honest answers."""
    assert await backend.spawner.wait_ready(0.1) is True
    assert backend.spawner.helper_pids() == set()
    assert backend.spawner.log_stats() is None and backend.spawner.log_pump_pid() is None
    assert backend.spawner.log_pump_health() is None
    await backend.spawner.sync_log(backend.tmp / "nothing.log")
    assert backend.spawner.ghosts(str(backend.tmp / "no-home"), set()) == {}
    child = await backend.spawner.spawn(backend.spec("h"))
    try:
        assert backend.spawner.resident(child) >= 0
        if backend.kind == "local":
            assert backend.spawner.resident(child) > 0
    finally:
        await backend.spawner.kill(child)


LISTENER = """
import socket, sys, time
s = socket.socket()
s.bind(("127.0.0.1", 0))
s.listen()
open(sys.argv[1] + ".tmp", "w").write(str(s.getsockname()[1]))
import os
os.replace(sys.argv[1] + ".tmp", sys.argv[1])
time.sleep(60)
"""


async def test_whose_listener_it_is_is_asked_of_the_local_spawner(tmp_path):
    """A listener in the child's tree is its; another incarnation's tree does not hold it;
    the holder is named by pid."""
    b = Backend("local", tmp_path)
    port_file = tmp_path / "port"
    listener = await b.spawner.spawn(b.spec("l", [sys.executable, "-c", LISTENER, str(port_file)]))
    other = await b.spawner.spawn(b.spec("o"))
    try:
        for _ in range(1000):
            if port_file.exists():
                break
            await asyncio.sleep(0.01)
        port = int(port_file.read_text())
        for _ in range(1000):
            if b.spawner.is_listening(port):
                break
            await asyncio.sleep(0.01)
        assert b.spawner.is_listening(port)
        assert b.spawner.listener_is_ours(listener, port) is True
        assert b.spawner.listener_is_ours(other, port) is False
        holder = b.spawner.port_holder(port)
        assert holder is not None and holder["pid"] in (listener.pid, None)  # None: not ours to look at
    finally:
        await b.spawner.kill(listener)
        await b.spawner.kill(other)
    assert not b.spawner.is_listening(port)
