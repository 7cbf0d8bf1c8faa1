"""Act first, record durably, never forget: the journaled store keeps deciding on memory
while SQLite refuses writes (a lock held elsewhere, a full database), says so, and flushes
every row exactly once, in order, when the store takes writes again."""

from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3
import time

import pytest

from tron.common.clock import FakeClock
from tron.common.states import RetryType, RunState, TaskState
from tron.registry.db import SqliteDb
from tron.registry.journal import ROUTES, JournaledStore
from tron.registry.protocol import Route
from tron.registry.schema import RegistryError, open_and_prepare
from tron.registry.store import SqlStore


async def journaled(path, clock, **kw) -> JournaledStore:
    open_and_prepare(path)
    store = JournaledStore(SqlStore(SqliteDb(path, busy_timeout_ms=20), clock=clock), clock=clock, **kw)
    return await store.open()


async def until(predicate, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


def rows(path, sql):
    with sqlite3.connect(path) as conn:
        return conn.execute(sql).fetchall()


async def write_a_failure(store, n):
    alert = {"alert_id": f"a-{n}", "service": "p", "incarnation": f"i-{n}", "reason": "process_exit"}
    _, created = await store.insert_alert(alert, stable=False)
    row = await store.record_retry(alert_id=f"a-{n}", agent_id="p", retry_type=RetryType.CHILD_RESTART,
                                   reason="process_exit", detail={}, case="idle_failure")
    return created, row


async def test_a_locked_database_degrades_then_every_row_lands_once(tmp_path):
    path = tmp_path / "registry.db"
    clock = FakeClock()
    store = await journaled(path, clock)
    try:
        holder = sqlite3.connect(path, isolation_level=None)
        holder.execute("BEGIN IMMEDIATE")  # another process holds the write lock
        for n in range(5):
            created, row = await write_a_failure(store, n)
            assert created and row["retry_count"] == n + 1  # decided at once, on memory
        await until(lambda: store.health()["state"] == "degraded")
        h = store.health()
        assert h["reason"] == "database locked" and h["pending"] >= 10
        assert (await store.alert("a-4"))["status"] == "pending"  # memory has it all
        holder.execute("ROLLBACK")
        holder.close()
        await until(lambda: store.health()["state"] == "ok" and not store.health()["pending"])
        assert rows(path, "SELECT COUNT(*), COUNT(DISTINCT alert_id) FROM retry_history") == [(5, 5)]
        assert rows(path, "SELECT alert_id FROM alerts ORDER BY mono, rowid") == [(f"a-{n}",) for n in range(5)]
        kinds = [k for (k,) in rows(path, "SELECT kind FROM events WHERE kind LIKE 'registry_%' ORDER BY id")]
        assert kinds == ["registry_degraded", "registry_recovered"]
        assert store.health()["episodes"][0]["reason"] == "database locked"
    finally:
        await store.close()


async def test_a_full_database_degrades_and_recovers_when_space_comes_back(tmp_path):
    path = tmp_path / "registry.db"
    clock = FakeClock()
    store = await journaled(path, clock)
    try:
        pages = rows(path, "PRAGMA page_count")[0][0]
        await store.durable.db.execute(f"PRAGMA max_page_count = {pages}")  # no room for one more page
        for n in range(40):
            await write_a_failure(store, n)
            await store.event("filler", {"blob": "x" * 2000})
        await until(lambda: store.health()["state"] == "degraded")
        assert store.health()["reason"] == "disk full"
        await store.durable.db.execute("PRAGMA max_page_count = 1073741823")  # space is back
        await until(lambda: store.health()["state"] == "ok" and not store.health()["pending"])
        assert rows(path, "SELECT COUNT(*) FROM retry_history") == [(40,)]
        assert rows(path, "SELECT COUNT(*) FROM events WHERE kind = 'filler'") == [(40,)]
    finally:
        await store.close()


async def test_rows_written_late_keep_the_time_they_happened(tmp_path):
    path = tmp_path / "registry.db"
    clock = FakeClock(start=500.0)
    store = await journaled(path, clock)
    try:
        holder = sqlite3.connect(path, isolation_level=None)
        holder.execute("BEGIN IMMEDIATE")
        await write_a_failure(store, 1)
        clock.advance(30)
        holder.execute("ROLLBACK")
        holder.close()
        await until(lambda: not store.health()["pending"])
        assert rows(path, "SELECT mono FROM alerts") == [(500.0,)]
        assert rows(path, "SELECT mono FROM retry_history") == [(500.0,)]
    finally:
        await store.close()


async def test_a_journal_that_outlives_its_daemon_is_replayed_by_the_next(tmp_path):
    path = tmp_path / "registry.db"
    spill = tmp_path / "journal.jsonl"
    clock = FakeClock()
    store = await journaled(path, clock, spill=spill)
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    await write_a_failure(store, 1)
    await store.close(grace=0.2)  # the store never took it
    holder.execute("ROLLBACK")
    holder.close()
    assert spill.exists() and rows(path, "SELECT COUNT(*) FROM alerts") == [(0,)]
    again = await journaled(path, clock, spill=spill)
    try:
        assert not spill.exists()
        assert rows(path, "SELECT alert_id FROM alerts") == [("a-1",)]
        assert (await again.alert("a-1"))["status"] == "pending"  # and the working copy has it
    finally:
        await again.close()


async def test_a_write_the_store_refuses_for_good_is_dropped_and_counted(tmp_path):
    path = tmp_path / "registry.db"
    store = await journaled(path, FakeClock())
    try:
        await store.open_session("i-1", "p", 7000, None)
        with sqlite3.connect(path) as conn:  # the row exists already: a primary-key clash, not a passing fault
            conn.execute("INSERT INTO sessions (incarnation, agent, port, status, started_at) VALUES "
                         "('i-2', 'p', 7000, 'intent', 'now')")
        await store.open_session("i-2", "q", 7001, None)  # memory takes it; the store never will
        await until(lambda: store.health()["failed_writes"] == 1)
        assert store.health()["state"] == "ok"
    finally:
        await store.close()


async def test_what_memory_knows_is_the_truth_even_empty_while_the_disk_lags(tmp_path):
    """A resume from step 1 sets every checkpoint aside: the next incarnation must be told
    'none' at once, not the disk's step 1 that the journal has not deleted yet (seen in a
    fresh-clone run: the new incarnation skipped step 1)."""
    path = tmp_path / "registry.db"
    clock = FakeClock()
    store = await journaled(path, clock)
    try:
        await store.create_run("r-1", "build it", False)
        await store.upsert_task({"task_id": "r-1.0", "run_id": "r-1", "agent": "p", "parent_agent": "gateway",
                                 "kind": "run", "prompt": "build it"})
        await store.add_checkpoint("r-1.0", 1, "draft", "step one", "i-1")
        await until(lambda: not store.health()["pending"])
        holder = sqlite3.connect(path, isolation_level=None)
        holder.execute("BEGIN IMMEDIATE")  # the disk lags: the drop waits in the journal
        try:
            assert [c["step"] for c in await store.drop_checkpoints("r-1.0", 1, by="ops")] == [1]
            assert rows(path, "SELECT step FROM checkpoints") == [(1,)]
            assert await store.checkpoints("r-1.0") == []
            assert [t["task_id"] for t in await store.tasks_of_run("r-1")] == ["r-1.0"]
        finally:
            holder.execute("ROLLBACK")
            holder.close()
        await until(lambda: store.health()["state"] == "ok" and not store.health()["pending"])
        assert rows(path, "SELECT step FROM checkpoints") == []
    finally:
        await store.close()


class Side:
    """A store that answers every call with ``answer`` and notes which side it reached."""

    drill = None

    def __init__(self, side: str, calls: list, answer) -> None:
        self.side, self.calls, self.answer = side, calls, answer

    def pinned(self, mono, wall, drill):
        return contextlib.nullcontext()

    def __getattr__(self, name: str):
        async def call(*args, **kwargs):
            self.calls.append((self.side, name))
            return self.answer
        return call


async def routed(name: str, *, memory_answers):
    """Call protocol method ``name`` on a journal over two recording sides: (result, calls, journal)."""
    calls: list = []
    store = JournaledStore(Side("durable", calls, "durable's"))  # never opened: no writer drains the journal
    store.memory = Side("memory", calls, memory_answers)
    result = await getattr(store, name)("key")
    return result, calls, [op.method for op in store.journal]


async def answered_by_mark(name: str, mark) -> None:
    """What the protocol says ``name``'s mark means (registry/protocol.py), one case per route."""
    match mark.route:
        case Route.WRITE:  # memory decides, the journal keeps it for the durable store
            assert await routed(name, memory_answers="memory's") == ("memory's", [("memory", name)], [name])
        case Route.MEMORY_READ:
            assert await routed(name, memory_answers="memory's") == ("memory's", [("memory", name)], [])
        case Route.FALLBACK_READ if mark.about is not None:  # memory that knows the key answers, empty included
            assert await routed(name, memory_answers="memory's") == ("memory's", [("memory", name)], [])
            assert await routed(name, memory_answers=[]) == ([], [("memory", name), ("memory", mark.about)], [])
            assert await routed(name, memory_answers=None) == (
                "durable's", [("memory", name), ("memory", mark.about), ("durable", name)], [])
        case Route.FALLBACK_READ:
            assert await routed(name, memory_answers="memory's") == ("memory's", [("memory", name)], [])
            assert await routed(name, memory_answers=None) == (
                "durable's", [("memory", name), ("durable", name)], [])
        case Route.OWNED_READ:  # memory knows the task or run: its answer stands, empty included
            assert await routed(name, memory_answers=[]) == ([], [("memory", mark.about), ("memory", name)], [])
            assert await routed(name, memory_answers=None) == (
                "durable's", [("memory", mark.about), ("durable", name)], [])
        case Route.DURABLE_READ:
            assert await routed(name, memory_answers="memory's") == ("durable's", [("durable", name)], [])
        case Route.OWN:  # the journal's own: it drives the writer and the durable store
            assert name in vars(JournaledStore)
        case _:
            raise AssertionError(f"{name}: no case for route {mark.route!r}")


async def test_every_protocol_method_is_answered_where_its_mark_says():
    for name, mark in ROUTES.items():
        try:
            await answered_by_mark(name, mark)
        except AssertionError as err:
            raise AssertionError(f"Store.{name} ({mark.route}) is not routed as marked") from err


async def test_a_run_that_ends_while_the_registry_refuses_writes_stays_readable_through_trims(tmp_path):
    """Issue 20, item 1: the journal owns what it has not written. A run finishes while the
    database is locked; the daemon's trims (every minute) must not drop it from memory
    before it is durable, or its run and tasks answer 404 until the lock goes."""
    path = tmp_path / "registry.db"
    clock = FakeClock()
    store = await journaled(path, clock)
    try:
        holder = sqlite3.connect(path, isolation_level=None)
        holder.execute("BEGIN IMMEDIATE")  # another process holds the write lock (a full disk alike)
        await store.create_run("r-1", "build it", False)
        await store.upsert_task({"task_id": "r-1.0", "run_id": "r-1", "agent": "root", "parent_agent": "gateway",
                                 "kind": "run", "prompt": "p"})
        await store.finish_task("r-1.0", TaskState.DONE, "the result", None)
        await store.mark_delivered("r-1.0")
        await store.finish_run("r-1", RunState.DONE, "the result", None)
        await until(lambda: store.health()["state"] == "degraded")
        for _ in range(5):  # five minutes of the daemon's trims
            clock.advance(60)
            store.trim()
            assert (await store.run("r-1"))["status"] == RunState.DONE
            assert (await store.task("r-1.0"))["result"] == "the result"
        holder.execute("ROLLBACK")
        holder.close()
        await until(lambda: store.health()["state"] == "ok" and not store.health()["pending"])
        store.trim()  # written now: memory may let it go, the durable store answers
        assert "r-1" not in store.memory.runs_
        assert (await store.run("r-1"))["status"] == RunState.DONE
        assert rows(path, "SELECT status FROM runs WHERE run_id = 'r-1'") == [("done",)]
    finally:
        await store.close()


async def test_the_ladder_rows_of_an_alert_memory_knows_are_read_from_memory_alone(tmp_path):
    """Every alert's ladder view reads its retry rows: a new alert has none yet, and asking
    the disk to confirm it cost a database read on every restart's path (0.4 ms of the
    daemon's loop each, 20 of them in a crash wave). Memory keeps every row of each alert
    it keeps, so its answer stands, empty included; an alert it does not know is read from
    the disk."""
    path = tmp_path / "registry.db"
    store = await journaled(path, FakeClock())
    try:
        created, _ = await write_a_failure(store, 1)
        await store.insert_alert({"alert_id": "a-2", "service": "p", "incarnation": "i-2", "reason": "hang"},
                                 stable=False)
        await until(lambda: not store.health()["pending"])
        asked: list[str] = []
        durable_rows = store.durable.retry_rows

        async def counted(alert_id):
            asked.append(alert_id)
            return await durable_rows(alert_id)

        store.durable.retry_rows = counted
        assert [r["retry_type"] for r in await store.retry_rows("a-1")] == ["child_restart"]
        assert await store.retry_rows("a-2") == []
        assert asked == []
        store.memory.alerts_.pop("a-1")  # trimmed from memory: the disk has its rows
        store.memory.retries_ = [r for r in store.memory.retries_ if r["alert_id"] != "a-1"]
        assert [r["retry_type"] for r in await store.retry_rows("a-1")] == ["child_restart"]
        assert asked == ["a-1"]
    finally:
        await store.close()


def counting_batches(store) -> list[int]:
    """Wraps the durable store's batch(): one entry per batch, how many rows it wrote."""
    sizes: list[int] = []
    original = store.durable.batch

    @contextlib.asynccontextmanager
    async def batch():
        sizes.append(store._in_flight)  # the entries the writer took for this batch
        async with original():
            yield

    store.durable.batch = batch
    return sizes


async def test_rows_waiting_in_the_journal_are_written_together_each_once_in_order(tmp_path):
    """Group commit: what piles up while the writer is busy (a crash wave journals ~8 rows a
    restart) goes in a few transactions, not one per row; every row once, in order."""
    path = tmp_path / "registry.db"
    store = await journaled(path, FakeClock())
    try:
        sizes = counting_batches(store)
        holder = sqlite3.connect(path, isolation_level=None)
        holder.execute("BEGIN IMMEDIATE")  # the writer waits: 100 rows pile up behind it
        for n in range(50):
            await write_a_failure(store, n)
        holder.execute("ROLLBACK")
        holder.close()
        await until(lambda: store.health()["state"] == "ok" and not store.health()["pending"])
        assert rows(path, "SELECT alert_id FROM alerts ORDER BY rowid") == [(f"a-{n}",) for n in range(50)]
        assert rows(path, "SELECT alert_id, retry_count FROM retry_history ORDER BY id") == [
            (f"a-{n}", n + 1) for n in range(50)]
        assert sizes and max(sizes) > 1 and len(sizes) <= 4, sizes  # 100 rows and the events: a few batches
    finally:
        await store.close()


async def test_a_history_read_waits_for_the_writes_before_it_not_for_those_that_keep_coming(tmp_path):
    """``flushed()`` (each history read calls it) waits for what was journaled before it. A
    write that comes after it and waits on the database does not hold it up: on a busy mesh
    the journal is never empty, and each read of the live view waited its whole timeout."""
    path = tmp_path / "registry.db"
    store = await journaled(path, FakeClock())
    gates = {"first": asyncio.Event(), "after": asyncio.Event()}
    real = store.durable.event

    async def event(kind, *args, **kwargs):
        if kind in gates:
            await gates[kind].wait()  # the database is slow for this one
        return await real(kind, *args, **kwargs)

    store.durable.event = event
    try:
        await store.event("first", {})
        await until(lambda: store._in_flight == 1)  # being written, and held there
        reading = asyncio.ensure_future(store.flushed(30.0))
        await asyncio.sleep(0.05)
        assert not reading.done()  # "first" came before the read: it waits for it
        await store.event("after", {})  # this one came after, and is held too
        gates["first"].set()
        assert await asyncio.wait_for(reading, 10)
        assert store.health()["pending"] == 1  # "after", still waiting on the database
        assert rows(path, "SELECT kind FROM events WHERE kind IN ('first', 'after')") == [("first",)]
        assert await store.flushed(0.2) is False  # what is held past the timeout: False
    finally:
        for gate in gates.values():
            gate.set()
        await store.close()
    assert rows(path, "SELECT kind FROM events WHERE kind IN ('first', 'after') ORDER BY id") == [("first",), ("after",)]


async def test_a_row_refused_for_good_inside_a_batch_loses_itself_alone(tmp_path):
    """One row the database will never take (a primary-key clash, a bug) in the middle of a
    batch: the batch is undone, its rows written one at a time, and only that row is lost
    (said and counted); those before and after it land."""
    path = tmp_path / "registry.db"
    store = await journaled(path, FakeClock())
    try:
        holder = sqlite3.connect(path, isolation_level=None)
        holder.execute("BEGIN IMMEDIATE")
        holder.execute("INSERT INTO sessions (incarnation, agent, port, status, started_at) VALUES "
                       "('i-2', 'p', 7000, 'intent', 'now')")  # lands with the holder's commit
        await store.open_session("i-1", "p", 7000, None)
        await store.open_session("i-2", "q", 7001, None)  # memory takes it; the store never will
        await store.open_session("i-3", "r", 7002, None)
        holder.execute("COMMIT")
        holder.close()
        await until(lambda: not store.health()["pending"])
        assert store.health()["failed_writes"] == 1 and store.health()["state"] == "ok"
        assert rows(path, "SELECT incarnation, agent FROM sessions ORDER BY incarnation") == [
            ("i-1", "p"), ("i-2", "p"), ("i-3", "r")]
    finally:
        await store.close()


def spill_events(spill, kinds, torn_tail: str = "") -> None:
    with open(spill, "w") as f:
        for n, kind in enumerate(kinds):
            f.write(json.dumps({"method": "event", "args": [kind, {"n": n}], "kwargs": {}, "mono": 1.0 + n,
                                "wall": "2026-01-01T00:00:00.000Z", "drill": None}) + "\n")
        f.write(torn_tail)


async def test_a_replay_cut_short_writes_nothing_so_the_next_daemon_writes_each_row_once(tmp_path):
    """The spill is replayed as one transaction: a daemon whose replay stopped half way (the
    database locked, the disk full) left the rows it had written *and* the whole file, and the
    next daemon wrote them a second time."""
    path = tmp_path / "registry.db"
    spill = tmp_path / "journal.jsonl"
    open_and_prepare(path)
    spill_events(spill, ["spilled-0", "spilled-1", "spilled-2"])
    clock = FakeClock()
    first = JournaledStore(SqlStore(SqliteDb(path, busy_timeout_ms=20), clock=clock), clock=clock, spill=spill)
    real_event, calls = first.durable.event, []

    async def locked_on_the_second(*args, **kwargs):
        calls.append(args[0])
        if len(calls) == 2:
            raise sqlite3.OperationalError("database is locked")
        return await real_event(*args, **kwargs)

    first.durable.event = locked_on_the_second  # type: ignore[method-assign]
    with pytest.raises(RegistryError, match=r"the 3 rows an earlier daemon could not write .* \(database locked: "
                                            r"database is locked\); refusing to start"):
        await first.open()  # a one-line refusal the daemon prints, not a traceback
    await first.durable.close()
    assert spill.exists()
    assert rows(path, "SELECT COUNT(*) FROM events WHERE kind LIKE 'spilled-%'") == [(0,)]
    again = await journaled(path, clock, spill=spill)
    try:
        assert not spill.exists()
        assert rows(path, "SELECT kind, COUNT(*) FROM events WHERE kind LIKE 'spilled-%' GROUP BY kind "
                          "ORDER BY kind") == [("spilled-0", 1), ("spilled-1", 1), ("spilled-2", 1)]
    finally:
        await again.close()


async def test_a_spill_torn_by_a_full_disk_does_not_stop_the_next_daemon(tmp_path):
    """A daemon saving its journal on a full disk may write half a line: the next start
    replays every whole row and says what it could not read, rather than refusing to start
    on a JSON error at every `tron up`."""
    path = tmp_path / "registry.db"
    spill = tmp_path / "journal.jsonl"
    open_and_prepare(path)
    spill_events(spill, ["spilled-0", "spilled-1"], torn_tail='{"method": "event", "args": ["spilled-2", {"n"')
    again = await journaled(path, FakeClock(), spill=spill)
    try:
        assert not spill.exists()
        assert rows(path, "SELECT kind FROM events WHERE kind LIKE 'spilled-%' ORDER BY kind") == [
            ("spilled-0",), ("spilled-1",)]
    finally:
        await again.close()


async def test_a_spilled_row_no_store_method_takes_is_dropped_and_said_not_a_refusal_of_every_start(tmp_path, caplog):
    """A row of an older version (a method since renamed) is dropped, loudly, and the rest
    replayed: it is no reason to refuse every `tron up` to come, as a locked database is."""
    path = tmp_path / "registry.db"
    spill = tmp_path / "journal.jsonl"
    open_and_prepare(path)
    spill_events(spill, ["spilled-0"], torn_tail=json.dumps(
        {"method": "renamed_since", "args": [], "kwargs": {}, "mono": 9.0, "wall": "2026-01-01T00:00:00.000Z",
         "drill": None}) + "\n")
    store = await journaled(path, FakeClock(), spill=spill)
    try:
        assert not spill.exists()
        assert rows(path, "SELECT kind FROM events WHERE kind LIKE 'spilled-%'") == [("spilled-0",)]
        assert "cannot be written by this version and is dropped: renamed_since" in caplog.text
    finally:
        await store.close()
