"""Fixtures every tier shares, and the CI rule: on CI nothing is skipped silently.

With ``CI`` set to a true value (``CI=true make test``), a test that would be skipped (a
missing server, browser, package or privilege) fails instead, and its report names what
was missing: the Makefile installs everything CI needs, so a skip there means a whole area
went untested. Elsewhere skips stay skips, listed at the end of the run (``-ra``).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

CI = os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def _fail_instead_of_skip(report) -> None:
    """Turn a skipped report into a failure that names the skip's reason."""
    if not (CI and report.skipped) or hasattr(report, "wasxfail"):
        return
    reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
    report.outcome = "failed"
    report.longrepr = f"CI=true: this would have been skipped, and CI must run it. {reason}"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    _fail_instead_of_skip(outcome.get_result())


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    # a module-level skip (pytest.importorskip at import time, pytestmark = skip)
    outcome = yield
    _fail_instead_of_skip(outcome.get_result())


@pytest.fixture(scope="session")
def postgres():
    """One throwaway PostgreSQL server per test process (tests/pgserver.py); skipped,
    loudly, where the package is not installed (a failure on CI)."""
    from tests.pgserver import ThrowawayPostgres

    server = ThrowawayPostgres(Path(tempfile.mkdtemp(prefix="tron-pg-")))
    server.start()
    yield server
    server.stop()
