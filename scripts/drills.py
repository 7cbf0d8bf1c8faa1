"""`tron drill`: break the running mesh on purpose and check that it keeps its promises.

Each drill injects one fault, follows what the mesh does through the registry (events,
alerts, retry_history) and the comms log, prints a timeline relative to the fault, and
gives a verdict checked against the registry and the processes themselves, not against
the drill's own impressions. While a drill runs, the daemon labels every event, alert
and retry row with the drill's name, and production failure_metrics skip them.

    kill NAME            SIGKILL; expect process_exit, a restart, a new healthy tree
    hang NAME            SIGSTOP; expect heartbeat_timeout (or a probe failure), replaced
    runaway NAME         the agent keeps beating but its progress marker freezes;
                         expect no_progress, replaced
    provider-outage P    provider P fails every call; a drill run must still complete
                         on another provider, with no process killed for it
    node-loss NODE       (a Ray cluster) every process of one node dies at once; its
                         services must come back on other nodes, their tasks go on
    partition NODE --seconds S
                         (a Ray cluster) the node's link down for S seconds (scripts/partition.py):
                         its lease lapses, it ends its services; after the heal each runs
                         from one incarnation, the stale ones ended
    crash-loop NAME      kill it as soon as it is back, max_restarts + 2 times: it must come
                         back every time, with growing backoff, crash-looping after
                         max_restarts failures, escalated once for the episode
    chaos                random faults of every kind while runs are submitted; then the
                         invariants of `tron report` plus a process census

A drill passes only when the service is still healthy, from a new process tree, a few
seconds after its recovery, and no process of the old tree survives.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import socket
import time
import uuid
from dataclasses import dataclass, field
from typing import TextIO
from urllib.parse import quote, urlencode, urlsplit

import psutil

from tron.common.ladder import worst_case_attempts
from tron.common.states import FINAL_TASK_STATES, RunState, ServiceState
from tron.registry import read
from tron.registry.report import run_report
from tron.scripts.client import ClientError, MeshClient, wait_for
from tron.scripts.stats import summary
from tron.common.processes import describe, home_processes, same_process


# s a recovery is given beyond the policy's own bounds (start, beat timeout, backoff) before a drill gives up
RECOVERY_SLACK = 10.0
RECOVERY_SLACK_KNOB = "TRON_TEST_RECOVERY_SLACK"  # a test knob: a drill that must fail gives up sooner


class DrillError(Exception):
    pass


@dataclass
class Drill:
    name: str
    target: str
    t0: float = 0.0
    timeline: list[tuple[float, str, str]] = field(default_factory=list)
    checks: list[tuple[str, bool]] = field(default_factory=list)
    data: dict = field(default_factory=dict)
    progress: TextIO | None = None  # where each step is said as it happens (a drill of minutes)

    def mark(self, label: str, detail: str = "", at: float | None = None) -> None:
        t = (time.monotonic() if at is None else at) - self.t0
        self.timeline.append((t, label, detail))
        self._tell(t, f"{label}  {detail}")

    def say(self, text: str) -> None:
        """A step said as it happens, kept out of the timeline: what the drill waits for now."""
        self._tell(time.monotonic() - self.t0, f"({text})")

    def _tell(self, t: float, text: str) -> None:
        if self.progress is not None:
            print(f"{self.name} {t:8.2f}s  {text}", file=self.progress, flush=True)

    def check(self, what: str, ok: bool) -> bool:
        self.checks.append((what, bool(ok)))
        return bool(ok)

    @property
    def passed(self) -> bool:
        return bool(self.checks) and all(ok for _, ok in self.checks)

    def to_dict(self) -> dict:
        return {"drill": self.name, "target": self.target, "verdict": "pass" if self.passed else "fail",
                "timeline": [{"t": round(t, 4), "event": e, "detail": d} for t, e, d in sorted(self.timeline)],
                "checks": [{"check": c, "ok": ok} for c, ok in self.checks], **self.data}

    def render(self) -> str:
        lines = [f"drill {self.name} {self.target}"]
        for t, label, detail in sorted(self.timeline):
            lines.append(f"  {t:+9.3f}s  {label:<18} {detail}")
        for what, ok in self.checks:
            lines.append(f"  [{'ok' if ok else 'FAIL'}] {what}")
        lines.append(f"verdict: {'PASS' if self.passed else 'FAIL'}")
        return "\n".join(lines)


def _this_machine() -> set[str]:
    """This machine's addresses: a Ray node here is reached at loopback, as the daemon does."""
    found = {"127.0.0.1", "localhost", "::1"}
    with contextlib.suppress(OSError, psutil.Error):
        found |= {a.address for addrs in psutil.net_if_addrs().values() for a in addrs}
    return found


SIGNAL_NAMES = {"kill": "SIGKILL", "stop": "SIGSTOP", "cont": "SIGCONT"}
TIMELINE = {"alert_raised": "detected", "child_restart": "decision", "spawned": "restarted",
            "recovered": "recovered", "task_resumed": "task resumed", "escalation": "escalated",
            "llm_change": "provider switched", "permanent_failure": "permanent failure",
            "crash_loop_started": "crash-looping", "spawn_failed": "spawn failed"}


class Runner:
    """Drives one running mesh: HTTP through the client, reads through registry/read.py."""

    def __init__(self, mesh: MeshClient, progress: TextIO | None = None) -> None:
        self.mesh = mesh
        self.progress = progress  # a chaos drill says each step there as it goes
        self.config = mesh.config
        self.policy = mesh.config.policy
        self._reached: dict[str, str | None] = {}  # service -> the node its address was set for (reach)

    # -- plumbing ----------------------------------------------------------------------

    def wait(self, predicate, timeout: float, what: str, interval: float = 0.01):
        return wait_for(predicate, timeout, what, interval, error=DrillError)

    def db(self):
        """The registry, read directly. The daemon records behind what it decides
        (registry/journal.py): let it write what it has first, so that a check never
        takes the journal's lag for a fault (an old session still open, say)."""
        self.flushed()
        return read.connect(self.mesh.registry())

    def flushed(self, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                registry = self.mesh.status().get("registry") or {}
            except ClientError:
                return  # no daemon: nothing is pending
            if registry.get("state") != "ok" or not registry.get("pending"):
                return  # written, or degraded (which `tron status` and the report say loudly)
            time.sleep(0.01)

    def service(self, name: str) -> dict:
        self.known(name)
        return self.mesh.service(name)

    def known(self, name: str) -> None:
        """A service of the mesh file; otherwise a DrillError that says what there is."""
        if name not in self.config.services:
            if replicas := self.config.replicas_of(name):  # a fault hits one process: one replica
                raise DrillError(f"{name} has replicas: drill one of them ({', '.join(replicas)}); its siblings "
                                 "go on serving meanwhile")
            raise DrillError(f"no service named {name!r} (known: {', '.join(self.config.services)})")

    def label(self, name: str | None) -> None:
        code, body = self.mesh.try_call("POST", self.mesh.daemon_url + "/control/drill", {"name": name}, auth=True)
        if code != 200:
            raise DrillError(f"the daemon refused to label the drill: {body}")

    def run_status(self, run_id: str) -> dict | None:
        """From the daemon, which no drill breaks (the gateway may be down)."""
        code, run = self.mesh.try_call("GET", self.mesh.daemon_url + f"/runs/{run_id}")
        return run if code == 200 and run["status"] != RunState.RUNNING else None

    def comms_since(self, t0: float) -> list[dict]:
        path = self.mesh.home.comms_log
        out = []
        if path.exists():
            for line in path.read_text(errors="replace").splitlines():
                try:
                    item = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if item.get("mono", 0) >= t0:
                    out.append(item)
        return out

    def recovery_bound(self) -> float:
        p = self.policy
        return p.start_timeout + p.beat_timeout + p.backoff_max + float(os.environ.get(RECOVERY_SLACK_KNOB)
                                                                         or RECOVERY_SLACK)

    def settle_time(self) -> float:
        """How long a recovered service must stay up, from the same new tree, to pass."""
        return max(1.0, min(2 * self.policy.beat_timeout, 10.0))

    def back(self, name: str, old_incarnation: str, timeout: float) -> dict:
        """Until a new incarnation of ``name`` is running and answers (an agent's /health
        names it; a program's state is running with a new pid)."""
        def fresh():
            s = self.mesh.service(name)
            if s["state"] != ServiceState.RUNNING or s["incarnation"] == old_incarnation or not s["pid"]:
                return None
            if self.config.services[name].is_agent:
                self.reach(s)
                h = self.mesh.health(name)
                return s if h and h.get("incarnation") == s["incarnation"] else None
            return s
        return self.wait(fresh, timeout, f"{name} to come back from a new incarnation")

    def reach(self, row: dict) -> None:
        """Ask a service on another machine's Ray node at that node's address (the daemon's
        status says which node, and its address), one on this machine at loopback."""
        name, ip = row["name"], None
        if self._reached.get(name, "?") == row.get("node"):
            return  # known already: no status call in a recovery's tight poll
        self._reached[name] = row.get("node")
        if row.get("node"):
            nodes = (self.mesh.status().get("cluster") or {}).get("nodes") or []
            ip = next((n["ip"] for n in nodes if n["node"] == row["node"]), None)
        if ip and ip not in _this_machine():
            self.config.hosts[name] = ip
        else:
            self.config.hosts.pop(name, None)

    def stays_up(self, drill: Drill, name: str, fresh: dict) -> None:
        """The recovery holds: the same new incarnation stays running for the settle time."""
        deadline = time.monotonic() + self.settle_time()
        while time.monotonic() < deadline:
            s = self.mesh.service(name)
            if s["incarnation"] != fresh["incarnation"] or s["state"] != ServiceState.RUNNING:
                drill.check(f"still healthy {self.settle_time():.1f}s after recovery (it went {s['state']}, "
                            f"incarnation {s['incarnation']})", False)
                return
            time.sleep(0.05)
        drill.check(f"still healthy from the same new tree {self.settle_time():.1f}s after recovery", True)

    def _port_of(self, name: str, before: dict) -> tuple[str, int] | None:
        """Where a program listens of its own, reached from here: None for a socket the daemon
        holds (it takes connections whoever serves it) or a service on another node."""
        spec = self.config.services[name]
        if spec.holds_socket or before.get("node") or not spec.port:
            return None
        url = urlsplit(self.mesh.url(name))
        return (url.hostname or "127.0.0.1", url.port or spec.port)

    @staticmethod
    def _takes_connections(where: tuple[str, int]) -> bool:
        try:
            socket.create_connection(where, timeout=1.0).close()
            return True
        except OSError:
            return False

    def old_tree_gone(self, drill: Drill, before: dict) -> None:
        """Read where the old incarnation ran, by the daemon (its node agent on a Ray node)."""
        if not before["pid"]:
            drill.check("no process of the old tree survives", True)
            return
        query = urlencode({"incarnation": before["incarnation"], "pid": before["pid"], "node": before.get("node") or ""})
        code, body = self.mesh.try_call("GET", f"{self.mesh.daemon_url}/services/{quote(before['name'])}/processes?"
                                               f"{query}", auth=True)
        if code != 200:
            drill.check(f"no process of the old tree survives (not known: the daemon answered {code}: {body})", False)
            return
        survivors = body["processes"]
        drill.check("no process of the old tree survives" + (f": {survivors}" if survivors else ""), not survivors)

    def signal(self, drill: Drill, name: str, before: dict, what: str, *, starts: bool = True) -> str:
        """A drill's fault through the daemon (``POST /services/{name}/signal``): it signals the
        incarnation where it runs (its pid here, or through its Ray node's agent), never a pid
        of the machine this drill runs on. The drill's clock starts when the daemon sent it."""
        code, body = self.mesh.try_call("POST", f"{self.mesh.daemon_url}/services/{quote(name)}/signal",
                                        {"signal": what, "incarnation": before["incarnation"],
                                         "reason": f"drill {drill.name}"}, auth=True)
        if code != 200:
            raise DrillError(f"the daemon did not {what} {name}: ({code}) {body}")
        if starts and drill.t0 <= body.get("sent_mono", 0) <= time.monotonic():  # the daemon's clock is ours
            drill.t0 = body["sent_mono"]
        return f"{SIGNAL_NAMES[what]} pid {body['pid']}" + (f" on node {body['node'][:12]}" if body["node"] else "")

    def cont(self, name: str, incarnation: str) -> None:
        """Never leave a drill's stopped process behind (a replaced one is ended already: 409)."""
        code, body = self.mesh.try_call("POST", f"{self.mesh.daemon_url}/services/{quote(name)}/signal",
                                        {"signal": "cont", "incarnation": incarnation,
                                         "reason": "drill over: a stopped process is let go on"}, auth=True)
        if code not in (200, 409, 404):
            print(f"tron drill: could not let {name} ({incarnation}) go on: ({code}) {body}")

    # -- the shared shape of a single-fault drill ------------------------------------------

    def _single(self, drill: Drill, name: str, inject, expected: set[str], *, detection: float = 0.0) -> Drill:
        """``detection``: how long the fault takes to be noticed at the earliest (a runaway's
        progress_timeout), waited on top of the recovery bound."""
        before = self.service(name)
        if before["state"] != ServiceState.RUNNING or not before["pid"]:
            raise DrillError(f"{name} is {before['state']}: a drill needs it running (see `tron status`)")
        self.label(f"{drill.name}:{name}:{uuid.uuid4().hex[:6]}")
        fresh, t_healthy = None, None
        served = self._port_of(name, before)
        if served is not None and not self._takes_connections(served):
            served = None  # it did not serve its port before the fault: nothing to ask of it after
        try:
            drill.t0 = time.monotonic()
            detail = inject(before)  # it may move t0 to when the daemon sent the fault
            drill.mark("fault injected", detail, at=drill.t0)
            with self.verdict_on_timeout(drill, name):
                fresh = self.back(name, before["incarnation"], detection + self.recovery_bound())
                t_healthy = time.monotonic()
                # Rows are written as the ladder acts; wait for the ones the verdict reads.
                with self.db() as conn:
                    self.wait(lambda: read.alerts_of(conn, name, before["incarnation"])
                              and (read.session(conn, before["incarnation"]) or {}).get("status") == "ended",
                              10, "the alert and the old session's end to be recorded", interval=0.02)
                self.stays_up(drill, name, fresh)
                if served is not None:  # whatever its probes say: the port it served before serves again
                    what = f"its port {served[1]} takes connections again, as before the fault"
                    try:
                        self.wait(lambda: self._takes_connections(served), 5.0, what, interval=0.05)
                        drill.check(what, True)
                    except DrillError:
                        drill.check(what, False)
        finally:
            self.label(None)
        self._timeline_from_registry(drill, name, before["incarnation"])
        if fresh is not None:
            drill.mark("healthy again", f"pid {fresh['pid']} incarnation {fresh['incarnation']}", at=t_healthy)
        with self.db() as conn:
            alerts = read.alerts_of(conn, name, before["incarnation"])
            rows = read.retries_since(conn, name, drill.t0)
            old = read.session(conn, before["incarnation"])
        drill.check(f"one alert for the failed incarnation, reason in {sorted(expected)}",
                    len(alerts) == 1 and alerts[0]["reason"] in expected)
        alert_ids = {a["alert_id"] for a in alerts}
        restarts = [r for r in rows if r["retry_type"] == "child_restart" and r["alert_id"] in alert_ids]
        drill.check("one child_restart row for that alert, with a real reason",
                    len(restarts) == 1 and bool(restarts[0]["reason"]))
        drill.check("rows labelled as drill traffic", all(r["drill"] for r in rows) and all(a["drill"] for a in alerts))
        drill.check("the old session is closed", bool(old) and old["status"] == "ended")
        self.old_tree_gone(drill, before)
        drill.data["recovery_seconds"] = None if t_healthy is None else round(t_healthy - drill.t0, 4)
        return drill

    @contextlib.contextmanager
    def verdict_on_timeout(self, drill: Drill, name: str):
        """Once the fault is injected, a wait that runs out is the drill's answer, not an
        error: a failed check saying what was awaited and where the service is, and the
        drill goes on to its timeline and verdict (FAIL, exit 1). Exit 2 is left for a
        drill that could not start."""
        try:
            yield
        except DrillError as err:
            try:
                s = self.mesh.service(name)
                where = f"{name} is {s['state']}" + (f", last failure {s['last_failure'].get('reason')}"
                                                    if s.get("last_failure") else "")
            except ClientError as gone:
                where = f"the daemon does not answer ({gone})"
            drill.mark("gave up", str(err))
            drill.check(f"recovered in time: {err}; {where}", False)

    def _timeline_from_registry(self, drill: Drill, name: str, incarnation: str) -> None:
        with self.db() as conn:
            events = read.events_since(conn, drill.t0, name)
        for ev in events:
            if ev["kind"] not in TIMELINE:
                continue
            p = ev["payload"]
            detail = {"alert_raised": lambda: f"{p.get('reason')} {p.get('detail', {})}",
                      "child_restart": lambda: f"restart by {p.get('requested_by')} ({p.get('case')}): "
                                               f"{p.get('reason')}",
                      "spawned": lambda: f"pid {p.get('pid')} ({p.get('mode')})"}.get(
                ev["kind"], lambda: json.dumps(p)[:80])()
            drill.mark(TIMELINE[ev["kind"]], detail, at=ev["mono"])
        for msg in self.comms_since(drill.t0):
            if msg["kind"] == "alert" and msg.get("agent") == name and msg.get("incarnation") == incarnation:
                drill.mark("alert delivered", f"to {msg['dst']}", at=msg["mono"])

    # -- drills -------------------------------------------------------------------------------

    def kill(self, name: str) -> Drill:
        drill = Drill("kill", name)
        return self._single(drill, name, lambda before: self.signal(drill, name, before, "kill"), {"process_exit"})

    def hang(self, name: str) -> Drill:
        drill = Drill("hang", name)
        stopped: list[str] = []

        def inject(before):
            stopped.append(before["incarnation"])
            return self.signal(drill, name, before, "stop")
        try:
            drill = self._single(drill, name, inject, {"heartbeat_timeout", "liveness_failed"})
        finally:
            # Whatever happened (a timeout, Ctrl-C), never leave a process stopped behind us.
            for incarnation in stopped:
                self.cont(name, incarnation)
        detected = [t for t, label, _ in drill.timeline if label == "detected"]
        spec = self.config.services[name]
        if spec.is_agent:
            bound = self.policy.beat_timeout
        else:  # its liveness probe, or the stopped-process check at that probe's cadence
            from tron.common.config import STOPPED_CADENCE

            probe = spec.liveness or STOPPED_CADENCE
            bound = probe.interval * probe.failure_threshold + probe.timeout
        drill.check(f"detected within the threshold ({bound:.2f}s) plus 1 s", bool(detected) and detected[0] <= bound + 1)
        return drill

    def _tron_agent(self, name: str, drill: str, why: str) -> None:
        """``name`` runs on Tron's agent runtime (a built-in role or an SDK class), which
        serves what ``drill`` needs (``why``); a program, contract agents among them, does not."""
        self.known(name)
        if not self.config.services[name].is_agent:
            raise DrillError(f"{name!r} is a program (command = ...), not an agent on Tron's runtime (a built-in "
                             f"role or an SDK class): the {drill} drill {why}")

    def runaway(self, name: str) -> Drill:
        self._tron_agent(name, "runaway", "freezes a task's progress through the agent's /drill/runaway")
        if not self.config.drills.enabled:
            raise DrillError("drills are off in this mesh ([drills] enabled = false): no agent serves /drill/runaway")

        def inject(before):
            code, body = self.mesh.try_call("POST", self.mesh.url(name) + "/drill/runaway", {}, auth=True)
            if code != 202:
                raise DrillError(f"{name} refused the runaway drill: {body}")
            return f"progress frozen on task {body['task_id']} (beats continue)"
        drill = self._single(Drill("runaway", name), name, inject, {"no_progress"},
                             detection=self.policy.progress_timeout)
        detected = [t for t, label, _ in drill.timeline if label == "detected"]
        drill.check(f"caught after progress_timeout ({self.policy.progress_timeout:.1f}s), not before",
                    bool(detected) and self.policy.progress_timeout - 0.1 <= detected[0]
                    <= self.policy.progress_timeout + self.policy.heartbeat_interval + 1)
        return drill

    def resume(self, name: str) -> Drill:
        """Kill an agent between two steps of its task: the next incarnation must resume
        after the last checkpoint, with its output, not redo it. The work saved is counted
        in LLM calls (llm-sim's counters): the run, the same run uninterrupted, and what it
        would have cost without checkpoints."""
        self._tron_agent(name, "resume", "kills it between two checkpointed steps of the runtime's own")
        sim = self.config.sim_url
        if sim is None:
            raise DrillError("the resume drill counts the LLM calls it saves in llm-sim; this mesh has no llm-sim service")
        self._gateway()  # its runs go in through the gateway
        before = self.service(name)
        provider = before["provider"] or self.config.providers.default
        self.label(f"resume:{name}:{uuid.uuid4().hex[:6]}")
        drill = Drill("resume", name)
        try:
            baseline = self._llm_calls_of_a_run(sim, provider)
            self.mesh.try_call("PUT", f"{sim}/sim/faults/{provider}", {"kind": "latency", "latency_ms": 700},
                               auth=True)
            calls0 = self._served(sim, provider)
            drill.t0 = time.monotonic()
            drill.mark("baseline", f"an uninterrupted run made {baseline} LLM calls")
            run_id = self._start_run("drill: resume")
            with self.db() as conn:
                task_id, mark = self.wait(lambda: next(((t["task_id"], c) for t in read.tasks_of(conn, run_id, name)
                                                        for c in read.task_checkpoints(conn, t["task_id"])), None),
                                          self.recovery_bound(), f"{name} to record its first step", interval=0.02)
            victim = self.service(name)
            done = self.signal(drill, name, victim, "kill", starts=False)  # this drill's clock runs from the run
            drill.mark("fault injected", f"{done} after step {mark['step']} ({mark['step_id']})")
            self.mesh.try_call("DELETE", f"{sim}/sim/faults/{provider}", auth=True)
            run = self.wait(lambda: self.run_status(run_id), self.recovery_bound() * 3, "the run to end", interval=0.05)
            calls = self._served(sim, provider) - calls0
        finally:
            self.mesh.try_call("DELETE", f"{sim}/sim/faults/{provider}", auth=True)
            self.label(None)
        with self.db() as conn:
            marks = read.task_checkpoints(conn, task_id)
            resumed = [e for e in read.task_events(conn, task_id) if e["kind"] == "task_resumed"]
        drill.mark(f"run {run['status']}", run_id)
        done_before = mark["step"]
        drill.check("the run completed", run["status"] == RunState.DONE)
        drill.check(f"resumed after step {done_before}, handed its checkpoint",
                    bool(resumed) and (resumed[-1]["payload"] or {}).get("checkpoint") == done_before)
        drill.check("the completed steps were kept, by the incarnation that did them",
                    all(m["incarnation"] == victim["incarnation"] for m in marks if m["step"] <= done_before))
        redone = calls - baseline - 1  # one call was cut short by the kill and had to be made again
        drill.check(f"no completed step redone ({calls} LLM calls; {baseline} uninterrupted)", redone <= 0)
        drill.data.update(llm_calls=calls, uninterrupted=baseline, steps_kept=done_before,
                          calls_saved=done_before, without_checkpoints=baseline + 1 + done_before)
        return drill

    def _cluster_node(self, key: str, drill: str) -> tuple[dict, dict]:
        """The mesh's cluster status and its one node ``key`` names (4+ characters of its id, or
        its address); a DrillError saying why not."""
        cluster = self.mesh.status().get("cluster")
        if not cluster:
            raise DrillError(f"not a cluster: {drill} needs [cluster] engine = \"ray\" (see README, "
                             "\"Running on several machines\")")
        nodes = [n for n in cluster["nodes"] if n["node"].startswith(key) or n["ip"] == key]
        if len(nodes) != 1:
            raise DrillError(f"{len(nodes)} nodes match {key!r}; known: "
                             + ", ".join(f"{n['node'][:12]} ({n['ip']})" for n in cluster["nodes"]))
        return cluster, nodes[0]

    def node_loss(self, key: str) -> Drill:
        """Lose a whole Ray node (every process its node agent runs dies at once, then the
        agent): every service placed there must come back on a surviving node, from a new
        incarnation, and every task it held must end or resume. The node takes no new
        services until the drill ends."""
        cluster, node = self._cluster_node(key, "node-loss")
        survivors = [n for n in cluster["nodes"] if n is not node and n["alive"] and n["agent_pid"]
                     and not n["cordoned"]]
        if not node["agent_pid"] or not node["services"]:
            raise DrillError(f"node {node['node'][:12]} runs no service: losing it would prove nothing")
        if not survivors:
            raise DrillError("no other live node to place its services on")
        before = {name: self.service(name) for name in node["services"]}
        with self.db() as conn:
            tasks = {t["task_id"]: t for name in before for t in read.open_tasks_of(conn, name)}
        drill = Drill("node-loss", f"{node['node'][:12]} ({', '.join(before)})")
        self.label(f"node-loss:{node['node'][:8]}:{uuid.uuid4().hex[:6]}")
        url = f"{self.mesh.daemon_url}/nodes/{node['node']}"
        try:
            drill.t0 = time.monotonic()
            code, body = self.mesh.try_call("POST", url + "/lose", {"reason": "drill node-loss"}, auth=True)
            if code != 200:
                raise DrillError(f"the daemon refused to lose the node: {body}")
            drill.mark("fault injected", f"node {node['node'][:12]} lost: {len(body.get('pids', []))} processes")
            fresh = {}
            for name, old in before.items():
                fresh[name] = self.back(name, old["incarnation"], self.recovery_bound())
                drill.mark("healthy again", f"{name} pid {fresh[name]['pid']} on {(fresh[name]['node'] or '')[:12]}")
            drill.data["recovery_seconds"] = round(time.monotonic() - drill.t0, 4)
            for name in before:
                self.stays_up(drill, name, fresh[name])
            if tasks:
                self.wait(lambda: self._tasks_went_on(tasks, drill.t0), self.recovery_bound() * 3,
                          "every task of the lost node to end or resume", interval=0.05)
        finally:
            self.mesh.try_call("POST", url + "/restore", {"reason": "drill node-loss ended"}, auth=True)
            self.label(None)
        for name, old in before.items():
            self._timeline_from_registry(drill, name, old["incarnation"])
            drill.check(f"{name} is back on another node", bool(fresh[name]["node"]) and fresh[name]["node"] != node["node"])
            with self.db() as conn:
                alerts = read.alerts_of(conn, name, old["incarnation"])
                old_session = read.session(conn, old["incarnation"])
            drill.check(f"{name}: one alert for the lost incarnation", len(alerts) == 1)
            drill.check(f"{name}: the old session is closed", bool(old_session) and old_session["status"] == "ended")
        if tasks:
            drill.check(f"every task it held ({len(tasks)}) ended or resumed", self._tasks_went_on(tasks, drill.t0))
        drill.data.update(node=node["node"], services=sorted(before), tasks=sorted(tasks))
        return drill

    def partition(self, key: str, seconds: float) -> Drill:
        """Partition a Ray node from this machine for ``seconds`` (its link down, then up): the
        node's lease lapses and it ends its own services; when the daemon notices, they come
        back on another node; after the heal, every one of them runs from exactly one
        incarnation, the replaced ones' sessions closed. A partition shorter than the
        detection may change nothing but the services' beats: that passes too."""
        from tron.scripts.partition import PartitionError, cut, link_to

        cluster, node = self._cluster_node(key, "partition")
        if not 0 < seconds <= 600:
            raise DrillError(f"--seconds {seconds:g}: give 0 < S <= 600")
        try:
            dev = link_to(node["ip"])
        except PartitionError as err:
            raise DrillError(str(err)) from None
        before = {name: self.service(name) for name in node["services"]}
        drill = Drill("partition", f"{node['node'][:12]} ({node['ip']}, link {dev}) for {seconds:g}s")
        self.label(f"partition:{node['node'][:8]}:{uuid.uuid4().hex[:6]}")
        moved: dict[str, dict] = {}
        try:
            with cut(dev):
                drill.t0 = time.monotonic()
                drill.mark("fault injected", f"link {dev} down: {node['ip']} cut off from this machine")
                while time.monotonic() - drill.t0 < seconds:
                    for name, old in before.items():
                        s = self.mesh.service(name)
                        if name not in moved and s["incarnation"] != old["incarnation"] \
                                and s["state"] == ServiceState.RUNNING:
                            moved[name] = {**s, "after": round(time.monotonic() - drill.t0, 4)}
                            drill.mark("healthy elsewhere", f"{name} pid {s['pid']} on {(s['node'] or '')[:12]}")
                    time.sleep(0.05)
            drill.mark("healed", f"link {dev} up")
            drill.data["healed_at"] = round(time.monotonic() - drill.t0, 4)
            for name, old in before.items():  # after the heal: one incarnation each, running
                fresh = self.wait(lambda: (s := self.mesh.service(name))["state"] == ServiceState.RUNNING and s,
                                  self.recovery_bound(), f"{name} to run after the heal")
                drill.check(f"{name} runs after the heal", True)
                if fresh["incarnation"] == old["incarnation"]:
                    continue
                with self.db() as conn:
                    ended = self.wait(lambda: (row := read.session(conn, old["incarnation"])) and
                                      row["status"] == "ended" and row, self.recovery_bound(),
                                      f"{name}'s stale incarnation to end", interval=0.1)
                drill.check(f"{name}: the stale incarnation {old['incarnation']} ended", bool(ended))
        except PartitionError as err:
            raise DrillError(str(err)) from None
        finally:
            self.label(None)
        drill.data.update(node=node["node"], link=dev, seconds=seconds, services=sorted(before),
                          moved={name: {"after": m["after"], "node": m["node"]} for name, m in moved.items()})
        return drill

    def _tasks_went_on(self, tasks: dict[str, dict], t0: float) -> bool:
        with self.db() as conn:
            for task_id in tasks:
                row = read.task(conn, task_id) or {}
                if row.get("status") in FINAL_TASK_STATES:
                    continue
                if not any(e["kind"] == "task_resumed" and e["mono"] >= t0 for e in read.task_events(conn, task_id)):
                    return False
        return True

    def _start_run(self, prompt: str) -> str:
        code, body = self.mesh.try_call("POST", self.mesh.url(self._gateway()) + "/runs",
                                        {"prompt": prompt, "drill": True}, auth=True)
        if code != 202:
            raise DrillError(f"the gateway refused the drill run: {body}")
        return body["run_id"]

    def _served(self, sim: str, provider: str) -> int:
        code, body = self.mesh.try_call("GET", f"{sim}/sim/faults")
        return body["providers"][provider]["counters"]["served"] if code == 200 else 0

    def _llm_calls_of_a_run(self, sim: str, provider: str) -> int:
        before = self._served(sim, provider)
        run_id = self._start_run("drill: baseline")
        self.wait(lambda: self.run_status(run_id), self.recovery_bound() * 3, "the baseline run", interval=0.05)
        return self._served(sim, provider) - before

    def provider_outage(self, provider: str) -> Drill:
        drill = Drill("provider-outage", provider)
        sim = self.config.sim_url
        if sim is None:
            raise DrillError("provider-outage needs the llm-sim service")
        self.label(f"provider-outage:{provider}:{uuid.uuid4().hex[:6]}")
        try:
            drill.t0 = time.monotonic()
            code, body = self.mesh.try_call("PUT", f"{sim}/sim/faults/{provider}", {"kind": "error"}, auth=True)
            if code != 200:
                raise DrillError(f"llm-sim refused the fault: {body}")
            drill.mark("fault injected", f"{provider}: every call answers 500")
            code, body = self.mesh.try_call("POST", self.mesh.url(self._gateway()) + "/runs",
                                            {"prompt": "drill: provider outage", "drill": True}, auth=True)
            if code != 202:
                raise DrillError(f"the gateway refused the drill run: {body}")
            run_id = body["run_id"]
            drill.mark("run submitted", run_id)
            bound = self.policy.task_timeout * worst_case_attempts(self.policy) + 60
            run = self.wait(lambda: self.run_status(run_id), bound, "the drill run to end", interval=0.05)
            drill.mark(f"run {run['status']}", run_id)
        finally:
            self.mesh.try_call("DELETE", f"{sim}/sim/faults/{provider}", auth=True)
            # The outage opened the provider for the whole mesh; the drill's outage is over, so
            # put it back rather than leave later runs to wait for its next probe (audited).
            code, state = self.mesh.try_call("GET", f"{self.mesh.daemon_url}/providers", auth=True)
            if code == 200 and any(p["provider"] == provider and p["state"] != "closed" for p in state["providers"]):
                self.mesh.try_call("POST", f"{self.mesh.daemon_url}/providers/{provider}/restore",
                                   {"reason": "drill over: the injected outage ended", "actor": "drill"}, auth=True)
                drill.mark("provider restored", f"{provider}: closed again after the drill")
            self.label(None)
        with self.db() as conn:
            rows = read.retries_of_run(conn, run_id)
            stored = read.run(conn, run_id)
        for r in rows:
            label = {"llm_change": "provider switched", "child_restart": "restart", "escalation": "escalated",
                     "permanent_failure": "permanent failure",
                     "provider_retry": "retried in place"}.get(r["retry_type"], r["retry_type"])
            drill.mark(label, f"{r['agent_id']}: {r['reason']} {r['from_provider'] or ''}"
                              f"{' -> ' + r['to_provider'] if r['to_provider'] else ''}", at=r["mono"])
        switches = [r for r in rows if r["retry_type"] == "llm_change"]
        drill.check("the run completed despite the outage", run["status"] == RunState.DONE)
        drill.check(f"work moved off {provider}", bool(switches) and all(r["from_provider"] == provider for r in switches))
        drill.check("every row has a real reason", all(r["reason"] for r in rows))
        drill.check("no process was killed for the provider's outage",
                    not [r for r in rows if r["retry_type"] == "child_restart"])
        drill.check("the run is labelled as a drill", bool(stored) and stored["drill"] == 1)
        drill.data["run_id"] = run_id
        return drill

    def _gateway(self) -> str:
        gw = next((n for n, s in self.config.services.items() if s.role == "gateway"), None)
        if gw is None:
            raise DrillError("this drill submits its runs through the gateway; this mesh has no gateway service")
        return gw

    def crash_loop(self, name: str) -> Drill:
        """Kill each new incarnation as soon as it is back (before min_uptime: an unstable
        failure every time). It must come back every time, with growing backoff; after
        max_restarts failures it is crash-looping, escalated once for the episode."""
        drill = Drill("crash-loop", name)
        before = self.service(name)
        if before["state"] != ServiceState.RUNNING or not before["pid"]:
            raise DrillError(f"{name} is {before['state']}: a drill needs it running")
        kills_wanted = self.policy.max_restarts + 2
        self.label(f"crash-loop:{name}:{uuid.uuid4().hex[:6]}")
        current, returns, looping_at = before, [], None
        try:
            drill.t0 = time.monotonic()
            with self.verdict_on_timeout(drill, name):
                for kill in range(1, kills_wanted + 1):
                    done = self.signal(drill, name, current, "kill", starts=False)
                    drill.mark("fault injected", f"#{kill} {done}")
                    t_kill = time.monotonic()
                    current = self.back(name, current["incarnation"], self.recovery_bound())
                    returns.append(round(time.monotonic() - t_kill, 3))
                    drill.mark("back", f"pid {current['pid']} after {returns[-1]:.3f}s")
                    if looping_at is None and current["crash_looping"]:
                        looping_at = kill
                self.stays_up(drill, name, current)
        finally:
            self.label(None)
        with self.db() as conn:
            rows = read.retries_since(conn, name, drill.t0)
        for r in rows:
            drill.mark(r["retry_type"], f"{r['case_id']}: {r['reason']} by {r['hop'] or r['requested_by']}",
                       at=r["mono"])
        restarts = [r for r in rows if r["retry_type"] == "child_restart"]
        delays = [r["detail"].get("delay", 0.0) for r in restarts]
        episodes = {r["alert_id"] for r in rows
                    if r["retry_type"] == "escalation" and r["detail"].get("kind") == "crash_loop"}
        drill.check(f"back after every one of {kills_wanted} kills", len(returns) == kills_wanted)
        drill.check(f"crash-looping by failure {self.policy.max_restarts} (was: {looping_at})",
                    looping_at is not None and looping_at <= self.policy.max_restarts)
        drill.check(f"one crash-loop escalation for the episode (found {len(episodes)})", len(episodes) == 1)
        drill.check(f"one restart per failure ({len(restarts)} for {kills_wanted})", len(restarts) == kills_wanted)
        drill.check(f"first restart immediate, then backoff grows: {[round(d, 3) for d in delays]}",
                    bool(delays) and delays[0] == 0 and all(b >= a * 0.79 for a, b in zip(delays[1:], delays[2:]))
                    and (len(delays) < 3 or delays[-1] > 0))
        drill.data.update(kills=kills_wanted, back_after=returns, delays=delays)
        return drill

    # -- handover ----------------------------------------------------------------------------

    def handover(self, name: str, kills: int = 10, path: str = "/health", workers: int = 2,
                 interval: float = 1.0) -> Drill:
        """Kill ``name`` ``kills`` times while clients ask it in a tight loop. With the
        socket held by the daemon nobody is refused: requests wait in the backlog for the
        next incarnation; only those inside the killed process fail."""
        from tron.scripts.loadloop import RequestLoop

        before = self.service(name)
        spec = self.config.services[name]
        drill = Drill("handover", f"{name}: {kills} kills under {workers} request loop(s)")
        held = spec.holds_socket
        drill.t0 = time.monotonic()
        drill.mark("socket", "held by the daemon (LISTEN_FDS)" if held else "bound by the program itself")
        current, back_after = before, []
        self.label(f"handover:{name}")
        try:
            with RequestLoop(spec.port, path, workers=workers) as loop:
                time.sleep(interval)
                warm = loop.counts.answered
                for n in range(1, kills + 1):
                    done = self.signal(drill, name, current, "kill", starts=False)
                    t_kill = time.monotonic()
                    drill.mark("fault injected", f"#{n} {done}")
                    current = self.back(name, current["incarnation"], self.recovery_bound())
                    back_after.append(round(time.monotonic() - t_kill, 3))
                    drill.mark("back", f"pid {current['pid']} after {back_after[-1]:.3f}s")
                    time.sleep(interval)
        finally:
            self.label(None)
        counts = loop.counts.summary()
        drill.mark("loop stopped", f"{counts['answered']} answered, {counts['refused']} refused, "
                                   f"{counts['failed']} failed")
        drill.check(f"answered before the first kill ({warm})", warm > 0)
        drill.check(f"back after every one of {kills} kills", len(back_after) == kills)
        drill.check(f"no request refused ({counts['refused']})", counts["refused"] == 0)
        drill.check(f"only requests inside a killed process failed ({counts['failed']} <= {kills} kills x "
                    f"{workers} loops)", counts["failed"] <= kills * workers)
        drill.data.update(summary={"kills": kills, "workers": workers, "socket": "held" if held else "own",
                                   "back_after": back_after, **counts})
        drill.data["latency"] = {k: counts[k] for k in ("p50_ms", "p99_ms", "max_ms")}
        return drill

    # -- chaos --------------------------------------------------------------------------------

    def chaos(self, faults: int, duration: float, seed: int | None) -> Drill:
        rng = random.Random(seed)
        drill = Drill("chaos", f"{faults} faults / {duration:.0f}s (seed {seed})", progress=self.progress)
        names = list(self.config.services)
        agents = [n for n in names if self.config.services[n].is_agent]
        kinds = ["kill", "kill", "hang", "provider"]
        if self.policy.progress_timeout <= duration / 3 and self.config.drills.enabled:
            kinds.append("runaway")
        counts = {k: 0 for k in ("kill", "hang", "runaway", "provider")}
        runs: list[str] = []
        pending: list[tuple[str, str]] = []  # (service, incarnation) hit by a process fault
        stopped: list[tuple[str, str]] = []  # (service, incarnation) a hang stopped
        label = f"chaos:{seed}:{uuid.uuid4().hex[:6]}"
        self.label(label)
        try:
            drill.t0 = time.monotonic()
            schedule = sorted(rng.uniform(0, duration) for _ in range(faults))
            next_run = 0.0
            for at in schedule:
                while time.monotonic() - drill.t0 < at:
                    if time.monotonic() - drill.t0 >= next_run:
                        runs += self._submit_drill_run()
                        next_run += max(2.0, duration / 10)
                    time.sleep(0.02)
                kind = rng.choice(kinds)
                give_up = time.monotonic() + 3.0  # every target of that kind may be down at this instant
                while time.monotonic() < give_up:
                    running = [x["name"] for x in self.mesh.status()["services"]
                               if x["state"] == ServiceState.RUNNING and x["pid"]]
                    pool = [n for n in (agents if kind == "runaway" else names) if n in running or kind == "provider"]
                    target = rng.choice(pool) if pool else None
                    incarnation = self.mesh.service(target)["incarnation"] if target else None
                    done = self._chaos_fault(kind, target, incarnation, rng, stopped) if target else None
                    if done:
                        counts[kind] += 1
                        drill.mark(f"fault {kind}", done)
                        if kind != "provider":
                            pending.append((target, incarnation))
                        break
                    time.sleep(0.1)
            drill.mark("faults done", f"{sum(counts.values())} injected")
            # No fault may outlive the drill: every hit incarnation must have been replaced
            # (a runaway, say, is only caught progress_timeout after it was injected).
            slowest = max(self.policy.progress_timeout, self.policy.beat_timeout) + self.recovery_bound()

            def unhandled() -> list[str]:
                now = {s["name"]: s for s in self.mesh.status()["services"]}
                return [f"{n} {inc} ({now[n]['state']}, pid {now[n]['pid']})" for n, inc in dict.fromkeys(pending)
                        if now[n]["incarnation"] == inc]

            drill.say(f"waiting up to {slowest:.0f}s for every hit incarnation to be replaced")
            try:
                self.wait(lambda: not unhandled(), slowest, "every injected fault to be handled", interval=0.1)
            except DrillError:
                raise DrillError(f"not every injected fault was handled within {slowest:.1f}s: still the hit "
                                 f"incarnation of {', '.join(unhandled())}") from None
            drill.mark("faults handled", f"{len(pending)} process faults, every target replaced")
            if self.config.sim_url:  # provider faults armed for a few more calls end with the fault phase
                self.mesh.try_call("DELETE", self.config.sim_url + "/sim/faults", auth=True)
            bound = self.policy.task_timeout * worst_case_attempts(self.policy) + 60
            drill.say(f"waiting up to {bound:.0f}s for each of the {len(runs)} runs to end: {', '.join(runs)}")
            ends = {r: self.wait(lambda r=r: self.run_status(r), bound, f"run {r} to end", interval=0.1)["status"]
                    for r in runs}
            drill.mark("runs ended", f"{sum(s == RunState.DONE for s in ends.values())} done, "
                                     f"{sum(s == RunState.FAILED for s in ends.values())} failed")
            self._settle(drill)
        finally:
            if self.config.sim_url:
                self.mesh.try_call("DELETE", self.config.sim_url + "/sim/faults", auth=True)
            for name, incarnation in stopped:  # never leave a process stopped behind us
                self.cont(name, incarnation)
            self.label(None)
        with self.db() as conn:
            alerts = read.alerts_of_drill(conn, label)
            rows = read.retries_of_drill(conn, label)
        summary = {
            "faults_requested": faults, "faults_injected": sum(counts.values()), "by_kind": counts,
            "detected": len(alerts),
            "recovered": sum(r["retry_type"] == "child_restart" for r in rows),
            "escalated": len({r["alert_id"] for r in rows if r["retry_type"] == "escalation"}),
            "provider_switches": sum(r["retry_type"] == "llm_change" for r in rows),
            "permanently_failed": sum(r["retry_type"] == "permanent_failure" for r in rows),
            "runs_submitted": len(runs), "runs_completed": sum(s == RunState.DONE for s in ends.values()),
            "runs_failed": sum(s == RunState.FAILED for s in ends.values()),
        }
        drill.data["summary"] = summary
        drill.data["latency"] = self._latencies(label)
        self._every_fault_noticed(drill, pending, alerts)
        self._invariants(drill, alerts, rows)
        return drill

    def _every_fault_noticed(self, drill: Drill, pending: list[tuple[str, str]], alerts: list[dict]) -> None:
        """Every incarnation a process fault hit has its alert, or was being replaced for
        another decision when the fault struck (a provider switch of its subtree, say: the
        kill of a process on its way out is no failure). Said per incarnation, never silent."""
        alerted = {a["incarnation"] for a in alerts}
        unalerted = []
        with self.db() as conn:
            for name, incarnation in dict.fromkeys(pending):
                if incarnation in alerted:
                    continue
                row = read.session(conn, incarnation) or {}
                reason = row.get("end_reason") or ""
                if reason.startswith("replaced:"):
                    drill.mark("replaced anyway", f"{name} {incarnation}: {reason} (no alert of its own)")
                else:
                    unalerted.append(f"{name} {incarnation} ({row.get('status')}, {reason or 'no end reason'})")
        drill.check("every hit incarnation alerted or replaced by a recorded decision"
                    + (f": not {', '.join(unalerted[:3])}" if unalerted else ""), not unalerted)

    def _latencies(self, label: str) -> dict:
        """Detection (fault became true -> alert) and recovery (failure -> healthy)
        percentiles over the drill, from the daemon's own records."""
        with self.db() as conn:
            detect = [e["payload"]["detail"].get("detected_after")
                      for e in read.events_of_drill(conn, label, "alert_raised")]
            recover = [e["payload"]["seconds"] for e in read.events_of_drill(conn, label, "recovered")]
        return {"detection_after_deadline_s": summary([v for v in detect if v is not None]),
                "recovery_s": summary(recover)}

    def _submit_drill_run(self) -> list[str]:
        code, body = self.mesh.try_call("POST", self.mesh.url(self._gateway()) + "/runs",
                                        {"prompt": "chaos run", "drill": True}, auth=True)
        return [body["run_id"]] if code == 202 else []  # a gateway down on purpose refuses runs

    def _chaos_fault(self, kind: str, target: str, incarnation: str | None, rng: random.Random,
                     stopped: list[tuple[str, str]]) -> str | None:
        """One fault; a process fault hits ``incarnation`` (the one the drill will wait to see
        replaced), or nothing when the daemon has another running by now."""
        s = self.mesh.service(target)
        if kind == "provider":
            if not self.config.sim_url:
                return None
            provider = rng.choice(self.config.providers.chain)  # the mesh's own providers
            fault = rng.choice(["overloaded", "error", "rate-limit", "midstream"])
            code, _ = self.mesh.try_call("PUT", self.config.sim_url + f"/sim/faults/{provider}",
                                         {"kind": fault, "times": rng.randint(1, 3)}, auth=True)
            return f"{provider} {fault}" if code == 200 else None
        if s["state"] != ServiceState.RUNNING or not s["pid"]:
            return None
        if kind in ("kill", "hang"):
            try:  # through the daemon, wherever it runs; replaced meanwhile (409): no fault this time
                self.signal(Drill("chaos", target), target, {**s, "incarnation": incarnation},
                            "kill" if kind == "kill" else "stop", starts=False)
            except DrillError:
                return None
            if kind == "hang":
                stopped.append((target, incarnation))
        else:
            code, _ = self.mesh.try_call("POST", self.mesh.url(target) + "/drill/runaway", {}, auth=True)
            if code != 202:
                return None
        return f"{target} pid {s['pid']} incarnation {incarnation}"

    def _settle(self, drill: Drill) -> None:
        """Every service running again: the ladder brings every one back by itself."""
        try:
            self.wait(lambda: all(s["state"] == ServiceState.RUNNING for s in self.mesh.status()["services"]),
                      self.recovery_bound() * 3, "every service to be running", interval=0.1)
            drill.mark("settled", "every service running")
        except (DrillError, ClientError) as err:
            drill.check(f"every service running again after the faults ({err})", False)

    def _invariants(self, drill: Drill, alerts: list[dict], rows: list[dict]) -> None:
        census = self.census()
        drill.check("no orphan or duplicate process for any service"
                    + (f": {'; '.join(census['problems'][:3])}" if census["problems"] else
                       f" ({census['processes']} processes, {census['sessions']} open sessions)"),
                    not census["problems"])
        drill.data["census"] = census
        with self.db() as conn:
            checks = run_report(conn, max_restarts=self.policy.max_restarts,
                                max_switches=self.policy.max_provider_switches, pid_alive=same_process, now=False)
        for c in checks:
            drill.check(f"report: {c.name} ({c.figure})", c.healthy)
        per_alert: dict[str, int] = {}
        for r in rows:
            if r["retry_type"] == "child_restart":
                per_alert[r["alert_id"]] = per_alert.get(r["alert_id"], 0) + 1
        handled = [a for a in alerts if (a["decision"] or "").startswith("restart:")]
        drill.check("one history row per handled failure",
                    all(per_alert.get(a["alert_id"]) == 1 for a in handled) and all(n == 1 for n in per_alert.values()))

    def census(self) -> dict:
        """Every live process of the mesh against the sessions the registry says are open."""
        procs = {p.pid: p for p in home_processes(str(self.mesh.home.root))}
        with self.db() as conn:
            sessions = read.open_sessions(conn)
        status = self.mesh.status()
        owners = {s["pid"] for s in sessions if s["pid"]}
        known = owners | {status["daemon"]["pid"]}
        fs = status.get("fork_server") or {}
        servers = [pid for pid in (fs.get("pid"), fs.get("heir")) if pid]  # an heir: warming up to take over
        known |= set(servers)
        if (status.get("logs") or {}).get("pid"):  # the log pump (services/daemon/logpump.py)
            known.add(status["logs"]["pid"])
        known |= set((status.get("ownership") or {}).get("gates") or ())  # next incarnations' gates (spawner.Gate)
        for node in (status.get("cluster") or {}).get("nodes", []):  # node agents and their fork servers
            known |= {node["agent_pid"], node["fork_server"]} - {None}
        servers += [n["fork_server"] for n in (status.get("cluster") or {}).get("nodes", []) if n.get("fork_server")]
        # (a fork server's command line, less its socket path and parent: a server retiring as
        # its warm heir takes over runs the same code on another socket)
        server_argv = [argv[:-2] for argv in (_argv(pid) for pid in servers) if argv]
        problems = []
        per_agent: dict[str, int] = {}
        for s in sessions:
            per_agent[s["agent"]] = per_agent.get(s["agent"], 0) + 1
            if s["pid"] not in procs and s["status"] != "intent":
                problems.append(f"session of {s['agent']} has no live process (pid {s['pid']})")
        problems += [f"{a} has {n} open sessions" for a, n in per_agent.items() if n > 1]
        for pid, proc in procs.items():
            if pid in known or _descends_from(proc, owners) or (_argv(pid) or [])[:-2] in server_argv or _gone(proc):
                continue  # (a fork server's copy not yet a service: a standby being made, an intermediate)
            problems.append(f"pid {pid} is not accounted for: {describe([proc])[0]}")
        return {"processes": len(procs), "sessions": len(sessions), "problems": problems}


def _gone(proc: psutil.Process) -> bool:
    """Exited since the census listed it (a fork server's intermediate lives a moment)."""
    try:
        return proc.status() == psutil.STATUS_ZOMBIE
    except psutil.Error:
        return True


def _argv(pid: int) -> list[str] | None:
    try:
        return psutil.Process(pid).cmdline()
    except psutil.Error:
        return None


def _descends_from(proc: psutil.Process, roots: set[int]) -> bool:
    try:
        return any(p.pid in roots for p in proc.parents())
    except psutil.Error:
        return False
