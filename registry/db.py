"""The one place that knows which SQL engine holds the registry.

``SqlStore`` writes portable SQL (``?`` placeholders, ``ON CONFLICT``, ``RETURNING``);
an engine adapter runs it: ``SqliteDb`` over aiosqlite, the embedded default. Each
``transaction()`` is one atomic unit: it commits on success and rolls back on error, so
a write that fails half-way leaves nothing behind. ``batch()`` makes several writes one
unit (the journal's group commit): a transaction opened inside it is the batch's own, and
a read inside it reads what the batch wrote so far.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import sqlite3
from pathlib import Path
from typing import TYPE_CHECKING, AsyncIterator, Protocol

import aiosqlite

from tron.common.clock import Clock
from tron.registry.rows import Args, Row

if TYPE_CHECKING:
    from tron.registry.store import SqlStore


# The engine adapter whose batch() the running task is inside, if any (a context variable:
# other tasks' transactions still take their turn on the writer's lock).
IN_BATCH: contextvars.ContextVar[object | None] = contextvars.ContextVar("tron_registry_batch", default=None)


@contextlib.asynccontextmanager
async def batch_of(db: "Db") -> AsyncIterator[None]:
    """``db``'s batch: one transaction, its own ``transaction()`` calls running inside it."""
    async with db.transaction():
        token = IN_BATCH.set(db)
        try:
            yield
        finally:
            IN_BATCH.reset(token)


class Db(Protocol):
    async def open(self) -> None: ...

    async def close(self) -> None: ...

    def transaction(self) -> contextlib.AbstractAsyncContextManager["Tx"]: ...

    def batch(self) -> contextlib.AbstractAsyncContextManager[None]:
        """Several transactions as one: all are written, or none (``batch_of``)."""
        ...

    async def one(self, sql: str, args: Args = ()) -> Row | None: ...

    async def all(self, sql: str, args: Args = ()) -> list[Row]: ...

    def unavailable(self, err: BaseException) -> bool:
        """``err`` is this engine's database being unavailable for a while (full disk, lock
        held, I/O error, lost connection), not a bug: the journal retries the write."""
        ...


class Tx(Protocol):
    async def execute(self, sql: str, args: Args = ()) -> int: ...

    async def one(self, sql: str, args: Args = ()) -> Row | None: ...

    async def all(self, sql: str, args: Args = ()) -> list[Row]: ...


class SqliteDb:
    """aiosqlite on one file, WAL mode, written by the daemon alone."""

    def __init__(self, path: Path, *, busy_timeout_ms: int = 5000) -> None:
        self.path = path
        self.busy_timeout_ms = busy_timeout_ms
        self._conn: aiosqlite.Connection | None = None
        # Two connections: transactions take turns on the writer's (SQLite has one writer
        # anyway); reads outside a transaction go to a reader's, so a write that waits for
        # the lock (busy_timeout: another process holds it) never holds a read up behind it
        # on the same connection's thread. In WAL mode a reader is never blocked by a writer.
        self._reader: aiosqlite.Connection | None = None
        self._writer = asyncio.Lock()

    async def open(self) -> None:
        self._conn = await aiosqlite.connect(self.path, isolation_level=None)
        self._conn.row_factory = aiosqlite.Row
        await self._conn.execute("PRAGMA journal_mode=WAL")
        await self._conn.execute("PRAGMA synchronous=NORMAL")
        await self._conn.execute(f"PRAGMA busy_timeout={self.busy_timeout_ms}")
        self._reader = await aiosqlite.connect(self.path, isolation_level=None)
        self._reader.row_factory = aiosqlite.Row
        await self._reader.execute("PRAGMA query_only=1")
        await self._reader.execute(f"PRAGMA busy_timeout={self.busy_timeout_ms}")

    async def close(self) -> None:
        for attr in ("_reader", "_conn"):
            conn = getattr(self, attr)
            if conn is not None:
                await conn.close()
                setattr(self, attr, None)

    @property
    def conn(self) -> aiosqlite.Connection:
        if self._conn is None:
            raise RuntimeError("SqliteDb.open() must be awaited before use")
        return self._conn

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator["_SqliteTx"]:
        if IN_BATCH.get() is self:  # the batch's transaction is this one
            yield _SqliteTx(self.conn)
            return
        async with self._writer:
            await self.conn.execute("BEGIN IMMEDIATE")
            try:
                yield _SqliteTx(self.conn)
            except BaseException:
                with contextlib.suppress(sqlite3.Error):
                    await self.conn.execute("ROLLBACK")
                raise
            await self.conn.execute("COMMIT")

    def batch(self) -> contextlib.AbstractAsyncContextManager[None]:
        return batch_of(self)

    async def execute(self, sql: str, args: Args = ()) -> int:
        """A statement outside a transaction, on the writer's connection (PRAGMAs, tests)."""
        return await _SqliteTx(self.conn).execute(sql, args)

    @property
    def reader(self) -> aiosqlite.Connection:
        """The reader's connection; inside a batch the writer's, which sees the batch's writes."""
        if IN_BATCH.get() is self:
            return self.conn
        return self._reader if self._reader is not None else self.conn

    async def one(self, sql: str, args: Args = ()) -> Row | None:
        return await _SqliteTx(self.reader).one(sql, args)

    async def all(self, sql: str, args: Args = ()) -> list[Row]:
        return await _SqliteTx(self.reader).all(sql, args)

    def unavailable(self, err: BaseException) -> bool:
        # SQLite says "database or disk is full", "database is locked", "disk I/O error" with
        # OperationalError; the file system with OSError. A constraint or a syntax error is a bug.
        return isinstance(err, (sqlite3.OperationalError, OSError))


class _SqliteTx:
    """Statements on one connection: the writer's inside a transaction, the reader's outside."""

    def __init__(self, conn: aiosqlite.Connection) -> None:
        self.conn = conn

    async def execute(self, sql: str, args: Args = ()) -> int:
        async with self.conn.execute(sql, args) as cur:
            return cur.rowcount

    async def one(self, sql: str, args: Args = ()) -> Row | None:
        rows = await self.conn.execute_fetchall(sql, args)
        return next((dict(r) for r in rows), None)

    async def all(self, sql: str, args: Args = ()) -> list[Row]:
        # One trip to the connection's thread (execute, fetch, done), where a cursor took
        # three (execute, fetch, close): each trip is a GIL hand-over, and a crash wave's
        # ladder views read several rows per alert on the restart path.
        return [dict(r) for r in await self.conn.execute_fetchall(sql, args)]


def open_reader(url: str) -> sqlite3.Connection:
    """registry/backends.py's read-only connection for the CLI (registry/read.py): never
    writes, never creates a registry that is not there."""
    from tron.registry.backends import sqlite_path

    path = sqlite_path(url)
    if not path.exists():
        raise FileNotFoundError(f"no registry at {path}: has `tron up` ever run with this home?")
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)
    conn.row_factory = sqlite3.Row
    return conn


def open_url(url: str, *, clock: Clock | None = None) -> "SqlStore":
    """registry/backends.py's entry for SQLite: a file path, ``sqlite:`` or ``file:`` URL."""
    from tron.registry.backends import sqlite_path
    from tron.registry.store import open_sqlite_store

    return open_sqlite_store(sqlite_path(url), clock=clock)
