"""Consistent online backups of the SQLite registry, and restoring one.

A backup is taken with SQLite's own backup API while the daemon writes (WAL: readers do
not stop writers), checked (``quick_check``, schema) before it is kept, and named by its
UTC time; the newest ``keep`` are kept. A restore refuses a file that fails the same
checks, and keeps the database it replaces beside it.
"""

from __future__ import annotations

import shutil
import sqlite3
from datetime import datetime, timezone
from pathlib import Path

from registry.schema import SCHEMA_VERSION, RegistryError, verify

PREFIX = "registry-"


def backups_dir(db_path: Path) -> Path:
    return db_path.parent / "backups"


def check(path: Path) -> int:
    """The schema version of a registry file that passes every start-up check; raises
    RegistryError naming what is wrong otherwise."""
    if not path.is_file():
        raise RegistryError(f"{path}: no such file")
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            verify(conn)
            rows = conn.execute("SELECT MAX(version) FROM schema_version").fetchone()
        finally:
            conn.close()
    except (sqlite3.DatabaseError, UnicodeDecodeError) as err:
        raise RegistryError(f"{path} is not a usable registry ({err})") from None
    version = rows[0] if rows else None
    if version is None or version > SCHEMA_VERSION:
        raise RegistryError(f"{path} has schema version {version}; this tron reads up to {SCHEMA_VERSION}")
    return version


def take(db_path: Path, *, keep: int) -> Path:
    """A consistent copy of the live database, checked, then the oldest beyond ``keep``
    removed. Safe while the daemon writes."""
    dest_dir = backups_dir(db_path)
    dest_dir.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S.%fZ")
    dest = dest_dir / f"{PREFIX}{stamp}.db"
    part = dest.with_suffix(".part")
    src = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=10)
    out = sqlite3.connect(part)
    try:
        src.backup(out)
    finally:
        out.close()
        src.close()
    try:
        check(part)
    except RegistryError:
        part.unlink(missing_ok=True)
        raise
    part.replace(dest)
    for old in sorted(dest_dir.glob(f"{PREFIX}*.db"))[:-keep] if keep > 0 else []:
        old.unlink(missing_ok=True)
    return dest


def newest_good(db_path: Path) -> Path | None:
    """The newest backup that passes the checks, if any."""
    for candidate in sorted(backups_dir(db_path).glob(f"{PREFIX}*.db"), reverse=True):
        try:
            check(candidate)
            return candidate
        except RegistryError:
            continue
    return None


def restore(backup: Path, db_path: Path) -> Path | None:
    """Put ``backup`` in place of the registry (the daemon must be stopped). The database
    it replaces, if any, is kept beside it; returns where."""
    check(backup)
    kept = None
    if db_path.exists():
        stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        kept = db_path.with_name(f"{db_path.name}.before-restore-{stamp}")
        shutil.move(db_path, kept)
    for side in ("-wal", "-shm"):  # they belong to the replaced file: they go with it
        old = db_path.with_name(db_path.name + side)
        if old.exists():
            shutil.move(old, (kept or db_path).with_name((kept or db_path).name + side))
    db_path.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(backup, db_path)
    return kept
