"""Issue 11: agents of the user's own get the whole ladder. A bash + curl agent speaks the
contract (beats, claims, checkpoints); a Python class named in mesh.toml runs on the SDK
under the same runtime and fork server: killed, it resumes after its last step with that
step's output; its provider switches along the chain; a broken module is a clear start
failure naming the file and line."""

from __future__ import annotations

import json
import os
import signal
import textwrap
import time

import pytest

from tests.harness import REPO, wait_for

pytestmark = pytest.mark.integration
BASH_AGENT = REPO / "examples" / "bash-agent" / "agent.sh"

STEPS_AGENT = '''
from tron.sdk import Agent, Task


class Steps(Agent):
    """Four steps; each output names the incarnation that made it, so a resumed task shows
    which steps were carried over and which were run again."""

    role = "steps"
    uses_llm = True

    async def work(self, task: Task) -> str:
        out = ""
        for n in range(1, 5):
            async def produce(previous, n=n):
                reply = await self.llm(task, f"step {n} of {task.assign.prompt}")
                return (previous + " | " if previous else "") + f"step{n}@{self.incarnation}:{reply[:12]}"
            out = await self.step(task, n, f"s{n}", produce, total=4)
        return out
'''

CLASHING_AGENT = '''
from tron.sdk import Agent, Task


class Clashing(Agent):
    """A user's agent whose own names are those Tron's runtime and ladder use."""

    uses_llm = True
    view = take = actions = active = waiting = early = parent = daemon = policy = "mine"
    config = ctx = clock = make_app = checkpoint = under_ladder = provider_settings = "mine"

    def client(self, provider=None):
        return "my client"

    async def work(self, task: Task) -> str:
        await self.step(task, 1, "draft", lambda _: self.llm(task, task.assign.prompt))
        return await self.step(task, 2, "sign", lambda draft: signed(draft, self.client(), self.incarnation))


async def signed(*parts) -> str:
    return " / ".join(parts)
'''


def run_task(mesh, agent: str, prompt: str) -> tuple[str, str]:
    """A run whose one task is ``agent``'s (the parent is an operator, not a service)."""
    code, run = mesh.http("POST", mesh.url("daemon") + "/runs", {"prompt": prompt})
    assert code == 201, run
    task_id = f"{run['run_id']}.0"
    code, body = mesh.http("POST", mesh.url("daemon") + "/tasks", {
        "task_id": task_id, "run_id": run["run_id"], "agent": agent, "parent_agent": "operator", "kind": "run",
        "prompt": prompt})
    assert code == 201, body
    return run["run_id"], task_id


def ended(mesh, run_id: str, timeout: float = 60) -> dict:
    return wait_for(lambda: (r := mesh.http("GET", mesh.url("daemon") + f"/runs/{run_id}")[1])
                    and r["status"] != "running" and r, timeout, f"run {run_id} to end")


@pytest.fixture
def bash_mesh(mesh_factory):
    def make(**env):
        services = {"bash-agent": {"command": ["bash", str(BASH_AGENT)], "port": 6160, "heartbeat": True,
                                   "env": {"STEP_SECONDS": "0.3", **env}}}
        mesh = mesh_factory(services=services, policy={"progress_timeout": 4.0})  # > beat timeout (2 s)
        mesh.up()
        return mesh
    return make


def test_a_bash_agent_beats_claims_checkpoints_and_finishes(bash_mesh):
    mesh = bash_mesh()
    wait_for(lambda: mesh.service("bash-agent")["last_beat_age"] is not None, 10, "beats")
    prompt = 'count to "three"\n\\ twice'  # quotes, a newline, a backslash: the JSON the agent writes holds
    out = mesh.tron("run", "--agent", "bash-agent", "--json", prompt, timeout=60, check=True)
    run = json.loads(out.stdout)
    assert run["status"] == "done" and run["result"] == f"step 3 of: {prompt}", run
    task_id = f"{run['run_id']}.0"
    marks = mesh.rows("SELECT step, step_id FROM checkpoints WHERE task_id = ? ORDER BY step", (task_id,))
    assert [(m["step"], m["step_id"]) for m in marks] == [(1, "step-1"), (2, "step-2"), (3, "step-3")]
    late = {"status": "failed", "reason": "late", "attempt": 2}  # the word of an attempt that is not this one
    code, body = mesh.http("POST", mesh.url("daemon") + f"/tasks/{task_id}/finish", late)
    assert code == 409 and body["verdict"] == "stale_attempt", body
    assert ended(mesh, run["run_id"])["status"] == "done"  # and it changed nothing
    bad = mesh.tron("run", "--agent", "nobody", "x")
    assert bad.returncode != 0 and "no service 'nobody'" in bad.stderr


def test_a_stopped_bash_agent_is_caught_by_its_silence_and_its_task_resumes(bash_mesh):
    mesh = bash_mesh(STEP_SECONDS="1.0")
    run_id, task_id = run_task(mesh, "bash-agent", "slow steps")
    wait_for(lambda: mesh.rows("SELECT step FROM checkpoints WHERE task_id = ?", (task_id,)), 20, "a first step")
    old = mesh.kill("bash-agent", signal.SIGSTOP)
    mesh.wait_state("bash-agent", "running", timeout=30)
    wait_for(lambda: mesh.service("bash-agent")["pid"] != old, 30, "a new incarnation")
    assert ended(mesh, run_id)["status"] == "done"
    [alert] = mesh.rows("SELECT reason FROM alerts")
    assert alert["reason"] == "heartbeat_timeout"
    resumed = mesh.rows("SELECT payload FROM events WHERE kind = 'task_resumed' AND task_id = ?", (task_id,))
    steps = [m["step"] for m in mesh.rows("SELECT step FROM checkpoints WHERE task_id = ?", (task_id,))]
    assert steps == [1, 2, 3] and resumed == []  # the bash agent claims; it is not pushed


def test_a_bash_agent_that_beats_but_never_moves_is_a_runaway(bash_mesh):
    mesh = bash_mesh(FREEZE="1")
    first = mesh.service("bash-agent")
    run_id, _ = run_task(mesh, "bash-agent", "stuck")
    wait_for(lambda: mesh.rows("SELECT reason FROM alerts"), 20, "TRON to see no progress")
    assert mesh.rows("SELECT reason FROM alerts")[0]["reason"] == "no_progress"
    wait_for(lambda: mesh.service("bash-agent")["incarnation"] != first["incarnation"], 20, "replaced")


@pytest.fixture
def steps_mesh(mesh_factory, tmp_path):
    pkg = tmp_path / "mine"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "steps.py").write_text(STEPS_AGENT)

    def make(policy=None, providers=None):
        services = {"llm-sim": {"role": "llm_sim", "port": 6190},
                    "worker": {"agent": "mine.steps:Steps", "port": 6161, "agent_path": [str(tmp_path)]}}
        mesh = mesh_factory(services=services, policy=policy or {}, providers=providers or {})
        mesh.up()
        return mesh
    return make


def test_a_class_of_the_users_resumes_after_step_two_with_its_output(steps_mesh):
    mesh = steps_mesh()
    fault = {"kind": "latency", "latency_ms": 700}
    assert mesh.http("PUT", mesh.url("llm-sim") + "/sim/faults/anthropic", fault)[0] == 200
    run_id, task_id = run_task(mesh, "worker", "four steps")
    first = mesh.service("worker")
    wait_for(lambda: len(mesh.rows("SELECT step FROM checkpoints WHERE task_id = ?", (task_id,))) == 2, 30,
             "two steps done")
    os.kill(first["pid"], signal.SIGKILL)
    mesh.http("DELETE", mesh.url("llm-sim") + "/sim/faults")
    run = ended(mesh, run_id)
    assert run["status"] == "done", run
    parts = run["result"].split(" | ")
    assert [p.split("@")[0] for p in parts] == ["step1", "step2", "step3", "step4"]
    by = [p.split("@")[1].split(":")[0] for p in parts]
    assert by[0] == by[1] == first["incarnation"]  # carried over, not redone
    assert by[2] == by[3] != first["incarnation"]  # the next incarnation went on from step 3
    resumed = mesh.rows("SELECT payload FROM events WHERE kind = 'task_resumed' AND task_id = ?", (task_id,))
    assert json.loads(resumed[-1]["payload"])["checkpoint"] == 2


def test_a_class_of_the_users_switches_provider_along_the_chain(steps_mesh):
    mesh = steps_mesh(policy={"max_restarts": 1},
                      providers={"chain": ["anthropic", "openai", "ollama"], "default": "anthropic"})
    assert mesh.http("PUT", mesh.url("llm-sim") + "/sim/faults/anthropic", {"kind": "error"})[0] == 200
    run_id, task_id = run_task(mesh, "worker", "on another provider")
    run = ended(mesh, run_id)
    assert run["status"] == "done", run
    switches = mesh.rows("SELECT from_provider, to_provider FROM retry_history WHERE retry_type = 'llm_change'")
    assert [(s["from_provider"], s["to_provider"]) for s in switches] == [("anthropic", "openai")]
    assert mesh.service("worker")["provider"] == "openai"


def test_a_broken_agent_module_is_a_clear_start_failure(mesh_factory, tmp_path):
    pkg = tmp_path / "broken"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "agent.py").write_text(textwrap.dedent("""
        from tron.sdk import Agent

        class Oops(Agent):
            def work(self, task)
                return "never"
    """))
    services = {"oops": {"agent": "broken.agent:Oops", "port": 6162, "agent_path": [str(tmp_path)]}}
    mesh = mesh_factory(services=services, policy={"start_timeout": 5.0})
    proc = mesh.tron("up", "--detach")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "oops is " in proc.stderr and "broken.agent:Oops" in proc.stderr, proc.stderr
    assert "agent.py line 5" in proc.stderr, proc.stderr
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not mesh.history("oops"):
        time.sleep(0.1)
    assert mesh.history("oops"), "it is retried like any failing service (and crash-loops at the cap)"


@pytest.mark.parametrize("provider,question,by_tool", [
    ("anthropic", "How do supervisors restart crashing workers?", True),  # tool_choice any: a call is forced
    ("openai", "How do supervisors restart crashing workers?", True),  # tool_choice required
    ("ollama", "How do heartbeats and backoff keep workers alive?", True),  # no tool_choice: a relevant tool
    ("ollama", "How do supervisors restart crashing workers?", False),  # nothing relevant: every note instead
])
def test_the_research_example_uses_its_tool_on_every_provider(mesh_factory, provider, question, by_tool):
    services = {"llm-sim": {"role": "llm_sim", "port": 6190},
                "researcher": {"agent": "research.agent:Researcher", "port": 6162,
                               "agent_path": [str(REPO / "examples" / "research-agent")]}}
    mesh = mesh_factory(services=services, providers={"default": provider,
                                                      "chain": ["anthropic", "ollama", "openai"]})
    mesh.up()
    out = mesh.tron("run", "--agent", "researcher", "--json", question, timeout=60, check=True)
    run = json.loads(out.stdout)
    assert run["status"] == "done" and "sources: " in run["result"], run
    [gather, summary] = mesh.rows("SELECT step_id, output FROM checkpoints WHERE task_id = ? ORDER BY step",
                                  (f"{run['run_id']}.0",))
    notes = json.loads(gather["output"])
    assert notes["by_tool"] is by_tool and notes["notes"].startswith("# ")
    assert len(notes["read"]) == 1 if by_tool else len(notes["read"]) == 4, notes["read"]
    assert summary["step_id"] == "summarise" and run["result"].startswith(summary["output"].strip())
    counters = mesh.http("GET", mesh.url("llm-sim") + "/sim/faults")[1]["providers"]
    asked = {name: c["counters"]["served"] for name, c in counters.items() if c["counters"]["served"]}
    assert list(asked) == [provider] and asked[provider] == (3 if by_tool else 2), asked  # call, answer, summary


# A contract-v1 agent in plain Python (no SDK, stdlib only): it writes down what it was given
# and what the daemon answered, so the test reads the contract from the agent's side.
CONTRACT_AGENT = r'''
import json, os, sys, threading, time, urllib.error, urllib.request
env = os.environ
url, name, inc = env["TRON_DAEMON_URL"], env["TRON_SERVICE"], env["TRON_INCARNATION"]
token = open(env["TRON_TOKEN_FILE"]).read().strip()
notes = open(sys.argv[1], "a")
state = {"task": None, "progress": None}

def note(**kw):
    notes.write(json.dumps({"incarnation": inc, "at": time.time(), **kw}) + "\n"); notes.flush()

def call(path, body):
    req = urllib.request.Request(url + path, json.dumps(body).encode(),
                                 {"Content-Type": "application/json", "X-Tron-Token": token})
    for _ in range(10):  # a daemon slow to answer on a loaded machine is asked again, not a crash
        try:
            with urllib.request.urlopen(req, timeout=10) as r:
                data = r.read()
                return r.status, json.loads(data) if data else None
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()
        except OSError as e:
            note(event="call_error", path=path, error=str(e))
            time.sleep(0.5)
    raise SystemExit(f"{path}: no answer")

note(event="start", provider=env.get("TRON_PROVIDER"), resume=json.loads(env.get("TRON_RESUME") or "null"))
time.sleep(float(env["FIRST_BEAT_AFTER"]))

def beats():
    seq = 0
    while True:
        body = {"service": name, "incarnation": inc, "pid": os.getpid(), "seq": seq}
        if state["task"]:
            body.update(task_id=state["task"], progress=state["progress"])
        code, _ = call("/beat", body)
        if seq == 0:
            note(event="first_beat", code=code)
        if code == 409:
            os._exit(0)
        seq += 1
        time.sleep(float(env["TRON_HEARTBEAT_INTERVAL"]))

threading.Thread(target=beats, daemon=True).start()
while True:
    code, task = call("/tasks/claim", {"service": name, "incarnation": inc})
    note(event="claim", code=code)
    if code != 200:
        time.sleep(0.2)
        continue
    state["task"] = task["task_id"]
    done = (task.get("checkpoint") or {}).get("step", 0)
    for step in range(done + 1, 3):
        state["progress"] = f"step:{step}/2"
        call(f"/tasks/{task['task_id']}/checkpoint",
             {"step": step, "step_id": f"s{step}", "output": f"step {step} by {inc}", "incarnation": inc})
        if not (json.loads(env.get("TRON_RESUME") or "null") or {}).get("tasks"):  # the first one cannot go on
            note(event="reporting")  # before: the restart it causes may end this process before the answer is read
            call("/control/report_failure", {"service": name, "incarnation": inc, "task_id": task["task_id"],
                                             "reason": "my_tool_is_down", "retryable": True})
            time.sleep(3600)
    call(f"/tasks/{task['task_id']}/finish", {"status": "done", "result": f"finished by {inc}", "incarnation": inc,
                                              "attempt": task["attempt"]})
    state["task"] = None
'''


def test_a_contract_agent_without_the_sdk_gets_the_whole_contract(mesh_factory, tmp_path):
    """README, "Any language: contract v1", from the agent's side: ready only at its first
    accepted beat; TRON_PROVIDER; 204 from an empty claim; a failure it reports through
    /control/report_failure restarts it, and the next incarnation's TRON_RESUME hands it the
    task with its checkpoint, from which it finishes."""
    script, notes = tmp_path / "agent.py", tmp_path / "notes.jsonl"
    script.write_text(CONTRACT_AGENT)
    services = {"llm-sim": {"role": "llm_sim", "port": 6190},
                "contract": {"command": ["{python}", str(script), str(notes)], "port": 6160, "heartbeat": True,
                             "env": {"FIRST_BEAT_AFTER": "2"}}}
    mesh = mesh_factory(services=services)
    mesh.up()
    up_at = time.time()

    def said(event: str, incarnation: str | None = None) -> list[dict]:
        lines = [json.loads(x) for x in notes.read_text().splitlines()] if notes.exists() else []
        return [n for n in lines if n["event"] == event and incarnation in (None, n["incarnation"])]

    [start] = said("start")
    first = start["incarnation"]
    assert up_at - start["at"] >= 2.0  # `tron up` waited for its first beat: not ready before it
    assert said("first_beat", first)[0]["code"] == 200
    assert start["provider"] == mesh.service("contract")["provider"] == mesh.spec["providers"]["default"]
    assert start["resume"] in (None, {"tasks": []})
    wait_for(lambda: said("claim", first), 10, "a first claim")
    assert said("claim", first)[0]["code"] == 204  # nothing to do yet
    run_id, task_id = run_task(mesh, "contract", "two steps")
    wait_for(lambda: said("reporting", first), 60, "the failure to be reported")
    fresh = wait_for(lambda: (s := said("start")) and len(s) > 1 and s[-1], 60, "a new incarnation")
    assert fresh["incarnation"] != first
    [resumed] = fresh["resume"]["tasks"]
    assert resumed["task_id"] == task_id and resumed["checkpoint"]["step"] == 1, fresh["resume"]
    assert ended(mesh, run_id)["status"] == "done"
    [alert] = mesh.rows("SELECT reason, detail FROM alerts WHERE incarnation = ?", (first,))
    assert alert["reason"] == "provider_failure" and "my_tool_is_down" in alert["detail"], alert
    marks = mesh.rows("SELECT step, incarnation FROM checkpoints WHERE task_id = ? ORDER BY step", (task_id,))
    assert [(m["step"], m["incarnation"]) for m in marks] == [(1, first), (2, fresh["incarnation"])]


def test_a_users_class_with_the_runtimes_own_names_runs_and_drills_off_means_no_drill_hook(mesh_factory, tmp_path):
    pkg = tmp_path / "mine"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "clashing.py").write_text(CLASHING_AGENT)
    services = {"llm-sim": {"role": "llm_sim", "port": 6190},
                "worker": {"agent": "mine.clashing:Clashing", "port": 6161, "agent_path": [str(tmp_path)]}}
    mesh = mesh_factory(services=services)
    mesh.config.write_text(mesh.config.read_text() + "[drills]\nenabled = false\n")
    mesh.up()
    run_id, task_id = run_task(mesh, "worker", "names of my own")
    run = ended(mesh, run_id)
    assert run["status"] == "done", run
    assert run["result"].endswith(" / my client / " + mesh.service("worker")["incarnation"]), run
    steps = mesh.rows("SELECT step FROM checkpoints WHERE task_id = ? ORDER BY step", (task_id,))
    assert [m["step"] for m in steps] == [1, 2]
    # a leaf serves no ladder endpoint, and with drills off no agent serves the drill's hook
    for path in ("/drill/runaway", "/handle_child_timeout", "/handle_grandchild_failure"):
        assert mesh.http("POST", mesh.url("worker") + path, {})[0] == 404, path
    drill = mesh.tron("drill", "runaway", "worker")
    assert drill.returncode == 2 and "drills are off" in drill.stderr, drill.stderr
    assert mesh.service("worker")["incarnation"] == run["result"].rsplit(" / ", 1)[1]  # nothing was broken
