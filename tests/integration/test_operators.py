"""Issue 12 on a real mesh: the lane breaker, checkpoints that survive kills, recovery
actions with their refusals and their audit trail."""

from __future__ import annotations

import json
import signal
import sqlite3

import pytest

from tests.harness import wait_for

pytestmark = pytest.mark.integration


def fault(mesh, provider: str, kind: str, **kw) -> None:
    code, body = mesh.http("PUT", mesh.url("llm-sim") + f"/sim/faults/{provider}", {"kind": kind, **kw})
    assert code == 200, body


def submit(mesh, prompt="build it") -> tuple[int, dict]:
    return mesh.http("POST", mesh.url("gateway") + "/runs", {"prompt": prompt})


def ended(mesh, run_id, timeout=120) -> dict:
    return wait_for(lambda: (r := mesh.http("GET", mesh.url("daemon") + f"/runs/{run_id}")[1])
                    and r["status"] != "running" and r, timeout, f"run {run_id} to end")


def test_the_same_failure_three_times_pauses_the_lane_and_the_next_run_fails_fast(mesh_factory):
    mesh = mesh_factory(policy={"max_provider_switches": 2})  # an even number: every run ends on the same provider
    mesh.up()
    fault(mesh, "anthropic", "auth")
    fault(mesh, "ollama", "auth")
    for n in range(3):
        code, body = submit(mesh, f"run {n}")
        assert code == 202
        run = ended(mesh, body["run_id"])
        assert run["status"] == "failed" and run["failure"]["reason"] == "max_provider_switches_exceeded", run
    lanes = {lane["lane"]: lane for lane in mesh.http("GET", mesh.url("daemon") + "/lanes")[1]}
    assert lanes["architect"]["state"] == "paused", lanes
    assert "3 tasks failed for good the same way" in lanes["architect"]["reason"]
    assert "architect" in mesh.tron("lane", "list").stdout and "paused" in mesh.tron("lane", "list").stdout
    # an alert records it, open (on the orange bar) until the lane is resumed; it restarts nothing
    [alert] = mesh.rows("SELECT * FROM alerts WHERE reason = 'lane_paused'")
    assert alert["agent"] == "lane:architect" and alert["status"] == "delivered", alert
    assert json.loads(alert["detail"])["lane"] == "architect"
    # the fourth run fails at once, with the lane's reason, and burns no ladder
    rows_before = len(mesh.history())
    code, body = submit(mesh, "run 3")
    run = ended(mesh, body["run_id"], timeout=30)
    assert run["status"] == "failed" and run["failure"]["reason"] == "lane_paused", run["failure"]
    assert len(mesh.history()) == rows_before
    proc = mesh.tron("lane", "resume", "architect", "--reason", "keys fixed")
    assert proc.returncode == 0 and "open" in proc.stdout, proc.stderr
    handled = mesh.rows("SELECT status, decision FROM alerts WHERE reason = 'lane_paused'")
    assert handled == [{"status": "handled", "decision": "lane resumed by " + json.loads(
        mesh.tron("audit", "--json").stdout)[0]["payload"]["who"]}], handled
    mesh.http("DELETE", mesh.url("llm-sim") + "/sim/faults")
    proc = mesh.tron("run", "works again", "--json")
    assert proc.returncode == 0, proc.stderr
    audit = mesh.tron("audit", "--json")
    assert [a["payload"]["what"] for a in json.loads(audit.stdout)] == ["lane_resume"]


def served(mesh) -> int:
    """LLM calls llm-sim answered for the mesh's default provider: its own counter."""
    code, body = mesh.http("GET", mesh.url("llm-sim") + "/sim/faults", token=False)
    assert code == 200, body
    return body["providers"][mesh.spec["providers"]["default"]]["counters"]["served"]


def test_a_killed_programmer_resumes_after_its_last_step_with_its_output(mesh):
    """Held against the world, not the drill's counters: llm-sim's own count of the calls
    it served, and the registry's checkpoints of the task that was killed."""
    before = served(mesh)
    assert mesh.tron("run", "one uninterrupted run").returncode == 0
    uninterrupted = served(mesh) - before
    before = served(mesh)
    proc = mesh.tron("drill", "resume", "programmer-1", "--json")
    result = json.loads(proc.stdout)
    assert proc.returncode == 0, result
    # the drill made its own uninterrupted run and one killed part-way: no completed step
    # was asked of the LLM again (one call cut short by the kill is made again)
    assert served(mesh) - before <= 2 * uninterrupted + 1, (served(mesh) - before, uninterrupted)
    [task] = mesh.rows("SELECT DISTINCT t.task_id, t.status FROM tasks t JOIN runs r ON r.run_id = t.run_id "
                       "JOIN events e ON e.task_id = t.task_id AND e.kind = 'task_resumed' "
                       "WHERE t.agent = 'programmer-1' AND r.prompt = 'drill: resume'")
    assert task["status"] == "done"
    marks = mesh.rows("SELECT step, incarnation, output FROM checkpoints WHERE task_id = ? ORDER BY step",
                      (task["task_id"],))
    assert [m["step"] for m in marks] == [1, 2] and all(m["output"] for m in marks)  # each step once
    killed = marks[0]["incarnation"]
    assert marks[1]["incarnation"] != killed  # the draft kept from the killed one, the review by the next
    [session] = mesh.rows("SELECT exit_signal FROM sessions WHERE incarnation = ?", (killed,))
    assert session["exit_signal"] == signal.SIGKILL
    resumed = [json.loads(e["payload"]) for e in mesh.rows(
        "SELECT payload FROM events WHERE task_id = ? AND kind = 'task_resumed'", (task["task_id"],))]
    assert resumed and resumed[-1]["checkpoint"] == 1


def test_recovery_actions_through_the_api_and_the_cli(mesh):
    # after=1: the run's first call, the architect's plan, goes through at once
    fault(mesh, "anthropic", "latency", latency_ms=3000, after=1)
    code, body = submit(mesh, "slow work")
    assert code == 202
    root_task = body["task_id"]
    wait_for(lambda: mesh.service("programmer-1")["task"], 30, "work to reach the programmers")
    # cancel the run's root task: everything below it ends too, and the run is cancelled
    proc = mesh.tron("task", "cancel", root_task, "--reason", "wrong prompt")
    assert proc.returncode == 0, proc.stderr
    answer = json.loads(proc.stdout)
    assert answer["status"] == "cancelled" and len(answer["tasks"]) == 6
    assert ended(mesh, body["run_id"], timeout=20)["status"] == "cancelled"
    again = mesh.tron("task", "cancel", root_task)
    assert json.loads(again.stdout)["status"] == "already_cancelled"
    mesh.http("DELETE", mesh.url("llm-sim") + "/sim/faults")
    # retry it: the run opens again and completes
    proc = mesh.tron("task", "retry", root_task)
    assert proc.returncode == 0 and json.loads(proc.stdout)["status"] == "reopened", proc.stderr
    assert ended(mesh, body["run_id"], timeout=60)["status"] == "done"
    # refusals name the problem and change nothing
    bad = mesh.tron("task", "retry", "nope-1")
    assert bad.returncode == 2 and "no task 'nope-1'" in bad.stderr
    done = mesh.tron("task", "retry", root_task)
    assert done.returncode == 2 and "is done: nothing to retry" in done.stderr
    code, answer = mesh.http("POST", mesh.url("daemon") + f"/tasks/{root_task}/resume", {"reason": "x"})
    assert code == 422 and "from_step" in answer["error"]
    code, _ = mesh.http("POST", mesh.url("daemon") + f"/tasks/{root_task}/cancel", {"reason": "x"}, token=False)
    assert code == 401
    # the same request twice acts once
    req = {"reason": "twice", "request_id": "req-same-1"}
    first = mesh.http("POST", mesh.url("daemon") + "/services/programmer-2/pause", req)
    second = mesh.http("POST", mesh.url("daemon") + "/services/programmer-2/pause", req)
    assert first[1]["status"] == "paused" and second[1] == {**first[1], "repeated": True}
    assert mesh.tron("resume", "programmer-2").returncode == 0
    step_task = mesh.rows("SELECT task_id FROM tasks WHERE agent = 'programmer-1' AND run_id = ?",
                          (body["run_id"],))[0]["task_id"]
    show = mesh.tron("task", "show", step_task)
    assert show.returncode == 0 and "checkpoints" in show.stdout and "decisions" in show.stdout
    assert mesh.tron("report").returncode == 0


def test_a_tampered_checkpoint_is_refused_by_hard_reset(mesh):
    proc = mesh.tron("run", "make two steps", "--json")
    assert proc.returncode == 0, proc.stderr
    run_id = json.loads(proc.stdout)["run_id"]
    task_id = mesh.rows("SELECT task_id FROM tasks WHERE agent = 'programmer-2' AND run_id = ?", (run_id,))[0]["task_id"]
    with sqlite3.connect(mesh.home / "registry" / "registry.db") as conn:  # someone edits the registry by hand
        conn.execute("UPDATE checkpoints SET output = 'not what was written' WHERE task_id = ? AND step = 1",
                     (task_id,))
    proc = mesh.tron("task", "hard-reset", task_id)
    assert proc.returncode == 2 and "checkpoint 1 (draft) does not match its hash" in proc.stderr, proc.stderr
    audit = json.loads(mesh.tron("audit", "--json").stdout)
    assert audit[-1]["payload"]["what"] == "task_hard_reset" and audit[-1]["payload"]["outcome"].startswith("refused")


def test_hard_reset_replays_the_verified_steps_and_resume_from_step_redoes_the_rest(mesh):
    """The happy paths through the real API and the CLI: each programmer is caught between its two
    steps; a hard reset hands the new incarnation step 1 (verified) and only step 2 is
    run again; a resume from step 1 sets step 1 aside and both steps are run again."""
    # Each call takes 6 s: long enough that neither programmer finishes step 2 while the API
    # call and the CLI (over a second to start on a loaded machine) act on them.
    # after=1: the run's first call, the architect's plan, goes through at once
    fault(mesh, "anthropic", "latency", latency_ms=6000, after=1)
    code, body = submit(mesh, "two slow steps")
    assert code == 202, body
    run_id = body["run_id"]

    def first_steps() -> dict | None:
        rows = mesh.rows("SELECT t.agent, t.task_id, c.incarnation FROM tasks t JOIN checkpoints c "
                         "ON c.task_id = t.task_id AND c.step = 1 WHERE t.run_id = ? AND t.agent LIKE 'programmer-%'",
                         (run_id,))
        return {r["agent"]: r for r in rows} if len(rows) == 2 else None

    first = wait_for(first_steps, 60, "both programmers to record step 1")
    olds = {name: mesh.service(name)["incarnation"] for name in first}
    reset_task, resumed_task = first["programmer-1"]["task_id"], first["programmer-2"]["task_id"]
    code, reset = mesh.http("POST", mesh.url("daemon") + f"/tasks/{reset_task}/hard-reset", {"reason": "drill"})
    assert code == 202 and reset["status"] == "retrying" and reset["replayed"] == [1], reset
    # the same verb from the CLI (README, Tasks: `tron task resume ID --from-step N`)
    proc = mesh.tron("task", "resume", resumed_task, "--from-step", "1", "--reason", "drill")
    assert proc.returncode == 0, proc.stderr
    resumed = json.loads(proc.stdout)
    assert resumed["kept"] == [] and resumed["set_aside"] == [1], resumed
    mesh.http("DELETE", mesh.url("llm-sim") + "/sim/faults")
    assert ended(mesh, run_id, timeout=60)["status"] == "done"

    def marks(task_id: str) -> dict[int, str]:
        return {m["step"]: m["incarnation"] for m in mesh.rows(
            "SELECT step, incarnation FROM checkpoints WHERE task_id = ?", (task_id,))}

    # hard reset: step 1 kept from the incarnation that did it, step 2 by its successor
    reset_marks = marks(reset_task)
    assert reset_marks[1] == first["programmer-1"]["incarnation"] == olds["programmer-1"]
    assert reset_marks[2] not in (None, olds["programmer-1"])
    handed = [json.loads(e["payload"]) for e in mesh.rows(
        "SELECT payload FROM events WHERE kind = 'task_resumed' AND task_id = ?", (reset_task,))]
    assert [h.get("replayed") for h in handed] == [[1]], handed
    # resume from step 1: both steps done again by the new incarnation; what was set aside is on record
    resumed_marks = marks(resumed_task)
    assert olds["programmer-2"] not in resumed_marks.values() and set(resumed_marks) == {1, 2}, resumed_marks
    [aside] = mesh.rows("SELECT payload FROM events WHERE kind = 'checkpoints_set_aside' AND task_id = ?",
                        (resumed_task,))
    assert [s["step"] for s in json.loads(aside["payload"])["steps"]] == [1]
    audit = [a["payload"] for a in json.loads(mesh.tron("audit", "--json").stdout)]
    assert [(a["what"], a["target"]) for a in audit] == [("task_hard_reset", reset_task),
                                                         ("task_resume", resumed_task)], audit
    assert all(a["outcome"] == "retrying" for a in audit), audit


def _at_once(n: int, call) -> list:
    """``n`` calls started together (a barrier), their answers in order."""
    import threading

    barrier = threading.Barrier(n)
    answers: list = [None] * n

    def one(i: int) -> None:
        barrier.wait()
        answers[i] = call(i)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return answers


def test_ten_concurrent_restarts_and_retries_admit_one_each(mesh):
    """Issue 20: an operator verb is admitted under its guard in one step. Ten restarts with
    different request ids at once: each 202 is one real restart and one row; the others are 409
    naming the one under way."""
    before = mesh.service("programmer-1")
    known = {r["incarnation"] for r in mesh.rows("SELECT incarnation FROM sessions WHERE agent = 'programmer-1'")}
    url = mesh.url("daemon") + "/services/programmer-1/restart"
    answers = _at_once(10, lambda i: mesh.http("POST", url, {"reason": f"race {i}", "request_id": f"race-r-{i}"}))
    # Every request that arrives while a restart is under way is refused. On a loaded machine a
    # late thread can arrive after the first restart ended and be admitted on its own, so the
    # proof is that each 202 is one real restart (one new incarnation, one row), never several
    # 202s for one restart (the bug: 3 to 5 answers and rows, one restart).
    admitted = sum(code == 202 for code, _ in answers)
    assert admitted >= 1 and all(code in (202, 409) for code, _ in answers), answers
    assert all("already" in body["error"] for code, body in answers if code == 409), answers
    mesh.wait_replaced("programmer-1", before["pid"])
    wait_for(lambda: len([r for r in mesh.rows("SELECT incarnation FROM sessions WHERE agent = 'programmer-1'")
                          if r["incarnation"] not in known]) >= admitted
             and mesh.service("programmer-1")["state"] == "running", 30, f"{admitted} new incarnations")
    new = [r for r in mesh.rows("SELECT incarnation FROM sessions WHERE agent = 'programmer-1'")
           if r["incarnation"] not in known]
    assert len(new) == admitted, (new, answers)
    rows = mesh.rows("SELECT * FROM retry_history WHERE agent_id = 'programmer-1' AND retry_type = 'operator_restart'")
    assert len(rows) == admitted, rows
    # a live task retried ten times at once: one new attempt
    # after=1: the run's first call, the architect's plan, goes through at once
    fault(mesh, "anthropic", "latency", latency_ms=3000, after=1)
    try:
        code, body = submit(mesh)
        assert code == 202
        busy = wait_for(lambda: (s := mesh.service("programmer-2"))["task"] and s, 30, "programmer-2 busy")
        task_url = mesh.url("daemon") + f"/tasks/{busy['task']}/retry"
        answers = _at_once(10, lambda i: mesh.http("POST", task_url, {"reason": f"race {i}",
                                                                       "request_id": f"race-t-{i}"}))
        admitted = sum(code == 202 for code, _ in answers)
        assert admitted >= 1 and all(code in (202, 409) for code, _ in answers), answers
        mesh.wait_replaced("programmer-2", busy["pid"])
        retried = mesh.rows("SELECT * FROM retry_history WHERE task_id = ? AND retry_type = 'operator_restart'",
                            (busy["task"],))
        assert len(retried) == admitted, (retried, answers)
    finally:
        mesh.http("DELETE", mesh.url("llm-sim") + "/sim/faults")
    assert ended(mesh, body["run_id"])["status"] == "done"


def test_concurrent_stops_and_starts_act_once(mesh):
    base = mesh.url("daemon") + "/services/programmer-2"
    stops = _at_once(5, lambda i: mesh.http("POST", base + "/stop", {"reason": f"s{i}", "request_id": f"race-s-{i}"}))
    # one stop acts; the rest either find it under way (409) or, arriving after it ended, already done
    acted = [body for code, body in stops if code == 200 and body.get("status") == "stopped"]
    assert len(acted) == 1, stops
    assert all(code == 409 or body.get("status") == "already_stopped" for code, body in stops
               if body is not acted[0]), stops
    mesh.wait_state("programmer-2", "stopped")
    starts = _at_once(5, lambda i: mesh.http("POST", base + "/start", {"reason": f"g{i}", "request_id": f"race-g-{i}"}))
    assert sorted(code for code, _ in starts).count(202) == 1, starts
    assert all(code in (202, 409, 200) for code, _ in starts), starts
    mesh.wait_state("programmer-2", "running")
    sessions = mesh.rows("SELECT COUNT(*) AS n FROM sessions WHERE agent = 'programmer-2' AND status != 'ended'")
    assert sessions == [{"n": 1}]  # one incarnation, not five
