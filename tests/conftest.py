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


# -- the order files are handed out in ------------------------------------------------------------
#
# `make test` runs `-n 3 --dist loadfile --no-loadscope-reorder`: xdist hands whole files to
# the workers in collection order. Its default order (most tests first) put the 1,400 fast unit
# tests first and the slow integration files with few tests (a Ray cluster, PostgreSQL, network
# namespaces) last, where one of them alone could make the run's tail. Here the heaviest files
# go first and the unit files last, filling the gaps (longest processing time first). Inside a
# file, and between files of the same weight, pytest-randomly's order stands (its shuffle runs
# before this stable sort). Seconds measured on 2 cores (a full run with four workers,
# 2026-12-06 morning); a stale figure costs balance, never correctness.
MEASURED_S = {"integration/test_ray_cluster": 195, "integration/test_faults": 190, "integration/test_drills": 135,
              "integration/test_ladder": 125, "integration/test_providers": 120, "integration/test_operators": 120,
              "integration/test_telemetry": 115, "integration/test_forkserver": 110,
              "integration/test_operator_cli": 105, "integration/test_standby": 105,
              "integration/test_own_agents": 90, "integration/test_mesh_core": 85, "browser/test_ui": 80,
              "integration/test_netns_cluster": 80, "integration/test_postgres_registry": 65,
              "integration/test_foreign": 60, "integration/test_handover": 55, "integration/test_spend": 50,
              "integration/test_least_privilege": 45, "integration/test_notify": 30,
              "integration/test_daemon_lifecycle": 25, "integration/test_mesh_start": 25,
              "integration/test_operator_restart": 25, "integration/test_replicas": 25, "unit/test_daemon": 25}
OTHERS_S = {"unit": 1.0}  # every file not listed took under 20 s; a unit file, about one


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config, items):
    def weight(item) -> float:
        path = Path(item.nodeid.split("::")[0])
        return MEASURED_S.get(f"{path.parent.name}/{path.stem}", OTHERS_S.get(path.parent.name, 5.0))

    items.sort(key=lambda item: -weight(item))


def pytest_sessionfinish(session):
    """The scratch folders of node agents that Ray ended with SIGKILL (a cluster test's
    node loss, its shutdown): each cluster fixture sweeps after its shutdown, but an agent
    may still be ending then; by the end of the run it has ended. Only folders whose agent
    is gone are removed (node_agent.sweep_scratch), so a still-running worker's are kept."""
    from tron.services.daemon.node_agent import sweep_scratch

    sweep_scratch()
