"""README, "Operating Tron", from the CLI on a real mesh: the promises no other test
exercised (tests/README.md maps each one here). Each is held against the world: the
registry, /proc, the port, llm-sim's own counters, the files in the home.

pause and its mark across a daemon restart; stop failing live tasks and refusing new ones;
the incident switch; a lane paused by hand and the breaker's metric; `tron audit --limit`;
the daemon's periodic backups and `tron restore` refused while the mesh runs.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import time

import psutil
import pytest

from tests.harness import TRON, wait_for

pytestmark = pytest.mark.integration


def fault(mesh, provider: str, kind: str, **kw) -> None:
    code, body = mesh.http("PUT", mesh.url("llm-sim") + f"/sim/faults/{provider}", {"kind": kind, **kw})
    assert code == 200, body


def submit(mesh, prompt: str) -> str:
    code, body = mesh.http("POST", mesh.url("gateway") + "/runs", {"prompt": prompt})
    assert code == 202, body
    return body["run_id"]


def ended(mesh, run_id: str, timeout: float = 120) -> dict:
    """The run's registry row once it is no longer running."""
    return wait_for(lambda: (r := mesh.rows("SELECT * FROM runs WHERE run_id = ?", (run_id,)))
                    and r[0]["status"] != "running" and r[0], timeout, f"run {run_id} to end")


def daemon_pid(mesh) -> int:
    return json.loads((mesh.home / "run" / "daemon.json").read_text())["pid"]


def metric(mesh, name: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    code, text = mesh.http("GET", mesh.url("daemon") + "/metrics", token=False)
    assert code == 200
    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples if s.name == name)


def test_pause_from_the_cli_fails_new_work_at_once_and_its_mark_survives_a_daemon_restart(mesh):
    proc = mesh.tron("pause", "programmer-1", "--reason", "promise check")
    assert proc.returncode == 0, proc.stderr
    ladder = len(mesh.history())
    run = ended(mesh, submit(mesh, "work while programmer-1 is paused"), timeout=60)
    assert run["status"] == "failed" and "service_paused" in run["failure"], run
    assert len(mesh.history()) == ladder  # refused, not climbed
    # the daemon is killed and started again: the mark is read back from the registry
    os.kill(daemon_pid(mesh), signal.SIGKILL)
    wait_for(lambda: not mesh.health("daemon"), 10, "the daemon to be gone")
    mesh.up()
    assert mesh.service("programmer-1")["paused"] is True
    run = ended(mesh, submit(mesh, "still paused after the restart"), timeout=60)
    assert run["status"] == "failed" and "service_paused" in run["failure"], run
    assert mesh.tron("resume", "programmer-1", "--reason", "promise check").returncode == 0
    assert ended(mesh, submit(mesh, "taken again"))["status"] == "done"


def test_stop_fails_a_live_task_with_service_stopped_and_a_new_one_is_refused_until_start(mesh):
    """README, Services: `tron stop` fails the service's live tasks at once with reason
    `service_stopped` and tells their parents (the run ends, it does not wait); a task given
    to it afterwards is refused with the same reason (the README said it waited for `tron
    start`: the code refuses, as the unit test of the breaker says, and the README now does)."""
    # after=1: the run's first call, the architect's plan, goes through at once
    fault(mesh, "anthropic", "latency", latency_ms=3000, after=1)
    run_id = submit(mesh, "slow work to be stopped")
    busy = wait_for(lambda: (s := mesh.service("programmer-1"))["task"] and s, 60, "programmer-1 to take its task")
    proc = mesh.tron("stop", "programmer-1", "--reason", "promise check")
    assert proc.returncode == 0, proc.stderr
    mesh.http("DELETE", mesh.url("llm-sim") + "/sim/faults")
    [task] = wait_for(lambda: (t := mesh.rows("SELECT status, failure FROM tasks WHERE task_id = ?", (busy["task"],)))
                      and t[0]["status"] == "failed" and t, 30, "its task to fail")
    assert "service_stopped" in (task["failure"] or ""), task
    assert ended(mesh, run_id, timeout=60)["status"] == "failed"  # the parent was told: the run did not hang
    assert not psutil.pid_exists(busy["pid"]) or psutil.Process(busy["pid"]).status() == psutil.STATUS_ZOMBIE
    run = ended(mesh, submit(mesh, "work for a stopped service"), timeout=60)
    assert run["status"] == "failed" and "service_stopped" in run["failure"], run
    assert mesh.tron("start", "programmer-1", "--wait", "--reason", "promise check").returncode == 0
    assert ended(mesh, submit(mesh, "work after the start"))["status"] == "done"


def test_the_incident_switch_from_the_cli_holds_every_start_until_resumed(mesh):
    proc = mesh.tron("spawning", "pause", "--reason", "incident")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(mesh.tron("status", "--json", check=True).stdout)["spawning"] == "paused"
    old = mesh.kill("programmer-2")
    # detected and decided, the old tree gone, but nothing new starts: it waits in backoff
    mesh.wait_state("programmer-2", "backoff", timeout=20)
    held = time.monotonic() + mesh.policy["heartbeat_interval"] * mesh.policy["miss_threshold"] * 2
    while time.monotonic() < held:
        assert mesh.health("programmer-2") is None  # nobody answers on its port
        assert mesh.service("programmer-2")["state"] == "backoff"
        time.sleep(0.1)
    assert [r["reason"] for r in mesh.history("programmer-2")] == ["process_exit"]  # recorded meanwhile
    refused = mesh.tron("restart", "programmer-1", "--reason", "during the incident")
    assert refused.returncode != 0 and "spawning" in refused.stderr, refused.stderr
    before = mesh.service("programmer-1")["pid"]
    proc = mesh.tron("spawning", "resume", "--reason", "over")
    assert proc.returncode == 0, proc.stderr
    mesh.wait_replaced("programmer-2", old)
    assert mesh.service("programmer-1")["pid"] == before  # the refused restart did nothing
    what = [a["payload"]["what"] for a in json.loads(mesh.tron("audit", "--json", check=True).stdout)]
    assert {"spawning_pause", "spawning_resume"} <= set(what), what


def test_a_lane_paused_by_hand_refuses_its_roles_work_and_the_breakers_metric_counts_only_its_own(mesh):
    assert mesh.tron("lane", "pause", "programmer", "--reason", "promise check").returncode == 0
    listed = mesh.tron("lane", "list").stdout
    assert any(line.split()[:2] == ["programmer", "paused"] for line in listed.splitlines()), listed
    run = ended(mesh, submit(mesh, "work for a paused lane"), timeout=60)
    assert run["status"] == "failed" and "lane_paused" in run["failure"], run
    assert metric(mesh, "tron_lanes_paused_total") == 0  # a pause by hand is not the breaker's
    assert mesh.tron("lane", "resume", "programmer", "--reason", "promise check").returncode == 0
    assert ended(mesh, submit(mesh, "the lane is open"))["status"] == "done"


def test_audit_limit_gives_the_newest_rows(mesh):
    for verb in ("pause", "resume", "pause", "resume"):
        assert mesh.tron(verb, "programmer-2", "--reason", f"audit {verb}").returncode == 0
    every = json.loads(mesh.tron("audit", "--json", check=True).stdout)
    two = json.loads(mesh.tron("audit", "--json", "--limit", "2", check=True).stdout)
    assert len(every) >= 4 and two == every[-2:]
    rows = mesh.rows("SELECT payload FROM events WHERE kind = 'audit' ORDER BY id")
    assert [json.loads(r["payload"])["what"] for r in rows][-2:] == [a["payload"]["what"] for a in two]
    assert len(mesh.tron("audit", "--limit", "1").stdout.strip().splitlines()) == 1


def test_the_daemon_backs_up_on_its_interval_keeps_the_newest_and_restore_needs_the_mesh_down(mesh_factory, tmp_path):
    mesh = mesh_factory(services={"llm-sim": {"role": "llm_sim", "port": 6190}})
    mesh.config.write_text(mesh.config.read_text() + "\n[registry]\nbackup_interval = 1.0\nbackup_keep = 2\n")
    mesh.up()
    backups = mesh.home / "registry" / "backups"

    def taken() -> list:
        return sorted(p for p in backups.glob("*.db")) if backups.exists() else []

    def kept_copy():  # the newest backup, copied aside (the daemon rotates them every second)
        for newest in reversed(taken()):
            try:
                return shutil.copy(newest, tmp_path / "kept.db")
            except FileNotFoundError:
                continue
        return None

    first = wait_for(lambda: (b := taken()) and b[0], 30, "a first backup by the daemon")
    wait_for(lambda: first not in taken(), 30, "newer backups to replace the oldest")
    assert len(taken()) <= 2  # backup_keep
    db = mesh.home / "registry" / "registry.db"
    before = db.stat().st_ino
    refused = mesh.tron("restore", wait_for(kept_copy, 10, "a backup to copy"))
    assert refused.returncode == 2 and len(refused.stderr.strip().splitlines()) == 1, refused.stderr
    assert db.stat().st_ino == before and mesh.health("llm-sim")  # untouched, still serving


def test_without_config_the_cli_speaks_of_the_mesh_the_home_runs(mesh_factory):
    """Only TRON_HOME and TRON_PORT_OFFSET in the shell (no --config, no TRON_CONFIG): the
    commands follow the mesh file the home's daemon was started with, not the shipped
    mesh.toml, which has no such service (`tron restart ticker` was refused as unknown)."""
    import sys

    mesh = mesh_factory(services={"ticker": {"command": [sys.executable, "-c", "import time; time.sleep(600)"],
                                             "port": 6190}})
    mesh.up()
    env = {k: v for k, v in mesh.env.items() if k != "TRON_CONFIG"}

    def plain(*args: str):
        import subprocess

        return subprocess.run([*TRON, *args], env=env, capture_output=True, text=True, timeout=60)

    before = mesh.service("ticker")["pid"]
    listed = plain("status")
    assert listed.returncode == 0 and "ticker" in listed.stdout, listed
    restarted = plain("restart", "ticker", "--wait")
    assert restarted.returncode == 0, restarted
    assert mesh.service("ticker")["pid"] != before
    unknown = plain("restart", "nobody")
    assert unknown.returncode == 2 and "no service named 'nobody'" in unknown.stderr and "ticker" in unknown.stderr, \
        unknown
