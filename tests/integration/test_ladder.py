"""Issue 3: provider failures climb the ladder — restarts, escalation hop by hop,
provider switch at the root, permanent failure — within the bound, on record."""

from __future__ import annotations

import json

import pytest

from tron.common.config import Policy
from tron.common.ladder import worst_case_attempts
from tests.harness import REPO, wait_for
from tests.integration.test_providers import pids

pytestmark = pytest.mark.integration

# The architect plans on Ollama so that faults injected into Anthropic hit only the
# programmers' calls.
import tomllib  # noqa: E402

_DEFAULT = tomllib.loads((REPO / "mesh.toml").read_text())["services"]
SERVICES = {**_DEFAULT, "architect": {**_DEFAULT["architect"], "provider": "ollama"}}


def fault(mesh, provider: str, kind: str, **kw) -> None:
    code, body = mesh.http("PUT", mesh.url("llm-sim") + f"/sim/faults/{provider}", {"kind": kind, **kw})
    assert code == 200, body


def submit(mesh, prompt: str = "build it") -> str:
    code, body = mesh.http("POST", mesh.url("gateway") + "/runs", {"prompt": prompt})
    assert code == 202, body
    return body["run_id"]


def finished(mesh, run_id: str, timeout: float = 120) -> dict:
    return wait_for(lambda: (r := mesh.http("GET", mesh.url("gateway") + f"/runs/{run_id}")[1])
                    and r["status"] != "running" and r, timeout, f"run {run_id} to finish")


def task_rows(mesh, task_id: str) -> list[dict]:
    return mesh.rows("SELECT * FROM retry_history WHERE task_id = ? ORDER BY id", (task_id,))


def programmer_task(mesh, run_id: str, programmer: str) -> str:
    return mesh.rows("SELECT task_id FROM tasks WHERE run_id = ? AND agent = ?", (run_id, programmer))[0]["task_id"]


@pytest.fixture
def ladder_mesh(mesh_factory):
    m = mesh_factory(services=SERVICES)
    m.up()
    return m


def test_anthropic_overloaded_is_retried_in_place_then_switched_and_nobody_is_killed(ladder_mesh):
    mesh = ladder_mesh
    before = pids(mesh)
    fault(mesh, "anthropic", "overloaded")
    run_id = submit(mesh)
    run = finished(mesh, run_id)
    assert run["status"] == "done", run
    assert "[sim:ollama:" in run["result"]
    p = mesh.policy["max_restarts"]
    for programmer in ("programmer-1", "programmer-2"):
        rows = task_rows(mesh, programmer_task(mesh, run_id, programmer))
        kinds = [r["retry_type"] for r in rows]
        # level 1 in place (until anthropic opened, mesh-wide), then one switch in place
        assert kinds[-1] == "llm_change" and set(kinds[:-1]) <= {"provider_retry"} and len(kinds) <= p + 1, kinds
        assert all(r["reason"] == "overloaded_error" for r in rows[:-1])
        switch = rows[-1]
        assert (switch["from_provider"], switch["to_provider"]) == ("anthropic", "ollama")
        assert switch["case_id"] in ("provider_open", "provider_retries_exhausted"), switch
        assert json.loads(switch["detail"])["in_place"] is True
    assert pids(mesh) == before  # no process was killed for the provider's outage
    assert mesh.service("programmer-1")["provider"] == "ollama"
    proc = mesh.tron("history", "--json")
    hist = json.loads(proc.stdout)
    assert all(r["reason"] not in ("", "Unknown error") for r in hist["retry_history"])
    assert not [r for r in hist["retry_history"] if r["retry_type"] in ("child_restart", "escalation")]
    assert any(m["scope"] == "provider" and m["key"] == "anthropic" and m["provider_retries"] >= 1
               and m["restarts"] == 0 for m in hist["failure_metrics"])


def test_both_providers_failing_ends_in_one_permanent_failure_within_the_bound(mesh_factory):
    mesh = mesh_factory(services=SERVICES, providers={"on_all_down": "fail"})
    mesh.up()
    before = pids(mesh)
    fault(mesh, "anthropic", "error")
    fault(mesh, "ollama", "error")
    run_id = submit(mesh)
    run = finished(mesh, run_id, timeout=180)
    assert run["status"] == "failed"
    failure = run["failure"]
    assert failure["reason"].startswith("all_providers_down:"), failure
    assert set(failure["providers_tried"]) == {"anthropic", "ollama"}
    policy = Policy(**{k: v for k, v in mesh.policy.items()})
    # the gateway was told once, and `tron run`-style readers see the structured reason
    def notices() -> list[dict]:
        lines = (mesh.home / "logs" / "comms.jsonl").read_text().splitlines()
        return [n for n in map(json.loads, lines) if n["kind"] == "notify_run_failed" and n["run"] == run_id]

    wait_for(notices, 10, "the root to notify the gateway")
    # every task that failed for itself (not because a child did) did so within the bound
    failed_tasks = mesh.rows("SELECT t.task_id, t.attempt, t.agent FROM tasks t WHERE t.run_id = ? AND "
                             "t.status = 'failed' AND EXISTS (SELECT 1 FROM retry_history r WHERE r.task_id = "
                             "t.task_id AND r.retry_type = 'permanent_failure')", (run_id,))
    assert [t["agent"] for t in failed_tasks] == [failure["agent"]]
    for t in failed_tasks:
        kinds = [r["retry_type"] for r in task_rows(mesh, t["task_id"])]
        assert kinds.count("provider_retry") <= policy.max_restarts
        assert kinds.count("llm_change") <= policy.max_provider_switches
        assert kinds.count("permanent_failure") == 1
        assert "child_restart" not in kinds
        assert 1 + kinds.count("provider_retry") + kinds.count("llm_change") <= worst_case_attempts(policy)
    # the failing agents are left healthy and idle, never restarted
    s = mesh.wait_state(failure["agent"], "running")
    assert s["task"] is None and pids(mesh) == before
    report = mesh.tron("report", "--json")
    assert report.returncode == 0, report.stdout
    mesh.http("DELETE", mesh.url("llm-sim") + "/sim/faults")
    for name in ("anthropic", "ollama"):  # an operator puts them back at once (else: the next probe)
        assert mesh.tron("provider", "restore", name).returncode == 0
    rows_then = len(mesh.history())
    proc = mesh.tron("run", "and now it works", "--json")
    assert proc.returncode == 0, proc.stderr
    assert len(mesh.history()) == rows_then
    # and `tron run` of a failing run exits non-zero with the reason: a bad key on every
    # provider is not an outage (nothing opens), the switches run out
    fault(mesh, "anthropic", "auth")
    fault(mesh, "ollama", "auth")
    proc = mesh.tron("run", "fails again")
    assert proc.returncode == 1 and "FAILED" in proc.stderr and "max_provider_switches_exceeded" in proc.stderr
    assert len(notices()) == 1  # still once, long after the first run failed


def test_authentication_error_is_not_retried_on_the_same_provider(ladder_mesh):
    mesh = ladder_mesh
    fault(mesh, "anthropic", "auth")
    run_id = submit(mesh)
    run = finished(mesh, run_id)
    assert run["status"] == "done", run
    rows = task_rows(mesh, programmer_task(mesh, run_id, "programmer-1"))
    trail = [(r["retry_type"], r["reason"], r["from_provider"], r["to_provider"], r["case_id"]) for r in rows]
    assert trail == [("llm_change", "authentication_error", "anthropic", "ollama", "request_error")], trail
    assert json.loads(rows[0]["detail"])["failure_class"] == "request"
    # a bad key says nothing about the provider's health: it is not opened
    state = {p["provider"]: p for p in mesh.http("GET", mesh.url("daemon") + "/providers")[1]["providers"]}
    assert state["anthropic"]["state"] == "closed", state


def test_error_in_the_middle_of_a_stream_is_classified_and_retried_in_place(ladder_mesh):
    mesh = ladder_mesh
    before = pids(mesh)
    fault(mesh, "anthropic", "midstream", times=1)
    run_id = submit(mesh)
    run = finished(mesh, run_id)
    assert run["status"] == "done", run
    rows = [r for r in mesh.history() if r["run_id"] == run_id]
    assert len(rows) == 1 and rows[0]["retry_type"] == "provider_retry", rows
    detail = json.loads(rows[0]["detail"])
    assert rows[0]["reason"] == "overloaded_error" and detail["midstream"] is True and detail["status"] == 200
    assert pids(mesh) == before


def test_a_runaway_that_beats_without_progress_is_caught_resumed_and_bounded(mesh_factory):
    # max_restarts 2 (3 shipped): each restart of the runaway waits out progress_timeout; the
    # bound is read from the policy below, whatever it is
    mesh = mesh_factory(services=SERVICES, policy={"progress_timeout": 1.5, "max_restarts": 2},
                        providers={"timeout": 60.0})
    mesh.up()
    fault(mesh, "anthropic", "hang")  # the call never returns; the agent keeps beating
    run_id = submit(mesh)
    run = finished(mesh, run_id, timeout=180)
    assert run["status"] == "done", run
    task_id = programmer_task(mesh, run_id, "programmer-1")
    rows = task_rows(mesh, task_id)
    restarts = [r for r in rows if r["retry_type"] == "child_restart"]
    assert len(restarts) == mesh.policy["max_restarts"]
    assert {r["reason"] for r in restarts} == {"no_progress"}
    assert rows[-1]["retry_type"] == "llm_change"
    resumed = mesh.rows("SELECT payload FROM events WHERE kind = 'task_resumed' AND task_id = ?", (task_id,))
    assert len(resumed) == mesh.policy["max_restarts"] + 1
    assert all(json.loads(r["payload"])["progress"] == "step:1/2" for r in resumed)


def test_a_runaway_at_the_top_is_never_switched_into_a_drained_provider(mesh_factory):
    """The same runaway, but the provider the top would switch it to is drained (open): the
    top restarts the subtree on the provider it has, as a switch (bounded like any), and the
    drained one never gets a request."""
    from tests.integration.test_providers import sim_counters

    # One restart in place (level 1, the test before this one's subject) before the task goes up to the top
    mesh = mesh_factory(services=SERVICES, policy={"progress_timeout": 1.5, "max_provider_switches": 2,
                                                   "max_restarts": 1}, providers={"timeout": 60.0})
    mesh.up()
    fault(mesh, "anthropic", "hang")
    run_id = submit(mesh)
    wait_for(lambda: mesh.rows("SELECT task_id FROM tasks WHERE run_id = ? AND agent LIKE 'programmer-%'", (run_id,)),
             60, "the programmers' tasks (the architect has planned, on ollama)")
    proc = mesh.tron("provider", "drain", "ollama", "--reason", "known outage")  # before any top decision
    assert proc.returncode == 0, proc.stderr
    sent0 = sim_counters(mesh)["ollama"]["requests"]
    run = finished(mesh, run_id, timeout=180)
    assert run["status"] == "failed", run
    # Both programmers hang on anthropic: whichever task fails for good first ends the run.
    rows = mesh.rows("SELECT * FROM retry_history WHERE run_id = ? ORDER BY id", (run_id,))
    switches = {(r["case_id"], r["from_provider"], r["to_provider"]) for r in rows if r["retry_type"] == "llm_change"}
    assert switches == {("stay_on_last_usable", "anthropic", "anthropic")}, switches
    failed_for_good = [r for r in rows if r["retry_type"] == "permanent_failure"]
    assert len(failed_for_good) >= 1 and failed_for_good[0]["reason"] == "max_provider_switches_exceeded", rows
    stays = [r for r in rows if r["retry_type"] == "llm_change" and r["task_id"] == failed_for_good[0]["task_id"]]
    assert len(stays) == 2  # max_provider_switches, each a restart on anthropic
    assert sim_counters(mesh)["ollama"]["requests"] == sent0  # nothing went into the known outage


def test_the_same_alert_delivered_twice_is_handled_once(ladder_mesh):
    mesh = ladder_mesh
    p1 = mesh.service("programmer-1")
    alert = {"alert_id": "a-dup-1", "service": "programmer-1", "incarnation": p1["incarnation"],
             "reason": "heartbeat_timeout", "detail": {"silent_for": 9}}
    url = mesh.url("director-code") + "/handle_child_timeout"
    answers = [mesh.http("POST", url, alert) for _ in range(2)]
    assert [a[0] for a in answers] == [200, 200]
    first, second = answers[0][1], answers[1][1]
    assert (first["case"], first["restart"]["status"]) == ("idle_failure", "accepted"), first
    assert (second["action"], second["case"]) == ("ignore", "duplicate_alert"), second
    mesh.wait_replaced("programmer-1", p1["pid"])
    assert len(mesh.history("programmer-1")) == 1


def test_llm_advice_is_recorded_and_a_slow_advisor_never_holds_the_ladder(mesh_factory):
    """Advice is asked only where there is a choice (a task in flight: restart it or send it
    up); it is recorded with its rationale, and a slow advisor costs at most its timeout."""
    mesh = mesh_factory(services=SERVICES, policy={"llm_advice": True, "advice_timeout": 4.0})
    mesh.up()
    fault(mesh, "anthropic", "latency", latency_ms=1500)  # the programmer is mid-task when it dies
    submit(mesh)
    busy = wait_for(lambda: (s := mesh.service("programmer-1"))["task"] and s, 30, "programmer-1 to take its task")
    mesh.kill("programmer-1")
    [row] = wait_for(lambda: mesh.history("programmer-1"), 20, "the restart row")
    detail = json.loads(row["detail"])
    assert row["task_id"] == busy["task"]
    assert row["decided_by"] == "llm" and detail["advice"] == "restart" and detail["rationale"], detail
    # the advisor's provider hangs: the restart goes ahead on policy after advice_timeout
    fault(mesh, "anthropic", "hang")
    busy = wait_for(lambda: (s := mesh.service("programmer-2"))["task"] and s, 30, "programmer-2 busy")
    mesh.kill("programmer-2")
    # replaced while the advisor still hangs (its fault lasts until it is deleted below): the
    # ladder went on without it, on policy
    mesh.wait_replaced("programmer-2", busy["pid"])
    [row] = wait_for(lambda: mesh.history("programmer-2"), 20, "the restart row")
    assert row["decided_by"] == "policy" and json.loads(row["detail"])["advice"].startswith("timeout"), row
    code, faults = mesh.http("GET", mesh.url("llm-sim") + "/sim/faults", token=False)
    assert faults["providers"]["anthropic"]["fault"]["kind"] == "hang", faults  # still hanging
    mesh.http("DELETE", mesh.url("llm-sim") + "/sim/faults")


def test_an_outage_moves_every_agent_that_calls_it_in_place_and_failback_brings_them_home(mesh_factory):
    """An outage moves every agent that calls anthropic to ollama, in place. While anthropic
    still fails, the daemon's own probe (a real call through the SDK, in a process of its own:
    nobody calls anthropic any more) fails, and nobody moves back. Once the outage is over the
    probe proves it, and failback_after later every one of them is back on anthropic, the same
    processes; the next run's calls go to anthropic, none to ollama."""
    from tests.integration.test_providers import sim_counters

    # default providers (the architect plans on Anthropic too); failback in seconds, not minutes
    mesh = mesh_factory(providers={"cooldown": 1.0, "cooldown_max": 2.0, "failback_after": 2.0})
    mesh.up()
    before = pids(mesh)
    fault(mesh, "anthropic", "overloaded")
    run_id = submit(mesh)
    run = finished(mesh, run_id)
    assert run["status"] == "done", run
    on = lambda: {s["name"]: s["provider"] for s in mesh.status()["services"]}  # noqa: E731
    providers = on()
    callers = ["architect", "programmer-1", "programmer-2"]
    assert {providers[n] for n in callers} == {"ollama"}, providers
    assert providers["root"] == "anthropic"  # never called the provider: untouched
    moved = mesh.rows("SELECT agent_id, case_id, from_provider, to_provider FROM retry_history "
                      "WHERE retry_type = 'llm_change'")
    assert sorted(r["agent_id"] for r in moved) == sorted(callers), moved
    assert {(r["from_provider"], r["to_provider"]) for r in moved} == {("anthropic", "ollama")}
    assert pids(mesh) == before  # switched in place: nobody restarted
    # failback
    probed = "SELECT payload FROM events WHERE kind = 'provider_probed' ORDER BY id"
    wait_for(lambda: any('"outcome": "failed"' in r["payload"] for r in mesh.rows(probed)), 60,
             "a probe of anthropic that fails while the outage lasts")
    assert {on()[n] for n in callers} == {"ollama"} and mesh.rows(
        "SELECT 1 FROM events WHERE kind = 'provider_failback'") == []
    mesh.http("DELETE", mesh.url("llm-sim") + "/sim/faults/anthropic")
    wait_for(lambda: {on()[n] for n in callers} == {"anthropic"}, 60, "the callers back on anthropic")
    assert any('"outcome": "ok"' in r["payload"] for r in mesh.rows(probed)), mesh.rows(probed)
    back = mesh.rows("SELECT agent, payload FROM events WHERE kind = 'provider_failback'")
    assert sorted(r["agent"] for r in back) == callers, back
    assert all('"from": "ollama", "to": "anthropic"' in r["payload"] for r in back), back
    assert pids(mesh) == before  # in place: nobody restarted
    # The probe that proved it spent tokens, recorded as spend like any call's (the failed ones used none).
    spent = "SELECT agent, provider, input_tokens, output_tokens, step FROM llm_usage WHERE source = 'probe'"
    wait_for(lambda: mesh.rows(spent), 10, "the probe's usage recorded")
    assert all((r["agent"], r["provider"], r["step"]) == ("tron-daemon", "anthropic", "failback_probe")
               and r["input_tokens"] > 0 and r["output_tokens"] > 0 for r in mesh.rows(spent)), mesh.rows(spent)
    listed = json.loads(mesh.tron("provider", "list", "--json").stdout)
    assert listed["failback"]["away"] == {} and listed["failback"]["after"] == 2.0, listed["failback"]
    sent0 = sim_counters(mesh)
    run = finished(mesh, submit(mesh, "build it again"))
    assert run["status"] == "done", run
    sent = sim_counters(mesh)
    assert sent["anthropic"]["served"] > sent0["anthropic"]["served"]
    assert sent["ollama"]["requests"] == sent0["ollama"]["requests"], (sent0, sent)


# A program that writes down each start and, 0.2 s later, its end (its own clock, not Tron's),
# then exits. (No braces: a command's strings are templates, {port} and the like.)
CRASHER = ("import sys, time; f = open(sys.argv[1], 'a'); f.write('start %r\\n' % time.time()); f.flush(); "
           "time.sleep(0.2); f.write('end %r\\n' % time.time()); f.flush(); sys.exit(1)")


def test_a_crash_loop_at_the_cap_restarts_no_more_than_the_backoff_allows_and_goes_on(mesh_factory, tmp_path):
    """README, Service restarts: a service that dies 0.2 s after each start is restarted by
    the running supervisor under the backoff rule; crash-looping does not end its restarts.
    Counted by the program itself: over a window W, at most W / backoff_max (every delay at
    its shortest jitter) + max_restarts + 2 starts."""
    starts = tmp_path / "starts.log"
    policy = {"backoff_initial": 0.1, "backoff_factor": 2.0, "backoff_max": 1.0, "backoff_jitter": 0.2,
              "max_restarts": 3, "restart_window": 60.0, "min_uptime": 1.0}
    services = {"crasher": {"command": ["{python}", "-c", CRASHER, str(starts)], "port": 6150}}
    mesh = mesh_factory(services=services, policy=policy)
    mesh.tron("up", "--detach")  # its exit code says the mesh did not come up healthy: not the point here
    window = 10.0

    def marks(kind: str) -> list[float]:
        return [float(line.split()[1]) for line in (starts.read_text().splitlines() if starts.exists() else [])
                if line.startswith(kind + " ")]

    def times() -> list[float]:
        return marks("start")

    wait_for(lambda: (t := times()) and t[-1] - t[0] >= window, 90, f"{window:.0f} s of crash-looping")
    first = times()[0]
    within = [t for t in times() if t < first + window]
    shortest = policy["backoff_max"] * (1 - policy["backoff_jitter"])
    assert len(within) <= window / shortest + policy["max_restarts"] + 2, within
    assert len(within) >= policy["max_restarts"] + 2  # it went on past max_restarts: crash-looping, restarted
    assert mesh.service("crasher")["crash_looping"] is True
    # At the cap, from each end to the next start: at least the backoff (the next program's own
    # start-up only adds, so a loaded machine cannot shrink it the way it could start to start).
    ends = marks("end")
    gaps = [min(t for t in within if t > end) - end for end in ends if end < within[-1]]
    assert min(gaps[-3:]) >= shortest * 0.9, gaps


def test_a_runaway_beside_a_task_waiting_on_its_child_is_caught_while_that_one_waits(mesh_factory):
    """director-code holds a run's task that waits on programmer-1, whose LLM call hangs; a
    runaway task is then given to director-code. Its heartbeat hands the runaway to TRON as
    the older task waits: no_progress is raised on director-code for the runaway's task
    while the run's task still waits. (The oldest task was carried before: the runaway was
    seen only once the run's task had ended, and the chaos drill once waited 34 s for it.)"""
    mesh = mesh_factory(services=SERVICES, policy={"progress_timeout": 3.0}, providers={"timeout": 60.0})
    mesh.up()
    fault(mesh, "anthropic", "hang")  # programmer-1's call never returns: director-code waits on it
    run_id = submit(mesh)
    child = wait_for(lambda: mesh.rows("SELECT task_id, parent_task_id FROM tasks WHERE run_id = ? AND agent = ?",
                                       (run_id, "programmer-1")), 60, "programmer-1's task")[0]
    code, body = mesh.http("POST", mesh.url("director-code") + "/drill/runaway", {})
    assert code == 202, body
    runaway = body["task_id"]
    [alert] = wait_for(lambda: mesh.rows("SELECT * FROM alerts WHERE agent = 'director-code'"), 30,
                       "director-code's alert")
    assert (alert["reason"], alert["task_id"]) == ("no_progress", runaway), alert
    [waiting] = mesh.rows("SELECT status FROM tasks WHERE task_id = ?", (child["parent_task_id"],))
    assert waiting["status"] in ("assigned", "running"), waiting  # still waiting on programmer-1
    assert not [r for r in mesh.history() if r["retry_type"] == "llm_change"]  # programmer-1 is still at it
