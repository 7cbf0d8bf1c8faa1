"""How long a history read waits while the mesh keeps writing.

A history read (events, retry history, spend: ``@durable_read``) first waits for the
journal's flush, so that it sees this daemon's own writes. Until 1ea93e4 it waited for an
*empty* journal: on a mesh that keeps writing, the journal may not be empty for long, and
each read waited up to its timeout (2 s). The live web UI reads ten kinds of events a
second, one after another.

Here one real JournaledStore on a real SQLite file takes a steady stream of event writes
(``--rate`` a second, each journaled as the daemon does), and a reader makes ``--reads``
history reads (``events(kind=...)``), one every 50 ms. Two rows, taking turns in blocks of
10 reads on the same file: the shipped ``flushed()`` (waits for what came before the read)
and the old one (waits for an empty journal). ``--fsync`` adds a thread that writes and
fsyncs 64 KiB in a loop on the same disk, as the rest of a busy machine does.

    .venv/bin/python -m benchmarks.history_read [--rate 400] [--reads 100] [--fsync]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
import threading
import time
from pathlib import Path

from benchmarks import finish
from tron.common.clock import MonotonicClock
from tron.registry.db import SqliteDb
from tron.registry.journal import JournaledStore
from tron.registry.schema import open_and_prepare
from tron.registry.store import SqlStore
from tron.scripts.stats import percentile


class EmptyJournalStore(JournaledStore):
    """The flush wait before 1ea93e4: until the journal is empty."""

    async def flushed(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while self.journal and time.monotonic() < deadline:
            await asyncio.sleep(0.002)
        return not self.journal


def fsync_loop(folder: Path, stop: threading.Event) -> None:
    path = folder / "load.bin"
    block = os.urandom(64 * 1024)
    with open(path, "wb") as f:
        while not stop.is_set():
            f.write(block)
            f.flush()
            os.fsync(f.fileno())
            if f.tell() > 64 * 1024 * 1024:
                f.seek(0)


async def measure(folder: Path, rate: float, reads: int) -> dict[str, list[float]]:
    samples: dict[str, list[float]] = {"shipped": [], "empty journal": []}
    clock = MonotonicClock()
    stores = {}
    for name, kind in (("shipped", JournaledStore), ("empty journal", EmptyJournalStore)):
        path = folder / f"{name.replace(' ', '-')}.db"
        open_and_prepare(path)
        stores[name] = await kind(SqlStore(SqliteDb(path), clock=clock), clock=clock).open()
    stop = asyncio.Event()

    async def write(store: JournaledStore) -> None:
        n = 0
        while not stop.is_set():
            await store.event("task_progress", {"n": n, "detail": "x" * 200})
            n += 1
            await asyncio.sleep(1 / rate)

    try:
        block = 10
        for b in range(0, reads, block):
            for name in (("shipped", "empty journal") if (b // block) % 2 == 0 else ("empty journal", "shipped")):
                store = stores[name]
                stop.clear()
                writer = asyncio.ensure_future(write(store))
                await asyncio.sleep(0.2)  # the stream is flowing
                for _ in range(block):
                    start = time.perf_counter()
                    await store.events(0, 20, "audit")
                    samples[name].append((time.perf_counter() - start) * 1000)
                    await asyncio.sleep(0.05)
                stop.set()
                await writer
                await store.flushed(30)
    finally:
        for store in stores.values():
            await store.close()
    return samples


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rate", type=float, default=400, help="event writes a second (default 400)")
    ap.add_argument("--reads", type=int, default=100, help="history reads per row (default 100)")
    ap.add_argument("--fsync", action="store_true", help="an fsync loop on the same disk beside it")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="tron-bench-history-", dir=os.environ.get("TMPDIR", "/tmp")) as tmp:
        folder = Path(tmp)
        stop = threading.Event()
        loader = threading.Thread(target=fsync_loop, args=(folder, stop), daemon=True)
        if args.fsync:
            loader.start()
        try:
            samples = asyncio.run(measure(folder, args.rate, args.reads))
        finally:
            stop.set()
            if args.fsync:
                loader.join()
    print(f"history reads while {args.rate:.0f} event writes a second are journaled"
          f"{' (and an fsync loop on the disk)' if args.fsync else ''}:")
    print(f"{'flush wait':<16}{'reads':>6}{'median ms':>11}{'p90 ms':>9}{'max ms':>9}")
    for name, ms in samples.items():
        print(f"{name:<16}{len(ms):>6}{percentile(ms, 0.5):>11.1f}{percentile(ms, 0.9):>9.1f}{max(ms):>9.1f}")
    return finish(args.json, {"rate": args.rate, "fsync": args.fsync, "samples_ms": samples}, [])


if __name__ == "__main__":
    raise SystemExit(main())
