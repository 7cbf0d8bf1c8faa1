"""PostgreSQL: the registry of a mesh that outgrows one machine.

``TRON_REGISTRY_URL=postgresql://...`` (or ``[registry] url`` in mesh.toml) selects it;
neither may hold a password (tron.common.config refuses one): that comes from PGPASSWORD or
~/.pgpass, and ``safe_url`` masks any that reaches a message all the same;
SQLite stays the embedded default. ``SqlStore`` runs the same SQL here. What differs
between the two engines is written out below and in ``tron.registry.schema`` (the DDL):

- placeholders: ``?`` becomes ``%s``, and a literal ``%`` becomes ``%%``;
- values: a Python bool is written as 0/1 (the columns are INTEGER, as in SQLite), and a
  NUMERIC aggregate comes back as int or float, never Decimal;
- writers: one daemon writes a registry. The SQLite file is guarded by the home's lock;
  a server is reachable from several machines, so the daemon also holds a PostgreSQL
  advisory lock for as long as it runs, and a second daemon is refused at start.
"""

from __future__ import annotations

import asyncio
import contextlib
import decimal
import re
from typing import TYPE_CHECKING, AsyncIterator
from urllib.parse import unquote

from tron.common.clock import Clock
from tron.registry.db import IN_BATCH, batch_of
from tron.registry.rows import Args, Row

if TYPE_CHECKING:  # psycopg is imported when a PostgreSQL registry is opened, not before
    import psycopg

    from tron.registry.store import SqlStore

DAEMON_LOCK = 0x7472_6F6E  # "tron": the advisory lock the one writing daemon holds


def to_pg(sql: str) -> str:
    return sql.replace("%", "%%").replace("?", "%s")


def _arg(value: object) -> object:
    return int(value) if isinstance(value, bool) else value


def _row(row: Row) -> Row:
    for key, value in row.items():
        if isinstance(value, decimal.Decimal):
            row[key] = int(value) if value == value.to_integral_value() else float(value)
    return row


# user:password@ in a URL anywhere in the text. Wider than libpq's reading (the password
# runs to the last @ of the word, across any /): showing too little is the safe mistake.
_USERINFO = re.compile(r"(://[^:/@\s]*):\S*@")
# A query parameter (?name=value or &name=value), and libpq's key=value form (password=x).
_PARAM = re.compile(r"([?&])([^=&\s]+)=([^&\s]*)")
_KEYWORD = re.compile(r"(?<![\w%?&])(\w*password\w*)\s*=\s*('(?:\\.|[^'\\])*'|[^\s&]+)", re.IGNORECASE)


def _is_password_param(name: str) -> bool:
    """tron.common.config.is_password_param's rule (which refuses these in a URL), kept here so
    the registry needs nothing from the config to mask: "password" in the decoded name."""
    return "password" in unquote(name).lower()


def safe_url(text: str) -> str:
    """``text`` (a URL, or a message holding one) for messages and logs: no password
    appears, neither user:password@ nor a password-ish parameter (``password``,
    ``sslpassword``, any name with "password" in it)."""
    text = _USERINFO.sub(r"\1:***@", text)
    text = _PARAM.sub(lambda m: f"{m[1]}{m[2]}=***" if _is_password_param(m[2]) else m[0], text)
    return _KEYWORD.sub(r"\1=***", text)


class PgDb:
    """Two connections: the writer (transactions, one at a time, holding the daemon lock)
    and the reader (autocommit), so a read never lands inside a transaction."""

    def __init__(self, url: str, *, lock: bool = True) -> None:
        self.url = url
        self.lock = lock
        self._writer_conn: psycopg.AsyncConnection[Row] | None = None
        self._reader_conn: psycopg.AsyncConnection[Row] | None = None
        self._writer = asyncio.Lock()
        self._reader = asyncio.Lock()

    async def open(self) -> None:
        import psycopg
        from psycopg.rows import dict_row

        from tron.registry.schema import RegistryError

        try:
            self._writer_conn = await psycopg.AsyncConnection.connect(self.url, autocommit=True, row_factory=dict_row,
                                                                      connect_timeout=10)
            self._reader_conn = await psycopg.AsyncConnection.connect(self.url, autocommit=True, row_factory=dict_row,
                                                                      connect_timeout=10)
        except psycopg.Error as err:
            await self.close()
            raise RegistryError(f"cannot reach the registry at {safe_url(self.url)}: {_first_line(err)}") from None
        if self.lock:
            cur = await self._writer_conn.execute("SELECT pg_try_advisory_lock(%s) AS ok", (DAEMON_LOCK,))
            got = await cur.fetchone()
            if got is None or not got["ok"]:
                await self.close()
                raise RegistryError(f"another tron daemon is writing the registry at {safe_url(self.url)} "
                                    "(it holds the daemon's advisory lock); stop it first")

    async def close(self) -> None:
        for name in ("_writer_conn", "_reader_conn"):
            conn = getattr(self, name)
            if conn is not None:
                with contextlib.suppress(Exception):
                    await conn.close()
                setattr(self, name, None)

    def _opened(self, conn: psycopg.AsyncConnection[Row] | None) -> psycopg.AsyncConnection[Row]:
        if conn is None:
            raise RuntimeError("PgDb.open() must be awaited before use")
        return conn

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator["_PgTx"]:
        if IN_BATCH.get() is self:  # the batch's transaction is this one
            yield _PgTx(self._opened(self._writer_conn))
            return
        async with self._writer:
            conn = self._opened(self._writer_conn)
            async with conn.transaction():
                yield _PgTx(conn)

    def batch(self) -> contextlib.AbstractAsyncContextManager[None]:
        return batch_of(self)

    async def execute(self, sql: str, args: Args = ()) -> int:
        async with self._writer:
            return await _PgTx(self._opened(self._writer_conn)).execute(sql, args)

    @contextlib.asynccontextmanager
    async def _reading(self) -> AsyncIterator["_PgTx"]:
        """The reader's connection, in its turn; inside a batch the writer's, which sees
        what the batch wrote so far (the batch holds the writer's turn)."""
        if IN_BATCH.get() is self:
            yield _PgTx(self._opened(self._writer_conn))
            return
        async with self._reader:
            yield _PgTx(self._opened(self._reader_conn))

    async def one(self, sql: str, args: Args = ()) -> Row | None:
        async with self._reading() as tx:
            return await tx.one(sql, args)

    async def all(self, sql: str, args: Args = ()) -> list[Row]:
        async with self._reading() as tx:
            return await tx.all(sql, args)

    def unavailable(self, err: BaseException) -> bool:
        # OperationalError is libpq's "the server cannot do it now": a lost connection, a
        # timeout, an administrator's shutdown, a full disk (DiskFull), no memory or
        # connections left (InsufficientResources), all its subclasses. An IntegrityError or
        # a ProgrammingError is a bug.
        import psycopg

        return isinstance(err, (psycopg.OperationalError, OSError))


class _PgTx:
    def __init__(self, conn: psycopg.AsyncConnection[Row]) -> None:
        self.conn = conn

    async def execute(self, sql: str, args: Args = ()) -> int:
        cur = await self.conn.execute(to_pg(sql), tuple(_arg(a) for a in args))
        return cur.rowcount

    async def one(self, sql: str, args: Args = ()) -> Row | None:
        cur = await self.conn.execute(to_pg(sql), tuple(_arg(a) for a in args))
        row = await cur.fetchone() if cur.description else None
        return None if row is None else _row(row)

    async def all(self, sql: str, args: Args = ()) -> list[Row]:
        cur = await self.conn.execute(to_pg(sql), tuple(_arg(a) for a in args))
        return [_row(r) for r in await cur.fetchall()] if cur.description else []


class PgReader:
    """The CLI's read-only connection, with sqlite3's calling shape (``execute`` returns
    rows that ``dict()`` takes) so registry/read.py and report.py run on either engine."""

    def __init__(self, url: str) -> None:
        import psycopg
        from psycopg.rows import dict_row

        try:
            self.conn = psycopg.connect(url, autocommit=True, row_factory=dict_row, connect_timeout=10,
                                        options="-c default_transaction_read_only=on")
        except psycopg.Error as err:
            raise FileNotFoundError(f"cannot reach the registry at {safe_url(url)}: {_first_line(err)}") from None
        self.row_factory = None  # report.py sets sqlite3's; rows are dicts here anyway

    def execute(self, sql: str, args: Args = (), /) -> list[Row]:
        cur = self.conn.execute(to_pg(sql), tuple(_arg(a) for a in args))
        return [_row(r) for r in cur.fetchall()] if cur.description else []

    def close(self) -> None:
        self.conn.close()

    def __enter__(self) -> "PgReader":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _first_line(err: Exception) -> str:
    text = str(err).strip().splitlines()
    return safe_url(text[0]) if text else type(err).__name__


def open_reader(url: str) -> PgReader:
    """registry/backends.py's read-only connection for the CLI (registry/read.py)."""
    return PgReader(url)


def open_url(url: str, *, clock: Clock | None = None) -> "SqlStore":
    """registry/backends.py's entry for ``postgresql://`` (and ``postgres://``) URLs."""
    from tron.registry.store import open_pg_store

    return open_pg_store(url, clock=clock)
