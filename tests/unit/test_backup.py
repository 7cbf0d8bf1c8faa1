"""Issue 9's start-up and backup edges on real SQLite files: rotation keeps the newest
``keep`` backups, each usable; schema text that is not UTF-8 is one clear refusal, at
start-up and for a restore, never a traceback."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import pwd
import sqlite3
import subprocess
from pathlib import Path

import pytest

from tron.registry import backup
from tron.registry.schema import (MIGRATIONS, SCHEMA_VERSION, RegistryError, describe, expected_schema, normal_sql,
                                  open_and_prepare)


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


# -- issue 20, item 5: a restore trusts nothing ------------------------------------------------------
# Each adversary's file is a good registry with one thing changed; each is refused by name,
# and the registry it would have replaced is left exactly as it was (same bytes, same inode).

MESH_FILE = Path(__file__).resolve().parents[2] / "mesh.toml"
TRIGGER = "CREATE TRIGGER wipe AFTER INSERT ON alerts BEGIN DELETE FROM alerts; END"


def tampered(tmp_path, *statements, writable_schema=False):
    """A good registry's backup, then ``statements`` run on it."""
    path = backup.take(registry(tmp_path / "source" / "registry.db"), keep=5)
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        if writable_schema:
            conn.execute("PRAGMA writable_schema = ON")
        for sql in statements:
            conn.execute(sql)
    finally:
        conn.close()
    return path


def live(tmp_path):
    """The registry a restore would replace, with a row to show it is untouched."""
    db = registry(tmp_path / "home" / "registry.db")
    conn = sqlite3.connect(db)
    conn.execute("INSERT INTO lanes (lane, state, changed_at) VALUES ('kept', 'open', 'now')")
    conn.commit()
    conn.close()
    return db


def fingerprint(db):
    """What must not change when a restore is refused: the file, its inode, its neighbours."""
    return db.read_bytes(), db.stat().st_ino, sorted(p.name for p in db.parent.iterdir())


def refused(backup_file, db) -> str:
    before = fingerprint(db)
    with pytest.raises(RegistryError) as err:
        backup.restore(backup_file, db)
    assert fingerprint(db) == before
    assert "\n" not in str(err.value)
    return str(err.value)


CHANGED_CHECK = ("UPDATE sqlite_master SET sql = replace(sql, '''Unknown error''', '''Unknown errors''') "
                 "WHERE name = 'retry_history'")


@pytest.mark.parametrize("statements, named", [
    ([TRIGGER], "trigger wipe is not part of tron's schema"),
    (["CREATE VIEW everything AS SELECT * FROM alerts"], "view everything is not part of tron's schema"),
    (["CREATE TABLE notes (x TEXT)"], "table notes is not part of tron's schema"),
    (["DROP INDEX alerts_agent_mono"], "index alerts_agent_mono is missing"),
    (["CREATE INDEX alerts_mine ON alerts(reason)"], "index alerts_mine is not part of tron's schema"),
    ([CHANGED_CHECK], "table retry_history differs from what the migrations create"),
], ids=["trigger", "view", "extra-table", "missing-index", "extra-index", "changed-check"])
def test_a_backup_whose_schema_is_not_exactly_trons_is_refused_by_name(tmp_path, statements, named):
    bad = tampered(tmp_path, *statements, writable_schema=statements == [CHANGED_CHECK])
    db = live(tmp_path)
    assert named in refused(bad, db)
    with pytest.raises(RegistryError, match=named):
        backup.check(bad)  # and never named as the newest good backup


def test_a_registry_made_by_migrate_is_exactly_the_expected_schema(tmp_path):
    """expected_schema replays MIGRATIONS itself; the registries tron makes must match it."""
    conn = sqlite3.connect(registry(tmp_path / "registry.db"))
    try:
        assert describe(conn) == dict(expected_schema())
    finally:
        conn.close()


@pytest.mark.parametrize("written, same", [
    ("CREATE TABLE t (a TEXT,\n    b INTEGER NOT NULL DEFAULT 0 )", True),  # only laid out differently
    ("CREATE TABLE t(a TEXT,b INTEGER NOT NULL DEFAULT 1)", False),
    ("CREATE TABLE t(a TEXT CHECK (a != 'x  y'),b INTEGER NOT NULL DEFAULT 0)", False),  # inside a literal
], ids=["layout", "default", "literal"])
def test_schema_sql_is_compared_without_its_layout_but_with_its_literals(written, same):
    canonical = "CREATE TABLE t(a TEXT,b INTEGER NOT NULL DEFAULT 0)"
    assert (normal_sql(written) == canonical) is same
    assert normal_sql("CHECK (a != 'x  y')") == "CHECK(a != 'x  y')"


def test_the_trigger_that_wipes_alerts_would_have_worked(tmp_path):
    """Why the trigger row matters: every column check passes, and the first alert written
    deletes all of them."""
    bad = tampered(tmp_path, TRIGGER)
    conn = sqlite3.connect(bad)
    conn.execute("INSERT INTO alerts (alert_id, agent, incarnation, reason, detail, status, created_at) "
                 "VALUES ('a1', 'web', 'i1', 'crash', '', 'pending', 'now')")
    assert conn.execute("SELECT COUNT(*) FROM alerts").fetchone() == (0,)
    conn.close()


def _retype_schema_version(version_value):
    # version is INTEGER PRIMARY KEY, which cannot hold text: the adversary rebuilt the table
    return ["ALTER TABLE schema_version RENAME TO old_versions",
            "CREATE TABLE schema_version (version, description TEXT NOT NULL, applied_at TEXT NOT NULL)",
            "INSERT INTO schema_version SELECT * FROM old_versions",
            "DROP TABLE old_versions",
            f"UPDATE schema_version SET version = {version_value} WHERE version = (SELECT MAX(version) "
            "FROM schema_version)"]


def test_a_schema_version_that_is_not_a_number_is_one_clear_refusal(tmp_path):
    bad = tampered(tmp_path, *_retype_schema_version("'zzz'"))
    db = live(tmp_path)
    assert "schema_version holds 'zzz', not a version number" in refused(bad, db)


def test_a_newer_schema_version_says_upgrade_tron(tmp_path):
    bad = tampered(tmp_path, "INSERT INTO schema_version VALUES (99, 'from the future', 'now')")
    db = live(tmp_path)
    assert "newer than this code" in refused(bad, db) and "upgrade tron" in refused(bad, db)


def test_restoring_the_live_file_onto_itself_is_refused_in_one_line(tmp_path):
    db = live(tmp_path)
    assert "is the registry itself" in refused(db, db)
    link = tmp_path / "same-inode.db"
    os.link(db, link)  # another name for the same file
    assert "is the registry itself" in refused(link, db)
    (tmp_path / "via-symlink.db").symlink_to(db)
    assert "is the registry itself" in refused(tmp_path / "via-symlink.db", db)


def test_tron_restore_of_the_live_file_exits_2_with_one_line(tmp_path, capsys):
    from tron.scripts import tron

    home = tmp_path / "home"
    db = registry(home / "registry" / "registry.db")
    before = fingerprint(db)
    code = tron.main(["--config", str(MESH_FILE), "--home", str(home), "restore", str(db)])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "is the registry itself" in err, err
    assert fingerprint(db) == before


def test_a_good_restore_keeps_the_replaced_registry_and_its_wal_beside_it(tmp_path):
    good = backup.take(registry(tmp_path / "source" / "registry.db"), keep=5)
    db = live(tmp_path)
    db.with_name("registry.db-wal").write_bytes(b"")  # as an unclean stop leaves it
    old_bytes = db.read_bytes()
    kept = backup.restore(good, db)
    assert kept.read_bytes() == old_bytes and kept.with_name(kept.name + "-wal").exists()
    assert not db.with_name("registry.db-wal").exists()  # never replayed into the restored file
    assert backup.check(db) == SCHEMA_VERSION
    conn = sqlite3.connect(db)
    assert conn.execute("SELECT COUNT(*) FROM lanes").fetchone() == (0,)  # the backup's rows, not the old ones
    conn.close()
    assert not [p for p in db.parent.iterdir() if ".restoring-" in p.name]


def test_a_restore_says_so_in_the_restored_registrys_audit_trail(tmp_path):
    """The restored history's last audit row is the restore itself: from which file (its hash,
    its schema version), what it replaced and where that is kept, by which Unix user. A row
    the backup carried in (forged, or just old) is not the last word."""
    source = registry(tmp_path / "source" / "registry.db")
    conn = sqlite3.connect(source)
    with conn:
        conn.execute("INSERT INTO events (ts, mono, kind, payload) VALUES ('then', 0, 'audit', '{\"who\": \"alice\"}')")
    conn.close()
    good = backup.take(source, keep=5)
    db = live(tmp_path)
    kept = backup.restore(good, db)
    conn = sqlite3.connect(db)
    rows = [json.loads(p) for (p,) in conn.execute("SELECT payload FROM events WHERE kind = 'audit' ORDER BY id")]
    conn.close()
    assert rows[0] == {"who": "alice"} and len(rows) == 2
    me = pwd.getpwuid(os.getuid()).pw_name
    assert {k: rows[-1][k] for k in ("who", "what", "outcome", "file", "kept", "backup_version", "unix_user")} == {
        "who": f"{me}@cli", "what": "restore", "outcome": "restored", "file": str(good), "kept": str(kept),
        "backup_version": SCHEMA_VERSION, "unix_user": f"{me} (uid {os.getuid()})"}
    assert rows[-1]["sha256"] == hashlib.sha256(good.read_bytes()).hexdigest()
    assert backup.check(db) == SCHEMA_VERSION  # still exactly Tron's schema


def test_an_older_backup_is_migrated_before_it_replaces_the_registry(tmp_path):
    old = tmp_path / "v6.db"
    conn = sqlite3.connect(old, isolation_level=None)
    conn.execute("CREATE TABLE schema_version (version INTEGER PRIMARY KEY, description TEXT NOT NULL, "
                 "applied_at TEXT NOT NULL)")
    for version, description, step in MIGRATIONS[:6]:
        step(conn) if callable(step) else conn.executescript(step)
        conn.execute("INSERT INTO schema_version VALUES (?, ?, 'then')", (version, description))
    conn.close()
    assert backup.check(old) == 6
    db = live(tmp_path)
    assert backup.restore(old, db) is not None
    assert backup.check(db) == SCHEMA_VERSION


# -- full disks: one line, nothing left behind -------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path):
    """A 1 MiB tmpfs (root only)."""
    mount = tmp_path / "small"
    mount.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {proc.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def fill_but(path, spare: int) -> None:
    """Fill the filesystem of ``path``, then free ``spare`` bytes: less than a registry."""
    filler = path / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        for size in (65536, 4096, 1):
            try:
                while True:
                    os.write(fd, b"\0" * size)
            except OSError as err:
                assert err.errno == errno.ENOSPC
    finally:
        os.close(fd)
    os.truncate(filler, filler.stat().st_size - spare)


def leftovers(directory):
    return sorted(p.name for p in directory.iterdir() if not p.name.endswith(".db"))


def test_a_good_backup_leaves_no_temporary_file(tmp_path):
    db = registry(tmp_path / "registry.db")
    backup.take(db, keep=3)
    backup.check(backup.take(db, keep=3))
    assert leftovers(backup.backups_dir(db)) == []  # no .part, .part-wal, .part-shm, .db-shm


def test_a_backup_on_a_full_disk_is_one_error_and_leaves_nothing(small_disk, capsys):
    from tron.scripts import tron

    home = small_disk / "home"
    db = registry(home / "registry" / "registry.db")
    backup.backups_dir(db).mkdir()
    fill_but(small_disk, 65536)
    with pytest.raises(RegistryError, match="full"):
        backup.take(db, keep=3)
    assert leftovers(backup.backups_dir(db)) == [] and not list(backup.backups_dir(db).iterdir())
    code = tron.main(["--config", str(MESH_FILE), "--home", str(home), "backup"])  # the daemon is down
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "backup of" in err and "full" in err, err
    assert not list(backup.backups_dir(db).iterdir())


def test_a_backup_whose_copy_fails_half_way_removes_its_part_files(tmp_path, monkeypatch):
    """Where a tmpfs cannot be mounted: the copy writes part of the file and its sidecars,
    then the disk is full."""
    db = registry(tmp_path / "registry.db")

    def copy_then_enospc(src, dest):
        for name in (dest, dest.with_name(dest.name + "-wal"), dest.with_name(dest.name + "-shm")):
            name.write_bytes(b"\0" * 4096)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(backup, "_copy_pages", copy_then_enospc)
    with pytest.raises(RegistryError, match="No space left on device"):
        backup.take(db, keep=3)
    assert not list(backup.backups_dir(db).iterdir())


def test_a_restore_on_a_full_disk_leaves_the_registry_exactly_in_place(small_disk, tmp_path):
    good = backup.take(registry(tmp_path / "source" / "registry.db"), keep=5)
    db = live(small_disk)
    fill_but(small_disk, 65536)
    assert "the registry is unchanged" in refused(good, db)
    assert not [p for p in db.parent.iterdir() if ".restoring-" in p.name]
