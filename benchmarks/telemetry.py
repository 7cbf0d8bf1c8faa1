"""What OpenTelemetry tracing costs (issue 25's targets: beats untouched, under 2 % of a
simulated LLM call; a collector that is down or hangs changes nothing).

Part ``call``, in one process, interleaved in blocks so the machine's noise lands on every row,
once for each place spans are exported from (``--export``): ``process``, the shipped default
(common/trace_export.py: a process of its own, forked at set-up), and ``thread`` (the SDK's
BatchSpanProcessor thread, in this process):

  call        one completion through the real anthropic SDK against llm-sim (a process of its
              own, as in a mesh), untraced; the median. Calls alternate with ``traced`` ones.
  traced      the same call inside ``telemetry.llm_span`` + ``llm_result`` (what ``Agent.llm``
              adds), tracing on, exported to a live OTLP sink (a process of its own that
              answers 200); the median.
  span        the span alone (attributes, usage, the SDK span made and ended, queued), no call.
  beat        what a heartbeat runs of telemetry: one ``telemetry.dropped()`` read, tracing on.
  export CPU  ``thread``: the SDK thread's CPU (``thread_time``) encoding and sending, a span;
              ``process``: our hand-over thread's CPU (building records, marshal, send), a
              span, on this process's GIL, and the exporter process's whole CPU, a span, on
              its own. Per call on this process's GIL = span + (export | hand-over).

Part ``mesh``: three real meshes up at once (tracing off; on, the collector down; on, the
collector hung: it accepts and never answers), the same runs through the gateway and the
same kill -9 of programmer-1 taking turns between them: the run's wall time and kill-to-healthy.

    .venv/bin/python -m benchmarks.telemetry [--calls 600] [--export process|thread|both] [--runs 6] [--kills 4]
                                             [--part call|mesh|both] [--json FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import signal
import socket
import sys
import tempfile
import time
from pathlib import Path

from aiohttp import web

from benchmarks import finish
from tron.common import telemetry
from tron.common.providers import ProviderSettings, aclose_clients, complete
from tron.scripts.stats import percentile
from benchmarks.usage_overhead import free_port, serve_sim  # llm-sim in a process of its own


def serve_sink(port: int) -> None:
    """An OTLP/HTTP receiver that takes every batch and keeps nothing."""
    async def take(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(body=b"", content_type="application/x-protobuf")

    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.router.add_post("/v1/traces", take)
    web.run_app(app, host="127.0.0.1", port=port, print=None, handle_signals=True)


def start(target, port: int):
    proc = multiprocessing.get_context("spawn").Process(target=target, args=(port,), daemon=True)
    proc.start()
    deadline = time.monotonic() + 30
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return proc
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{target.__name__} did not start") from None
            time.sleep(0.05)


async def measure_calls(calls: int, block: int, export: str = "process") -> dict:
    import psutil

    sim_port, sink_port = free_port(), free_port()
    sim, sink = start(serve_sim, sim_port), start(serve_sink, sink_port)
    settings = ProviderSettings(sim_url=f"http://127.0.0.1:{sim_port}", timeout_s=30)
    assert telemetry.setup(telemetry.TelemetrySection(otlp_endpoint=f"http://127.0.0.1:{sink_port}", export=export),
                           service="bench", env={})
    samples: dict[str, list[float]] = {"call": [], "traced": [], "span": [], "beat": []}
    exports = {"cpu_s": 0.0, "spans": 0, "batches": 0}
    process = telemetry._on.process
    if process is None:  # the SDK's thread, in this process: its CPU measured in it (thread_time)
        counting = telemetry._on.processor.counting
        inner_export = counting.inner.export

        def timed_export(spans):  # in the exporter's thread: its CPU for encoding and sending a batch
            t0 = time.thread_time()
            try:
                return inner_export(spans)
            finally:
                exports["cpu_s"] += time.thread_time() - t0
                exports["spans"] += len(spans)
                exports["batches"] += 1

        counting.inner.export = timed_export
    else:  # the exporter process: all of its CPU (receiving, rebuilding, encoding, sending)
        assert telemetry._on.processor.force_flush(10_000)  # it is forked with the first hand-over
        exporter_cpu = psutil.Process(process.pid)
        cpu0 = sum(exporter_cpu.cpu_times()[:2])
    try:
        for _ in range(3):  # warm: the SDK's first request imports what it needs
            await complete("anthropic", system="", prompt="warm up", settings=settings)
        done = 0
        while done < calls:
            n = min(block, calls - done)
            for i in range(n):  # call by call, in turns, the order alternating: no row is always second
                for key in (("call", "traced") if i % 2 else ("traced", "call")):
                    t0 = time.perf_counter()
                    if key == "call":
                        await complete("anthropic", system="You plan.", prompt=f"plan step {done + i}",
                                       settings=settings)
                    else:
                        with telemetry.llm_span("anthropic", "claude-sonnet-4-5") as span:
                            reply = await complete("anthropic", system="You plan.", prompt=f"plan step {done + i}",
                                                   settings=settings)
                            telemetry.llm_result(span, reply)
                    samples[key].append(time.perf_counter() - t0)
            for _ in range(n):
                t0 = time.perf_counter()
                with telemetry.llm_span("anthropic", "claude-sonnet-4-5") as span:
                    telemetry.llm_result(span, reply)
                samples["span"].append(time.perf_counter() - t0)
            for _ in range(n):
                t0 = time.perf_counter()
                telemetry.dropped() or None
                samples["beat"].append(time.perf_counter() - t0)
            done += n
        telemetry._on.processor.force_flush()
        dropped = telemetry.dropped()
        if process is not None:
            exports["cpu_s"] = sum(exporter_cpu.cpu_times()[:2]) - cpu0
            exports["spans"] = process.counters()[0]
            exports["handover_cpu_s"] = process.cpu_s  # our thread's, on this process's GIL
    finally:
        telemetry.shutdown(5)
        await aclose_clients()
        for proc in (sim, sink):
            proc.terminate()
            proc.join(10)
    med = {k: percentile(v, 0.5) for k, v in samples.items()}
    export_per_span = exports["cpu_s"] / max(1, exports["spans"])
    # on this process's GIL: the span, and its export when it runs here, or its hand-over
    here = export_per_span if process is None else exports["handover_cpu_s"] / max(1, exports["spans"])
    return {"calls": calls, "median_s": med, "p90_s": {k: percentile(v, 0.9) for k, v in samples.items()},
            "exports": exports, "export_cpu_per_span_s": export_per_span,
            "handover_cpu_per_span_s": here if process is not None else 0.0,
            "tracing_per_call_s": med["span"] + here, "tracing_of_call": (med["span"] + here) / med["call"],
            "export": export, "span_of_call": med["span"] / med["call"],
            "traced_minus_call_of_call": (med["traced"] - med["call"]) / med["call"], "dropped": dropped,
            "loadavg": os.getloadavg()}


def measure_mesh(runs: int, kills: int) -> dict:
    """Three meshes up at once, the runs and the kills taking turns between them (the order
    shuffled each round), so the machine's noise lands on every row."""
    import random

    from tests.harness import cleanup, make_mesh, wait_for

    def one_run(mesh, n: int) -> float:
        t0 = time.monotonic()
        code, body = mesh.http("POST", mesh.url("gateway") + "/runs", {"prompt": f"measure {n}"})
        assert code == 202, body
        run = wait_for(lambda: (r := mesh.http("GET", mesh.url("gateway") + f"/runs/{body['run_id']}")[1])
                       and r["status"] != "running" and r, 120, "the run", interval=0.01)  # a run is read with the token
        assert run["status"] == "done", run
        return time.monotonic() - t0

    def one_kill(mesh) -> float:
        old = mesh.service("programmer-1")["pid"]
        t0 = time.monotonic()
        os.kill(old, signal.SIGKILL)
        wait_for(lambda: (h := mesh.health("programmer-1")) and h.get("pid") not in (None, old), 60,
                 "programmer-1 healthy again", interval=0.005)
        return time.monotonic() - t0

    rng = random.Random(1)
    labels = ["off", "down", "hung"]
    out: dict = {label: {"run_s": [], "kill_to_healthy_s": []} for label in labels}
    silent = socket.socket()  # the hung collector: it accepts and never answers
    silent.bind(("127.0.0.1", 0))
    silent.listen(1024)
    meshes = {}
    with tempfile.TemporaryDirectory() as tmp:
        try:
            for label in labels:
                mesh = meshes[label] = make_mesh(Path(tmp) / label)
                if label == "down":
                    mesh.env["OTEL_EXPORTER_OTLP_ENDPOINT"] = f"http://127.0.0.1:{free_port()}"
                elif label == "hung":
                    mesh.env["OTEL_EXPORTER_OTLP_ENDPOINT"] = f"http://127.0.0.1:{silent.getsockname()[1]}"
                mesh.up()
            for n in range(runs):
                for label in rng.sample(labels, len(labels)):
                    out[label]["run_s"].append(one_run(meshes[label], n))
            for _ in range(kills):
                for label in rng.sample(labels, len(labels)):
                    out[label]["kill_to_healthy_s"].append(one_kill(meshes[label]))
                time.sleep(1.5)  # past min_uptime: the next kill is restarted at once too
            for label, mesh in meshes.items():
                text = mesh.http("GET", mesh.url("daemon") + "/metrics", token=False)[1]
                out[label]["dropped"] = sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                                            if line.startswith("tron_otel_spans_dropped_total{"))
        finally:
            for mesh in meshes.values():
                out.setdefault("leftovers", []).extend(cleanup(mesh))
            silent.close()
    return out


def print_calls(r: dict) -> None:
    m, p = r["median_s"], r["p90_s"]
    where = "the exporter process" if r["export"] == "process" else "the SDK's thread, in this process"
    print(f"export = {r['export']!r}: {r['calls']} calls each way; load {r['loadavg'][0]:.2f}; "
          f"spans dropped {r['dropped']}\n")
    print("| | median | p90 |\n|---|---|---|")
    for key, label in (("call", "a simulated call (anthropic SDK -> llm-sim), untraced"),
                       ("traced", "the same call, traced (exported to a live OTLP sink)"),
                       ("span", "the LLM span alone (attributes, usage, close, hand-over)"),
                       ("beat", "tracing's part of a beat (the dropped count, read)")):
        print(f"| {label} | {m[key] * 1000:.4f} ms | {p[key] * 1000:.4f} ms |")
    e = r["exports"]
    print(f"\nexport CPU in {where}: {r['export_cpu_per_span_s'] * 1000:.4f} ms a span ({e['spans']} spans"
          + (f" in {e['batches']} batches of {e['spans'] / max(1, e['batches']):.0f})" if e["batches"] else ")"))
    if r["export"] == "process":
        print(f"hand-over CPU (our thread, on this process's GIL): {r['handover_cpu_per_span_s'] * 1000:.4f} ms a span")
    print(f"tracing per call on this process's GIL (span + its {'hand-over' if r['export'] == 'process' else 'export'}): "
          f"{r['tracing_per_call_s'] * 1000:.4f} ms = "
          f"{r['tracing_of_call']:.2%} of the untraced call's median"
          + (f" (the exporter process's CPU besides: {r['export_cpu_per_span_s'] / m['call']:.2%})"
             if r["export"] == "process" else ""))
    print(f"span / call: {r['span_of_call']:.2%}; traced - untraced medians / call: "
          f"{r['traced_minus_call_of_call']:.2%}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=600)
    ap.add_argument("--block", type=int, default=20)
    ap.add_argument("--runs", type=int, default=6)
    ap.add_argument("--kills", type=int, default=4)
    ap.add_argument("--part", choices=["call", "mesh", "both"], default="both")
    ap.add_argument("--export", choices=["process", "thread", "both"], default="both",
                    help="where spans are encoded and sent: the exporter process (the default) or the SDK's thread")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    results: dict = {}
    if args.part in ("call", "both"):
        for export in (["process", "thread"] if args.export == "both" else [args.export]):
            r = results[f"call_{export}"] = asyncio.run(measure_calls(args.calls, args.block, export))
            print_calls(r)
    if args.part in ("mesh", "both"):
        r = results["mesh"] = measure_mesh(args.runs, args.kills)
        print("\n| tracing | run median (s) | run max (s) | kill -> healthy median (s) | max (s) | spans dropped |")
        print("|---|---|---|---|---|---|")
        for label, what in (("off", "off"), ("down", "on, collector down"), ("hung", "on, collector hung")):
            row = r[label]
            print(f"| {what} | {percentile(row['run_s'], 0.5):.3f} | {max(row['run_s']):.3f} | "
                  f"{percentile(row['kill_to_healthy_s'], 0.5):.3f} | {max(row['kill_to_healthy_s']):.3f} | "
                  f"{row['dropped']:.0f} |")
    return finish(args.json, results, results.get("mesh", {}).get("leftovers", []))


if __name__ == "__main__":
    sys.exit(main())
