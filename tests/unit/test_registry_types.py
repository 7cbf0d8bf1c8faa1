"""What `make typecheck` (mypy, strict on registry/) found that could go wrong at run time,
each pinned by a test: a migration that changed its caller's connection, an engine used
before it was opened, and answers whose shape drifted from what the protocol says."""

from __future__ import annotations

import sqlite3
import typing

import pytest

from tron.registry.pg import PgDb
from tron.registry.read import COST_GROUPS, Cost, connect, cost
from tron.registry.schema import SCHEMA_VERSION, migrate, open_and_prepare


def test_a_migration_leaves_an_autocommit_connection_in_autocommit(tmp_path):
    """migrate() runs its rebuilding steps in an explicit transaction and used to hand the
    connection back in sqlite3's implicit-transaction mode whatever it had been: a caller in
    autocommit then held every later write in an open transaction, unseen by others and
    lost when it closed the connection without a commit."""
    path = tmp_path / "registry.db"
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        assert migrate(conn) == SCHEMA_VERSION
        assert conn.isolation_level is None
        conn.execute("INSERT INTO lanes (lane, state, reason, changed_by, changed_at) "
                     "VALUES ('anthropic', 'open', 'test', 'test', 'now')")
        other = sqlite3.connect(path)
        try:
            assert other.execute("SELECT lane FROM lanes").fetchall() == [("anthropic",)]
        finally:
            other.close()
    finally:
        conn.close()


def test_a_migration_leaves_a_default_connection_as_it_was(tmp_path):
    conn = sqlite3.connect(tmp_path / "registry.db")
    try:
        before = conn.isolation_level
        migrate(conn)
        assert conn.isolation_level == before
    finally:
        conn.close()


@pytest.mark.parametrize("use", ["one", "all", "execute", "transaction"])
async def test_a_postgresql_engine_used_before_open_says_so(use):
    """No server is needed: nothing is reached before open(). It used to fail with
    "'NoneType' object has no attribute 'execute'"."""
    db = PgDb("postgresql://tron@127.0.0.1:1/tron")
    with pytest.raises(RuntimeError, match=r"PgDb\.open\(\) must be awaited before use"):
        if use == "transaction":
            async with db.transaction():
                pass
        else:
            await getattr(db, use)("SELECT 1")


def test_cost_answers_the_total_then_every_group_in_order(tmp_path):
    """read.cost's answer is typed (Cost); its groups are COST_GROUPS's, so the two cannot drift."""
    path = tmp_path / "registry.db"
    open_and_prepare(path)
    conn = connect(path)
    try:
        report = cost(conn)
    finally:
        conn.close()
    assert list(report) == ["total", *COST_GROUPS] == list(typing.get_type_hints(Cost))
    assert report["total"]["calls"] == 0 and report["provider_model"] == []
