"""``build_daemon``: the one place a daemon's parts are chosen and put together.

The daemon (services/daemon/core.py) is given its parts as constructor arguments and never
probes them: the registry (a ``Store``, journaled over SQLite or PostgreSQL), the spawner
(a ``Spawner``: this machine's, or Ray's) and, on a cluster, its ``ClusterControl``. A test
hands in its own parts (the in-memory store, the stub spawner); everything else is made here
from the mesh file:

    [cluster] engine = "local"  LocalSpawner (fork server, log pump, cgroups as configured)
    [cluster] engine = "ray"    RaySpawner, which is the ClusterControl too
    TRON_TEST_DIE_AFTER_FORK    the spawner wrapped for a fault (services/daemon/fault_injection.py)
"""

from __future__ import annotations

import os
from pathlib import Path

from tron.common.clock import Clock, MonotonicClock
from tron.common.config import MeshConfig, registry_url
from tron.common.paths import Home, mesh_marks
from tron.registry.protocol import Store
from tron.services.daemon import fault_injection
from tron.services.daemon.core import Daemon
from tron.services.daemon.lock import HomeLock
from tron.services.daemon.logpump import LogPumpClient
from tron.services.daemon.spawner import (ClusterControl, ForkServerClient, LocalSpawner, Spawner, fork_server_env,
                                          local_fork_server)


def build_daemon(config: MeshConfig, home: Home, *, config_path: Path | None = None, lock: HomeLock | None = None,
                 forkserver: ForkServerClient | None = None, store: Store | None = None,
                 spawner: Spawner | None = None, clock: Clock | None = None, monitor_thread: bool = True) -> Daemon:
    """A daemon for ``home``, not started. ``lock``: taken already, else taken here (raises
    StartError when another daemon holds it): the registry file is made and checked (fail
    closed: RegistryError) only under it. ``forkserver``: launched already (__main__ starts it
    before the daemon's imports, so that the two overlap). ``store``, ``spawner``: a test's."""
    clock = clock or MonotonicClock()
    lock = lock or HomeLock(home)
    if store is None:
        lock.acquire()  # a second daemon must be refused before it touches the registry
        store = open_registry(config, home, clock)
    cluster: ClusterControl | None = None
    ray = None
    if spawner is None:
        if config.cluster.engine == "ray":
            from tron.services.daemon.ray_spawner import RaySpawner

            ray = RaySpawner(config=config, home_root=home.root, config_path=config_path,
                             marks=fork_server_env(config, home))
            spawner, cluster = ray, ray
        else:
            spawner = local_spawner(config, home, forkserver)
        spawner = fault_injection.wrap(spawner)
    daemon = Daemon(config, home, store=store, spawner=spawner, cluster=cluster, config_path=config_path, clock=clock,
                    monitor_thread=monitor_thread, lock=lock)
    if ray is not None:
        # The one part made after the daemon: the node agents' beat relays are credentials of
        # the daemon's access rules (access.py), which read its services' current incarnations.
        ray.relays = daemon.access
    return daemon


def open_registry(config: MeshConfig, home: Home, clock: Clock) -> Store:
    """Decide on memory, record behind: a registry that refuses writes (disk full, lock held
    elsewhere) never stops detection or recovery (registry/journal.py). The backend is the
    URL's scheme's (registry/backends.py); the home's file by default."""
    from tron.registry.backends import open_store

    return open_store(registry_url(config) or home.registry_db, clock=clock,
                      spill=home.registry_db.with_name("journal.jsonl"))


def local_spawner(config: MeshConfig, home: Home, forkserver: ForkServerClient | None) -> LocalSpawner:
    """This machine's spawner: the fork server (``forkserver`` if launched already), the log
    pump, and a cgroup per incarnation where ``[mesh] ownership`` allows."""
    if not config.mesh.fork_server:
        forkserver = None
    elif forkserver is None:
        forkserver = local_fork_server(config, home)
    pump = None
    if config.logs.pump:
        min_free = -1 if config.logs.min_free is None else config.logs.min_free
        pump = LogPumpClient(home.run / "logpump.sock", home.log_file("logpump"), home.logs,
                             {**os.environ, **mesh_marks(home)}, min_free)
    return LocalSpawner(forkserver=forkserver, logs=pump,
                        cgroup_home=home.root if config.mesh.ownership == "auto" else None,
                        standbys=config.mesh.standbys, beat_channels=True)
