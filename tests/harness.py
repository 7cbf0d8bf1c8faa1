"""A real mesh driven from outside, as a user would: `tron` commands, HTTP, signals and
read-only registry queries. Used by the integration tests and the benchmarks (never by
the CLI: the CLI does not import test code).

``cleanup`` stops a mesh and reports (and kills) any process that was started for its
home and is still alive (found through its TRON_HOME environment variable).
"""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import psutil

from tron.common.processes import describe, home_processes, kill_tree
from tron.scripts.client import http, wait_for as client_wait_for

REPO = Path(__file__).resolve().parents[1]
# The entry point a user runs: installed into the same environment as this interpreter.
TRON = [str(Path(sys.executable).parent / "tron")]

FAST_POLICY = {
    "heartbeat_interval": 0.25,
    "miss_threshold": 8,  # 2 s: a loaded 2-core machine running three meshes starves a process for 1 s
    "progress_timeout": 20.0,
    "task_timeout": 60.0,
    "max_restarts": 3,
    "restart_window": 60.0,
    "backoff_initial": 0.05,
    "backoff_factor": 2.0,
    "backoff_max": 0.2,
    "backoff_jitter": 0.2,
    "stop_grace": 3.0,
    "start_timeout": 20.0,
}


POLL_MAX = 0.1


def wait_for(predicate, timeout: float, what: str, interval: float = 0.02, *,
             error: type[Exception] = AssertionError):
    """tron.scripts.client.wait_for, its polls thinning out from ``interval`` to 10 a second
    after about half a second: most polls here ask a daemon for its /status (~1 ms of CPU on
    each side), and three or four tests waiting seconds at 50 polls a second took a share of
    the suite's two cores from the meshes they wait on."""
    return client_wait_for(predicate, timeout, what, interval, error=error, interval_max=POLL_MAX)


def closed_by_peer(socks: list[socket.socket], timeout: float) -> int:
    """How many of ``socks`` the other end closed (EOF or a reset) within ``timeout`` s each."""
    closed = 0
    for s in socks:
        s.settimeout(timeout)
        try:
            closed += s.recv(1) == b""
        except ConnectionResetError:
            closed += 1
    return closed


def send_json(handler, body, status: int = 200) -> None:
    """A fake server's answer (an http.server request handler): ``body`` as JSON."""
    data = json.dumps(body).encode()
    handler.send_response(status)
    handler.send_header("Content-Type", "application/json")
    handler.send_header("Content-Length", str(len(data)))
    handler.end_headers()
    handler.wfile.write(data)


class FakeDaemon:
    """A home's daemon as the CLI meets it, on a free loopback port: /health for ``home``,
    ``status`` for any other GET, ``answer`` for any POST (each kept in ``posted``); the
    home's daemon file names it, and the operator's token is written unless ``token`` is
    False (a token file removed while the mesh runs). ``close()`` when done."""

    def __init__(self, home, status: dict, *, answer: dict | None = None, token: bool = True) -> None:
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        self.posted: list[tuple[str, dict]] = []
        posted = self.posted

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                send_json(self, {"status": "ok", "home": str(home.root)} if self.path == "/health" else status)

            def do_POST(self) -> None:
                posted.append((self.path, json.loads(self.rfile.read(int(self.headers["Content-Length"])))))
                send_json(self, answer or {})

            def log_message(self, *args) -> None:  # quiet
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True).start()
        if token:
            home.token_file.write_text("test-token\n")
        home.daemon_file.write_text(json.dumps({"pid": os.getpid(), "port": self.server.server_address[1]}))

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _ports_free(ports) -> bool:
    for port in ports:
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                return False
    return True


def _ephemeral_start() -> int:
    """Where the kernel starts handing out ports for outgoing connections: a listener
    placed above it can find its port taken by any client's socket."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


# Ray's workers (the node agents, tests/integration/test_ray_cluster.py) bind ports of their
# own, by default anywhere in 10002-19999, right where meshes' offsets land; the cluster tests
# give them this band instead, and no mesh is placed on it.
RAY_WORKER_PORTS = (31000, 31999)

# Its own generator: pytest-randomly seeds the global one alike before every test, and every
# test of a worker would then try the same offsets first.
_PORTS = random.Random()


def free_offset(base_ports: list[int]) -> int:
    """An offset that puts every port free and below the ephemeral range. Parallel test
    workers (pytest-xdist) each draw from a band of their own, so two never race for one."""
    low, high = min(base_ports), max(base_ports)
    bottom, top = max(1025 - low, 2000), min(_ephemeral_start(), RAY_WORKER_PORTS[0]) - 1 - high
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1") or 1)
    worker = int(os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw") or 0)
    band = (top - bottom) // max(1, workers)
    bottom, top = bottom + worker * band, bottom + (worker + 1) * band
    for _ in range(200):
        offset = _PORTS.randrange(bottom, top, 10)
        if _ports_free([p + offset for p in base_ports]):
            return offset
    raise RuntimeError("no free port range found")


def toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{k} = {toml_value(x)}" for k, x in v.items()) + " }"
    raise TypeError(v)


def write_mesh(path: Path, *, policy: dict | None = None, services: dict | None = None,
               providers: dict | None = None, fast: bool = True, cluster: dict | None = None,
               notify: list[dict] | None = None) -> dict:
    """Write a mesh file: the default mesh, with the fast test policy unless ``fast`` is
    False, then the given overrides; ``notify``: its ``[[notify]]`` entries."""
    base = tomllib.loads((REPO / "mesh.toml").read_text())
    if fast:
        base["policy"].update(FAST_POLICY)
    base["policy"].update(policy or {})
    base["providers"].update(providers or {})
    if services is not None:
        base["services"] = services
    if cluster is not None:
        base["cluster"] = cluster
    if notify is not None:
        base["notify"] = notify
    path.write_text(mesh_text(base))
    return base


def mesh_text(data: dict) -> str:
    """A mesh file's text from its data: the sections the tests set, its ``[[notify]]`` entries,
    then its services."""
    lines = []
    for section in ("mesh", "policy", "providers", "cluster"):
        if section in data:
            lines.append(f"[{section}]")
            lines += [f"{k} = {toml_value(v)}" for k, v in data[section].items()]
    for entry in data.get("notify", []):
        lines.append("[[notify]]")
        lines += [f"{k} = {toml_value(v)}" for k, v in entry.items()]
    for name, spec in data["services"].items():
        lines.append(f"[services.{json.dumps(name)}]")  # quoted: a name may hold a dot
        lines += [f"{k} = {toml_value(v)}" for k, v in spec.items()]
    return "\n".join(lines) + "\n"


class Mesh:
    def __init__(self, home: Path, config: Path, offset: int, spec: dict, registry_url: str | None = None) -> None:
        self.home = home
        self.config = config
        self.offset = offset
        self.spec = spec
        self.registry_url = registry_url  # a PostgreSQL registry, else the SQLite file in the home
        self.env = dict(os.environ, TRON_HOME=str(home), TRON_PORT_OFFSET=str(offset))
        self.env.pop("TRON_REGISTRY_URL", None)
        if registry_url:
            self.env["TRON_REGISTRY_URL"] = registry_url
        self.env.pop("ANTHROPIC_API_KEY", None)
        self.env.pop("OLLAMA_HOST", None)
        self.policy = spec["policy"]

    # -- commands --------------------------------------------------------------------------

    def tron(self, *args: str, timeout: float = 120, check: bool = False) -> subprocess.CompletedProcess:
        proc = subprocess.run([*TRON, "--config", str(self.config), *args], env=self.env, capture_output=True,
                              text=True, timeout=timeout, cwd=REPO)
        if check and proc.returncode != 0:
            raise AssertionError(f"tron {' '.join(args)} exited {proc.returncode}: {proc.stderr}{proc.stdout}")
        return proc

    def up(self) -> None:
        self.tron("up", "--detach", check=True)

    def down(self) -> subprocess.CompletedProcess:
        return self.tron("down")

    # -- looking -----------------------------------------------------------------------------

    def port(self, name: str) -> int:
        if name == "daemon":
            return self.spec["mesh"]["daemon_port"] + self.offset
        return self.spec["services"][name]["port"] + self.offset

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.port(name)}"

    @property
    def token(self) -> str:
        return (self.home / "run" / "token").read_text().strip()

    def http(self, method: str, url: str, body=None, *, token: str | None | bool = True, raw: bytes | None = None,
             timeout: float = 5) -> tuple[int, object]:
        given = self.token if token is True else (token or None)
        if token is True and not url.startswith(self.url("daemon") + "/"):
            given = self.peer_token(url)  # the operator's token is never sent to a service
        return http(method, url, body, token=given, raw=raw, timeout=timeout)

    def peer_token(self, url: str) -> str | None:
        """A token the daemon makes for calling one of the mesh's services (access.py)."""
        name = next((n for n in self.spec["services"] if url.startswith(self.url(n) + "/")), None)
        if name is None:
            return None
        code, answer = http("POST", self.url("daemon") + "/auth/peer", {"to": name}, token=self.token, timeout=5)
        return answer["token"] if code == 200 else None

    def health(self, name: str) -> dict | None:
        try:
            status, body = self.http("GET", self.url(name) + "/health", timeout=0.5)  # with a peer token
        except OSError:
            return None
        # Without "incarnation" it took our token for another incarnation's (the daemon made it
        # just before a restart): the public answer; the next call gets a new token.
        return body if status == 200 and isinstance(body, dict) and "incarnation" in body else None

    def status(self) -> dict:
        status, body = self.http("GET", self.url("daemon") + "/status")
        assert status == 200, body
        return body

    def service(self, name: str) -> dict:
        return next(s for s in self.status()["services"] if s["name"] == name)

    def metrics(self) -> dict[tuple[str, tuple], float]:
        """The daemon's /metrics samples, by (name, sorted labels)."""
        from prometheus_client.parser import text_string_to_metric_families

        code, text = self.http("GET", self.url("daemon") + "/metrics", token=False)
        assert code == 200, text
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for fam in text_string_to_metric_families(text) for s in fam.samples}

    def db(self):
        """A read-only connection to this mesh's registry, on whichever engine holds it."""
        from tron.registry.read import connect

        return connect(self.registry_url or self.home / "registry" / "registry.db")

    def flushed(self, timeout: float = 10.0) -> None:
        """The daemon records behind (registry/journal.py): before reading the registry
        directly, let it write what it has already decided (when it runs and can write)."""
        def done():
            try:
                code, body = self.http("GET", self.url("daemon") + "/status", token=False, timeout=2)
            except OSError:
                return True  # no daemon: nothing pending
            return code != 200 or body["registry"]["state"] != "ok" or not body["registry"].get("pending")
        wait_for(done, timeout, "the daemon's journal to be written", interval=0.01)

    def rows(self, sql: str, args: tuple = ()) -> list[dict]:
        self.flushed()
        with self.db() as conn:
            return [dict(r) for r in conn.execute(sql, args)]

    def history(self, agent: str | None = None) -> list[dict]:
        if agent:
            return self.rows("SELECT * FROM retry_history WHERE agent_id = ? ORDER BY id", (agent,))
        return self.rows("SELECT * FROM retry_history ORDER BY id")

    def wait_replaced(self, name: str, old_pid: int, timeout: float = 30, *, listens: bool = True) -> dict:
        """Until the service is back with a new pid; returns what shows it.

        An agent: a new pid answers /health on the service's own port and the daemon has
        recorded that pid (a forked child can answer before its spawn call returns); its
        /health answer. A program (``command`` in its spec: it answers no /health): the daemon
        records a new pid, that process is alive, the service is running and (unless
        ``listens`` is False, for a program that serves no port) its port accepts a
        connection; the daemon's status row of the service."""
        if "command" not in self.spec["services"][name]:
            return wait_for(lambda: (h := self.health(name)) and h["pid"] != old_pid
                            and self.service(name)["pid"] == h["pid"] and h, timeout,
                            f"{name} to come back with a new pid")

        def back() -> dict | None:
            s = self.service(name)
            if s["state"] != "running" or not s["pid"] or s["pid"] == old_pid or not psutil.pid_exists(s["pid"]):
                return None
            if listens:
                try:
                    socket.create_connection(("127.0.0.1", self.port(name)), timeout=1).close()
                except OSError:
                    return None
            return s
        return wait_for(back, timeout, f"{name} (a program) to be running again with a new pid")

    def wait_state(self, name: str, state: str, timeout: float = 30) -> dict:
        return wait_for(lambda: (s := self.service(name))["state"] == state and s, timeout, f"{name} {state}")

    def kill(self, name: str, sig: int = signal.SIGKILL) -> int:
        pid = self.service(name)["pid"]
        assert pid, f"{name} has no pid"
        os.kill(pid, sig)
        return pid

    def standby(self, name: str) -> tuple[int, str] | None:
        """The standby (or gate) waiting for ``name``'s next start: (pid, the incarnation id
        its cgroup is named after), from the daemon's census and the process's own cgroups."""
        for pid in self.status()["ownership"].get("gates", []):
            try:
                lines = Path(f"/proc/{pid}/cgroup").read_text().splitlines()
            except OSError:
                continue
            for line in lines:
                leaf = line.rsplit("/", 1)[-1]
                if leaf.startswith(f"{name}.i-"):
                    return pid, leaf[len(name) + 1:]
        return None

    def processes(self) -> list[psutil.Process]:
        """Every live process of this mesh (found by its environment, not the registry)."""
        return home_processes(str(self.home))


def rewrite_mesh(mesh: "Mesh", services: dict | None = None, policy: dict | None = None,
                 notify: list[dict] | None = None) -> None:
    """Rewrite a mesh's file: its services, policy keys or ``[[notify]]`` entries, everything
    else kept (for `tron reload`)."""
    data = tomllib.loads(mesh.config.read_text())
    data["policy"].update(policy or {})
    if services is not None:
        data["services"] = services
    if notify is not None:
        data["notify"] = notify
    mesh.config.write_text(mesh_text(data))


def make_mesh(tmp_path: Path, *, home: Path | None = None, registry_url: str | None = None, **kw) -> Mesh:
    """A mesh in ``tmp_path`` (config, and the home unless given) on a free port range;
    not started. ``registry_url``: a PostgreSQL database for its registry."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    home = home or tmp_path / "home"
    config = tmp_path / "mesh.toml"
    spec = write_mesh(config, **kw)
    ports = [spec["mesh"]["daemon_port"]] + [s["port"] for s in spec["services"].values()]
    return Mesh(home, config, free_offset(ports), spec, registry_url)


def cleanup(mesh: Mesh) -> list[str]:
    """Stop the mesh; return what was left behind (and kill it, so nothing leaks)."""
    mesh.down()
    # What `tron down` could not reach (a fork server of a Ray node the test removed) ends by
    # its parent-death signal, a moment later on a loaded machine: give that moment, no more.
    deadline = time.monotonic() + 10
    while (leftovers := mesh.processes()) and time.monotonic() < deadline:
        time.sleep(0.1)
    names = describe(leftovers)
    kill_tree(leftovers)
    return names


def server_answers(port: int, name: str, timeout: float = 1.0) -> bool:
    """A real server of examples/servers answers its own protocol on 127.0.0.1: redis
    PING -> +PONG, nginx GET / -> 200, PostgreSQL a connection running SELECT 1."""
    import urllib.request

    import psycopg

    try:
        if name == "redis":
            with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith(b"+PONG")
        if name == "nginx":
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=timeout) as resp:
                return resp.status == 200
        with psycopg.connect(host="127.0.0.1", port=port, user="postgres", dbname="postgres",
                             connect_timeout=max(1, int(timeout))) as conn:
            return conn.execute("SELECT 1").fetchone() == (1,)
    except (OSError, psycopg.Error):  # refused, reset, "the database system is starting up": not serving
        return False

