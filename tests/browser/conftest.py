"""The web UI in a real headless browser: Debian's Chromium driven by Playwright, against
one real mesh shared by the module (real processes, real registry, nothing mocked).

Playwright cannot download its own browser here, so it drives the system's
``/usr/bin/chromium`` (`make test` installs Debian's chromium package, as root). The mesh is stopped
at teardown and the module fails if any process started for it is still alive.
Screenshots go to a temporary artifacts directory, named at the end of the run.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.harness import Mesh, cleanup, make_mesh

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
# The fast test policy declares a service silent after 1 s without a beat. On a small
# machine busy with other suites, an agent starved that long during a run was restarted
# for heartbeat_timeout, and every test counting this module's detections and restarts
# saw one too many. These tests are about the UI, not detection latency: 2 s.
POLICY = {"miss_threshold": 8}


@pytest.fixture(scope="module")
def mesh(tmp_path_factory) -> Mesh:
    m = make_mesh(tmp_path_factory.mktemp("mesh"), policy=POLICY)
    try:
        m.up()
        yield m
    finally:
        leaks = cleanup(m)
        assert not leaks, f"processes left behind: {leaks}"


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.exists():
        pytest.skip(f"no Chromium at {CHROMIUM}: `make system-deps` (part of `make test`) installs it, as root")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield b
        b.close()


# A name that is not a loopback one but that this browser resolves to 127.0.0.1: what a
# DNS-rebinding page sees once its name points at this machine.
REBOUND_HOST = "evil.test"


@pytest.fixture(scope="module")
def rebinding_browser(browser):
    """A second Chromium whose resolver maps REBOUND_HOST to 127.0.0.1 (a launch argument,
    so not the module's browser)."""
    b = browser.browser_type.launch(executable_path=str(CHROMIUM), args=[
        *CHROMIUM_ARGS, f"--host-resolver-rules=MAP {REBOUND_HOST} 127.0.0.1"])
    yield b
    b.close()


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ui-screenshots")
    yield path
    print(f"\nweb UI screenshots: {path}")
