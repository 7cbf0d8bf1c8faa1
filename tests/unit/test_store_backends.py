"""Issue 26: a store backend is chosen by the registry URL's scheme (registry/backends.py),
one table of schemes, and each engine says itself which of its errors mean "the database is
unavailable for a while" (the journal retries those, and loses nothing)."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from tron.common.clock import FakeClock
from tron.registry import backends
from tron.registry.backends import SCHEMES, Backend, open_durable, open_store, scheme_of, sqlite_path
from tron.registry.db import SqliteDb
from tron.registry.journal import JournaledStore
from tron.registry.memory import MemoryStore
from tron.registry.pg import PgDb
from tron.registry.schema import RegistryError, open_and_prepare
from tron.registry.store import SqlStore


@pytest.mark.parametrize("url, scheme", [
    ("/var/tron/registry.db", "sqlite"),
    ("registry.db", "sqlite"),
    ("sqlite:///var/tron/registry.db", "sqlite"),
    ("SQLite:registry.db", "sqlite"),
    ("file:///var/tron/registry.db", "file"),
    ("postgresql://tron@db/tron", "postgresql"),
    ("postgres://db:5432/tron", "postgresql".removesuffix("ql")),
    ("memory://", "memory"),
    ("C:\\tron\\registry.db", "sqlite"),  # a drive letter, not a scheme
    ("mysql://db/tron", "mysql"),
])
def test_the_scheme_of_a_registry_url(url, scheme):
    assert scheme_of(url) == scheme


@pytest.mark.parametrize("url, path", [
    ("/var/tron/registry.db", "/var/tron/registry.db"),
    ("sqlite:///var/tron/registry.db", "/var/tron/registry.db"),
    ("sqlite://localhost/var/tron/registry.db", "/var/tron/registry.db"),
    ("sqlite:registry.db", "registry.db"),
    ("file:///var/tron/registry.db", "/var/tron/registry.db"),
])
def test_the_file_of_a_sqlite_url(url, path):
    assert sqlite_path(url) == Path(path)


@pytest.mark.parametrize("url, says", [
    ("sqlite://db.example/registry.db", "a SQLite registry is a local file, not on 'db.example'"),
    ("sqlite:///", "sqlite: URL without a file path"),
    ("file:", "file: URL without a file path"),
])
def test_a_sqlite_url_that_names_no_local_file_is_refused(url, says):
    with pytest.raises(RegistryError, match=says):
        sqlite_path(url)


def test_an_unknown_scheme_is_refused_and_creates_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(RegistryError, match=r"no registry backend for mysql:\.\.\. URLs \(known: file, memory, "):
        open_store("mysql://db/tron")
    assert list(tmp_path.iterdir()) == []


async def test_a_file_path_opens_sqlite_behind_the_journal(tmp_path):
    clock = FakeClock()
    for url in (tmp_path / "a.db", f"sqlite://{tmp_path}/b.db", f"file://{tmp_path}/c.db"):
        store = open_store(url, clock=clock, spill=tmp_path / "journal.jsonl")
        assert isinstance(store, JournaledStore) and isinstance(store.durable, SqlStore)
        assert isinstance(store.durable.db, SqliteDb) and store.spill == tmp_path / "journal.jsonl"
        try:
            await store.open()
            await store.event("hello", {"url": str(url)})
            assert await store.flushed(30.0)
        finally:
            await store.close()
    assert sorted(p.name for p in tmp_path.glob("*.db")) == ["a.db", "b.db", "c.db"]


async def test_memory_is_not_journaled_and_keeps_what_it_is_told():
    store = open_store("memory://")
    assert type(store) is MemoryStore
    await store.open()
    await store.create_run("r-1", "p", False)
    assert (await store.run("r-1"))["status"] == "running"
    assert store.health() == {"state": "ok"} and await store.flushed(0)
    await store.close()


def test_postgresql_urls_open_the_same_sql_on_psycopg(monkeypatch):
    """No server here (tests/unit/test_store_contract.py runs one): the store is built,
    its schema preparation is the backend's own, stubbed out to see the URL reach it."""
    import tron.registry.schema as schema

    seen = []
    monkeypatch.setattr(schema, "open_and_prepare_pg", seen.append)
    for url in ("postgresql://tron@db/tron", "postgres://db/tron"):
        store = open_durable(url)
        assert isinstance(store, SqlStore) and isinstance(store.db, PgDb) and store.db.url == url
    assert seen == ["postgresql://tron@db/tron", "postgres://db/tron"]


def test_a_new_backend_is_one_entry(monkeypatch):
    """The table is the only place a scheme is named: an entry pointing at a module with an
    ``open_url`` is a backend (here the memory module under another scheme)."""
    monkeypatch.setitem(SCHEMES, "scratch", Backend("tron.registry.memory", journaled=False))
    assert type(open_store("scratch://anything")) is MemoryStore
    assert backends.backend_for("scratch://x") is SCHEMES["scratch"]


def test_a_backend_the_journal_cannot_record_on_is_refused(monkeypatch):
    monkeypatch.setitem(SCHEMES, "scratch", Backend("tron.registry.memory", journaled=True))
    with pytest.raises(RegistryError, match="opened a MemoryStore, not a store the journal can record on"):
        open_store("scratch://anything")


# -- which errors are "unavailable": the engine's answer, not the journal's guess ----------------


def test_sqlite_says_which_of_its_errors_pass(tmp_path):
    db = SqliteDb(tmp_path / "registry.db")
    store = SqlStore(db)
    for err in (sqlite3.OperationalError("database is locked"), sqlite3.OperationalError("database or disk is full"),
                OSError(28, "No space left on device")):
        assert store.unavailable(err) and db.unavailable(err)
    for err in (sqlite3.IntegrityError("UNIQUE constraint failed"), sqlite3.ProgrammingError("closed"),
                ValueError("bad row"), KeyError("x")):
        assert not store.unavailable(err)


def test_postgresql_says_which_of_its_errors_pass():
    import psycopg
    from psycopg import errors

    db = PgDb("postgresql://db/tron")
    for err in (psycopg.OperationalError("connection lost"), errors.DiskFull("full"), errors.AdminShutdown("bye"),
                errors.InsufficientResources("no"), errors.ConnectionTimeout("slow"), ConnectionResetError()):
        assert db.unavailable(err), type(err)
    for err in (errors.UniqueViolation("dup"), psycopg.ProgrammingError("syntax"), errors.InvalidTextRepresentation(),
                ValueError("bad row")):
        assert not db.unavailable(err), type(err)
    assert not MemoryStore().unavailable(OSError())  # memory is never unavailable


class Refusing(SqlStore):
    """A SQLite store whose engine refuses the next writes with one chosen error."""

    def __init__(self, path: Path, err: BaseException, times: int) -> None:
        open_and_prepare(path)
        super().__init__(SqliteDb(path), clock=FakeClock())
        self.err, self.times = err, times

    async def event(self, *args, **kwargs):  # type: ignore[override]
        if self.times > 0:
            self.times -= 1
            raise self.err
        return await super().event(*args, **kwargs)


async def test_the_journal_retries_what_the_engine_calls_unavailable_and_drops_what_it_does_not(tmp_path):
    durable = Refusing(tmp_path / "registry.db", sqlite3.OperationalError("database is locked"), times=2)
    store = JournaledStore(durable, clock=durable.clock)
    try:
        await store.open()
        await store.event("kept", {})
        assert await store.flushed(30.0)  # refused twice, then written: nothing lost
        assert [e["kind"] for e in await durable.events(kind="kept")] == ["kept"]
        assert store.health_.failed_writes == 0
        durable.err, durable.times = sqlite3.IntegrityError("a bug"), 1
        await store.event("lost", {})
        assert await store.flushed(30.0)  # a bug is not retried: said loudly, counted, dropped
        assert store.health_.failed_writes == 1
        assert await durable.events(kind="lost") == []
    finally:
        await store.close()


# -- the CLI's read-only connection, by the same table ---------------------------------------------


async def test_the_cli_reads_the_registry_of_any_sqlite_url_read_only(tmp_path):
    from tron.registry.read import connect

    store = open_store(tmp_path / "registry.db")
    try:
        await store.open()
        await store.create_run("r-1", "p", False)
        assert await store.flushed(30.0)
    finally:
        await store.close()
    for where in (tmp_path / "registry.db", str(tmp_path / "registry.db"), f"sqlite://{tmp_path}/registry.db"):
        conn = connect(where)
        try:
            assert [r["run_id"] for r in conn.execute("SELECT run_id FROM runs")] == ["r-1"]
            with pytest.raises(sqlite3.OperationalError, match="readonly"):
                conn.execute("DELETE FROM runs")
        finally:
            conn.close()


@pytest.mark.parametrize("where, error, says", [
    ("missing.db", FileNotFoundError, "no registry at .*missing.db: has `tron up` ever run"),
    ("memory://", FileNotFoundError, "lives in its daemon's memory"),
    ("mysql://db/tron", RegistryError, "no registry backend for mysql"),
])
def test_the_cli_is_told_when_there_is_nothing_to_read(where, error, says, tmp_path, monkeypatch):
    from tron.registry.read import connect

    monkeypatch.chdir(tmp_path)
    with pytest.raises(error, match=says):
        connect(where)
    assert list(tmp_path.iterdir()) == []  # nothing created
