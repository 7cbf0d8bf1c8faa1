"""python -m tron.services.daemon [--config FILE] [--home DIR]: the daemon in the foreground.

Usually started by `tron up`. Exits non-zero with one clear line when it cannot start
(another daemon on this home, a malformed registry, a bad mesh file, a busy port).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import signal
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from tron.common.config import ConfigError, MeshConfig, load_mesh, registry_url
from tron.common.paths import Home
from tron.common.settings import apply_overlay, overlay_path, read_overlay
from tron.registry.backup import newest_good
from tron.registry.schema import RegistryError, RegistryUnwritable
from tron.services.daemon.lock import HomeLock, StartError
from tron.services.daemon.spawner import ForkServerClient, local_fork_server

SWITCH_INTERVAL = 0.001  # seconds the GIL stays with one thread while another waits (Python's: 0.005)

if TYPE_CHECKING:
    from tron.services.daemon.core import Daemon

log = logging.getLogger("tron.daemon")


async def serve(daemon: Daemon) -> int:
    from aiohttp import web

    from tron.common import conn_guard, telemetry
    from tron.services.daemon.api import make_app

    telemetry.setup(daemon.config.telemetry, service="daemon")  # imports the SDK only with an endpoint
    try:
        await daemon.start()
    except BaseException:
        await daemon.shutdown()  # close what start() opened (the registry's thread would hold the exit)
        raise
    runner = web.AppRunner(make_app(daemon), access_log=None, handle_signals=False,
                           keepalive_timeout=conn_guard.IDLE_TIMEOUT)
    await runner.setup()
    assert runner.server is not None
    # Connections held open by any local user cannot take the descriptors the daemon runs on.
    daemon.http_guard = conn_guard.ConnectionGuard(runner.server, on_evict=daemon.metrics.http_evicted.inc)
    bind = daemon.config.mesh.bind
    site = web.TCPSite(runner, bind, daemon.config.mesh.daemon_port, reuse_address=True)
    try:
        await site.start()
    except OSError as err:
        await runner.cleanup()
        await daemon.shutdown()
        raise StartError(f"cannot listen on {bind}:{daemon.config.mesh.daemon_port}: {err.strerror}") from None
    # The start-up heap (modules, schemas, the config) lives as long as the daemon: out of the
    # collector's sight, a full collection walks only what was made since, so under a beat load it
    # stalls the loop and the monitor thread for milliseconds, not ~200 ms (benchmarks/README.md, 5).
    gc.collect()
    gc.freeze()
    # The monitor thread waits for the GIL whenever it wakes while the loop runs Python: up to
    # Python's 5 ms switch interval, more under a batch of beats (TRON's p99 lateness rose from
    # 9.6 to 15.8 ms under POST /beats). A shorter interval hands it over sooner; it costs
    # nothing while no other thread waits (benchmarks/README.md, section 5).
    sys.setswitchinterval(SWITCH_INTERVAL)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, daemon.request_shutdown)
    loop.add_signal_handler(signal.SIGHUP, daemon.reload_on_signal)  # as nginx and supervisord: read the file again
    daemon.write_daemon_file(daemon.config.mesh.daemon_port)
    bring_up = daemon.background(daemon.bring_up(), "bring-up")  # a failure of it is logged, not lost
    await daemon.shutdown_requested.wait()
    bring_up.cancel()
    await daemon.shutdown()
    await runner.cleanup()
    telemetry.shutdown()  # bounded: a hung collector never holds `tron down`
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tron.services.daemon")
    parser.add_argument("--config", type=Path)
    parser.add_argument("--home")
    args = parser.parse_args(argv)
    on_postgres = False
    forkserver = None
    try:
        config = load_mesh(args.config)
        on_postgres = registry_url(config) is not None
        home = Home.resolve(args.home)
        config_path = (args.config or Path(config.source)).resolve()
        overlay = overlay_path(config_path, home.root)
        config = apply_overlay(config, read_overlay(overlay), overlay)
        lock = HomeLock(home)
        lock.acquire()  # before the fork server binds its socket in the home: one authority, never two
        forkserver = launch_fork_server(config, home)
        from tron.services.daemon.build import build_daemon  # the heavy imports, while the fork server makes its own

        daemon = build_daemon(config, home, config_path=config_path, lock=lock, forkserver=forkserver)
        return asyncio.run(serve(daemon))
    except RegistryError as err:
        hint = "" if on_postgres or isinstance(err, RegistryUnwritable) else \
            restore_hint(Home.resolve(args.home).registry_db)
        print(f"tron daemon: {err}{hint}", file=sys.stderr)
        return 2
    except (ConfigError, StartError) as err:
        print(f"tron daemon: {err}", file=sys.stderr)
        return 2
    finally:
        end_fork_server(forkserver)


def end_fork_server(forkserver: ForkServerClient | None) -> None:
    """The fork server launched early must not outlive a daemon that could not start (a
    malformed registry, an unsafe token file): ended here, not a moment later by its
    parent-death signal, so `tron up` returns with nothing of the home left running. A
    daemon that ran has stopped it already."""
    proc = forkserver.proc if forkserver is not None else None
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def launch_fork_server(config: MeshConfig, home: Home) -> ForkServerClient | None:
    """The fork server's imports (the agent code, then the LLM SDKs) are the longest part of
    a `tron up`: it starts before the daemon's own, on the other core. None when the mesh
    runs without one (or on Ray, whose nodes have their own)."""
    if not config.mesh.fork_server or config.cluster.engine == "ray":
        return None
    forkserver = local_fork_server(config, home)
    return forkserver if forkserver.launch() else None


def restore_hint(db_path: Path) -> str:
    good = newest_good(db_path)
    if good is None:
        return ""
    return f". The newest good backup is {good}: `tron restore {good}` puts it in place"


if __name__ == "__main__":
    sys.exit(main())
