"""Heartbeat ingestion over HTTP: beats per second into the REAL daemon's ``/beat`` against a
bare aiohttp handler that parses the same JSON, with the same load generator, in the same run.

Servers (each in its own process, so the load never shares their CPU or GIL):
  real             ``tron.services.daemon.api.make_app(daemon)``: a real ``Daemon`` on a temporary
                   home with 200 command services that are never spawned (``bring_up`` is not
                   called); each gets an incarnation and is watched with hour-long deadlines.
  bare             a bare aiohttp app: ``await request.json()`` and ``web.json_response``.
  bare_in_daemon   the same bare handler served from the real daemon's process (its own
                   port): tells the handler's cost from the cost of the process it runs in.
  batch            (in the real daemon's process, its own port) a bare-bones handler written
                   here: token check, ``await request.json()`` of a list, a loop of
                   ``daemon.monitor.beat``. Not part of the daemon.
  batch_validated  the same, but each beat is validated as ``Beat`` (pydantic TypeAdapter) and
                   goes through ``daemon.on_beat`` (metrics, service state): what a real batch
                   endpoint would cost.
  beats            the REAL daemon's ``POST /beats`` (services/daemon/api.py), on the same port
                   as ``real``, with a node agent's relay credential that covers every service
                   (``Access.mint_relay`` + ``relay_runs``): ``--beats-conns`` connections, each
                   owning ``--beats-batch`` services of its own (the daemon watches as many as
                   that takes) and pipelining ``--beats-depth`` requests.
All are served by ``web.AppRunner(app, access_log=None, handle_signals=False)`` on 127.0.0.1,
as the daemon serves itself.

Load generator (this process): one keep-alive TCP connection per sender, each sender owning
its services so seq is strictly increasing per service and arrives in order; a small
asyncio Protocol writes a request as soon as the previous response is in (closed loop).
It is written on raw asyncio instead of aiohttp's client because the client costs about as
much CPU per request as the server does, and would then be what is measured
(``--client aiohttp`` runs it for comparison). Singles: ``--senders`` connections, one
service each. Batches: ``senders / batch`` connections, each owning ``batch`` services and
sending one beat of each per request (the same number of beats in flight).

Batch connections pipeline ``--batch-depth`` requests (HTTP/1.1, answered in order), since
four connections in strict ping-pong leave the server idle between requests.

The monitor's lateness under each load: in the real daemon's process, ``--probes`` extra
agents (not in the mesh) are watched with beat deadlines 50-250 ms ahead and never beat;
the monitor thread fires each (its signals are taken off before they reach the ladder),
and ``fired_at - deadline`` is its lateness, sampled while each variant runs and while
nothing runs (``idle``), so the loads' effect on detection is measured in the same run.

Rounds: ``--rounds`` alternating rounds of every variant, each ``--warmup`` s then
``--seconds`` s measured; medians reported, with the server's CPU time per beat (psutil) and
its garbage collection time per beat (gc.callbacks in the server). Afterwards the real
handler, the bare one and the validated batch are profiled with pyinstrument inside the
server process; the handler's pieces are timed one by one, and the real /beat handler is
timed against the bare one on mocked requests (no HTTP at all), in the server process.

    .venv/bin/python -m benchmarks.beat_ingest [--seconds 10] [--senders 200]
                                            [--json benchmarks/results/beat_ingest.json]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import platform
import secrets
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from array import array
from collections import defaultdict, deque
from multiprocessing.connection import Client, Listener
from pathlib import Path

import psutil

from tron.scripts.stats import summary
from tron.services.daemon.__main__ import SWITCH_INTERVAL

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
N_SERVICES_DEFAULT = 200
VARIANTS = ("real", "bare", "bare_in_daemon", "batch", "batch_validated", "beats", "idle")
SINGLE = ("real", "bare", "bare_in_daemon")


def table(title: str, headers: list[str], rows: list[list]) -> str:
    def fmt(c):
        if c is None:
            return ""
        if isinstance(c, float):
            return f"{c:,.2f}"
        if isinstance(c, int):
            return f"{c:,}"
        return str(c)
    cells = [headers] + [[fmt(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    out = [title, "  ".join(h.rjust(w) for h, w in zip(cells[0], widths)), "  ".join("-" * w for w in widths)]
    out += ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in cells[1:]]
    return "\n".join(out)


def service_names(n: int) -> list[str]:
    return [f"svc-{i:03d}" for i in range(n)]


# =====================================================================================
# Server process
# =====================================================================================

def write_mesh(path: Path, n: int) -> None:
    from tron.common.config import MeshSection
    lines = ["[mesh]", "daemon_port = 39999"]
    if "fork_server" in MeshSection.model_fields:
        lines.append("fork_server = false")  # command services only, nothing to fork; no extra process
    lines.append("")
    for i, name in enumerate(service_names(n)):
        lines += [f"[services.{name}]", 'command = ["sleep", "1000"]', f"port = {40000 + i}", ""]
    path.write_text("\n".join(lines))


def _profile_summary(session, top: int = 25) -> dict:
    """Self time per function and inclusive time of the handler's parts, from a
    pyinstrument session of the event loop thread."""
    root = session.root_frame()
    if root is None:
        return {}
    total = root.time
    self_t: dict[str, float] = defaultdict(float)
    incl: dict[str, float] = defaultdict(float)
    idle = 0.0

    def walk(f, active: frozenset) -> None:
        nonlocal idle
        base = os.path.basename(f.file_path or "")
        if f.function == "select" and base == "selectors.py":
            idle += f.time  # the event loop waiting for sockets
            return
        if not f.is_synthetic:
            self_t[f"{f.function} ({f.file_path_short}:{f.line_no})"] += f.total_self_time
        key = f"{f.function}@{base}"
        new_active = active
        if key not in active:
            incl[key] += f.time
            new_active = active | {key}
        for c in f.children:
            walk(c, new_active)

    walk(root, frozenset())
    busy = total - idle
    parts = ["_run_once@base_events.py", "data_received@web_protocol.py", "start@web_protocol.py",
             "_handle_request@web_protocol.py", "finish_response@web_protocol.py", "guarded@http.py",
             "token_ok@http.py", "beat@api.py", "parse@http.py", "read@web_request.py", "model_validate@main.py",
             "on_beat@core.py", "beat@monitor.py", "inc@metrics.py", "json_response@web_response.py",
             "json@web_request.py", "bare@beat_ingest.py", "batch@beat_ingest.py",
             "batch_validated@beat_ingest.py", "validate_json@type_adapter.py", "dumps@__init__.py",
             "loads@__init__.py", "beats@api.py", "_read_batch@api.py", "model_validate_json@main.py",
             "on_beats@core.py", "speaks_for@access.py", "record@audit.py"]
    return {
        "total_s": round(total, 3), "idle_select_s": round(idle, 3), "busy_s": round(busy, 3),
        "self_top": [{"func": k, "s": round(v, 3), "pct_of_busy": round(100 * v / busy, 1) if busy else None}
                     for k, v in sorted(self_t.items(), key=lambda kv: -kv[1])[:top]],
        "inclusive": {k: {"s": round(incl[k], 3), "pct_of_busy": round(100 * incl[k] / busy, 1) if busy else None}
                      for k in parts if k in incl},
        "inclusive_top": [{"func": k, "s": round(v, 3), "pct_of_busy": round(100 * v / busy, 1) if busy else None}
                          for k, v in sorted(incl.items(), key=lambda kv: -kv[1])[:40]],
    }


class ServerSide:
    """Runs in the server process: the app(s), and a control thread that takes commands
    from the orchestrator over a multiprocessing connection."""

    def __init__(self, kind: str, args) -> None:
        self.kind = kind
        self.args = args
        self.daemon = None
        self.runners = []
        self.ports: dict[str, int] = {}
        self.requests = 0
        self.batch_beats = 0
        self.profiler = None
        self.loop: asyncio.AbstractEventLoop | None = None
        # garbage collections in this process: count and seconds per generation
        self.gc_count = [0, 0, 0]
        self.gc_time = [0.0, 0.0, 0.0]
        self._gc_t0 = 0.0
        gc.callbacks.append(self._on_gc)
        self.done = asyncio.Event()  # made once (it was remade at every collection: a quit could be lost)

    def _on_gc(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._gc_t0 = time.perf_counter()
        else:
            g = info["generation"]
            self.gc_count[g] += 1
            self.gc_time[g] += time.perf_counter() - self._gc_t0

    async def _serve(self, app, name: str) -> None:
        from aiohttp import web
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0, reuse_address=True)
        await site.start()
        self.runners.append(runner)
        self.ports[name] = site._server.sockets[0].getsockname()[1]

    async def setup(self) -> None:
        await self._setup()
        if self.args.server_gc_freeze:
            gc.collect()
            gc.freeze()  # diagnostic: start-up objects out of the collector's sight
        if self.args.server_switch_interval:
            sys.setswitchinterval(self.args.server_switch_interval)  # the GIL's hand-over period, as the daemon

    async def _setup(self) -> None:
        from aiohttp import web
        async def bare(request: web.Request) -> web.Response:
            await request.json()
            self.requests += 1
            return web.json_response({"ok": True})

        if self.kind == "bare":
            app = web.Application(client_max_size=256 * 1024)
            app.router.add_post("/beat", bare)
            await self._serve(app, "bare")
            return

        from pydantic import TypeAdapter

        from tron.common.config import load_mesh
        from tron.common.http import TOKEN_KEY, error, token_ok
        from tron.common.models import Beat
        from tron.common.monitor import Verdict
        from tron.common.paths import Home
        from tron.services.daemon.api import make_app
        from tron.services.daemon.build import build_daemon

        mesh = Path(self.args.home) / "mesh.toml"
        n_services = max(self.args.services, self.args.beats_conns * self.args.beats_batch)
        write_mesh(mesh, n_services)
        config = load_mesh(mesh, port_offset=0)
        d = self.daemon = build_daemon(config, Home(Path(self.args.home) / "home"), config_path=mesh)
        await d.start()
        self.relay_token = d.access.mint_relay("bench-node")  # a node agent's credential, as the Ray spawner mints it
        for i, name in enumerate(service_names(n_services)):
            d.sup.services[name].incarnation = f"i-{i}"
            d.access.relay_runs("bench-node", name, f"i-{i}")
            d.monitor.watch(name, f"i-{i}", time.monotonic(), beat_timeout=3600, progress_timeout=3600,
                            task_timeout=3600)
        self._start_probes(d)
        await self._serve(make_app(d), "real")

        monitor = d.monitor
        accepted = Verdict.ACCEPTED
        beats_adapter = TypeAdapter(list[Beat])

        async def batch(request: web.Request) -> web.Response:
            if not token_ok(request):
                return error(401, "token")
            items = await request.json()
            now = time.monotonic()
            n = 0
            for b in items:
                if monitor.beat(b["service"], b["incarnation"], b["seq"], now, task_id=b.get("task_id"),
                                progress=b.get("progress"), waiting=b.get("waiting", False)) is accepted:
                    n += 1
            self.batch_beats += n
            return web.json_response({"accepted": n})

        async def batch_validated(request: web.Request) -> web.Response:
            if not token_ok(request):
                return error(401, "token")
            beats = beats_adapter.validate_json(await request.read())
            n = 0
            for b in beats:
                if await d.on_beat(b) is accepted:
                    n += 1
            self.batch_beats += n
            return web.json_response({"accepted": n})

        app = web.Application(client_max_size=256 * 1024)
        app[TOKEN_KEY] = d.token
        app.router.add_post("/beats", batch)
        app.router.add_post("/beats_validated", batch_validated)
        app.router.add_post("/beat", bare)  # the bare handler inside the daemon's process
        await self._serve(app, "batch")

    def _start_probes(self, d) -> None:
        """Agents that never beat, re-watched as soon as they fire: the monitor thread's
        lateness (fired_at - deadline) while the loop ingests beats."""
        import random

        probes = [f"probe-{i:03d}" for i in range(self.args.probes)]
        fired: deque = deque()
        self.lateness: list[float] = []
        thread = d.monitor_thread
        pass_on = thread.sink

        def sink(signal) -> None:  # on the monitor thread
            if signal.service.startswith("probe-"):
                self.lateness.append((signal.fired_at - signal.deadline) * 1e3)
                fired.append(signal.service)
            else:
                pass_on(signal)
        thread.sink = sink

        def arm(name: str) -> None:
            d.monitor.watch(name, "p", time.monotonic(), beat_timeout=random.uniform(0.05, 0.25),
                            progress_timeout=3600, task_timeout=3600)

        async def rearm() -> None:
            for name in probes:
                arm(name)
            while True:
                await asyncio.sleep(0.02)
                while fired:
                    arm(fired.popleft())
        if probes:
            self.probe_task = asyncio.ensure_future(rearm())

    # -- commands (run on the loop) ------------------------------------------------------

    async def cmd_info(self) -> dict:
        return {"pid": os.getpid(), "ports": self.ports, "token": self.daemon.token if self.daemon else "",
                "relay_token": getattr(self, "relay_token", ""), "kind": self.kind}

    async def cmd_stats(self, objects: bool = False) -> dict:
        out = {"requests": self.requests, "batch_beats": self.batch_beats, "gc_count": list(self.gc_count),
               "gc_time_s": list(self.gc_time), "gc_tracked_objects": len(gc.get_objects()) if objects else None}
        lateness = getattr(self, "lateness", None)
        if lateness is not None:  # the samples since the last call (drained)
            out["lateness_ms"], self.lateness = lateness, []
        if self.daemon:
            m = self.daemon.metrics
            out["monitor_beats_accepted"] = self.daemon.monitor.beats_accepted
            out["metric_beats_received"] = m.beats._value.get()
            out["metric_beats_rejected"] = {k[0]: c._value.get() for k, c in m.beats_rejected._metrics.items()}
            out["monitor_thread_alive"] = self.daemon.monitor_thread.is_alive()
        return out

    async def cmd_profile_start(self) -> dict:
        from pyinstrument import Profiler
        self.profiler = Profiler(interval=0.0005, async_mode="disabled")
        self.profiler.start()
        return {"ok": True}

    async def cmd_profile_stop(self, out_path: str) -> dict:
        p = self.profiler
        session = p.stop()
        self.profiler = None
        Path(out_path).write_text(p.output_text(unicode=False, color=False, show_all=False))
        return _profile_summary(session)

    async def cmd_micro(self, iters: int = 20000) -> dict:
        """The handler's pieces, timed one by one on this process's loop (idle meanwhile)."""
        import hmac

        from aiohttp import web

        from tron.common.models import Beat
        out: dict[str, float] = {}
        raw = (b'{"service":"svc-000","incarnation":"i-0","pid":1234,"seq":1,"task_id":null,'
               b'"progress":null}')

        def timeit(name, fn):
            for _ in range(500):
                fn()
            t0 = time.perf_counter_ns()
            for _ in range(iters):
                fn()
            out[name] = round((time.perf_counter_ns() - t0) / iters)

        tok = (self.daemon.token if self.daemon else "x" * 43).encode()
        timeit("hmac.compare_digest(token)", lambda: hmac.compare_digest(tok, tok))
        timeit("json.loads(body)", lambda: json.loads(raw))
        data = json.loads(raw)
        timeit("Beat.model_validate(dict)", lambda: Beat.model_validate(data))
        timeit("web.json_response({'ok': True})", lambda: web.json_response({"ok": True}))
        if self.daemon:
            d = self.daemon
            name, inc = "svc-000", "i-0"
            d.monitor.watch(name, inc, time.monotonic(), beat_timeout=3600, progress_timeout=3600, task_timeout=3600)
            seq = [0]

            def mon():
                seq[0] += 1
                d.monitor.beat(name, inc, seq[0], time.monotonic(), task_id=None, progress=None, waiting=False)
            timeit("Monitor.beat", mon)
            timeit("metrics.beats.inc()", d.metrics.beats.inc)
            loop = asyncio.get_running_loop()
            beats = [Beat(service=name, incarnation=inc, pid=1234, seq=10**9 + k) for k in range(iters + 500)]
            it = iter(beats)

            def on_beat():  # a coroutine that never suspends: drive it by hand, no loop round trip
                coro = d.on_beat(next(it))
                try:
                    coro.send(None)
                except StopIteration:
                    pass
            timeit("Daemon.on_beat (coroutine, no suspend)", on_beat)
            out.update(await self._handler_ab(loop))
        return out

    async def _handler_ab(self, loop, n: int = 2000, reps: int = 5) -> dict:
        """The real /beat handler against the bare one on mocked requests (no HTTP, no
        sockets; GC off while timing): the handlers' own cost, free of aiohttp's machinery."""
        from unittest import mock

        from aiohttp import streams, web
        from aiohttp.test_utils import make_mocked_request

        from tron.services.daemon.api import DAEMON_KEY, beat as real_beat
        d = self.daemon
        app = web.Application()
        app[DAEMON_KEY] = d
        from tron.common.http import TOKEN_KEY
        app[TOKEN_KEY] = d.token
        proto = mock.Mock(_reading_paused=False)  # shared by every mocked request: building mocks is slow
        transport = mock.Mock()
        transport.get_extra_info.return_value = ("127.0.0.1", 12345)
        writer = mock.Mock()
        name, inc = "svc-001", "i-1"

        async def bare(request):
            await request.json()
            return web.json_response({"ok": True})

        def req(seq: int):
            body = (b'{"service":"%s","incarnation":"%s","pid":1234,"seq":%d,"task_id":null,"progress":null}'
                    % (name.encode(), inc.encode(), seq))
            payload = streams.StreamReader(proto, 2**16, loop=loop)
            payload.feed_data(body)
            payload.feed_eof()
            return make_mocked_request("POST", "/beat", headers={"X-Tron-Token": d.token, "Content-Length": str(len(body)),
                                                                 "Content-Type": "application/json"},
                                       payload=payload, app=app, protocol=proto, transport=transport, writer=writer)

        res: dict[str, list[float]] = {"real": [], "bare": []}
        seq = 10**9
        d.monitor.watch(name, inc, time.monotonic(), beat_timeout=3600, progress_timeout=3600, task_timeout=3600)
        for _ in range(reps):
            for kind, handler in (("bare", bare), ("real", real_beat)):
                reqs = [req(seq + k) for k in range(n)]
                if kind == "real":  # only the real handler moves the monitor's seq (a jump over SEQ_WINDOW is refused)
                    seq += n
                gc.collect()
                gc.disable()
                try:
                    per = []
                    for r in reqs:
                        t0 = time.perf_counter_ns()
                        resp = await handler(r)
                        per.append(time.perf_counter_ns() - t0)
                finally:
                    gc.enable()
                if resp.status != 200:
                    raise RuntimeError(f"{kind} handler answered {resp.status}: {getattr(resp, 'text', '')}")
                res[kind].append(statistics.median(per))
                del reqs
        return {"handler bare, mocked request (p50 of call, median of reps)": round(statistics.median(res["bare"])),
                "handler real /beat, mocked request": round(statistics.median(res["real"])),
                "mocked reps bare": [round(x) for x in res["bare"]], "mocked reps real": [round(x) for x in res["real"]]}

    async def cmd_quit(self) -> dict:
        self.done.set()
        return {"ok": True}

    async def run(self, address, authkey: bytes) -> None:
        self.loop = asyncio.get_running_loop()
        conn = Client(address, authkey=authkey)
        try:
            await self.setup()
            conn.send(await self.cmd_info())

            def control() -> None:
                while True:
                    try:
                        msg = conn.recv()
                    except (EOFError, OSError):
                        asyncio.run_coroutine_threadsafe(self.cmd_quit(), self.loop)
                        return
                    name, kwargs = msg
                    fut = asyncio.run_coroutine_threadsafe(getattr(self, f"cmd_{name}")(**kwargs), self.loop)
                    try:
                        conn.send({"ok": fut.result(timeout=300)})
                    except Exception as err:  # noqa: BLE001 - reported to the orchestrator
                        conn.send({"error": repr(err)})
                    if name == "quit":
                        return

            th = threading.Thread(target=control, name="bench-control", daemon=True)
            th.start()
            await self.done.wait()
        finally:
            for r in self.runners:
                await r.cleanup()
            if self.daemon is not None:
                await self.daemon.shutdown()
            conn.close()


def server_main(args) -> int:
    address = (args.ctl_host, args.ctl_port)
    authkey = bytes.fromhex(os.environ["BENCH_AUTHKEY"])
    asyncio.run(ServerSide(args._serve, args).run(address, authkey))
    return 0


# =====================================================================================
# Orchestrator side
# =====================================================================================

class Server:
    """A server process and its control connection."""

    def __init__(self, kind: str, tmp: Path, services: int, listener: Listener, authkey: bytes,
                 gc_freeze: bool = False, extra: tuple[str, ...] = ()) -> None:
        self.kind = kind
        home = tmp / kind
        home.mkdir(parents=True, exist_ok=True)
        self.log = open(home / "server.log", "w")
        env = {**os.environ, "BENCH_AUTHKEY": authkey.hex(), "PYTHONUNBUFFERED": "1"}
        host, port = listener.address
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.beat_ingest", "--_serve", kind, "--home", str(home),
             "--services", str(services), "--ctl-host", host, "--ctl-port", str(port), *extra]
            + (["--server-gc-freeze"] if gc_freeze else []),
            stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, cwd=str(ROOT))
        self.conn = None
        try:
            self.conn = listener.accept()  # the listener has a timeout set by the caller
            if not self.conn.poll(60):
                raise RuntimeError(f"{kind} server did not come up; see {home / 'server.log'}")
            self.info = self.conn.recv()
            self.ps = psutil.Process(self.proc.pid)
        except BaseException:
            self.proc.kill()
            self.proc.wait()
            if self.conn is not None:
                self.conn.close()
            self.log.close()
            raise

    def call(self, name: str, **kwargs):
        self.conn.send((name, kwargs))
        if not self.conn.poll(600):
            raise RuntimeError(f"{self.kind}: no answer to {name}")
        res = self.conn.recv()
        if "error" in res:
            raise RuntimeError(f"{self.kind}: {name} failed: {res['error']}")
        return res["ok"]

    def cpu(self) -> float:
        t = self.ps.cpu_times()
        return t.user + t.system

    def stop(self) -> None:
        try:
            if self.proc.poll() is None:
                try:
                    self.call("quit")
                except Exception:  # noqa: BLE001 - fall through to terminate
                    pass
                try:
                    self.proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    self.proc.terminate()
                    try:
                        self.proc.wait(timeout=5)
                    except subprocess.TimeoutExpired:
                        self.proc.kill()
                        self.proc.wait()
        finally:
            try:
                self.conn.close()
            finally:
                self.log.close()


class Gen:
    """Shared state of one load run."""

    def __init__(self) -> None:
        self.running = True
        self.measuring = False
        self.requests = 0
        self.beats_ok = 0
        self.status: dict[int, int] = defaultdict(int)
        self.status_measured: dict[int, int] = defaultdict(int)
        self.lat = array("d")
        self.in_flight = 0
        self.idle = asyncio.Event()
        self.errors: list[str] = []


class Sender(asyncio.Protocol):
    """One keep-alive connection in a closed loop: ``depth`` requests outstanding (HTTP/1.1
    pipelining when > 1; the server answers a connection's requests in order, so seqs stay
    in order), a new one written as soon as a response is complete."""

    def __init__(self, gen: Gen, make_request, beats_of, depth: int = 1) -> None:
        self.gen = gen
        self.make_request = make_request  # () -> bytes
        self.beats_of = beats_of  # (status, body bytes) -> beats accepted
        self.depth = depth
        self.buf = b""
        self.sent_at: deque[float] = deque()
        self.transport = None

    def connection_made(self, transport) -> None:
        self.transport = transport

    def start(self) -> None:
        for _ in range(self.depth):
            self.send()

    def send(self) -> None:
        self.gen.in_flight += 1
        self.sent_at.append(time.perf_counter())
        self.transport.write(self.make_request())

    def data_received(self, data: bytes) -> None:
        buf = self.buf + data if self.buf else data
        g = self.gen
        while True:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                break
            head = buf[:end]
            i = head.lower().find(b"content-length:")
            if i >= 0:
                j = head.find(b"\r\n", i)
                clen = int(head[i + 15:j if j > 0 else len(head)])
            else:
                clen = 0
            total = end + 4 + clen
            if len(buf) < total:
                break
            status = int(head[9:12])
            body = buf[end + 4:total]
            buf = buf[total:]
            t_sent = self.sent_at.popleft()
            g.in_flight -= 1
            g.requests += 1
            g.status[status] += 1
            g.beats_ok += self.beats_of(status, body)
            if g.measuring:
                g.status_measured[status] += 1
                g.lat.append(time.perf_counter() - t_sent)
            if g.running:
                self.send()
            elif g.in_flight == 0:
                g.idle.set()
        self.buf = buf

    def connection_lost(self, exc) -> None:
        if self.gen.running and exc is not None:
            self.gen.errors.append(repr(exc))


class Load:
    """Request bodies with a strictly increasing seq per service, kept across runs (the real
    and the batch variants share one monitor)."""

    def __init__(self, services: int, token: str, relay_token: str = "") -> None:
        self.names = service_names(services)
        self.incs = [f"i-{i}" for i in range(services)]
        self.seq = [0] * services
        self.token = token.encode()
        self.relay_token = relay_token.encode()
        self.pid = os.getpid()

    def beat_body(self, i: int) -> bytes:
        self.seq[i] += 1
        return (b'{"service":"%s","incarnation":"%s","pid":%d,"seq":%d,"task_id":null,"progress":null}'
                % (self.names[i].encode(), self.incs[i].encode(), self.pid, self.seq[i]))

    def request(self, port: int, path: str, body: bytes, token: bytes | None = None) -> bytes:
        return (b"POST %s HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nX-Tron-Token: %s\r\n"
                b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                % (path.encode(), port, token or self.token, len(body), body))


def _one_if_200(status: int, body: bytes) -> int:
    return 1 if status == 200 else 0


def _accepted(status: int, body: bytes) -> int:
    return json.loads(body)["accepted"] if status == 200 else 0


async def run_load(load: Load, variant: str, port: int, *, senders: int, batch: int, warmup: float,
                   seconds: float, server: Server, client: str = "raw", depth: int = 1,
                   beats_shape: tuple[int, int, int] = (2, 1000, 2)) -> dict:
    loop = asyncio.get_running_loop()
    gen = Gen()
    n = len(load.names)
    if variant == "idle":  # nothing sent: the monitor's lateness with the loop idle
        groups, path, beats_of = [], "", _one_if_200
    elif variant == "beats":  # the real /beats: each connection owns its batch's services
        conns, batch, depth = beats_shape
        groups = [[c * batch + j for j in range(batch)] for c in range(conns)]
        path, beats_of = "/beats", _accepted
    elif variant in SINGLE:
        groups = [[i % n] for i in range(senders)]
        path, beats_of = "/beat", _one_if_200
        depth = 1
    else:
        conns = max(1, senders // batch)
        groups = [[(c * batch + j) % n for j in range(batch)] for c in range(conns)]
        path = "/beats" if variant == "batch" else "/beats_validated"
        beats_of = _accepted
    if variant in SINGLE and len(set(g[0] for g in groups)) != len(groups):
        raise SystemExit("--senders must not exceed --services: one service per sender keeps seqs in order")

    def maker(group):
        if len(group) == 1 and variant in SINGLE:
            i = group[0]
            return lambda: load.request(port, path, load.beat_body(i))
        if variant == "beats":
            return lambda: load.request(port, path, b'{"beats":[' + b",".join(load.beat_body(i) for i in group) + b"]}",
                                        load.relay_token)
        return lambda: load.request(port, path, b"[" + b",".join(load.beat_body(i) for i in group) + b"]")

    protos: list[Sender] = []
    tasks: list[asyncio.Task] = []
    me = psutil.Process()
    try:
        if client == "raw":
            for g in groups:
                _, proto = await loop.create_connection(lambda g=g: Sender(gen, maker(g), beats_of, depth),
                                                        "127.0.0.1", port)
                protos.append(proto)
            for p in protos:
                p.start()
        else:
            import aiohttp
            session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=len(groups)))

            async def worker(make):
                while gen.running:
                    raw = make()
                    head, body = raw.split(b"\r\n\r\n", 1)
                    t0 = time.perf_counter()
                    async with session.post(f"http://127.0.0.1:{port}{path}", data=body,
                                            headers={"X-Tron-Token": load.token.decode(),
                                                     "Content-Type": "application/json"}) as r:
                        rb = await r.read()
                    gen.requests += 1
                    gen.status[r.status] += 1
                    gen.beats_ok += beats_of(r.status, rb)
                    if gen.measuring:
                        gen.status_measured[r.status] += 1
                        gen.lat.append(time.perf_counter() - t0)
            tasks = [asyncio.ensure_future(worker(maker(g))) for g in groups]
        await asyncio.sleep(warmup)
        st0 = await loop.run_in_executor(None, server.call, "stats")
        b0, r0, t0 = gen.beats_ok, gen.requests, time.perf_counter()
        s0, c0 = server.cpu(), me.cpu_times()
        gen.measuring = True
        await asyncio.sleep(seconds)
        gen.measuring = False
        b1, r1, t1 = gen.beats_ok, gen.requests, time.perf_counter()
        s1, c1 = server.cpu(), me.cpu_times()
        st1 = await loop.run_in_executor(None, lambda: server.call("stats", objects=True))
        gen.running = False
        if client == "raw":
            if gen.in_flight:
                await asyncio.wait_for(gen.idle.wait(), 30)
        else:
            await asyncio.wait_for(asyncio.gather(*tasks), 30)
            await session.close()
    finally:
        gen.running = False
        for p in protos:
            if p.transport is not None:
                p.transport.close()
        for t in tasks:
            t.cancel()
    await asyncio.sleep(0.05)
    wall = t1 - t0
    beats = b1 - b0
    lat = summary([x * 1e3 for x in gen.lat])  # ms; {} when nothing was measured
    lateness = st1.get("lateness_ms") or []
    return {
        "variant": variant, "client": client, "connections": len(groups), "pipeline_depth": depth,
        "beats_per_request": len(groups[0]) if groups and variant not in SINGLE else (1 if groups else 0),
        "seconds": round(wall, 3), "beats": beats, "requests": r1 - r0,
        "beats_per_s": beats / wall, "requests_per_s": (r1 - r0) / wall,
        "monitor_lateness_ms": summary(lateness) if lateness else {}, "monitor_lateness_samples": len(lateness),
        "server_cpu_pct": 100 * (s1 - s0) / wall,
        "server_cpu_us_per_beat": 1e6 * (s1 - s0) / beats if beats else None,
        "client_cpu_pct": 100 * ((c1.user + c1.system) - (c0.user + c0.system)) / wall,
        "latency_ms_p50": lat.get("p50"), "latency_ms_p99": lat.get("p99"),
        "server_gc_count": [b - a for a, b in zip(st0["gc_count"], st1["gc_count"])],
        "server_gc_ms": [round((b - a) * 1e3, 1) for a, b in zip(st0["gc_time_s"], st1["gc_time_s"])],
        "server_gc_us_per_beat": 1e6 * (sum(st1["gc_time_s"]) - sum(st0["gc_time_s"])) / beats if beats else None,
        "server_gc_tracked_objects": st1["gc_tracked_objects"],
        "status_all": dict(gen.status), "status_measured": dict(gen.status_measured),
        "beats_ok_all": gen.beats_ok, "errors": gen.errors[:5],
    }


def fetch_metric(port: int, name: str) -> float | None:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        for line in r.read().decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
    return None


def machine() -> dict:
    return {
        "nproc": os.cpu_count(), "python": sys.version.split()[0], "platform": platform.platform(),
        "cpu_model": next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo")
                           if ln.startswith("model name")), "?"),
        "loadavg_at_start": os.getloadavg(),
        "aiohttp": __import__("aiohttp").__version__, "pydantic": __import__("pydantic").__version__,
    }


async def orchestrate(args) -> dict:
    out: dict = {"machine": machine(), "command": " ".join([Path(sys.executable).name] + sys.argv),
                 "params": {"seconds": args.seconds, "warmup": args.warmup, "senders": args.senders,
                            "services": args.services, "batch": args.batch, "batch_depth": args.batch_depth,
                            "beats_conns": args.beats_conns, "beats_batch": args.beats_batch,
                            "beats_depth": args.beats_depth, "probes": args.probes,
                            "rounds": args.rounds,
                            "client": args.client, "server_gc_freeze": args.server_gc_freeze}}
    print(f"machine: {out['machine']}")
    t_start = time.monotonic()
    authkey = secrets.token_bytes(32)
    servers: dict[str, Server] = {}
    tmp = tempfile.TemporaryDirectory(prefix="beat-ingest-")
    listener = Listener(("127.0.0.1", 0), authkey=authkey)
    listener._listener._socket.settimeout(60)
    loop = asyncio.get_running_loop()
    try:
        for kind in ("real", "bare"):
            extra = ("--beats-conns", str(args.beats_conns), "--beats-batch", str(args.beats_batch),
                     "--probes", str(args.probes), "--server-switch-interval", str(args.server_switch_interval))
            servers[kind] = await loop.run_in_executor(None, Server, kind, Path(tmp.name), args.services, listener,
                                                       authkey, args.server_gc_freeze, extra)
        real, bare = servers["real"], servers["bare"]
        load = Load(max(args.services, args.beats_conns * args.beats_batch), real.info["token"],
                    real.info["relay_token"])
        ports = {"real": real.info["ports"]["real"], "bare": bare.info["ports"]["bare"],
                 "batch": real.info["ports"]["batch"], "batch_validated": real.info["ports"]["batch"],
                 "bare_in_daemon": real.info["ports"]["batch"], "beats": real.info["ports"]["real"],
                 "idle": real.info["ports"]["real"]}
        owner = {"real": real, "bare": bare, "batch": real, "batch_validated": real, "bare_in_daemon": real,
                 "beats": real, "idle": real}
        out["servers"] = {k: {"pid": s.info["pid"], "ports": s.info["ports"]} for k, s in servers.items()}

        runs = []
        variants = [v for v in VARIANTS if v in args.variants.split(",")]
        for r in range(args.rounds):
            order = variants if r % 2 == 0 else list(reversed(variants))
            for v in order:
                res = await run_load(load, v, ports[v], senders=args.senders, batch=args.batch, warmup=args.warmup,
                                     seconds=args.seconds, server=owner[v], client=args.client,
                                     depth=args.batch_depth,
                                     beats_shape=(args.beats_conns, args.beats_batch, args.beats_depth))
                res["round"] = r + 1
                runs.append(res)
                print(f"  round {r + 1} {v:16s} {res['beats_per_s']:10,.0f} beats/s  {res['requests_per_s']:9,.0f} req/s"
                      f"  server cpu {res['server_cpu_pct']:5.1f}% ({res['server_cpu_us_per_beat'] or 0:6.1f} us/beat)"
                      f"  client cpu {res['client_cpu_pct']:5.1f}%  p50 {res['latency_ms_p50'] or 0:6.2f} ms"
                      f"  p99 {res['latency_ms_p99'] or 0:6.2f} ms  status {res['status_measured']}"
                      f"  server gc {res['server_gc_count']} {res['server_gc_ms']} ms"
                      f"  monitor lateness ms {res['monitor_lateness_ms']}", flush=True)
        out["runs"] = runs

        def med(values):
            values = [x for x in values if x is not None]
            return statistics.median(values) if values else None

        summary = {}
        for v in variants:
            rs = [x for x in runs if x["variant"] == v]
            summary[v] = {
                "beats_per_s_median": statistics.median(x["beats_per_s"] for x in rs),
                "beats_per_s_all": [round(x["beats_per_s"]) for x in rs],
                "server_cpu_us_per_beat_median": med(x["server_cpu_us_per_beat"] for x in rs),
                "server_cpu_pct_median": statistics.median(x["server_cpu_pct"] for x in rs),
                "client_cpu_pct_median": statistics.median(x["client_cpu_pct"] for x in rs),
                "latency_ms_p50_median": med(x["latency_ms_p50"] for x in rs),
                "latency_ms_p99_median": med(x["latency_ms_p99"] for x in rs),
                "non_200_measured": sum(n for x in rs for s, n in x["status_measured"].items() if s != 200),
                "server_gc_us_per_beat_median": med(x["server_gc_us_per_beat"] for x in rs),
                "monitor_lateness_ms_p50_median": med(x["monitor_lateness_ms"].get("p50") for x in rs),
                "monitor_lateness_ms_p99_median": med(x["monitor_lateness_ms"].get("p99") for x in rs),
                "monitor_lateness_ms_max": max((x["monitor_lateness_ms"].get("max", 0) for x in rs), default=None),
                "monitor_lateness_samples": sum(x["monitor_lateness_samples"] for x in rs),
                "server_gc_tracked_objects": rs[-1]["server_gc_tracked_objects"],
                "connections": rs[0]["connections"], "pipeline_depth": rs[0]["pipeline_depth"],
                "beats_per_request": rs[0]["beats_per_request"],
            }
        out["summary"] = summary
        if "real" in summary and "bare" in summary:
            ratio = summary["real"]["beats_per_s_median"] / summary["bare"]["beats_per_s_median"]
            cpu_ratio = summary["bare"]["server_cpu_us_per_beat_median"] / summary["real"]["server_cpu_us_per_beat_median"]
            out["ratio_real_over_bare"] = {"beats_per_s": ratio, "by_server_cpu_per_beat": cpu_ratio,
                                           "per_round": [round(a["beats_per_s"] / b["beats_per_s"], 3) for a, b in zip(
                                               [x for x in runs if x["variant"] == "real"],
                                               [x for x in runs if x["variant"] == "bare"])],
                                           "target": 0.8, "met": ratio >= 0.8}
        if "real" in summary and "bare_in_daemon" in summary:
            # the same bare handler inside the daemon's process: separates the handler's own cost
            # from the process it runs in (heap size, GC, threads)
            out["ratio_real_over_bare_in_daemon"] = {
                "beats_per_s": summary["real"]["beats_per_s_median"] / summary["bare_in_daemon"]["beats_per_s_median"],
                "by_server_cpu_per_beat": summary["bare_in_daemon"]["server_cpu_us_per_beat_median"]
                / summary["real"]["server_cpu_us_per_beat_median"],
                "per_round": [round(a["beats_per_s"] / b["beats_per_s"], 3) for a, b in zip(
                    [x for x in runs if x["variant"] == "real"], [x for x in runs if x["variant"] == "bare_in_daemon"])]}

        print(f"  [{time.monotonic() - t_start:6.1f} s] rounds done; verifying", flush=True)
        # verification: the real endpoint accepted what the generator saw accepted
        stats = real.call("stats")
        sent_ok_single = sum(x["status_all"].get(200, 0) for x in runs if x["variant"] == "real")
        batch_ok = sum(x["beats_ok_all"] for x in runs if x["variant"] == "batch")
        batchv_ok = sum(x["beats_ok_all"] for x in runs if x["variant"] == "batch_validated")
        beats_ok = sum(x["beats_ok_all"] for x in runs if x["variant"] == "beats")
        metric_http = fetch_metric(ports["real"], "tron_beats_received_total")
        out["verification"] = {
            "client_200s_real": sent_ok_single,
            "client_accepted_batch": batch_ok,
            "client_accepted_batch_validated": batchv_ok,
            "client_accepted_beats": beats_ok,
            "monitor_beats_accepted": stats["monitor_beats_accepted"],
            "expected_monitor_beats_accepted": sent_ok_single + batch_ok + batchv_ok + beats_ok,
            "metric_tron_beats_received_total_via_http": metric_http,
            "expected_metric": sent_ok_single + batchv_ok + beats_ok,
            "metric_beats_rejected": stats["metric_beats_rejected"],
            "monitor_thread_alive": stats["monitor_thread_alive"],
            "bare_requests_served": bare.call("stats")["requests"],
        }
        v = out["verification"]
        v["ok"] = (v["monitor_beats_accepted"] == v["expected_monitor_beats_accepted"]
                   and v["metric_tron_beats_received_total_via_http"] == v["expected_metric"]
                   and not any(v["metric_beats_rejected"].values()))

        print(f"  [{time.monotonic() - t_start:6.1f} s] profiling", flush=True)
        # profiles: pyinstrument inside the server process, one run each
        out["profiles"] = {}
        if args.profile_seconds > 0:
            for v_name, srv in (("real", real), ("bare", bare), ("batch_validated", real), ("beats", real)):
                if v_name not in variants:
                    continue
                prof_path = args.json.with_name(args.json.stem + f"_profile_{v_name}.txt")
                srv.call("profile_start")
                try:
                    res = await run_load(load, v_name, ports[v_name], senders=args.senders, batch=args.batch,
                                         warmup=0.5, seconds=args.profile_seconds, server=srv, client=args.client,
                                         depth=args.batch_depth,
                                         beats_shape=(args.beats_conns, args.beats_batch, args.beats_depth))
                finally:
                    summ = srv.call("profile_stop", out_path=str(prof_path))
                summ["beats_per_s_while_profiled"] = res["beats_per_s"]
                summ["beats"] = res["beats"]
                summ["text_file"] = str(prof_path)
                out["profiles"][v_name] = summ

        print(f"  [{time.monotonic() - t_start:6.1f} s] timing the handler's pieces", flush=True)
        # the handler's pieces, one by one (last: it moves svc-000's seq on)
        out["micro_ns"] = {"real_process": real.call("micro"), "bare_process": bare.call("micro")}
        return out
    finally:
        for s in servers.values():
            s.stop()
        listener.close()
        tmp.cleanup()


def report(out: dict, args) -> None:
    s = out["summary"]
    print()
    print(table(f"beats/s, {args.rounds} alternating rounds x {args.seconds:g} s (after {args.warmup:g} s warm-up), "
                f"{args.senders} senders, client={args.client}; medians",
                ["variant", "conns x depth x beats", "beats/s p50", "per round", "server cpu %", "server us/beat",
                 "gc us/beat", "gc objects", "client cpu %", "lat p50 ms", "lat p99 ms", "non-200",
                 "TRON late p50/p99/max ms"],
                [[v, f'{x["connections"]} x {x["pipeline_depth"]} x {x["beats_per_request"]}',
                  round(x["beats_per_s_median"]), " / ".join(f"{b:,}" for b in x["beats_per_s_all"]),
                  x["server_cpu_pct_median"], x["server_cpu_us_per_beat_median"], x["server_gc_us_per_beat_median"],
                  x["server_gc_tracked_objects"], x["client_cpu_pct_median"],
                  x["latency_ms_p50_median"], x["latency_ms_p99_median"], x["non_200_measured"],
                  "" if x["monitor_lateness_ms_p50_median"] is None else
                  f'{x["monitor_lateness_ms_p50_median"]:.2f} / {x["monitor_lateness_ms_p99_median"]:.2f} / '
                  f'{x["monitor_lateness_ms_max"]:.2f}']
                 for v, x in s.items()]))
    if "ratio_real_over_bare" in out:
        r = out["ratio_real_over_bare"]
        print(f"\nreal/bare: {r['beats_per_s']:.3f} by beats/s (per round {r['per_round']}), "
              f"{r['by_server_cpu_per_beat']:.3f} by server CPU per beat; target >= {r['target']}: "
              f"{'met' if r['met'] else 'MISSED'}")
    if "ratio_real_over_bare_in_daemon" in out:
        r = out["ratio_real_over_bare_in_daemon"]
        print(f"real/bare-in-daemon-process: {r['beats_per_s']:.3f} by beats/s (per round {r['per_round']}), "
              f"{r['by_server_cpu_per_beat']:.3f} by server CPU per beat")
    for v in ("batch", "batch_validated", "beats"):
        if v in s and "real" in s:
            size = args.beats_batch if v == "beats" else args.batch
            print(f"{v}: {s[v]['beats_per_s_median'] / s['real']['beats_per_s_median']:.1f}x the real single-beat "
                  f"endpoint ({size} beats per request)")
    print(f"\nverification: {out['verification']}")
    for name, p in out.get("profiles", {}).items():
        if not p:
            continue
        print(f"\npyinstrument, {name} server ({p['beats']:,} beats at {p['beats_per_s_while_profiled']:,.0f}/s while "
              f"profiled): total {p['total_s']} s, idle in select {p['idle_select_s']} s, busy {p['busy_s']} s; "
              f"full tree: {p['text_file']}")
        print("  inclusive (% of busy): " + ", ".join(f"{k} {v['pct_of_busy']}%" for k, v in p["inclusive"].items()))
        print("  top self time:")
        for row in p["self_top"][:15]:
            print(f"    {row['pct_of_busy']:5.1f}%  {row['func']}")
    print("\nhandler pieces, ns per call (server processes, idle):")
    for proc, m in out["micro_ns"].items():
        print(f"  {proc}: " + ", ".join(f"{k} {v:,}" if isinstance(v, (int, float)) else f"{k} {v}"
                                        for k, v in m.items()))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--warmup", type=float, default=2.0)
    ap.add_argument("--senders", type=int, default=200)
    ap.add_argument("--services", type=int, default=N_SERVICES_DEFAULT)
    ap.add_argument("--batch", type=int, default=50)
    ap.add_argument("--batch-depth", type=int, default=4,
                    help="requests pipelined per batch connection (batch variants only)")
    ap.add_argument("--beats-conns", type=int, default=2, help="connections of the real /beats variant")
    ap.add_argument("--beats-batch", type=int, default=1000, help="beats a request of the real /beats variant")
    ap.add_argument("--beats-depth", type=int, default=2, help="requests pipelined per /beats connection")
    ap.add_argument("--probes", type=int, default=50,
                    help="never-beating agents whose deadlines measure the monitor's lateness (0: none)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--client", choices=("raw", "aiohttp"), default="raw")
    ap.add_argument("--profile-seconds", type=float, default=6.0, help="0 skips profiling")
    ap.add_argument("--json", type=Path, default=RESULTS / "beat_ingest.json")
    ap.add_argument("--server-switch-interval", type=float, default=SWITCH_INTERVAL,
                    help="sys.setswitchinterval(S) in the server processes: the daemon's (services/daemon/"
                         "__main__.py) unless told (0.005: Python's own)")
    ap.add_argument("--server-gc-freeze", action="store_true",
                    help="diagnostic: gc.freeze() in both server processes once they are set up")
    # server-process mode (internal)
    ap.add_argument("--_serve", choices=("real", "bare"), help=argparse.SUPPRESS)
    ap.add_argument("--home", help=argparse.SUPPRESS)
    ap.add_argument("--ctl-host", help=argparse.SUPPRESS)
    ap.add_argument("--ctl-port", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._serve:
        return server_main(args)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a plain SIGTERM still runs the cleanup below
    args.json.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    children_before = {p.pid for p in psutil.Process().children(recursive=True)}
    out = asyncio.run(orchestrate(args))
    args.json.write_text(json.dumps(out, indent=2, default=str))  # first, so a report bug loses nothing
    report(out, args)
    gc.collect()
    left = [f"{p.pid}:{p.name()}" for p in psutil.Process().children(recursive=True) if p.pid not in children_before]
    threads = [t.name for t in threading.enumerate() if t is not threading.main_thread() and t.is_alive()]
    out["left_behind"] = {"processes": left, "threads": threads}
    out["elapsed_s"] = round(time.monotonic() - t0, 1)
    print(f"\nleft behind: processes {left or 'none'}, threads {threads or 'none'}; elapsed {out['elapsed_s']} s")
    args.json.write_text(json.dumps(out, indent=2, default=str))
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
