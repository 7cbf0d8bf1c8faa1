"""Fixtures every tier shares."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def postgres():
    """One throwaway PostgreSQL server per test process (tests/pgserver.py); skipped,
    loudly, where the package is not installed."""
    from tests.pgserver import ThrowawayPostgres

    server = ThrowawayPostgres(Path(tempfile.mkdtemp(prefix="tron-pg-")))
    server.start()
    yield server
    server.stop()
