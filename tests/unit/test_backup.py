"""Issue 9's start-up and backup edges on real SQLite files: rotation keeps the newest
``keep`` backups, each usable; schema text that is not UTF-8 is one clear refusal, at
start-up and for a restore, never a traceback."""

from __future__ import annotations

import sqlite3

import pytest

from registry import backup
from registry.schema import RegistryError, open_and_prepare


def registry(path):
    open_and_prepare(path)
    return path


def test_rotation_keeps_the_newest_backups_each_one_usable(tmp_path):
    db = registry(tmp_path / "registry.db")
    taken = [backup.take(db, keep=3) for _ in range(5)]
    kept = sorted(backup.backups_dir(db).glob("registry-*.db"))
    assert kept == taken[-3:]  # named by time: the two oldest went
    assert all(backup.check(p) for p in kept)
    assert not list(backup.backups_dir(db).glob("*.part"))
    assert backup.newest_good(db) == taken[-1]


def test_a_bad_newest_backup_is_passed_over_for_the_newest_good_one(tmp_path):
    db = registry(tmp_path / "registry.db")
    good = backup.take(db, keep=5)
    bad = backup.take(db, keep=5)
    bad.write_bytes(b"not a database" * 100)
    assert backup.newest_good(db) == good


def _garble_schema(path) -> None:
    """Someone's editor or a bad disk: a table's schema text that is not UTF-8."""
    conn = sqlite3.connect(path)
    try:
        conn.execute("PRAGMA writable_schema = ON")
        conn.execute("UPDATE sqlite_master SET sql = CAST(X'4352454154452054414246C3' || X'FF' AS TEXT) "
                     "WHERE name = 'events'")
        conn.commit()
    finally:
        conn.close()


def test_schema_text_that_is_not_utf8_is_one_clear_refusal(tmp_path):
    db = registry(tmp_path / "registry.db")
    _garble_schema(db)
    with pytest.raises(RegistryError) as start:
        open_and_prepare(db)
    assert "refusing to start" in str(start.value) and str(db) in str(start.value)
    with pytest.raises(RegistryError) as restore:
        backup.restore(db, tmp_path / "other.db")
    assert "not a usable registry" in str(restore.value)
    assert not (tmp_path / "other.db").exists()  # refused: nothing changed
