"""`tron down --force` while the registry takes writes again during the shutdown, and an operator's
refused actions (an invalid body, a state that does not allow it) audited, on a running mesh."""

from __future__ import annotations

import json

import sqlite3
import subprocess
import threading
from pathlib import Path

import psutil
import pytest

from tests.harness import REPO, TRON, wait_for

pytestmark = pytest.mark.integration

SMALL = {"llm-sim": {"role": "llm_sim", "port": 6190},
         "root": {"role": "root", "port": 6100},
         "programmer-1": {"role": "programmer", "port": 6130, "parent": "root"}}


def audit(mesh) -> list[dict]:
    return [json.loads(r["payload"]) for r in mesh.rows("SELECT payload FROM events WHERE kind = 'audit' ORDER BY id")]


def test_an_operator_action_refused_for_an_invalid_body_is_audited(mesh_factory):
    """README, Audit trail: every operator action, accepted or refused (... an invalid body
    ...), is an audit event."""
    mesh = mesh_factory(services=SMALL)
    mesh.up()
    d = mesh.url("daemon")
    code, answer = mesh.http("POST", d + "/runs/run-0123456789ab/budget", {"reason": "no number"})
    assert code == 422, answer
    code, answer = mesh.http("POST", d + "/tokens", {"name": "bad name with spaces!"})
    assert code in (400, 422), answer
    code, answer = mesh.http("PUT", d + "/settings", {"policy": {"miss_threshold": 0}})
    assert code == 422, answer  # refused, and audited by the daemon itself: once, not twice
    wait_for(lambda: [a for a in audit(mesh) if a["what"] == "POST /runs/run-0123456789ab/budget"], 10,
             "the refused budget audited")
    rows = audit(mesh)
    [budget] = [a for a in rows if a["what"] == "POST /runs/run-0123456789ab/budget"]
    assert budget["who"] == "token:operator" and budget["outcome"] == "refused (422): usd or tokens: name the new budget"
    assert len([a for a in rows if a["what"] == "POST /tokens"]) == 1, rows
    assert len([a for a in rows if a["what"] in ("settings", "PUT /settings")]) == 1, rows
    overlay = mesh.http("GET", d + "/settings")[1]["overlay"]
    code, answer = mesh.http("PUT", d + "/settings", {"policy": {}})  # nothing named: nothing written
    assert code == 422 and "policy" in json.dumps(answer), answer
    assert not Path(overlay).exists()


def test_down_force_does_not_say_lost_when_the_registry_wrote_the_rows_during_the_shutdown(mesh_factory):
    """`tron down --force` counts the rows held when it asked /status, then compares them
    with the lines of journal.jsonl after the shutdown. A registry that takes writes again
    while the services are being stopped (the lock ended, space freed) writes every row
    and leaves no journal: nothing is lost."""
    mesh = mesh_factory(services=SMALL)
    mesh.up()
    db = mesh.home / "registry" / "registry.db"
    holder = sqlite3.connect(db, isolation_level=None, timeout=10)
    holder.execute("BEGIN IMMEDIATE")  # another process holds the write lock
    released = threading.Event()
    try:
        old = mesh.kill("programmer-1")
        mesh.wait_replaced("programmer-1", old, timeout=20)
        wait_for(lambda: (r := mesh.status()["registry"])["state"] == "degraded" and r["pending"], 20, "rows held")
        service_pid = mesh.service("programmer-1")["pid"]
        proc = subprocess.Popen([*TRON, "--config", str(mesh.config), "down", "--force"], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env=mesh.env, cwd=REPO)
        # the lock ends once the services are being stopped (the CLI has read /status by then)
        wait_for(lambda: not psutil.pid_exists(service_pid), 60, "the services stopping")
        holder.execute("ROLLBACK")
        released.set()
        out, err = proc.communicate(timeout=120)
    finally:
        if not released.is_set():
            holder.execute("ROLLBACK")
        holder.close()
    journal = mesh.home / "registry" / "journal.jsonl"
    written = sqlite3.connect(db).execute(
        "SELECT COUNT(*) FROM retry_history WHERE agent_id = 'programmer-1'").fetchone()[0]
    assert not journal.exists() and written == 1, (journal.exists(), written)  # every row written: nothing lost
    assert "LOST" not in err and proc.returncode == 0, (proc.returncode, err)
    assert "rows it held are written" in err, err
