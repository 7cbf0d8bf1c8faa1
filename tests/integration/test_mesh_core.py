"""Issue 2: the mesh comes up, TRON notices dead and hung agents, parents restart them,
restarts are bounded and recorded, bad input changes nothing, nothing is left behind."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import psutil
import pytest

from tests.harness import REPO, wait_for

pytestmark = pytest.mark.integration

AGENTS = ["llm-sim", "gateway", "root", "architect", "director-code", "director-docs", "programmer-1",
          "programmer-2"]


def test_whole_mesh_comes_up_healthy(mesh):
    status = mesh.status()
    assert [s["name"] for s in status["services"]] == AGENTS
    for s in status["services"]:
        assert s["state"] == "running", s
        public = mesh.http("GET", mesh.url(s["name"]) + "/health", token=False)[1]
        assert set(public) == {"status", "service", "role", "uptime"}  # what a load balancer needs, no ids
        h = mesh.health(s["name"])  # with a peer token
        assert h["pid"] == s["pid"] and h["incarnation"] == s["incarnation"]
        assert {"status", "role", "pid", "incarnation", "uptime", "task", "provider"} <= set(h)
    sessions = mesh.rows("SELECT agent, status FROM sessions")
    assert sorted(r["agent"] for r in sessions) == sorted(AGENTS)
    assert {r["status"] for r in sessions} == {"running"}
    out = mesh.tron("status").stdout
    assert "programmer-1" in out and "running" in out


def test_sigkill_of_every_service_brings_a_new_pid_and_one_history_row(mesh):
    for name in AGENTS:
        before = mesh.service(name)
        old_pid = mesh.kill(name)
        fresh = mesh.wait_replaced(name, old_pid)
        assert fresh["incarnation"] != before["incarnation"]
        rows = wait_for(lambda: mesh.history(name), 30, f"history row for {name}")
        assert len(rows) == 1, rows
        row = rows[0]
        assert (row["retry_type"], row["reason"], row["retry_count"]) == ("child_restart", "process_exit", 1)
        assert json.loads(row["detail"])["signal"] == signal.SIGKILL
        # An idle failure: its one answer carried at once by the daemon, on the parent's view;
        # the parent is told once the service is back (the alert delivered to it).
        expected_parent = mesh.spec["services"][name].get("parent", "daemon")
        assert (row["requested_by"], row["case_id"], row["decided_by"]) == ("daemon", "idle_failure", "policy")
        if expected_parent != "daemon":
            assert json.loads(row["detail"])["decided_for"] == expected_parent
            [told] = wait_for(lambda: mesh.rows("SELECT status, delivered_to FROM alerts WHERE alert_id = ? AND "
                                                "delivered_to IS NOT NULL", (row["alert_id"],)), 10, f"{name}'s parent told")
            assert (told["status"], told["delivered_to"]) == ("handled", expected_parent)
        old = mesh.rows("SELECT status, end_reason, exit_signal FROM sessions WHERE incarnation = ?",
                        (before["incarnation"],))[0]
        assert old["status"] == "ended" and old["exit_signal"] == signal.SIGKILL
        assert not psutil.pid_exists(old_pid) or psutil.Process(old_pid).status() == psutil.STATUS_ZOMBIE
    # one running session per service, none left open for a dead process
    open_sessions = mesh.rows("SELECT agent, pid FROM sessions WHERE status != 'ended'")
    assert sorted(r["agent"] for r in open_sessions) == sorted(AGENTS)
    assert all(psutil.pid_exists(r["pid"]) for r in open_sessions)
    report = mesh.tron("report", "--json")
    assert report.returncode == 0, report.stdout
    assert json.loads(report.stdout)["healthy"] is True


def test_sigstop_is_detected_after_missed_beats_and_the_process_is_replaced(mesh):
    old_pid = mesh.kill("programmer-2", signal.SIGSTOP)
    stopped_at = time.monotonic()
    mesh.wait_replaced("programmer-2", old_pid)
    took = time.monotonic() - stopped_at
    [row] = mesh.history("programmer-2")
    assert row["reason"] == "heartbeat_timeout" and row["retry_type"] == "child_restart"
    detail = json.loads(row["detail"])
    beat_timeout = mesh.policy["heartbeat_interval"] * mesh.policy["miss_threshold"]
    assert detail["beat_timeout"] == beat_timeout
    # Detected no earlier than the threshold allows (and the stopped process is gone).
    assert detail["silent_for"] >= beat_timeout
    assert took >= beat_timeout - mesh.policy["heartbeat_interval"]
    wait_for(lambda: not psutil.pid_exists(old_pid) or psutil.Process(old_pid).status() == "zombie", 10,
             "the stopped process to be killed")


def test_a_service_killed_past_max_restarts_comes_back_every_time_and_crash_loops_once(mesh):
    """The service lifecycle: never given up while no operator stopped it. The failures
    within the window make it crash-looping, escalated once for the episode."""
    name = "programmer-1"
    limit = mesh.policy["max_restarts"]
    for _ in range(limit + 2):
        old = mesh.kill(name)
        mesh.wait_replaced(name, old)
    assert mesh.service(name)["crash_looping"] is True
    rows = wait_for(lambda: (h := mesh.history(name)) and any(r["hop"] == "architect->root" for r in h) and h,
                    10, "the crash-loop escalation to reach the root")
    assert [r["retry_type"] for r in rows].count("child_restart") == limit + 2
    loops = [r for r in rows if r["retry_type"] == "escalation"]
    assert {r["alert_id"] for r in loops} == {loops[0]["alert_id"]}  # one episode, one escalation
    assert [r["hop"] for r in loops] == ["director-code->architect", "architect->root"]
    assert all(r["reason"] == "crash_looping" for r in loops)
    assert [r["case_id"] for r in rows if r["retry_type"] == "child_restart"] == ["idle_failure"] * (limit + 2)
    status = mesh.tron("status").stdout
    assert "crash-loop" in status


def test_operator_stop_holds_across_failures_and_a_daemon_restart_until_start(mesh):
    old = mesh.service("programmer-2")
    proc = mesh.tron("stop", "programmer-2")
    assert proc.returncode == 0 and "stopped" in proc.stdout, proc.stderr
    assert mesh.service("programmer-2")["state"] == "stopped" and mesh.health("programmer-2") is None
    assert not psutil.pid_exists(old["pid"]) or psutil.Process(old["pid"]).status() == "zombie"
    again = mesh.tron("restart", "programmer-2")
    assert again.returncode == 2 and "is stopped" in again.stderr
    # a daemon restart does not bring it back
    daemon_pid = mesh.status()["daemon"]["pid"]
    mesh.down()
    mesh.up()
    assert mesh.status()["daemon"]["pid"] != daemon_pid
    assert mesh.service("programmer-2")["state"] == "stopped"
    proc = mesh.tron("start", "programmer-2", "--wait")
    assert proc.returncode == 0, proc.stderr
    assert mesh.health("programmer-2")["incarnation"] == mesh.service("programmer-2")["incarnation"]
    before = mesh.service("programmer-2")
    proc = mesh.tron("restart", "programmer-2", "--wait", "--reason", "config change")
    assert proc.returncode == 0, proc.stderr
    after = mesh.service("programmer-2")
    assert after["incarnation"] != before["incarnation"] and after["state"] == "running"
    audit = [json.loads(r["payload"]) for r in mesh.rows("SELECT payload FROM events WHERE kind = 'audit' ORDER BY id")]
    assert [(a["what"], a["outcome"]) for a in audit] == [
        ("stop", "stopped"), ("restart", "refused: programmer-2 is stopped; `tron start programmer-2` brings it back"),
        ("start", "starting"), ("restart", "restarting")]
    assert audit[-1]["reason"] == "config change" and audit[-1]["who"] == "token:operator"  # not the body's name
    [op] = [r for r in mesh.history("programmer-2") if r["retry_type"] == "operator_restart"]
    assert op["decided_by"] == "operator"


def test_run_completes_end_to_end_through_llm_sim(mesh):
    proc = mesh.tron("run", "write a haiku about supervisors", "--json")
    assert proc.returncode == 0, proc.stderr
    run = json.loads(proc.stdout)
    assert run["status"] == "done"
    assert "[sim:anthropic:" in run["result"] and "programmer-1" in run["result"] and "programmer-2" in run["result"]
    tasks = mesh.rows("SELECT agent, status, kind FROM tasks WHERE run_id = ?", (run["run_id"],))
    assert sorted(t["agent"] for t in tasks) == sorted(["root", "architect", "director-code", "director-docs",
                                                        "programmer-1", "programmer-2"])
    assert {t["status"] for t in tasks} == {"done"}
    # the real SDKs reached the simulator: both streamed and plain requests were served
    status, faults = mesh.http("GET", mesh.url("llm-sim") + "/sim/faults", token=False)
    assert faults["providers"]["anthropic"]["counters"]["served"] >= 5


def test_a_task_in_flight_survives_the_death_of_its_programmer(mesh):
    # Slow the provider so the programmer is mid-task when it dies.
    # after=1: the run's first call, the architect's plan, goes through at once
    code, _ = mesh.http("PUT", mesh.url("llm-sim") + "/sim/faults/anthropic",
                        {"kind": "latency", "latency_ms": 1500, "after": 1})
    assert code == 200
    code, body = mesh.http("POST", mesh.url("gateway") + "/runs", {"prompt": "resume me"})
    assert code == 202
    run_id = body["run_id"]
    busy = wait_for(lambda: (s := mesh.service("programmer-1"))["task"] and s, 30, "programmer-1 to take its task")
    mesh.http("DELETE", mesh.url("llm-sim") + "/sim/faults/anthropic")
    mesh.kill("programmer-1")
    run = wait_for(lambda: (r := mesh.http("GET", mesh.url("gateway") + f"/runs/{run_id}")[1])
                   and r["status"] != "running" and r, 60, "the run to finish")
    assert run["status"] == "done", run
    [task] = mesh.rows("SELECT * FROM tasks WHERE task_id = ?", (busy["task"],))
    assert task["attempt"] == 2 and task["status"] == "done"
    resumed = mesh.rows("SELECT payload FROM events WHERE kind = 'task_resumed' AND task_id = ?", (busy["task"],))
    assert len(resumed) == 1
    payload = json.loads(resumed[0]["payload"])
    assert payload["progress"].startswith("step:")
    # the checkpoint carried the completed step's output: the review got the draft
    marks = mesh.rows("SELECT step, step_id, output FROM checkpoints WHERE task_id = ? ORDER BY step", (busy["task"],))
    assert [m["step_id"] for m in marks] == ["draft", "review"] and marks[0]["output"]


def test_second_daemon_on_the_same_home_is_refused(mesh):
    proc = subprocess.run([sys.executable, "-m", "tron.services.daemon", "--config", str(mesh.config),
                           "--home", str(mesh.home)], env=mesh.env, cwd=REPO, capture_output=True, text=True,
                          timeout=30)
    assert proc.returncode == 2
    assert "another tron daemon" in proc.stderr
    again = mesh.tron("up", "--detach")
    assert again.returncode != 0 and "already up" in again.stderr
    assert all(s["state"] == "running" for s in mesh.status()["services"])


def test_bad_beats_and_missing_tokens_get_4xx_and_change_nothing(mesh):
    daemon = mesh.url("daemon")
    p1 = mesh.service("programmer-1")
    good = {"service": "programmer-1", "incarnation": p1["incarnation"], "pid": p1["pid"], "seq": 10**9}
    cases = [
        ("POST", daemon + "/beat", good, False, None, 401),
        ("POST", daemon + "/beat", {**good, "service": "nobody"}, True, None, 404),
        ("POST", daemon + "/beat", {**good, "incarnation": "i-stale"}, True, None, 409),
        ("POST", daemon + "/beat", None, True, b"{not json", 400),
        ("POST", daemon + "/beat", {"service": "programmer-1"}, True, None, 422),
        ("POST", daemon + "/beat", {**good, "extra": 1}, True, None, 422),
        ("POST", daemon + "/beat", None, True, b"{" + b" " * (300 * 1024) + b"}", 413),
        ("POST", daemon + "/control/restart", {"service": "programmer-1", "replaces": p1["incarnation"],
                                               "alert_id": "a-x", "reason": "manual", "case": "idle_failure",
                                               "requested_by": "me"}, False, None, 401),
        ("POST", daemon + "/control/restart", {"service": "programmer-1", "replaces": p1["incarnation"],
                                               "alert_id": "a-x", "reason": "manual", "case": "idle_failure",
                                               "requested_by": "me"}, "wrong-token", None, 401),
        ("POST", daemon + "/control/restart", {"service": "ghost", "replaces": "i-1", "alert_id": "a-y",
                                               "reason": "manual", "case": "idle_failure", "requested_by": "me"},
         True, None, 404),
        ("POST", daemon + "/services/programmer-1/stop", {"reason": "x"}, False, None, 401),
        ("POST", daemon + "/services/ghost/stop", {"reason": "x"}, True, None, 404),
        ("POST", daemon + "/services/programmer-1/stop", {"reason": "x", "bogus": 1}, True, None, 422),
        ("GET", daemon + "/events?since=99999999999999999999999", None, True, None, 400),
        ("GET", daemon + "/events?limit=-1", None, True, None, 400),
        ("GET", daemon + "/runs/..%2Fstatus", None, True, None, 400),
        ("POST", mesh.url("director-code") + "/handle_child_timeout", {}, False, None, 401),
        ("POST", mesh.url("root") + "/handle_grandchild_failure", {}, False, None, 401),
        ("POST", mesh.url("gateway") + "/notify_run_failed", {"run_id": "r", "reason": "x"}, False, None, 401),
        ("POST", mesh.url("gateway") + "/runs", {"prompt": "x"}, False, None, 401),
        ("POST", mesh.url("gateway") + "/runs", {"prompt": ""}, True, None, 422),
        ("POST", mesh.url("architect") + "/handle_child_timeout",
         {"alert_id": "a-1", "service": "gateway", "incarnation": "i-1", "reason": "process_exit"}, True, None, 422),
    ]
    for method, url, body, token, raw, expected in cases:
        code, answer = mesh.http(method, url, body, token=token, raw=raw)
        assert code == expected, (url, body, code, answer)
        assert isinstance(answer, dict) and answer.get("error"), (url, answer)
    # nothing changed: same incarnation, no history, no runs
    assert mesh.service("programmer-1")["incarnation"] == p1["incarnation"]
    assert mesh.history() == []
    assert mesh.rows("SELECT * FROM runs") == []


def test_duplicate_restart_requests_restart_once(mesh):
    p1 = mesh.service("programmer-1")
    req = {"service": "programmer-1", "replaces": p1["incarnation"], "alert_id": "a-manual-1",
           "reason": "operator_request", "case": "idle_failure", "requested_by": "director-code"}
    answers = [mesh.http("POST", mesh.url("daemon") + "/control/restart", req) for _ in range(3)]
    other = mesh.http("POST", mesh.url("daemon") + "/control/restart", {**req, "alert_id": "a-manual-2"})
    assert [a[0] for a in answers] == [202, 200, 200]
    assert other[0] == 409 and other[1]["status"] == "stale"
    mesh.wait_replaced("programmer-1", p1["pid"])
    assert len(mesh.history("programmer-1")) == 1


def test_tron_down_leaves_nothing_behind(mesh):
    pids = [s["pid"] for s in mesh.status()["services"]] + [json.loads((mesh.home / "run" / "daemon.json")
                                                                       .read_text())["pid"]]
    proc = mesh.down()
    assert proc.returncode == 0 and "Nothing left running" in proc.stdout
    assert mesh.processes() == []
    assert not any(psutil.pid_exists(p) and psutil.Process(p).status() != "zombie" for p in pids)
    assert mesh.rows("SELECT * FROM sessions WHERE status != 'ended'") == []
    assert "nothing was running" in mesh.down().stdout


def test_a_task_for_a_child_that_is_down_is_not_posted_by_its_parent_but_handed_over_once_when_it_is_up(mesh_factory):
    """POST /tasks says ``dispatch`` false while the child is down or coming up: the daemon hands
    the task to the incarnation that comes up. A parent's post, queued on the held socket, was a
    second copy of the task with the attempt before the restart's: one started, then was
    cancelled by the other (an LLM call paid for nothing)."""
    mesh = mesh_factory(policy={"backoff_initial": 4.0, "backoff_max": 4.0, "backoff_jitter": 0.0})
    mesh.up()
    daemon = mesh.url("daemon")
    first = mesh.service("programmer-2")["incarnation"]
    mesh.kill("programmer-2")  # the first restart is at once; the second waits out the backoff
    wait_for(lambda: (s := mesh.service("programmer-2"))["state"] == "running" and s["incarnation"] != first, 20,
             "programmer-2 back after its first kill")
    mesh.kill("programmer-2")
    wait_for(lambda: mesh.service("programmer-2")["state"] == "backoff", 10, "programmer-2 waiting out its backoff")
    code, run = mesh.http("POST", daemon + "/runs", {"prompt": "while it is down"})
    assert code == 201, run
    task = {"task_id": f"{run['run_id']}.0", "run_id": run["run_id"], "agent": "programmer-2",
            "parent_agent": "operator", "kind": "step", "prompt": "while it is down"}
    code, answer = mesh.http("POST", daemon + "/tasks", task)
    assert code == 201 and answer["dispatch"] is False and mesh.service("programmer-2")["state"] == "backoff", answer
    row = wait_for(lambda: (r := mesh.http("GET", daemon + f"/tasks/{task['task_id']}")[1])["status"] == "done" and r,
                   30, "the task handed over when programmer-2 came up to be done")
    assert row["agent"] == "programmer-2"
    received = [json.loads(line) for line in (mesh.home / "logs" / "comms.jsonl").read_text().splitlines()
                if task["task_id"] in line]
    assert [m["kind"] for m in received].count("task_received") == 1, received
    code, answer = mesh.http("POST", daemon + "/tasks", {**task, "task_id": f"{run['run_id']}.1"})
    assert code == 201 and answer["dispatch"] is True, answer
