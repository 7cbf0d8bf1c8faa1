"""Issue 23: spend. Tokens and cost on every call, exactly what llm-sim reported at the
price table's prices; a budget the ladder obeys (a task parks at it, its agent stays up,
and goes on from its checkpoint when an operator raises it); the human rung before a
permanent failure."""

from __future__ import annotations

import json
import tomllib

import pytest

from tron.common.prices import DEFAULT_PRICES, cost_usd, price_for
from tests.harness import REPO, wait_for
from tests.integration.test_notify import SECRET, Receiver
from tests.integration.test_providers import fault, finished, pids, submit

pytestmark = pytest.mark.integration

_DEFAULT = tomllib.loads((REPO / "mesh.toml").read_text())["services"]
# programmer-2 calls Ollama (streamed): with the architect (Anthropic, whole answers) and
# programmer-1 (Anthropic, streamed) every run uses both APIs, streamed and not.
MIXED = {**_DEFAULT, "programmer-2": {**_DEFAULT["programmer-2"], "provider": "ollama"}}


def parked(mesh, run_id: str, kind: str, timeout: float = 60) -> dict:
    return wait_for(lambda: (r := mesh.rows("SELECT * FROM tasks WHERE run_id = ? AND status = 'parked' AND "
                                            "parked_reason = ?", (run_id, kind))) and r[0], timeout,
                    f"a task of {run_id} to park ({kind})")


def test_a_runs_cost_is_what_llm_sim_reported_at_the_listed_prices(mesh_factory):
    mesh = mesh_factory(services=MIXED)
    mesh.up()
    assert mesh.http("POST", mesh.url("llm-sim") + "/sim/counters/reset", {})[0] == 200
    run_id = submit(mesh)
    assert finished(mesh, run_id)["status"] == "done"
    sim = mesh.http("GET", mesh.url("llm-sim") + "/sim/faults", token=False)[1]["providers"]
    counted = {(p, m): t for p, v in sim.items() for m, t in v["counters"]["tokens"].items()}
    assert {p for p, _ in counted} == {"anthropic", "ollama"}, counted
    mesh.flushed()
    rows = mesh.rows("SELECT provider, model, COUNT(*) AS calls, SUM(input_tokens) AS input_tokens, "
                     "SUM(output_tokens) AS output_tokens, SUM(cost_usd) AS cost FROM llm_usage WHERE run_id = ? "
                     "GROUP BY provider, model", (run_id,))
    recorded = {(r["provider"], r["model"]): r for r in rows}
    assert set(recorded) == set(counted)
    expected_total = 0.0
    for key, sim_tokens in counted.items():
        row = recorded[key]
        assert (row["calls"], row["input_tokens"], row["output_tokens"]) == (
            sim_tokens["calls"], sim_tokens["input_tokens"], sim_tokens["output_tokens"]), (key, row, sim_tokens)
        price = price_for(DEFAULT_PRICES, *key)
        expected = cost_usd(price, input_tokens=sim_tokens["input_tokens"], output_tokens=sim_tokens["output_tokens"])
        assert row["cost"] == pytest.approx(expected, abs=1e-9), key
        expected_total += expected
    assert expected_total > 0  # Anthropic is priced; local Ollama costs nothing
    proc = mesh.tron("cost", "--run", run_id, "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    total = report["total"]
    assert total["cost_usd"] == pytest.approx(expected_total, abs=1e-9)
    assert total["input_tokens"] == sum(t["input_tokens"] for t in counted.values())
    assert total["output_tokens"] == sum(t["output_tokens"] for t in counted.values())
    assert {r["agent"] for r in report["service"]} == {"architect", "programmer-1", "programmer-2"}
    text = mesh.tron("cost", "--run", run_id).stdout
    assert f"${expected_total:.6f}" in text and "ollama/llama3.1" in text
    assert mesh.tron("cost", "--since", "an hour").returncode != 0  # bad input: a clear error
    metrics = mesh.http("GET", mesh.url("daemon") + "/metrics", token=False)[1]
    assert 'tron_llm_tokens_total{kind="output",model="claude-sonnet-4-5",provider="anthropic"}' in metrics
    assert "tron_llm_cost_usd_total" in metrics


def test_a_run_over_its_budget_parks_with_its_agents_up_and_resumes_when_raised(mesh_factory):
    mesh = mesh_factory()
    mesh.up()
    before = pids(mesh)
    run_id = submit(mesh, budget_tokens=500)  # a run here takes about 1,100 tokens
    task = parked(mesh, run_id, "budget_exceeded")
    run = mesh.http("GET", mesh.url("gateway") + f"/runs/{run_id}")[1]
    assert run["status"] == "running" and run["budget_tokens"] == 500, run
    assert {p["kind"] for p in run["parked"]} == {"budget_exceeded"}
    assert run["spend"]["tokens"] >= 500
    assert pids(mesh) == before  # parked, not killed
    assert mesh.service(task["agent"])["state"] == "running"
    wait_for(lambda: [c for c in (json.loads(x) for x in (mesh.home / "logs" / "comms.jsonl").read_text()
                                  .splitlines()) if c["kind"] == "run_parked" and c["run"] == run_id], 30,
             "the gateway to be told")
    [event] = wait_for(lambda: mesh.rows("SELECT payload FROM events WHERE kind = 'budget_exceeded' AND task_id = ?",
                                         (task["task_id"],)), 30, "the budget_exceeded event")
    assert "run_tokens" in json.loads(event["payload"])["reason"]
    status = mesh.tron("status").stdout
    assert f"parked: {task['task_id']}" in status and "budget_exceeded" in status
    proc = mesh.tron("run", "budget", run_id, "--tokens", "100000", "--reason", "worth it")
    assert proc.returncode == 0, proc.stderr
    assert finished(mesh, run_id)["status"] == "done"
    # every step ran once: what was done before the park was not redone
    steps = mesh.rows("SELECT task_id, step, COUNT(*) AS n FROM llm_usage WHERE run_id = ? GROUP BY task_id, step",
                      (run_id,))
    assert steps and all(s["n"] == 1 for s in steps), steps
    assert pids(mesh) == before
    audit = [a["payload"] for a in json.loads(mesh.tron("audit", "--json").stdout)]
    assert [(a["what"], a["target"], a["outcome"]) for a in audit] == [("run_budget", run_id, "budget_set")]
    assert mesh.tron("run", "budget", run_id).returncode != 0  # no amount: refused, nothing changed
    assert mesh.http("POST", mesh.url("daemon") + f"/runs/{run_id}/budget", {"usd": -1})[0] == 422


def test_the_human_rung_asks_before_failing_and_an_approval_completes_the_run(mesh_factory):
    with Receiver() as receiver:
        mesh = mesh_factory(policy={"ask_operator": True}, providers={"on_all_down": "fail"},
                            notify=[{"url": receiver.url, "secret_env": "TRON_NOTIFY_SECRET",
                                     "events": ["awaiting_operator", "permanent_failure"]}])
        mesh.env["TRON_NOTIFY_SECRET"] = SECRET
        mesh.up()
        human_rung(mesh, receiver)


def human_rung(mesh, receiver) -> None:
    before = pids(mesh)
    fault(mesh, "anthropic", "error")
    fault(mesh, "ollama", "error")
    run_id = submit(mesh)
    task = parked(mesh, run_id, "awaiting_operator")
    # the event is its own write, a moment after the task's row on a loaded machine
    [event] = wait_for(lambda: mesh.rows("SELECT payload FROM events WHERE kind = 'awaiting_operator' AND task_id = ?",
                                         (task["task_id"],)), 30, "the awaiting_operator event")
    asked = json.loads(event["payload"])
    assert asked["reason"].startswith("all_providers_down") and set(asked["providers_tried"]) == {"anthropic", "ollama"}
    assert asked["fingerprint"] and asked["cost"] is not None and asked["timeout_s"] == 86400.0
    # the failure under the ladder's reason: the one the call met (the sim's "error" fault: a 500)
    assert asked["error"] and asked["error"] != asked["reason"] and "all_providers_down" not in asked["error"], asked
    # a person hears of it: a signed notification at a real receiver
    [note] = wait_for(lambda: receiver.of("awaiting_operator"), 15, "the awaiting_operator notification")
    assert note["signed"] and note["body"]["task_id"] == task["task_id"], note
    assert note["body"]["payload"]["approve"].startswith(f"tron task approve {task['task_id']}")
    assert mesh.http("GET", mesh.url("gateway") + f"/runs/{run_id}")[1]["status"] == "running"
    # a task that is not awaiting an operator cannot be approved; a bad provider is refused
    refused = mesh.tron("task", "approve", f"{run_id}.0")
    assert refused.returncode != 0 and "only a task parked awaiting_operator" in refused.stderr, refused.stderr
    bad = mesh.http("POST", mesh.url("daemon") + f"/tasks/{task['task_id']}/approve", {"provider": "nosuch"})
    assert bad[0] == 422
    mesh.http("DELETE", mesh.url("llm-sim") + "/sim/faults")
    proc = mesh.tron("task", "approve", task["task_id"], "--provider", "ollama", "--reason", "ollama is back")
    assert proc.returncode == 0, proc.stderr
    run = finished(mesh, run_id)
    assert run["status"] == "done" and "[sim:ollama:" in run["result"], run
    assert pids(mesh) == before
    # the next one is failed by the operator instead
    fault(mesh, "anthropic", "error")
    fault(mesh, "ollama", "error")
    mesh.tron("provider", "restore", "anthropic")
    run_id = submit(mesh, "again")
    task = parked(mesh, run_id, "awaiting_operator")
    proc = mesh.tron("task", "fail", task["task_id"], "--reason", "not worth it")
    assert proc.returncode == 0, proc.stderr
    run = finished(mesh, run_id)
    assert run["status"] == "failed", run
    [row] = mesh.rows("SELECT * FROM retry_history WHERE task_id = ? AND retry_type = 'permanent_failure'",
                      (task["task_id"],))
    assert (row["case_id"], row["decided_by"]) == ("operator_failed", "operator")
    whats = [a["payload"]["what"] for a in json.loads(mesh.tron("audit", "--json").stdout)]
    assert "task_approve" in whats and "task_fail" in whats
    mesh.http("DELETE", mesh.url("llm-sim") + "/sim/faults")


def test_a_run_failed_by_an_operator_leaves_no_task_behind_to_spend_for_it(mesh_factory):
    """Two tasks of a run park at its budget; the operator fails one. The run fails, and the
    other, still parked, is cancelled with it (it once went on and, after a budget raise on
    the failed run, spent money for nothing); a budget for a finished run is refused."""
    mesh = mesh_factory()
    mesh.up()
    run_id = submit(mesh, budget_tokens=500)
    first = parked(mesh, run_id, "budget_exceeded")
    wait_for(lambda: len(mesh.rows("SELECT 1 FROM tasks WHERE run_id = ? AND status = 'parked'", (run_id,))) >= 2
             or mesh.rows("SELECT 1 FROM tasks WHERE run_id = ? AND status IN ('assigned', 'running') AND task_id != ?",
                          (run_id, first["task_id"])), 30, "another live task of the run")
    live = lambda: mesh.rows("SELECT task_id, status FROM tasks WHERE run_id = ? AND status IN "  # noqa: E731
                             "('assigned', 'running', 'parked', 'escalated')", (run_id,))
    assert len(live()) >= 2, live()
    proc = mesh.tron("task", "fail", first["task_id"], "--reason", "not worth it")
    assert proc.returncode == 0, proc.stderr
    assert finished(mesh, run_id)["status"] == "failed"
    wait_for(lambda: not live(), 15, f"no live task left in {run_id}")
    cancelled = mesh.rows("SELECT task_id, failure FROM tasks WHERE run_id = ? AND status = 'cancelled'", (run_id,))
    assert cancelled and all("run_failed" in r["failure"] for r in cancelled), cancelled
    spent = mesh.rows("SELECT COUNT(*) AS n FROM llm_usage WHERE run_id = ?", (run_id,))[0]["n"]
    proc = mesh.tron("run", "budget", run_id, "--usd", "1")
    assert proc.returncode != 0 and "is failed" in proc.stderr, proc
    code, answer = mesh.http("POST", mesh.url("daemon") + f"/runs/{run_id}/budget", {"usd": 1})
    assert code == 409 and answer["verdict"] == "run_finished", answer
    assert mesh.rows("SELECT COUNT(*) AS n FROM llm_usage WHERE run_id = ?", (run_id,))[0]["n"] == spent


def test_a_task_parked_at_its_own_budget_says_how_to_go_on_and_a_reload_lets_it(mesh_factory):
    """A task parked at [budgets] task_tokens: `tron status` tells to raise it in mesh.toml and
    `tron reload` (it once told `tron run budget`, which changes nothing for a task's limit);
    doing so lets it go on, and the run ends done."""
    mesh = mesh_factory()
    text = mesh.config.read_text()
    mesh.config.write_text(text + "[budgets]\ntask_tokens = 150\n")
    mesh.up()
    run_id = submit(mesh)
    task = parked(mesh, run_id, "budget_exceeded")
    status = mesh.tron("status", check=True).stdout
    line = next(x for x in status.splitlines() if x.startswith(f"parked: {task['task_id']}"))
    assert "task_tokens" in line and "tron reload" in line and "tron run budget" not in line, line
    mesh.config.write_text(text + "[budgets]\ntask_tokens = 100000\n")
    mesh.tron("reload", check=True)
    assert finished(mesh, run_id)["status"] == "done"
