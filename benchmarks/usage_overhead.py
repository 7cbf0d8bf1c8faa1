"""What usage accounting costs per LLM call, beside the call itself (issue 23's target: below
1 % of a simulated call's time).

Side by side in one process, interleaved in blocks so the machine's noise lands on both:

  call       one completion through the real anthropic SDK against llm-sim on loopback,
             llm-sim in a process of its own as in a mesh (non-streamed and streamed),
             what an agent's ``llm`` does; the median.
  accounting everything usage adds to a call, end to end: the agent reads the usage off
             the answer and puts it in the outcome body (``AgentRuntime._usage``, JSON), the
             daemon parses it (pydantic ``ProviderOutcome``), prices it and writes its
             ``llm_usage`` row through the journal to a real SQLite file, and updates the
             totals and metrics (``Spend.record``); the median. The journal writes behind,
             so the row's durable write is measured apart (``flush``), per row.

    .venv/bin/python -m benchmarks.usage_overhead [--calls 400] [--json benchmarks/results/usage_overhead.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import socket
import sys
import tempfile
import time
from pathlib import Path

from aiohttp import web

from benchmarks import finish
from tron.common.agent import Task
from tron.common.agent_runtime import AgentRuntime
from tron.common.clock import MonotonicClock
from tron.common.config import MeshConfig
from tron.common.models import ProviderOutcome, TaskAssign
from tron.common.providers import ProviderSettings, aclose_clients, complete
from tron.registry.journal import JournaledStore
from tron.registry.store import open_sqlite_store
from tron.scripts.stats import percentile
from tron.services.daemon.metrics import DaemonMetrics
from tron.services.daemon.spend import Spend
from tron.services.llm_sim.app import make_app


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_sim(port: int) -> None:
    web.run_app(make_app(), host="127.0.0.1", port=port, print=None, handle_signals=True)


async def measure(calls: int, block: int) -> dict:
    port = free_port()
    sim = multiprocessing.get_context("spawn").Process(target=serve_sim, args=(port,), daemon=True)
    sim.start()
    deadline = time.monotonic() + 30
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                break
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError("llm-sim did not start") from None
            await asyncio.sleep(0.05)
    settings = ProviderSettings(sim_url=f"http://127.0.0.1:{port}", timeout_s=30)
    config = MeshConfig.model_validate({"services": {"worker": {"agent": "x.y:Z", "port": 7001}}})
    with tempfile.TemporaryDirectory() as tmp:
        clock = MonotonicClock()
        store = JournaledStore(open_sqlite_store(Path(tmp) / "registry.db", clock=clock), clock=clock)
        await store.open()
        spend = Spend(config, store, clock=clock, metrics=DaemonMetrics())
        await store.create_run("r-1", "measure", False)
        await store.upsert_task({"task_id": "t-1", "run_id": "r-1", "agent": "worker", "parent_agent": "operator",
                                 "kind": "run", "prompt": "p"})
        task = await store.task("t-1")
        sdk_task = Task(TaskAssign(task_id="t-1", run_id="r-1", kind="run", prompt="p", reply_to="operator"))
        samples: dict[str, list[float]] = {"call": [], "call_streamed": [], "accounting": [], "flush_per_row": []}
        for _ in range(3):  # warm: the SDK's first request imports what it needs
            await complete("anthropic", system="", prompt="warm up", settings=settings)
        done = 0
        while done < calls:
            n = min(block, calls - done)
            replies = []
            for stream, key in ((False, "call"), (True, "call_streamed")):
                for i in range(n):
                    t0 = time.perf_counter()
                    reply = await complete("anthropic", system="You plan.", prompt=f"plan step {done + i}",
                                           settings=settings, stream=stream)
                    samples[key].append(time.perf_counter() - t0)
                    replies.append(reply)
            for reply in replies[:n]:
                t0 = time.perf_counter()
                usage = AgentRuntime._usage(sdk_task, "anthropic", reply, t0)
                body = json.dumps({"service": "worker", "incarnation": "i-1", "task_id": "t-1",
                                   "provider": "anthropic", "ok": True, "usage": usage}).encode()
                out = ProviderOutcome.model_validate_json(body)
                await spend.record(out.usage, agent="worker", incarnation="i-1", task=task, ok=True)
                samples["accounting"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            await store.flushed(30.0)
            samples["flush_per_row"].append((time.perf_counter() - t0) / n)
            done += n
        rows = (await store.spend(run_id="r-1"))["calls"]
        await store.close()
    await aclose_clients()
    sim.terminate()
    sim.join(10)
    med = {k: percentile(v, 0.5) for k, v in samples.items()}
    return {"calls": calls, "rows_written": rows, "median_s": med,
            "p90_s": {k: percentile(v, 0.9) for k, v in samples.items()},
            "overhead_of_call": med["accounting"] / med["call"],
            "overhead_of_streamed_call": med["accounting"] / med["call_streamed"],
            "with_durable_write_of_call": (med["accounting"] + med["flush_per_row"]) / med["call"],
            "loadavg": os.getloadavg()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=400)
    ap.add_argument("--block", type=int, default=20)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    r = asyncio.run(measure(args.calls, args.block))
    m = r["median_s"]
    print(f"{r['calls']} calls each way, {r['rows_written']} usage rows written; load {r['loadavg'][0]:.2f}\n")
    print("| | median | p90 |\n|---|---|---|")
    for key, label in (("call", "a simulated call (anthropic SDK -> llm-sim, whole answer)"),
                       ("call_streamed", "the same, streamed"),
                       ("accounting", "usage accounting: read, send, parse, price, record, totals, metrics"),
                       ("flush_per_row", "the row's durable write (behind, in the journal), per row")):
        print(f"| {label} | {m[key] * 1000:.3f} ms | {r['p90_s'][key] * 1000:.3f} ms |")
    print(f"\naccounting / call: {r['overhead_of_call']:.2%} (streamed: {r['overhead_of_streamed_call']:.2%}); "
          f"with the durable write: {r['with_durable_write_of_call']:.2%}")
    return finish(args.json, r, [])


if __name__ == "__main__":
    sys.exit(main())
