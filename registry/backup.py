"""Consistent online backups of the SQLite registry, and restoring one.

A backup is taken with SQLite's own backup API while the daemon writes (WAL: readers do
not stop writers) into a temporary ``.part`` file, made a single self-contained file
(rollback journal, no ``-wal``/``-shm``), checked, then renamed to its UTC time; the newest
``keep`` are kept. Whatever fails, no temporary file stays behind.

A restore trusts nothing in the file it is given. It is copied beside the registry, and
the copy must pass ``quick_check``, record schema versions this tron knows, and hold
exactly the schema the migrations create at that version -- no trigger, view, table or
index more, none missing, none changed. An older copy is migrated; only then is it synced
and renamed over the registry, so a refused or failed restore leaves the registry as it
was. The database it replaces is kept beside it (a hard link: nothing is moved away first).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sqlite3
import time
from datetime import datetime, timezone
from pathlib import Path

from tron.common.clock import utc_iso
from tron.common.processes import user_label, user_name
from tron.registry.schema import SCHEMA_VERSION, RegistryError, check_exact, migrate, quick_check, recorded_version

PREFIX = "registry-"
# Beside a SQLite file: its WAL, the WAL's index, a rollback journal. Each belongs to one file.
SIDECARS = ("-wal", "-shm", "-journal")


def backups_dir(db_path: Path) -> Path:
    return db_path.parent / "backups"


def _side(path: Path, suffix: str) -> Path:
    return path.with_name(path.name + suffix)


def _remove(path: Path) -> None:
    """``path`` and its sidecars, those that exist."""
    for p in (path, *(_side(path, s) for s in SIDECARS)):
        p.unlink(missing_ok=True)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__


def inspect(conn: sqlite3.Connection, where: str) -> int:
    """Every check a file must pass to be a registry, on an open connection: ``quick_check``,
    schema versions, the exact schema. Returns the recorded version; a RegistryError names
    ``where``."""
    quick_check(conn, where)
    try:
        version = recorded_version(conn)
        check_exact(conn, version)
    except RegistryError as err:
        raise RegistryError(f"{where}: {err}") from None
    return version


def check(path: Path) -> int:
    """The schema version of a registry file that passes every check (see ``inspect``);
    raises RegistryError naming what is wrong otherwise. Read-only, and leaves nothing
    beside the file: without a WAL to read it is opened immutable, which makes no -shm."""
    if not path.is_file():
        raise RegistryError(f"{path}: no such file")
    immutable = "" if _side(path, "-wal").exists() else "&immutable=1"
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro{immutable}", uri=True)
        try:
            return inspect(conn, str(path))
        finally:
            conn.close()
    except (sqlite3.DatabaseError, UnicodeDecodeError) as err:
        raise RegistryError(f"{path} is not a usable registry ({_one_line(err)})") from None


def _copy_pages(src_path: Path, dest: Path) -> None:
    """SQLite's backup API from ``src_path`` (read-only: the daemon may be writing) into
    ``dest``, left as one file in rollback-journal mode (a WAL-mode copy would grow -wal
    and -shm files whenever it is opened), synced."""
    src = sqlite3.connect(f"file:{src_path}?mode=ro", uri=True, timeout=10)
    try:
        out = sqlite3.connect(dest)
        try:
            src.backup(out)
            out.execute("PRAGMA journal_mode=DELETE")
        finally:
            out.close()
    finally:
        src.close()
    _fsync(dest)


def take(db_path: Path, *, keep: int) -> Path:
    """A consistent copy of the live database, checked, then the oldest beyond ``keep``
    removed. Safe while the daemon writes. A full disk, any OSError or SQLite error, or a
    copy that fails the checks is one RegistryError, and no temporary file remains."""
    dest_dir = backups_dir(db_path)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S.%fZ")
    dest = dest_dir / f"{PREFIX}{stamp}.db"
    part = dest.with_suffix(".part")
    try:
        dest_dir.mkdir(parents=True, exist_ok=True)
        _copy_pages(db_path, part)
        check(part)
        os.replace(part, dest)
        _fsync(dest_dir)
    except (OSError, sqlite3.Error) as err:
        raise RegistryError(f"backup of {db_path} into {dest_dir} failed: {_one_line(err)}") from None
    finally:
        _remove(part)  # after the rename only its sidecars could be left, if anything
    for old in sorted(dest_dir.glob(f"{PREFIX}*.db"))[:-keep] if keep > 0 else []:
        try:
            _remove(old)
        except OSError as err:
            raise RegistryError(f"backup {dest} taken, but removing the old {old.name} failed: "
                                f"{_one_line(err)}") from None
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


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist
        return False


def _prepare(backup: Path, staged: Path) -> int:
    """Copy ``backup`` (with its WAL, if it has one: that is part of the database) to
    ``staged``, check the copy, migrate it if older, check it again, and leave it one synced
    file. Returns the version the backup recorded."""
    shutil.copyfile(backup, staged)
    if _side(backup, "-wal").is_file():
        shutil.copyfile(_side(backup, "-wal"), _side(staged, "-wal"))
    conn = sqlite3.connect(staged)
    try:
        version = inspect(conn, str(backup))  # before anything runs in it: migrate writes rows
        if version < SCHEMA_VERSION:
            migrate(conn)
            inspect(conn, f"{backup} migrated to version {SCHEMA_VERSION}")
        conn.execute("PRAGMA journal_mode=DELETE")  # folds a copied WAL in; one file to rename
    finally:
        conn.close()
    _fsync(staged)
    return version


def _keep_aside(db_path: Path) -> Path:
    """The current registry and its sidecars kept under a new name, without moving them: a
    hard link (a copy where links are not supported). Returns the kept path."""
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    kept = db_path.with_name(f"{db_path.name}.before-restore-{stamp}")
    n = 0
    while any(_side(kept, s).exists() for s in ("", *SIDECARS)):
        n += 1
        kept = db_path.with_name(f"{db_path.name}.before-restore-{stamp}-{n}")
    try:
        for suffix in ("", *SIDECARS):
            if _side(db_path, suffix).exists():
                try:
                    os.link(_side(db_path, suffix), _side(kept, suffix))
                except OSError:
                    shutil.copy2(_side(db_path, suffix), _side(kept, suffix))
    except OSError:
        _remove(kept)
        raise
    return kept


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _record(staged: Path, backup: Path, digest: str, version: int, kept: Path | None) -> None:
    """The restore's own audit row, written into the copy before it takes the registry's
    place: the history that follows says where it came from (the file, its hash, what was
    replaced and kept where, which Unix user), and a row a backup carried in cannot pass for
    the last word."""
    uid = os.getuid()
    payload = {"who": f"{user_name(uid) or uid}@cli", "what": "restore", "target": "registry",
               "before": str(kept or ""), "after": str(backup), "outcome": "restored", "reason": "tron restore",
               "request_id": None, "ref": None, "unix_user": user_label(uid), "file": str(backup), "sha256": digest,
               "backup_version": version, "kept": str(kept) if kept else None}
    conn = sqlite3.connect(staged)
    try:
        with conn:
            conn.execute("INSERT INTO events (ts, mono, kind, payload) VALUES (?, ?, 'audit', ?)",
                         (utc_iso(), time.monotonic(), json.dumps(payload)))
    finally:
        conn.close()
    _fsync(staged)


def restore(backup: Path, db_path: Path) -> Path | None:
    """Put ``backup`` in place of the registry (the daemon must be stopped). The database
    it replaces, if any, is kept beside it; returns where. The restored registry's last
    audit row says so (``_record``). Refused (RegistryError, the registry untouched) if
    ``backup`` is the registry itself, fails any check, or cannot be written beside it."""
    if not backup.is_file():
        raise RegistryError(f"{backup}: no such file")
    if _same_file(backup, db_path):
        raise RegistryError(f"{backup} is the registry itself: restore one of its backups (in "
                            f"{backups_dir(db_path)}) or a copy taken elsewhere")
    staged = db_path.with_name(f"{db_path.name}.restoring-{os.getpid()}")
    unchanged = "; the registry is unchanged"
    try:
        db_path.parent.mkdir(parents=True, exist_ok=True)
        _remove(staged)  # left by a restore that died here; no one else writes this name
        digest = _sha256(backup)
        version = _prepare(backup, staged)
        # a WAL with no database beside it is kept too: it may be all that is left of one
        kept = _keep_aside(db_path) if any(_side(db_path, s).exists() for s in ("", *SIDECARS)) else None
        try:
            _record(staged, backup, digest, version, kept)
        except BaseException:
            if kept is not None:
                _remove(kept)
            raise
    except RegistryError as err:
        _remove(staged)
        raise RegistryError(f"{err}{unchanged}") from None
    except (sqlite3.DatabaseError, UnicodeDecodeError) as err:
        _remove(staged)
        raise RegistryError(f"{backup} is not a usable registry ({_one_line(err)}){unchanged}") from None
    except OSError as err:
        _remove(staged)
        raise RegistryError(f"could not copy {backup} beside {db_path} ({_one_line(err)}){unchanged}") from None
    # The replaced file's WAL or journal would be replayed into the new one: they go first,
    # and come back from the kept links if the rename fails.
    gone = [s for s in SIDECARS if _side(db_path, s).exists()]
    try:
        for suffix in gone:
            _side(db_path, suffix).unlink()
        os.replace(staged, db_path)
    except OSError as err:
        for suffix in gone:
            # kept is None only when nothing was there to keep, and then nothing is gone
            if kept is not None and not _side(db_path, suffix).exists():
                os.link(_side(kept, suffix), _side(db_path, suffix))
        _remove(staged)
        if kept is not None:
            _remove(kept)
        raise RegistryError(f"could not rename the checked copy onto {db_path} ({_one_line(err)}){unchanged}") from None
    try:
        _fsync(db_path.parent)  # so the rename itself survives a crash
    except OSError as err:
        raise RegistryError(f"{backup} is in place of {db_path}, but syncing {db_path.parent} failed "
                            f"({_one_line(err)}): check that disk") from None
    return kept
