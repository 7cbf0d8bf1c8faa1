"""`tron drill`: break the running mesh on purpose and check that it keeps its promises.

Each drill injects one fault, follows what the mesh does through the registry (events,
alerts, retry_history) and the comms log, prints a timeline relative to the fault, and
gives a verdict that is checked against the registry, not against the drill's own
impressions. While a drill runs, the daemon labels every event, alert and retry row with
the drill's name, and production failure_metrics skip them.

    kill NAME            SIGKILL; expect process_exit, a restart, a new healthy pid
    hang NAME            SIGSTOP; expect heartbeat_timeout (or liveness_failed), replaced
    runaway NAME         the agent keeps beating but its progress marker freezes;
                         expect no_progress, replaced
    provider-outage P    provider P fails every call; a drill run must still complete
                         after the root switches provider
    crash-loop NAME      kill it every time it comes back; the ladder must give up after
                         max_restarts and escalate, and the service must stay down
    chaos                random faults of every kind while runs are submitted; then the
                         invariants of `tron report` plus a process census
"""

from __future__ import annotations

import json
import os
import random
import signal
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from common.config import MeshConfig
from common.policy import worst_case_attempts
from registry.report import run_report
from scripts.harness import Mesh, wait_for


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

    def mark(self, label: str, detail: str = "", at: float | None = None) -> None:
        self.timeline.append(((time.monotonic() if at is None else at) - self.t0, label, detail))

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


class Runner:
    """Drives one running mesh: HTTP through the harness, reads through the registry."""

    def __init__(self, home: Path, config: MeshConfig, offset: int) -> None:
        self.config = config
        self.policy = config.policy
        # The harness adds the offset itself: hand it the unshifted ports.
        spec = {"mesh": {"daemon_port": config.mesh.daemon_port - offset},
                "services": {n: {"port": s.port - offset} for n, s in config.services.items()},
                "policy": config.policy.model_dump()}
        self.mesh = Mesh(home, Path(config.source), offset, spec)

    # -- plumbing ----------------------------------------------------------------------

    def wait(self, predicate, timeout: float, what: str, interval: float = 0.01):
        return wait_for(predicate, timeout, what, interval, error=DrillError)

    def http(self, method: str, url: str, body=None) -> tuple[int, object]:
        """Like the harness's, but a refused or timed-out connection is (0, reason):
        during a drill, any service may be down on purpose."""
        try:
            return self.mesh.http(method, url, body)
        except OSError as err:  # URLError is an OSError
            return 0, str(err)

    def run_status(self, run_id: str) -> dict | None:
        """From the daemon, which no drill breaks (the gateway may be down)."""
        code, run = self.http("GET", self.mesh.url("daemon") + f"/runs/{run_id}")
        return run if code == 200 and run["status"] != "running" else None

    def service(self, name: str) -> dict:
        if name not in self.config.services:
            raise DrillError(f"no service named {name!r} (known: {', '.join(self.config.services)})")
        return self.mesh.service(name)

    def label(self, name: str | None) -> None:
        code, body = self.mesh.http("POST", self.mesh.url("daemon") + "/control/drill", {"name": name})
        if code != 200:
            raise DrillError(f"the daemon refused to label the drill: {body}")

    def events_since(self, t0: float, agent: str | None = None) -> list[dict]:
        sql = "SELECT * FROM events WHERE mono >= ?" + (" AND agent = ?" if agent else "") + " ORDER BY id"
        return self.mesh.rows(sql, (t0, agent) if agent else (t0,))

    def comms_since(self, t0: float) -> list[dict]:
        path = self.mesh.home / "logs" / "comms.jsonl"
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
        return self.policy.start_timeout + self.policy.beat_timeout + self.policy.backoff_max + 10

    def replaced(self, name: str, old_pid: int, timeout: float) -> dict:
        return self.wait(lambda: (h := self.mesh.health(name)) and h["pid"] != old_pid and h
                         if self.config.services[name].is_agent else
                         ((s := self.mesh.service(name))["state"] == "running" and s["pid"] not in (None, old_pid)
                          and {"pid": s["pid"], "incarnation": s["incarnation"]}),
                         timeout, f"{name} to come back with a new pid")

    # -- the shared shape of a single-fault drill ------------------------------------------

    def _single(self, drill: Drill, name: str, inject, expected: set[str]) -> Drill:
        before = self.service(name)
        if before["state"] != "running" or not before["pid"]:
            raise DrillError(f"{name} is {before['state']}: a drill needs it running (see `tron status`)")
        self.label(f"{drill.name}:{name}:{uuid.uuid4().hex[:6]}")
        try:
            drill.t0 = time.monotonic()
            drill.mark("fault injected", inject(before))
            fresh = self.replaced(name, before["pid"], self.recovery_bound())
            t_healthy = time.monotonic()
            time.sleep(0.2)  # let the last rows land
        finally:
            self.label(None)
        self._timeline_from_registry(drill, name, before["incarnation"])
        drill.mark("healthy again", f"pid {fresh['pid']} incarnation {fresh['incarnation']}", at=t_healthy)
        alerts = self.mesh.rows("SELECT * FROM alerts WHERE agent = ? AND incarnation = ?", (name, before["incarnation"]))
        rows = self.mesh.rows("SELECT * FROM retry_history WHERE agent_id = ? AND mono >= ? ORDER BY id",
                              (name, drill.t0))
        drill.check(f"one alert for the failed incarnation, reason in {sorted(expected)}",
                    len(alerts) == 1 and alerts[0]["reason"] in expected)
        drill.check("one child_restart row with a real reason",
                    [r["retry_type"] for r in rows] == ["child_restart"] and rows[0]["reason"] not in ("", None))
        drill.check("rows labelled as drill traffic", all(r["drill"] for r in rows) and all(a["drill"] for a in alerts))
        old = self.mesh.rows("SELECT status FROM sessions WHERE incarnation = ?", (before["incarnation"],))
        drill.check("the old session is closed", bool(old) and old[0]["status"] == "ended")
        drill.check("the old process is gone", not alive_since(before["pid"], None))
        drill.data["recovery_seconds"] = round(t_healthy - drill.t0, 4)
        return drill

    def _timeline_from_registry(self, drill: Drill, name: str, incarnation: str) -> None:
        labels = {"alert_raised": "detected", "child_restart": "decision", "spawned": "restarted",
                  "recovered": "recovered", "task_resumed": "task resumed", "escalation": "escalated",
                  "llm_change": "provider switched", "permanent_failure": "permanent failure"}
        for ev in self.events_since(drill.t0, name):
            if ev["kind"] in labels:
                payload = json.loads(ev["payload"])
                detail = {"alert_raised": lambda p: f"{p.get('reason')} {p.get('detail', {})}",
                          "child_restart": lambda p: f"restart by {p.get('requested_by')} ({p.get('decided_by')}): "
                                                     f"{p.get('reason')}",
                          "spawned": lambda p: f"pid {p.get('pid')} ({p.get('mode')})"}.get(
                    ev["kind"], lambda p: json.dumps(p)[:80])(payload)
                drill.mark(labels[ev["kind"]], detail, at=ev["mono"])
        for msg in self.comms_since(drill.t0):
            if msg["kind"] == "alert" and msg.get("agent") == name and msg.get("incarnation") == incarnation:
                drill.mark("alert delivered", f"to {msg['dst']}", at=msg["mono"])

    # -- drills -------------------------------------------------------------------------------

    def kill(self, name: str) -> Drill:
        def inject(before):
            os.kill(before["pid"], signal.SIGKILL)
            return f"SIGKILL pid {before['pid']}"
        return self._single(Drill("kill", name), name, inject, {"process_exit"})

    def hang(self, name: str) -> Drill:
        def inject(before):
            os.kill(before["pid"], signal.SIGSTOP)
            return f"SIGSTOP pid {before['pid']}"
        drill = self._single(Drill("hang", name), name, inject, {"heartbeat_timeout", "liveness_failed"})
        detected = [t for t, label, _ in drill.timeline if label == "detected"]
        spec = self.config.services[name]
        bound = self.policy.beat_timeout if spec.is_agent else (
            spec.liveness.interval * spec.liveness.failure_threshold + spec.liveness.timeout if spec.liveness else 0)
        drill.check(f"detected within the threshold ({bound:.2f}s) plus 1 s", bool(detected) and detected[0] <= bound + 1)
        return drill

    def runaway(self, name: str) -> Drill:
        if not self.config.services.get(name) or not self.config.services[name].is_agent:
            raise DrillError(f"{name!r} is not an agent of this mesh: only agents carry progress markers")

        def inject(before):
            code, body = self.mesh.http("POST", self.mesh.url(name) + "/drill/runaway", {})
            if code != 202:
                raise DrillError(f"{name} refused the runaway drill: {body}")
            return f"progress frozen on task {body['task_id']} (beats continue)"
        drill = self._single(Drill("runaway", name), name, inject, {"no_progress"})
        detected = [t for t, label, _ in drill.timeline if label == "detected"]
        drill.check(f"caught after progress_timeout ({self.policy.progress_timeout:.1f}s), not before",
                    bool(detected) and self.policy.progress_timeout - 0.1 <= detected[0]
                    <= self.policy.progress_timeout + self.policy.heartbeat_interval + 1)
        return drill

    def provider_outage(self, provider: str) -> Drill:
        drill = Drill("provider-outage", provider)
        sim = self.config.sim_url
        if sim is None:
            raise DrillError("provider-outage needs the llm-sim service")
        self.label(f"provider-outage:{provider}:{uuid.uuid4().hex[:6]}")
        try:
            drill.t0 = time.monotonic()
            code, body = self.mesh.http("PUT", f"{sim}/sim/faults/{provider}", {"kind": "error"})
            if code != 200:
                raise DrillError(f"llm-sim refused the fault: {body}")
            drill.mark("fault injected", f"{provider}: every call answers 500")
            code, body = self.mesh.http("POST", self.mesh.url("gateway") + "/runs",
                                        {"prompt": "drill: provider outage", "drill": True})
            if code != 202:
                raise DrillError(f"the gateway refused the drill run: {body}")
            run_id = body["run_id"]
            drill.mark("run submitted", run_id)
            bound = self.policy.task_timeout * worst_case_attempts(self.policy) + 60
            run = self.wait(lambda: self.run_status(run_id), bound, "the drill run to end", interval=0.05)
            drill.mark(f"run {run['status']}", run_id)
        finally:
            self.mesh.http("DELETE", f"{sim}/sim/faults/{provider}")
            self.label(None)
        rows = self.mesh.rows("SELECT * FROM retry_history WHERE run_id = ? ORDER BY id", (run_id,))
        for r in rows:
            label = {"llm_change": "provider switched", "child_restart": "restart", "escalation": "escalated",
                     "permanent_failure": "permanent failure"}[r["retry_type"]]
            drill.mark(label, f"{r['agent_id']}: {r['reason']} {r['from_provider'] or ''}"
                              f"{' -> ' + r['to_provider'] if r['to_provider'] else ''}", at=r["mono"])
        switches = [r for r in rows if r["retry_type"] == "llm_change"]
        drill.check("the run completed despite the outage", run["status"] == "done")
        drill.check(f"work moved off {provider}", bool(switches) and all(r["from_provider"] == provider for r in switches))
        drill.check("every row has a real reason", all(r["reason"] for r in rows))
        drill.check("the run is labelled as a drill",
                    self.mesh.rows("SELECT drill FROM runs WHERE run_id = ?", (run_id,))[0]["drill"] == 1)
        drill.data["run_id"] = run_id
        return drill

    def crash_loop(self, name: str) -> Drill:
        drill = Drill("crash-loop", name)
        before = self.service(name)
        if before["state"] != "running":
            raise DrillError(f"{name} is {before['state']}: a drill needs it running")
        self.label(f"crash-loop:{name}:{uuid.uuid4().hex[:6]}")
        kills = 0
        try:
            drill.t0 = time.monotonic()
            pid = before["pid"]
            while True:
                os.kill(pid, signal.SIGKILL)
                kills += 1
                drill.mark("fault injected", f"SIGKILL #{kills} pid {pid}")
                state = self.wait(lambda: (s := self.mesh.service(name))["state"] in ("given_up",) and s
                                  or (s["state"] == "running" and s["pid"] not in (None, pid) and s), self.recovery_bound(),
                                  f"{name} to come back or be given up")
                if state["state"] == "given_up":
                    drill.mark("given up", f"after {kills} kills")
                    break
                pid = state["pid"]
                if kills > self.policy.max_restarts + 1:
                    break
            settle = time.monotonic() + 2 * self.policy.beat_timeout
            while time.monotonic() < settle:
                if self.mesh.service(name)["state"] != "given_up":
                    break
                time.sleep(0.05)
            stayed_down = self.mesh.service(name)["state"] == "given_up"
        finally:
            self.label(None)
        rows = self.mesh.rows("SELECT * FROM retry_history WHERE agent_id = ? AND mono >= ? ORDER BY id",
                              (name, drill.t0))
        for r in rows:
            drill.mark(r["retry_type"], f"{r['reason']} by {r['hop'] or r['requested_by']}", at=r["mono"])
        restarts = [r for r in rows if r["retry_type"] == "child_restart"]
        drill.check(f"at most max_restarts ({self.policy.max_restarts}) restarts", len(restarts) <= self.policy.max_restarts)
        drill.check("the ladder gave up and escalated", any(r["retry_type"] == "escalation" for r in rows))
        drill.check("it stayed down (no restart loop)", stayed_down)
        self.mesh.http("POST", self.mesh.url("daemon") + "/control/respawn", {"service": name,
                                                                           "reason": "drill_restore"})
        self.wait(lambda: self.mesh.service(name)["state"] == "running", self.recovery_bound(), f"{name} restored")
        drill.mark("restored", "respawned by the drill (operator action)")
        drill.data.update(kills=kills, restarts=len(restarts))
        return drill

    # -- chaos --------------------------------------------------------------------------------

    def chaos(self, faults: int, duration: float, seed: int | None) -> Drill:
        rng = random.Random(seed)
        drill = Drill("chaos", f"{faults} faults / {duration:.0f}s (seed {seed})")
        names = list(self.config.services)
        agents = [n for n in names if self.config.services[n].is_agent]
        kinds = ["kill", "kill", "hang", "provider"]
        if self.policy.progress_timeout <= duration / 3:
            kinds.append("runaway")
        counts = {k: 0 for k in ("kill", "hang", "runaway", "provider")}
        runs: list[str] = []
        pending: list[tuple[str, str]] = []  # (service, incarnation) hit by a process fault
        label = f"chaos:{seed}:{uuid.uuid4().hex[:6]}"
        self.label(label)
        try:
            drill.t0 = time.monotonic()
            schedule = sorted(rng.uniform(0, duration) for _ in range(faults))
            next_run = next_restore = 0.0
            for at in schedule:
                while time.monotonic() - drill.t0 < at:
                    now = time.monotonic() - drill.t0
                    if now >= next_run:
                        runs += self._submit_drill_run()
                        next_run += max(2.0, duration / 10)
                    if now >= next_restore:  # as an operator would: bring back what the ladder gave up
                        self._respawn_given_up(drill)
                        next_restore = now + 0.5
                    time.sleep(0.02)
                kind = rng.choice(kinds)
                running = [x["name"] for x in self.mesh.status()["services"] if x["state"] == "running" and x["pid"]]
                pool = [n for n in (agents if kind == "runaway" else names) if n in running or kind == "provider"]
                if not pool:
                    continue  # everything of that kind is down at this instant
                target = rng.choice(pool)
                incarnation = self.mesh.service(target)["incarnation"]
                done = self._chaos_fault(kind, target, rng)
                if done:
                    counts[kind] += 1
                    drill.mark(f"fault {kind}", done)
                    if kind != "provider":
                        pending.append((target, incarnation))
            drill.mark("faults done", f"{sum(counts.values())} injected")
            # No fault may outlive the drill: every hit incarnation must have been replaced
            # (a runaway, say, is only caught progress_timeout after it was injected).
            slowest = max(self.policy.progress_timeout, self.policy.beat_timeout) + self.recovery_bound()
            self.wait(lambda: self._respawn_given_up(drill) is not None and all(
                self.mesh.service(n)["incarnation"] != inc for n, inc in pending), slowest,
                "every injected fault to be handled", interval=0.1)
            drill.mark("faults handled", f"{len(pending)} process faults, every target replaced")
            if self.config.sim_url:  # provider faults armed for a few more calls end with the fault phase
                self.http("DELETE", self.config.sim_url + "/sim/faults")
            bound = self.policy.task_timeout * worst_case_attempts(self.policy) + 60
            ends = {}
            for r in runs:  # services given up meanwhile are brought back, so runs can end
                ends[r] = self.wait(lambda r=r: self._respawn_given_up(drill) and self.run_status(r), bound,
                                    f"run {r} to end", interval=0.1)["status"]
            drill.mark("runs ended", f"{sum(s == 'done' for s in ends.values())} done, "
                                     f"{sum(s == 'failed' for s in ends.values())} failed")
            self._settle(drill)
        finally:
            if self.config.sim_url:
                self.http("DELETE", self.config.sim_url + "/sim/faults")
            self.label(None)
        alerts = self.mesh.rows("SELECT * FROM alerts WHERE drill = ?", (label,))
        rows = self.mesh.rows("SELECT * FROM retry_history WHERE drill = ?", (label,))
        summary = {
            "faults_requested": faults, "faults_injected": sum(counts.values()), "by_kind": counts,
            "detected": len(alerts),
            "recovered": sum(r["retry_type"] == "child_restart" for r in rows),
            "escalated": len({r["alert_id"] for r in rows if r["retry_type"] == "escalation"}),
            "provider_switches": sum(r["retry_type"] == "llm_change" for r in rows),
            "permanently_failed": sum(r["retry_type"] == "permanent_failure" for r in rows),
            "runs_submitted": len(runs), "runs_completed": sum(s == "done" for s in ends.values()),
            "runs_failed": sum(s == "failed" for s in ends.values()),
        }
        drill.data["summary"] = summary
        drill.data["latency"] = self._latencies(drill.t0, label)
        self._invariants(drill, alerts, rows)
        return drill

    def _latencies(self, t0: float, label: str) -> dict:
        """Detection (fault became true -> alert) and recovery (failure -> healthy)
        percentiles over the drill, from the daemon's own records."""
        detect = [json.loads(r["payload"])["detail"].get("detected_after") for r in
                  self.mesh.rows("SELECT payload FROM events WHERE kind = 'alert_raised' AND drill = ?", (label,))]
        recover = [json.loads(r["payload"])["seconds"] for r in
                   self.mesh.rows("SELECT payload FROM events WHERE kind = 'recovered' AND drill = ?", (label,))]

        def pcts(values):
            values = sorted(v for v in values if v is not None)
            if not values:
                return {}
            pick = lambda q: values[min(len(values) - 1, int(round(q * (len(values) - 1))))]  # noqa: E731
            return {"n": len(values), "p50": round(pick(0.5), 4), "p90": round(pick(0.9), 4),
                    "p99": round(pick(0.99), 4), "max": round(values[-1], 4)}

        return {"detection_after_deadline_s": pcts(detect), "recovery_s": pcts(recover)}

    def _submit_drill_run(self) -> list[str]:
        code, body = self.http("POST", self.mesh.url("gateway") + "/runs", {"prompt": "chaos run", "drill": True})
        return [body["run_id"]] if code == 202 else []  # a gateway down on purpose refuses runs

    def _chaos_fault(self, kind: str, target: str, rng: random.Random) -> str | None:
        s = self.mesh.service(target)
        if kind == "provider":
            if not self.config.sim_url:
                return None
            provider = rng.choice(["anthropic", "ollama"])
            fault = rng.choice(["overloaded", "error", "rate-limit", "midstream"])
            code, _ = self.http("PUT", self.config.sim_url + f"/sim/faults/{provider}",
                                {"kind": fault, "times": rng.randint(1, 3)})
            return f"{provider} {fault}" if code == 200 else None
        if s["state"] != "running" or not s["pid"]:
            return None
        if kind == "kill":
            os.kill(s["pid"], signal.SIGKILL)
        elif kind == "hang":
            os.kill(s["pid"], signal.SIGSTOP)
        else:
            code, _ = self.http("POST", self.mesh.url(target) + "/drill/runaway", {})
            if code != 202:
                return None
        return f"{target} pid {s['pid']}"

    def _settle(self, drill: Drill) -> None:
        """Wait until every service is running again; bring back those the ladder gave
        up on (as an operator would) so the mesh ends whole."""
        deadline = time.monotonic() + self.recovery_bound() * 3
        while time.monotonic() < deadline:
            services = self._respawn_given_up(drill)
            if all(s["state"] == "running" for s in services):
                drill.mark("settled", "every service running")
                return
            time.sleep(0.1)
        drill.check("every service running again after the faults", False)

    def _respawn_given_up(self, drill: Drill) -> list[dict]:
        services = self.mesh.status()["services"]
        for s in services:
            if s["state"] == "given_up":
                self.http("POST", self.mesh.url("daemon") + "/control/respawn",
                          {"service": s["name"], "reason": "chaos_restore"})
                drill.mark("respawned", s["name"])
        return services

    def _invariants(self, drill: Drill, alerts: list[dict], rows: list[dict]) -> None:
        census = self.census()
        drill.check("no orphan or duplicate process for any service"
                    + (f": {'; '.join(census['problems'][:3])}" if census["problems"] else
                       f" ({census['processes']} processes, {census['sessions']} open sessions)"),
                    not census["problems"])
        drill.data["census"] = census
        with self.mesh.db() as conn:
            checks = run_report(conn, max_restarts=self.policy.max_restarts,
                                max_switches=self.policy.max_provider_switches, pid_alive=alive_since)
        for c in checks:
            drill.check(f"report: {c.name} ({c.figure})", c.healthy)
        handled = [a for a in alerts if a["decision"] == "child_restart"]
        restarts_by_alert = {}
        for r in rows:
            if r["retry_type"] == "child_restart":
                restarts_by_alert[r["alert_id"]] = restarts_by_alert.get(r["alert_id"], 0) + 1
        drill.check("one history row per handled failure",
                    all(restarts_by_alert.get(a["alert_id"]) == 1 for a in handled)
                    and all(n == 1 for n in restarts_by_alert.values()))

    def census(self) -> dict:
        """Every live process of this home against the sessions the registry says are open."""
        home = str(self.mesh.home)
        me = psutil.Process()
        ourselves = {me.pid} | {p.pid for p in me.parents()}  # the drill (and its shell) may carry TRON_HOME
        procs = {}
        for p in psutil.process_iter(["pid", "cmdline"]):
            try:
                if p.pid in ourselves:
                    continue
                if p.environ().get("TRON_HOME") == home and p.status() != psutil.STATUS_ZOMBIE:
                    procs[p.pid] = " ".join(p.info["cmdline"] or [])
            except psutil.Error:
                continue
        sessions = self.mesh.rows("SELECT agent, pid FROM sessions WHERE status != 'ended'")
        status = self.mesh.status()
        owners = {s["pid"] for s in sessions}  # a service's own subprocesses are accounted for
        known = owners | {status["daemon"]["pid"]}
        if status.get("fork_server"):
            known.add(status["fork_server"]["pid"])
        problems = []
        per_agent: dict[str, int] = {}
        for s in sessions:
            per_agent[s["agent"]] = per_agent.get(s["agent"], 0) + 1
            if s["pid"] not in procs:
                problems.append(f"session of {s['agent']} has no live process (pid {s['pid']})")
        problems += [f"{a} has {n} open sessions" for a, n in per_agent.items() if n > 1]
        problems += [f"pid {pid} is not accounted for: {cmd[:80]}" for pid, cmd in procs.items()
                     if pid not in known and not _descends_from(pid, owners)]
        return {"processes": len(procs), "sessions": len(sessions), "problems": problems}


def alive_since(pid: int | None, create_time: float | None) -> bool:
    """The process is alive and is the one recorded (same start time: pids recycle)."""
    if not pid:
        return False
    try:
        p = psutil.Process(pid)
        return p.status() != psutil.STATUS_ZOMBIE and (create_time is None or abs(p.create_time() - create_time) < 0.01)
    except psutil.Error:
        return False


def _descends_from(pid: int, roots: set[int]) -> bool:
    try:
        return any(p.pid in roots for p in psutil.Process(pid).parents())
    except psutil.Error:
        return False
