"""Issue 4: each drill against a real mesh, its verdict checked against the registry;
a chaos drill of 30+ faults with every invariant held; `tron logs -f` follows a service
through restarts."""

from __future__ import annotations

import json
import re
import subprocess
import threading
import time

import psutil
import pytest

from tests.harness import REPO, TRON, wait_for

pytestmark = pytest.mark.integration


@pytest.fixture
def drill_mesh(mesh_factory):
    m = mesh_factory(policy={"progress_timeout": 1.5})
    m.up()
    return m


def drill(mesh, *args, timeout=150) -> tuple[int, dict]:
    """``timeout`` below pytest-timeout's: a drill that does not end fails with what it said
    it was waiting for, the runs, and the daemon's last lines, not with a stack of select()."""
    try:
        proc = mesh.tron("drill", *args, "--json", timeout=timeout)
    except subprocess.TimeoutExpired as err:
        said = err.stderr.decode(errors="replace") if isinstance(err.stderr, bytes) else err.stderr or ""
        runs = mesh.rows("SELECT run_id, status, created_at FROM runs")
        daemon = (mesh.home / "logs" / "daemon.log").read_text(errors="replace").splitlines()[-60:]
        pytest.fail(f"tron drill {' '.join(args)} did not end in {timeout}s; it said:\n{said[-6000:]}\n"
                    f"runs: {runs}\ndaemon log:\n" + "\n".join(daemon))
    assert proc.stdout, proc.stderr
    return proc.returncode, json.loads(proc.stdout)


def events(result: dict) -> list[str]:
    return [e["event"] for e in result["timeline"]]


def test_kill_drill(drill_mesh):
    code, result = drill(drill_mesh, "kill", "programmer-1")
    assert code == 0 and result["verdict"] == "pass", result
    assert {"fault injected", "detected", "alert delivered", "decision", "restarted", "healthy again"} <= set(events(result))
    [row] = drill_mesh.history("programmer-1")
    assert row["drill"] and row["drill"].startswith("kill:programmer-1:")
    # drill traffic stays out of the production figures
    assert drill_mesh.rows("SELECT * FROM failure_metrics") == []


def test_runaway_drill(drill_mesh):
    code, result = drill(drill_mesh, "runaway", "programmer-2")
    assert code == 0, result
    [row] = drill_mesh.history("programmer-2")
    assert row["reason"] == "no_progress"
    detail = json.loads(row["detail"])
    assert detail["progress_timeout"] == 1.5 and detail["stuck_for"] >= 1.5


def test_provider_outage_drill(drill_mesh):
    code, result = drill(drill_mesh, "provider-outage", "anthropic")
    assert code == 0, result
    run = drill_mesh.rows("SELECT * FROM runs WHERE run_id = ?", (result["run_id"],))[0]
    assert run["status"] == "done" and run["drill"] == 1
    switches = drill_mesh.rows("SELECT * FROM retry_history WHERE run_id = ? AND retry_type = 'llm_change'",
                               (result["run_id"],))
    assert switches and {s["from_provider"] for s in switches} == {"anthropic"}


def test_crash_loop_drill(drill_mesh):
    code, result = drill(drill_mesh, "crash-loop", "programmer-1")
    assert code == 0, result
    kills = drill_mesh.policy["max_restarts"] + 2
    rows = drill_mesh.history("programmer-1")
    assert [r["retry_type"] for r in rows].count("child_restart") == kills
    loops = [r for r in rows if r["retry_type"] == "escalation"]
    assert loops and {r["reason"] for r in loops} == {"crash_looping"}
    assert len(result["back_after"]) == kills and result["delays"][0] == 0 and result["delays"][-1] > 0
    status = drill_mesh.service("programmer-1")
    assert status["state"] == "running" and status["crash_looping"] is True  # back by itself, still in its episode


def test_a_failing_drill_exits_non_zero(drill_mesh):
    proc = drill_mesh.tron("drill", "kill", "nobody")
    assert proc.returncode == 2 and "no service named 'nobody'" in proc.stderr
    proc = drill_mesh.tron("drill", "runaway", "llm-sim")
    assert proc.returncode != 0
    drill_mesh.tron("stop", "programmer-2")
    proc = drill_mesh.tron("drill", "kill", "programmer-2")
    assert proc.returncode == 2 and "programmer-2 is stopped: a drill needs it running" in proc.stderr


def test_chaos_drill_keeps_every_invariant(drill_mesh):
    code, result = drill(drill_mesh, "chaos", "--faults", "32", "--duration", "20", "--seed", "3")
    summary = result["summary"]
    assert summary["faults_injected"] >= 30, summary
    failed = [c for c in result["checks"] if not c["ok"]]
    assert code == 0 and not failed, failed
    assert summary["detected"] >= summary["by_kind"]["kill"] + summary["by_kind"]["hang"]
    # Held against the world, not the drill's own output. Every service answers /health on
    # its own port, from the pid and incarnation the registry has for it.
    services = drill_mesh.status()["services"]
    assert {s["state"] for s in services} == {"running"}, services
    for s in services:
        health = wait_for(lambda n=s["name"]: drill_mesh.health(n), 15, f"{s['name']} to answer /health")
        assert (health["pid"], health["incarnation"]) == (s["pid"], s["incarnation"]), (s, health)
    # /proc: every live process of the home belongs to a current service's tree, the daemon,
    # its fork server or its log pump; no orphan of a killed incarnation, no duplicate.
    daemon = json.loads((drill_mesh.home / "run" / "daemon.json").read_text())["pid"]

    def strays() -> list[psutil.Process]:
        status = drill_mesh.status()
        owned = {daemon, (status.get("fork_server") or {}).get("pid"), (status.get("logs") or {}).get("pid")}
        owned |= set((status.get("ownership") or {}).get("gates") or ())  # next incarnations' gates and standbys
        for s in services:
            owned |= {s["pid"]} | {c.pid for c in psutil.Process(s["pid"]).children(recursive=True)}
        return [p for p in drill_mesh.processes() if p.pid not in owned and p.status() != psutil.STATUS_ZOMBIE]

    # A standby being made as the drill ends (forked, not yet registered) is no stray: polled
    # for a moment, while a real orphan or duplicate stays and fails it.
    deadline = time.monotonic() + 10
    while (left := strays()) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert left == [], [(p.pid, p.cmdline()) for p in left]
    # Every process the drill hit (its timeline says which pid and incarnation, as its input)
    # is gone from /proc, its session is closed, and the registry has an alert for that
    # incarnation, or ended it as replaced by another decision already under way (a provider
    # switch of its subtree: the kill of a process on its way out is no failure). Two faults
    # on one incarnation make one alert (one per incarnation), so incarnations are compared.
    hit = {m.group(2): int(m.group(1)) for e in result["timeline"]
           if e["event"] in ("fault kill", "fault hang", "fault runaway")
           for m in [re.search(r"pid (\d+) incarnation (\S+)", e["detail"])]}
    assert len(hit) >= 10, result["timeline"]
    alive = [pid for pid in hit.values() if psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE]
    assert alive == [], alive
    sessions = {r["incarnation"]: r for r in drill_mesh.rows(
        f"SELECT incarnation, pid, status, end_reason FROM sessions WHERE incarnation IN ({','.join('?' * len(hit))})",
        tuple(hit))}
    alerted = {r["incarnation"] for r in drill_mesh.rows("SELECT incarnation FROM alerts WHERE drill LIKE 'chaos%'")}
    assert set(sessions) == set(hit) and all(r["status"] == "ended" and r["pid"] == hit[i]
                                             for i, r in sessions.items()), sessions
    unnoticed = {i: r["end_reason"] for i, r in sessions.items()
                 if i not in alerted and not (r["end_reason"] or "").startswith("replaced:")}
    assert unnoticed == {}, unnoticed
    assert len(set(hit) & alerted) >= len(hit) // 2, (hit, alerted)  # most faults are failures of their own


def test_logs_follow_a_service_through_two_restarts(drill_mesh):
    proc = subprocess.Popen([*TRON, "--config", str(drill_mesh.config), "logs", "-f", "-n", "1", "programmer-1"],
                            env=drill_mesh.env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(proc.stdout.readline, "")), daemon=True)
    reader.start()
    try:
        wait_for(lambda: lines, 15, "the tail to start")  # it printed the last line: it is following now
        incarnations = []
        for _ in range(2):
            old = drill_mesh.kill("programmer-1")
            incarnations.append(drill_mesh.wait_replaced("programmer-1", old)["incarnation"])
        wait_for(lambda: all(any(i in line for line in list(lines)) for i in incarnations), 15,
                 "both new incarnations in the followed log")
        assert all(line.startswith("  programmer-1 |") or "programmer-1 |" in line for line in lines)
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        reader.join(timeout=5)


def test_metrics_are_served_in_prometheus_format_and_count_what_happened(drill_mesh):
    """A kill, then a hang drill (its own checks: it passes, its row is the hang's), then
    /metrics counts both."""
    from prometheus_client.parser import text_string_to_metric_families

    old = drill_mesh.kill("programmer-1")
    drill_mesh.wait_replaced("programmer-1", old)
    code, result = drill(drill_mesh, "hang", "director-code")
    assert code == 0, result
    [row] = drill_mesh.history("director-code")
    assert row["reason"] == "heartbeat_timeout" and row["drill"]
    code, text = drill_mesh.http("GET", drill_mesh.url("daemon") + "/metrics", token=False)
    assert code == 200
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for fam in text_string_to_metric_families(text) for s in fam.samples}
    assert samples[("tron_beats_received_total", ())] > 10
    assert samples[("tron_alerts_total", (("reason", "process_exit"),))] == 1
    assert samples[("tron_alerts_total", (("reason", "heartbeat_timeout"),))] == 1
    assert samples[("tron_restarts_total", (("kind", "child_restart"),))] == 2
    # both idle failures: carried at once by the daemon on the parent's view, the parent told after
    assert samples[("tron_restarts_at_once_total", ())] == 2
    assert samples[("tron_restarts_answered_total", ())] == 0
    assert samples[("tron_detection_latency_seconds_count", (("reason", "heartbeat_timeout"),))] == 1
    assert samples[("tron_recovery_latency_seconds_count", ())] == 2
    assert samples[("tron_services_running", ())] == 8
