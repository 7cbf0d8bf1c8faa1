"""Which store a registry URL opens: one table of schemes, ``open_store(url)``.

    registry.db            (bare path)      the SQLite file, the embedded default
                           sqlite:///abs/path, sqlite:rel/path, file:///abs/path
    tron.registry.pg            postgresql://..., postgres://...    a PostgreSQL server
    tron.registry.memory        memory://                           nothing kept (tests, trials)

Each backend module has one ``open_url(url, *, clock)`` that answers its store for the URL
(checked, migrated, not yet opened), one ``open_reader(url)`` for the CLI's read-only
queries (registry/read.py), and an engine whose ``unavailable(err)`` says which of its
errors mean "the database is unavailable for a while" (registry/journal.py retries those).
A new backend is that module plus one line in ``SCHEMES`` (and its URL in the contract
suite, tests/unit/test_store_contract.py): the daemon, the journal and the CLI's reads find
it here. (The mesh file and TRON_REGISTRY_URL still admit only postgresql:// URLs,
common/config.py: a user-selectable new scheme is also one entry there.)

A durable backend is opened behind the journal (``JournaledStore``: the daemon decides on a
working copy in memory, the writer records behind); the memory backend needs none.
"""

from __future__ import annotations

import importlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Union

from tron.common.clock import Clock
from tron.registry.schema import RegistryError

if TYPE_CHECKING:
    import sqlite3

    from tron.registry.journal import JournaledStore
    from tron.registry.memory import MemoryStore
    from tron.registry.pg import PgReader
    from tron.registry.store import SqlStore

    Opened = Union["SqlStore", "MemoryStore"]
    Reader = Union["sqlite3.Connection", "PgReader"]  # what registry/read.py's queries run on


@dataclass(frozen=True)
class Backend:
    # Has open_url(url, *, clock) -> its store, and open_reader(url) -> the CLI's read-only
    # connection; imported only when a URL of its scheme is opened.
    module: str
    journaled: bool  # durable: the daemon's writes go through the journal in front of it

    def opener(self) -> Callable[..., "Opened"]:
        opener: Callable[..., Opened] = importlib.import_module(self.module).open_url
        return opener

    def reader(self) -> Callable[[str], "Reader"]:
        reader: Callable[[str], Reader] = importlib.import_module(self.module).open_reader
        return reader


SQLITE = Backend("tron.registry.db", journaled=True)
SCHEMES: dict[str, Backend] = {
    "sqlite": SQLITE,
    "file": SQLITE,
    "postgresql": Backend("tron.registry.pg", journaled=True),
    "postgres": Backend("tron.registry.pg", journaled=True),
    "memory": Backend("tron.registry.memory", journaled=False),
}
_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*):")


def scheme_of(url: str | Path) -> str:
    """The URL's scheme, lower-cased; a bare file path (no ``scheme:``) is "sqlite"."""
    if isinstance(url, Path):
        return "sqlite"
    found = _SCHEME.match(url)
    # One letter is a Windows drive (C:\\...), never a scheme.
    return found[1].lower() if found and len(found[1]) > 1 else "sqlite"


def backend_for(url: str | Path) -> Backend:
    scheme = scheme_of(url)
    backend = SCHEMES.get(scheme)
    if backend is None:
        raise RegistryError(f"no registry backend for {scheme}:... URLs "
                            f"(known: {', '.join(sorted(SCHEMES))}, or a file path for SQLite)")
    return backend


def open_durable(url: str | Path, *, clock: Clock | None = None) -> "Opened":
    """The backend's own store for ``url``, not journaled, not opened yet (``await
    store.open()``). Raises ``RegistryError`` for a scheme no backend serves."""
    return backend_for(url).opener()(str(url), clock=clock)


def open_reader(where: str | Path) -> "Reader":
    """The CLI's read-only connection to the registry at ``where`` (registry/read.py); raises
    FileNotFoundError when there is none to read, ``RegistryError`` for an unknown scheme."""
    return backend_for(where).reader()(str(where))


def open_store(url: str | Path, *, clock: Clock | None = None,
               spill: Path | None = None) -> Union["JournaledStore", "MemoryStore"]:
    """The store the daemon runs on for ``url``: a durable backend behind the journal
    (``spill``: where writes it could not flush at shutdown are saved), or the memory one.
    Not opened yet. Raises ``RegistryError`` for a scheme no backend serves."""
    from tron.registry.journal import JournaledStore
    from tron.registry.memory import MemoryStore
    from tron.registry.store import SqlStore

    backend = backend_for(url)
    store = backend.opener()(str(url), clock=clock)
    if not backend.journaled and isinstance(store, MemoryStore):
        return store
    if not isinstance(store, SqlStore):  # the journal replays on, and loads from, an SQL store
        raise RegistryError(f"the registry backend of {scheme_of(url)}: URLs opened a {type(store).__name__}, "
                            "not a store the journal can record on")
    return JournaledStore(store, clock=clock, spill=spill)


def sqlite_path(url: str) -> Path:
    """The file of a SQLite URL: ``sqlite:///abs``, ``sqlite:rel``, ``file:///abs`` or a bare path."""
    found = _SCHEME.match(url)
    if found is None or len(found[1]) == 1 or found[1].lower() not in ("sqlite", "file"):
        return Path(url)
    scheme, rest = found[1].lower(), url[found.end():]
    if rest.startswith("//"):
        host, _, path = rest[2:].partition("/")
        if host not in ("", "localhost"):
            raise RegistryError(f"a SQLite registry is a local file, not on {host!r}: {scheme}:///path/to/registry.db")
        rest = "/" + path
    if rest in ("", "/"):
        raise RegistryError(f"{scheme}: URL without a file path: {scheme}:///path/to/registry.db")
    return Path(rest)
