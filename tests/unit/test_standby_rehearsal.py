"""A standby rehearses its role's start before it waits (forkserver.py ``_rehearse_role``): the
role's application is built for a stand-in incarnation and dropped. It must have no effect
outside its process (no thread, no socket, nothing sent), leave the mesh file read ahead for
the real start, and build nothing for a service that is not a built-in role; and the real
start's logging setup then changes no level (``logs._set_level``), since each change clears
every logger's cache. Each case runs in a fresh interpreter: it sets up logging globally."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys

import pytest

from tests.harness import REPO

SCRIPT = """
import json, logging, os, sys, threading
from tron.common import config as cfg
from tron.services.daemon.forkserver import _rehearse_role
path = os.path.join(sys.argv[1], "mesh.toml")
cfg.preload_mesh(path)
before = set(os.listdir("/proc/self/fd"))
_rehearse_role(path, sys.argv[2])
after = set(os.listdir("/proc/self/fd"))
print(json.dumps({"threads": threading.active_count(), "new_fds": sorted(after - before),
                  "read_ahead": bool(cfg._preloaded),
                  "handlers": len(logging.getLogger().handlers),
                  "incarnation_logged": __import__("tron.common.logs", fromlist=["x"])._context.get("incarnation")}))
"""


def rehearse(service: str) -> dict:
    out = subprocess.run([sys.executable, "-c", SCRIPT, str(REPO), service], capture_output=True, text=True,
                         timeout=60, cwd=REPO, env={"PATH": "/usr/bin:/bin", "TRON_SDKS": ""})
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("service, built", [
    ("programmer-1", True), ("director-code", True), ("root", True), ("gateway", True),
    ("llm-sim", False),  # not an agent role: nothing to build
    ("no-such-service", False),
])
def test_a_rehearsal_builds_a_built_in_role_and_touches_nothing_outside(service, built):
    said = rehearse(service)
    assert said["threads"] == 1 and said["new_fds"] == [], said  # no thread, no socket, no file left open
    assert said["read_ahead"], "the real start must still find its mesh file read ahead"
    assert (said["incarnation_logged"] == "i-standby") is built, said
    assert said["handlers"] == (1 if built else 0), said


@pytest.mark.parametrize("current, wanted, changes", [
    (logging.NOTSET, "INFO", True),
    (logging.INFO, "INFO", False),
    (logging.INFO, "info", False),
    (logging.INFO, "DEBUG", True),
    (logging.WARNING, logging.WARNING, False),
    (logging.INFO, logging.WARNING, True),
])
def test_a_logger_level_is_set_only_when_it_changes(monkeypatch, current, wanted, changes):
    from tron.common import logs

    logger = logging.Logger("t")
    logger.level = current
    calls = []
    monkeypatch.setattr(logger, "setLevel", lambda level: calls.append(level))
    logs._set_level(logger, wanted)
    assert bool(calls) is changes


@pytest.mark.parametrize("ahead", [False, True], ids=["read now", "read ahead by the standby"])
def test_an_incarnations_environment_is_exactly_its_own(monkeypatch, ahead):
    """Only what differs is set or unset, and nothing of the server's is left behind."""
    from tron.common import environ
    from tron.services.daemon.forkserver import _replace_environ

    monkeypatch.setattr(os, "environ", os.environ.copy())  # a copy: the test's own is not touched
    os.environ.clear()
    os.environ.update({"PATH": "/bin", "SERVER_ONLY": "1", "TRON_SERVICE": "old", "HOME": "/root"})
    new = {"PATH": "/bin", "TRON_SERVICE": "programmer-1", "HOME": "/root", "TRON_INCARNATION": "i-1"}
    if ahead:
        environ.current()  # what a standby decodes while it waits
    _replace_environ(new)
    assert dict(os.environ) == new
