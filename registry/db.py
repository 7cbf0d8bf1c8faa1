"""The one place that knows which SQL engine holds the registry.

``SqlStore`` writes portable SQL (``?`` placeholders, ``ON CONFLICT``, ``RETURNING``);
an engine adapter runs it: ``SqliteDb`` over aiosqlite, the embedded default. Each
``transaction()`` is one atomic unit: it commits on success and rolls back on error, so
a write that fails half-way leaves nothing behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from pathlib import Path
from typing import AsyncIterator, Protocol

import aiosqlite


class Db(Protocol):
    async def open(self) -> None: ...

    async def close(self) -> None: ...

    def transaction(self) -> contextlib.AbstractAsyncContextManager["Tx"]: ...

    async def one(self, sql: str, args: tuple = ()) -> dict | None: ...

    async def all(self, sql: str, args: tuple = ()) -> list[dict]: ...


class Tx(Protocol):
    async def execute(self, sql: str, args: tuple = ()) -> int: ...

    async def one(self, sql: str, args: tuple = ()) -> dict | None: ...

    async def all(self, sql: str, args: tuple = ()) -> list[dict]: ...


class SqliteDb:
    """aiosqlite on one file, WAL mode, written by the daemon alone."""

    def __init__(self, path: Path, *, busy_timeout_ms: int = 5000) -> None:
        self.path = path
        self.busy_timeout_ms = busy_timeout_ms
        self._conn: aiosqlite.Connection | None = None
        # One connection, many coroutines: transactions take turns (SQLite has one
        # writer anyway); reads outside a transaction do not wait.
        self._writer = asyncio.Lock()

    async def open(self) -> None:
        self._conn = await aiosqlite.connect(self.path, isolation_level=None)
        self._conn.row_factory = aiosqlite.Row
        await self._conn.execute("PRAGMA journal_mode=WAL")
        await self._conn.execute("PRAGMA synchronous=NORMAL")
        await self._conn.execute(f"PRAGMA busy_timeout={self.busy_timeout_ms}")

    async def close(self) -> None:
        if self._conn is not None:
            await self._conn.close()
            self._conn = None

    @property
    def conn(self) -> aiosqlite.Connection:
        if self._conn is None:
            raise RuntimeError("SqliteDb.open() must be awaited before use")
        return self._conn

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator["SqliteDb"]:
        async with self._writer:
            await self.conn.execute("BEGIN IMMEDIATE")
            try:
                yield self
            except BaseException:
                with contextlib.suppress(sqlite3.Error):
                    await self.conn.execute("ROLLBACK")
                raise
            await self.conn.execute("COMMIT")

    async def execute(self, sql: str, args: tuple = ()) -> int:
        async with self.conn.execute(sql, args) as cur:
            return cur.rowcount

    async def one(self, sql: str, args: tuple = ()) -> dict | None:
        async with self.conn.execute(sql, args) as cur:
            row = await cur.fetchone()
        return None if row is None else dict(row)

    async def all(self, sql: str, args: tuple = ()) -> list[dict]:
        async with self.conn.execute(sql, args) as cur:
            return [dict(r) for r in await cur.fetchall()]
