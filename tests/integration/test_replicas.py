"""Replicas (issue 24): N incarnations of one service, each supervised on its own; a program's
replicas share the held listening socket; `tron restart NAME` rolls; `tron scale` changes N."""

from __future__ import annotations

import http.client
import signal
import sys
import threading
import time

import psutil

from tests.harness import REPO, rewrite_mesh, wait_for

APPS = REPO / "tests" / "integration" / "apps"
UVICORN = [sys.executable, "-m", "uvicorn", "--fd", "3", "--app-dir", str(APPS), "hello_asgi:app"]
APP = {"command": UVICORN, "port": 6165, "socket": "inherit", "replicas": 3,
       "readiness": {"url": "http://127.0.0.1:{port}/", "interval": 0.2}}


class Load:
    """Requests on new connections, one after another, from a thread: each answer's pid,
    connections refused and requests that failed after connecting."""

    def __init__(self, port: int) -> None:
        self.port, self.pids, self.refused, self.failed = port, [], 0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
            try:
                conn.request("GET", "/")
                self.pids.append(int(conn.getresponse().read()))
            except ConnectionRefusedError:
                self.refused += 1
            except (OSError, http.client.HTTPException, ValueError):
                self.failed += 1
            finally:
                conn.close()
            time.sleep(0.005)

    def __enter__(self) -> "Load":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(10)


def replicas(mesh, group: str) -> dict:
    return {s["name"]: s for s in mesh.status()["services"] if s["name"].startswith(group + ".")}


def test_a_programs_replicas_share_its_port_roll_on_restart_and_survive_a_kill(mesh_factory):
    mesh = mesh_factory(services={"app": APP})
    mesh.up()
    rows = replicas(mesh, "app")
    assert sorted(rows) == ["app.1", "app.2", "app.3"] and all(r["state"] == "running" for r in rows.values())
    pids = {r["pid"] for r in rows.values()}
    assert len(pids) == 3 and all(r["port"] == mesh.port("app") for r in rows.values())
    with Load(mesh.port("app")) as load:
        wait_for(lambda: set(load.pids[-200:]) >= pids, 30, "every replica to answer (the kernel spreads them)")
        # A rolling restart: one at a time, the next once the new one is ready.
        began = len(load.pids)
        proc = mesh.tron("restart", "app", timeout=120)
        assert proc.returncode == 0, proc.stderr
        assert "app: restarted" in proc.stdout
        after = replicas(mesh, "app")
        assert not ({r["pid"] for r in after.values()} & pids)
        wait_for(lambda: set(load.pids[began:]) >= {r["pid"] for r in after.values()}, 20,
                 "every new replica to answer on the shared port")
        # Never fewer than two replicas serving: no refusal, at most one in-flight failure each.
        assert load.refused == 0 and load.failed <= 3, (load.refused, load.failed)
        # kill -9 of one replica: the other two go on answering, and it is restarted.
        victim = after["app.2"]["pid"]
        mark = len(load.pids)
        psutil.Process(victim).kill()
        back = wait_for(lambda: (r := replicas(mesh, "app")["app.2"])["state"] == "running" and r["pid"] != victim
                        and r, 30, "app.2 back with a new pid")
        # The kill -> restart takes milliseconds, fewer than one request of the loop on a loaded
        # machine: the two others are waited for, not read at the moment app.2 is back.
        wait_for(lambda: {after["app.1"]["pid"], after["app.3"]["pid"]} <= set(load.pids[mark:]), 20,
                 "the two other replicas to answer after the kill")
        wait_for(lambda: back["pid"] in load.pids[mark:], 20, "the new app.2 to answer too")
        assert load.refused == 0
    rows = mesh.rows("SELECT agent_id, retry_type FROM retry_history WHERE retry_type = 'operator_restart'")
    assert sorted(r["agent_id"] for r in rows) == ["app.1", "app.2", "app.3"]


def test_scale_adds_and_removes_replicas_of_the_running_mesh(mesh_factory):
    mesh = mesh_factory(services={"app": {**APP, "replicas": 2}})
    mesh.up()
    before = replicas(mesh, "app")
    proc = mesh.tron("scale", "app", "4")
    assert proc.returncode == 0 and "2 -> 4" in proc.stdout, proc.stderr
    rows = wait_for(lambda: (r := replicas(mesh, "app")) and len(r) == 4
                    and all(x["state"] == "running" for x in r.values()) and r, 30, "four replicas running")
    assert {n: (rows[n]["pid"], rows[n]["incarnation"]) for n in before} == \
        {n: (before[n]["pid"], before[n]["incarnation"]) for n in before}  # the first two untouched
    gone = [rows["app.3"]["pid"], rows["app.4"]["pid"]]
    assert mesh.tron("scale", "app", "2").returncode == 0
    wait_for(lambda: sorted(replicas(mesh, "app")) == ["app.1", "app.2"], 30, "back to two replicas")
    wait_for(lambda: not any(psutil.pid_exists(p) and psutil.Process(p).status() != "zombie" for p in gone), 15,
             "the scaled-away replicas' processes to end")
    refused = mesh.tron("scale", "nosuch", "2")
    assert refused.returncode == 2 and "not a replicated service" in refused.stderr


def test_scale_refuses_a_replica_named_as_a_service_of_its_own(mesh_factory):
    """`tron scale web 3` beside a [services."web.3"] of its own once replaced that service by
    the new replica (it stopped, with "web: 2 -> 3 replicas"), and scaling back removed it."""
    own = {"command": [sys.executable, "-m", "http.server", "{port}", "--bind", "127.0.0.1"], "port": 6168}
    mesh = mesh_factory(services={"app": {**APP, "replicas": 2}, "app.3": own})
    mesh.up()
    before = {s["name"]: s for s in mesh.status()["services"]}["app.3"]
    refused = mesh.tron("scale", "app", "3")
    assert refused.returncode == 2 and "app.3 is a service of its own" in refused.stderr, refused.stderr
    after = {s["name"]: s for s in mesh.status()["services"]}
    assert (after["app.3"]["pid"], after["app.3"]["port"]) == (before["pid"], before["port"])
    assert sorted(replicas(mesh, "app")) == ["app.1", "app.2", "app.3"]  # app.3 still the file's own


def test_an_agents_replicas_share_the_tasks_given_to_its_name(mesh_factory):
    import tomllib

    services = tomllib.loads((REPO / "mesh.toml").read_text())["services"]
    services["programmer-1"].update(replicas=2, port=6140)  # 6140 and 6141: agents take a port each
    mesh = mesh_factory(services=services)
    mesh.up()
    rows = replicas(mesh, "programmer-1")
    assert sorted(rows) == ["programmer-1.1", "programmer-1.2"]
    assert rows["programmer-1.2"]["port"] == rows["programmer-1.1"]["port"] + 1
    for _ in range(4):
        proc = mesh.tron("run", "--agent", "programmer-1", "write a haiku", timeout=120)
        assert proc.returncode == 0, proc.stderr
    owners = [r["agent"] for r in mesh.rows("SELECT agent FROM tasks WHERE parent_agent = 'operator'")]
    assert sorted(set(owners)) == ["programmer-1.1", "programmer-1.2"]  # both took a share


# app.3 takes the shared socket but never serves it: its siblings answer every connection
# made to the port. Its readiness probe (an HTTP GET on that port) must not pass on their answers.
LAZY = {**APP, "command": ["sh", "-c", 'if [ "$TRON_SERVICE" = app.3 ]; then exec sleep 600; fi; exec "$0" "$@"',
                           *UVICORN]}


def test_a_replica_that_never_serves_is_not_healthy_though_its_siblings_answer_the_shared_port(mesh_factory):
    mesh = mesh_factory(services={"app": LAZY}, policy={"start_timeout": 4.0})
    proc = mesh.tron("up", "--detach", timeout=120)
    assert proc.returncode != 0 and "app.3" in proc.stdout + proc.stderr, (proc.stdout, proc.stderr)
    rows = replicas(mesh, "app")
    assert rows["app.1"]["state"] == "running" and rows["app.2"]["state"] == "running"
    assert rows["app.3"]["state"] != "running", rows["app.3"]
    alerts = wait_for(lambda: mesh.rows("SELECT reason FROM alerts WHERE agent = 'app.3'"), 30, "app.3's alert")
    assert {a["reason"] for a in alerts} == {"start_timeout"}, alerts
    # The two that serve are not judged by app.3's silence, nor by each other's answers.
    assert not mesh.rows("SELECT agent, reason FROM alerts WHERE agent != 'app.3'")


def test_a_replica_whose_loop_blocks_is_restarted_though_its_siblings_answer_its_probes(mesh_factory):
    """app.2's event loop blocks (SIGUSR1): it accepts nothing, its siblings take every probe
    connection, so each probe of it is inconclusive; a minute of that (3 s here, the test
    knob) is a liveness failure, and it is restarted. Its siblings serve throughout, unjudged."""
    mesh = mesh_factory(services={"app": {**APP, "liveness": {"tcp": {}, "interval": 0.2}}},
                        policy={"stop_grace": 1.0})
    mesh.env["TRON_TEST_ALONE_SECONDS"] = "3"
    mesh.up()
    rows = replicas(mesh, "app")
    blocked = rows["app.2"]["pid"]
    with Load(mesh.port("app")) as load:
        wait_for(lambda: blocked in load.pids, 30, "app.2 to answer before it blocks")
        psutil.Process(blocked).send_signal(signal.SIGUSR1)
        back = wait_for(lambda: (r := replicas(mesh, "app")["app.2"])["state"] == "running" and r["pid"] != blocked
                        and r, 60, "app.2 restarted with a new pid")
        wait_for(lambda: back["pid"] in load.pids, 20, "the new app.2 to answer")
        assert load.refused == 0
    alerts = mesh.rows("SELECT agent, reason, detail FROM alerts")
    assert [(a["agent"], a["reason"]) for a in alerts] == [("app.2", "liveness_failed")], alerts
    assert "accepts nothing" in alerts[0]["detail"]
    after = replicas(mesh, "app")
    assert (after["app.1"]["pid"], after["app.3"]["pid"]) == (rows["app.1"]["pid"], rows["app.3"]["pid"])


def test_a_reload_rolls_a_replicated_program_and_halts_at_a_replica_that_does_not_come_back(mesh_factory):
    mesh = mesh_factory(services={"app": APP})
    mesh.up()
    before = replicas(mesh, "app")
    good = mesh.config.read_text()
    rewrite_mesh(mesh, {"app": {**APP, "command": ["sh", "-c", "exit 3"]}})
    with Load(mesh.port("app")) as load:
        wait_for(lambda: len(load.pids) > 20, 30, "requests answered")
        proc = mesh.tron("reload", timeout=120)
        assert proc.returncode == 2, (proc.stdout, proc.stderr)
        assert "the roll of app halted: app.1 not ready again; still on the old entry: app.2, app.3" in proc.stderr
        now = replicas(mesh, "app")
        assert now["app.1"]["state"] != "running"
        assert {n: (now[n]["pid"], now[n]["incarnation"]) for n in ("app.2", "app.3")} == \
            {n: (before[n]["pid"], before[n]["incarnation"]) for n in ("app.2", "app.3")}
        mark = len(load.pids)
        wait_for(lambda: {now["app.2"]["pid"], now["app.3"]["pid"]} <= set(load.pids[mark:]), 20,
                 "the two untouched replicas to go on answering (the crash-looping app.1 must not stall them)")
        # The file mended: only the replica that runs the broken entry is replaced.
        mesh.config.write_text(good)
        plan = mesh.tron("reload", "--dry-run")
        assert plan.returncode == 0
        planned = {line.split()[0]: line.split()[1] for line in plan.stdout.splitlines() if line.startswith("app.")}
        assert planned == {"app.1": "replace", "app.2": "unchanged", "app.3": "unchanged"}, plan.stdout
        assert mesh.tron("reload", timeout=120).returncode == 0
        wait_for(lambda: (r := replicas(mesh, "app"))["app.1"]["state"] == "running" and r["app.1"]["pid"] in
                 load.pids[mark:], 30, "app.1 serving again")
        assert load.refused == 0 and load.failed <= 3, (load.refused, load.failed)


def run_on(mesh, agent: str, prompt: str) -> str:
    """A run whose one task goes straight to ``agent`` (a replicated one: the daemon picks the
    replica); the task's id."""
    daemon = mesh.url("daemon")
    code, run = mesh.http("POST", daemon + "/runs", {"prompt": prompt})
    assert code == 201, run
    task = {"task_id": f"{run['run_id']}.0", "run_id": run["run_id"], "agent": agent, "parent_agent": "operator",
            "kind": "run", "prompt": prompt}
    assert mesh.http("POST", daemon + "/tasks", task)[0] in (200, 201)
    return task["task_id"]


def test_scaling_an_agent_down_hands_the_removed_replicas_task_to_a_sibling(mesh_factory):
    """`tron scale NAME 1` while both replicas work: the task of the replica scaled away is not
    failed, it goes to the one that stays (one attempt on, from its checkpoint) and is done."""
    import tomllib

    services = tomllib.loads((REPO / "mesh.toml").read_text())["services"]
    services["programmer-1"].update(replicas=2, port=6140)
    mesh = mesh_factory(services=services)
    mesh.up()
    assert mesh.http("PUT", mesh.url("llm-sim") + "/sim/faults/anthropic",
                     {"kind": "latency", "latency_ms": 2500})[0] == 200  # both are mid-task at the scale
    tasks = [run_on(mesh, "programmer-1", f"write haiku {i}") for i in range(2)]
    marks = ",".join("?" * len(tasks))
    rows = wait_for(lambda: (r := mesh.rows(f"SELECT task_id, agent, status FROM tasks WHERE task_id IN ({marks})",
                                            tuple(tasks)))
                    and {x["agent"] for x in r} == {"programmer-1.1", "programmer-1.2"}
                    and all(x["status"] == "running" for x in r) and r, 30, "both replicas working")
    moved = next(r["task_id"] for r in rows if r["agent"] == "programmer-1.2")
    proc = mesh.tron("scale", "programmer-1", "1", timeout=120)
    assert proc.returncode == 0, proc.stderr
    done = wait_for(lambda: (r := mesh.rows(f"SELECT task_id, agent, status, attempt FROM tasks WHERE task_id IN "
                                            f"({marks})", tuple(tasks)))
                    and all(x["status"] in ("done", "failed") for x in r) and r, 90, "both tasks to end")
    by_id = {r["task_id"]: r for r in done}
    assert by_id[moved]["status"] == "done" and by_id[moved]["agent"] == "programmer-1.1", by_id[moved]
    assert all(r["status"] == "done" for r in done), done
    handed = mesh.rows("SELECT payload FROM events WHERE kind = 'task_requeued' AND task_id = ?", (moved,))
    assert any('"from_agent": "programmer-1.2"' in (h["payload"] or "") for h in handed), handed
    mesh.http("DELETE", mesh.url("llm-sim") + "/sim/faults")


def test_a_task_waiting_for_an_operator_on_a_replica_scaled_away_waits_on_the_sibling_and_completes(mesh_factory):
    """Both providers down, the human rung on: each replica's task parks awaiting an operator.
    `tron scale NAME 1` must not throw the one of the replica scaled away away: it goes to the
    replica that stays, still awaiting the operator (no attempt spent), and the operator's
    approval completes it there."""
    import tomllib

    from tests.integration.test_providers import fault

    services = tomllib.loads((REPO / "mesh.toml").read_text())["services"]
    services["programmer-1"].update(replicas=2, port=6140)
    mesh = mesh_factory(services=services, policy={"ask_operator": True}, providers={"on_all_down": "fail"})
    mesh.up()
    fault(mesh, "anthropic", "error")
    fault(mesh, "ollama", "error")
    tasks = [run_on(mesh, "programmer-1", f"write haiku {i}") for i in range(2)]
    marks = ",".join("?" * len(tasks))
    query = f"SELECT task_id, agent, status, parked_reason, attempt FROM tasks WHERE task_id IN ({marks})"
    rows = wait_for(lambda: (r := mesh.rows(query, tuple(tasks)))
                    and {x["agent"] for x in r} == {"programmer-1.1", "programmer-1.2"}
                    and all(x["parked_reason"] == "awaiting_operator" for x in r) and r, 90,
                    "both replicas' tasks to park awaiting an operator")
    moved = next(r for r in rows if r["agent"] == "programmer-1.2")
    proc = mesh.tron("scale", "programmer-1", "1", timeout=120)
    assert proc.returncode == 0, proc.stderr
    mesh.flushed()
    after = {r["task_id"]: r for r in mesh.rows(query, tuple(tasks))}
    assert (after[moved["task_id"]]["agent"], after[moved["task_id"]]["status"],
            after[moved["task_id"]]["parked_reason"], after[moved["task_id"]]["attempt"]) == (
        "programmer-1.1", "parked", "awaiting_operator", moved["attempt"]), after
    [event] = mesh.rows("SELECT payload FROM events WHERE kind = 'task_moved' AND task_id = ?", (moved["task_id"],))
    assert '"from_agent": "programmer-1.2"' in event["payload"], event
    assert "parked: " + moved["task_id"] in mesh.tron("status").stdout
    mesh.http("DELETE", mesh.url("llm-sim") + "/sim/faults")
    for task_id in tasks:
        proc = mesh.tron("task", "approve", task_id, "--provider", "ollama", "--reason", "ollama is back")
        assert proc.returncode == 0, (task_id, proc.stdout, proc.stderr)
    done = wait_for(lambda: (r := mesh.rows(query, tuple(tasks))) and all(x["status"] in ("done", "failed") for x in r)
                    and r, 90, "both tasks to end")
    assert all((r["status"], r["agent"]) == ("done", "programmer-1.1") for r in done), done


def test_a_task_held_for_the_tops_decision_on_a_replica_scaled_away_is_decided_for_the_sibling(mesh_factory):
    """A runaway on anthropic climbs the ladder; the root is stopped, so the task waits
    escalated, held for a decision that has not come. `tron scale NAME 1` removes its replica:
    the task must not fail with it. It goes to the replica that stays, still held, and the
    daemon decides it there at once (not the watchdog, tens of seconds later): switched to
    ollama, it is done on the sibling."""
    import tomllib

    from tests.integration.test_providers import fault

    services = tomllib.loads((REPO / "mesh.toml").read_text())["services"]
    services["programmer-1"].update(replicas=2, port=6140)
    # alert_delivery_timeout: the watchdog's deadline for a held task (~35 s) is far off
    mesh = mesh_factory(services=services, policy={"progress_timeout": 1.5, "max_restarts": 1,
                                                   "alert_delivery_timeout": 10.0}, providers={"timeout": 60.0})
    mesh.up()
    assert mesh.tron("stop", "root", "--reason", "no top decision for now").returncode == 0
    fault(mesh, "anthropic", "hang")  # the call never returns; the agent keeps beating: no progress
    task_id = run_on(mesh, "programmer-1.2", "write a haiku")
    query = "SELECT agent, status, attempt, provider FROM tasks WHERE task_id = ?"
    held = wait_for(lambda: (r := mesh.rows(query, (task_id,))) and r[0]["status"] == "escalated" and r[0], 90,
                    "the task held for the top's decision")
    assert held["agent"] == "programmer-1.2", held
    proc = mesh.tron("scale", "programmer-1", "1", timeout=120)
    assert proc.returncode == 0, proc.stderr
    mesh.http("DELETE", mesh.url("llm-sim") + "/sim/faults/anthropic")
    done = wait_for(lambda: (r := mesh.rows(query, (task_id,))) and r[0]["status"] in ("done", "failed") and r[0],
                    60, "the moved task to end")
    assert (done["agent"], done["status"], done["provider"]) == ("programmer-1.1", "done", "ollama"), done
    mesh.flushed()
    [moved] = mesh.rows("SELECT payload FROM events WHERE kind = 'task_moved' AND task_id = ?", (task_id,))
    assert '"from_agent": "programmer-1.2"' in moved["payload"] and '"status": "escalated"' in moved["payload"], moved
    kinds = [r["kind"] for r in mesh.rows("SELECT kind FROM events WHERE task_id = ? AND kind LIKE '%decides' "
                                          "OR task_id = ? AND kind = 'held_task_moved'", (task_id, task_id))]
    assert kinds == ["held_task_moved"], kinds  # decided when it moved, not by the watchdog
    [switch] = mesh.rows("SELECT agent_id, to_provider, requested_by FROM retry_history WHERE task_id = ? "
                         "AND retry_type = 'llm_change'", (task_id,))
    assert (switch["agent_id"], switch["to_provider"]) == ("programmer-1.1", "ollama"), switch


def test_a_parent_delegates_to_the_replicas_a_scale_made_without_being_restarted(mesh_factory):
    """director-code delegates to its replicated child by the child's name (the daemon picks the
    replica): `tron scale` up and down leaves it running, its tasks reach a replica its own copy
    of the mesh file does not name, and none goes to a replica that is gone."""
    import tomllib

    services = tomllib.loads((REPO / "mesh.toml").read_text())["services"]
    services["programmer-1"].update(replicas=2, port=6140)
    mesh = mesh_factory(services=services)
    mesh.up()
    director = mesh.service("director-code")["pid"]
    assert mesh.tron("scale", "programmer-1", "3", timeout=120).returncode == 0
    for i in range(6):  # the daemon gives each task to the replica with the fewest: .3 gets one soon
        proc = mesh.tron("run", f"build part {i}", timeout=120)
        assert proc.returncode == 0, (proc.stdout, proc.stderr)
        if mesh.rows("SELECT 1 FROM tasks WHERE agent = 'programmer-1.3' AND status = 'done'"):
            break
    else:
        raise AssertionError("no task reached programmer-1.3")
    assert mesh.tron("scale", "programmer-1", "1", timeout=120).returncode == 0
    proc = mesh.tron("run", "after the scale down", timeout=120)
    assert proc.returncode == 0, (proc.stdout, proc.stderr)
    assert mesh.service("director-code")["pid"] == director  # never restarted by either scale
    assert not mesh.rows("SELECT agent, reason FROM alerts")
    assert not mesh.rows("SELECT task_id FROM tasks WHERE status != 'done'")
    # Every replica stopped: a task for the service is refused in the service's name.
    assert mesh.tron("stop", "programmer-1").returncode == 0
    proc = mesh.tron("run", "--agent", "programmer-1", "nobody takes this", timeout=60)
    assert proc.returncode != 0 and "programmer-1 is stopped by an operator" in proc.stderr \
        and "`tron start programmer-1`" in proc.stderr, (proc.stdout, proc.stderr)
