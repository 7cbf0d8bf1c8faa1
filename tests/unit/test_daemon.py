"""The daemon's parts with a fake clock, the in-memory store and the stub spawner: no
process, no file but the home's lock and token, no sleeping. Every decision the daemon
carries out for its own children (and in the stead of ancestors that cannot) is checked
on the registry rows it leaves."""

from __future__ import annotations

import asyncio

import pytest
from pydantic import ValidationError

from tron.common.carry import carry_out
from tron.common.clock import FakeClock
from tron.common.config import parse_mesh
from tron.common.ladder import ChildFailed, LadderView, Restart, decide
from tron.common.models import Beat, RestartRequest
from tron.common.paths import Home
from tron.common.states import AlertState, ServiceState, TaskState
from tron.registry.memory import MemoryStore
from tron.services.daemon.core import Daemon
from tron.services.daemon.stub_spawner import StubSpawner

POLICY = {"heartbeat_interval": 1.0, "miss_threshold": 3, "max_restarts": 3, "restart_window": 60.0,
          "backoff_initial": 0.5, "backoff_factor": 2.0, "backoff_max": 4.0, "backoff_jitter": 0.0,
          "min_uptime": 1.0, "max_provider_switches": 1, "start_timeout": 10.0}


def mesh(policy: dict | None = None, **services):
    """``policy``: keys that differ from POLICY."""
    services = services or {
        "web": {"command": ["web-server"], "port": 7001},
        "root": {"role": "root", "port": 7002},
        "worker": {"role": "programmer", "port": 7003, "parent": "root"},
    }
    return parse_mesh({"mesh": {"daemon_port": 7000}, "policy": {**POLICY, **(policy or {})}, "services": services})


class Rig:
    """A daemon on stubs. ``settle()`` lets every ready coroutine run; ``advance(s)`` moves
    the fake clock and settles again."""

    def __init__(self, tmp_path, config) -> None:
        self.clock = FakeClock()
        self.store = MemoryStore(clock=self.clock)
        self.spawner = StubSpawner()
        self.daemon = Daemon(config, Home(tmp_path / "home"), store=self.store, spawner=self.spawner,
                             clock=self.clock, monitor_thread=False)
        self.posts: list[tuple[str, dict]] = []
        self.answer = None  # how agent ancestors answer alerts: None = unreachable
        self.seq: dict[str, int] = {}  # each service's last beat number (beats())

    async def start(self) -> None:
        d = self.daemon
        await d.start()

        async def healthy(svc, incarnation):  # the stub processes "serve" at once
            return svc.incarnation == incarnation and svc.child is not None and svc.child.alive

        d.sup.healthy_now = healthy
        d.sup.first_beat_wait = 0.0  # stubs send no beats: ask their stand-in /health at once
        d.client.post = self._post
        await d.bring_up()
        await self.settle()

    async def _post(self, url, body=None, **kw):
        payload = body.model_dump(mode="json") if hasattr(body, "model_dump") else body
        self.posts.append((url, payload))
        if self.answer is None:
            raise OSError("connection refused")
        return await self.answer(url, payload)

    async def settle(self, rounds: int = 50) -> None:
        for _ in range(rounds):
            await asyncio.sleep(0)

    async def until_running(self, name: str, limit: float = 30.0) -> float:
        """Move the clock in small steps until ``name`` runs again; how long that took."""
        waited = 0.0
        while self.svc(name).state != ServiceState.RUNNING and waited < limit:
            await self.advance(0.25)
            waited += 0.25
        return waited

    async def advance(self, seconds: float) -> None:
        step = 0.25
        while seconds > 1e-9:
            self.clock.advance(min(step, seconds))
            seconds -= step
            await self.settle()

    def svc(self, name):
        return self.daemon.sup[name]

    async def beats(self, name: str, tasks: list[str], seconds: float) -> None:
        """``name`` beats every 0.25 s of the fake clock for ``seconds``, naming ``tasks``."""
        svc = self.svc(name)
        for _ in range(int(seconds / 0.25)):
            self.seq[name] = self.seq.get(name, 0) + 1
            await self.daemon.on_beat(Beat(service=name, incarnation=svc.incarnation, pid=svc.child.pid,
                                           seq=self.seq[name], task_id=tasks[0] if tasks else None, tasks=tasks))
            await self.advance(0.25)

    async def crash(self, name: str) -> str:
        old = self.svc(name).incarnation
        self.spawner.crash(self.svc(name).child)
        await self.settle()
        return old

    async def rows(self, name: str) -> list[dict]:
        return list(reversed(await self.store.history(agent=name)))

    async def restarts(self, name: str) -> list[dict]:
        return [r for r in await self.rows(name) if r["retry_type"] == "child_restart"]

    async def stop(self) -> None:
        await self.daemon.shutdown()


@pytest.fixture
async def rig(tmp_path):
    r = Rig(tmp_path, mesh())
    await r.start()
    yield r
    await r.stop()


async def test_bring_up_starts_every_service_parents_first(rig):
    assert {n: str(s.state) for n, s in rig.daemon.sup.services.items()} == {
        "web": "running", "root": "running", "worker": "running"}
    assert [s.name for s in rig.spawner.spawned] == ["web", "root", "worker"]
    sessions = await rig.store.open_sessions()
    assert {s["status"] for s in sessions} == {"running"}


async def test_a_crash_is_restarted_at_once_by_the_daemon_with_its_case(rig):
    old = await rig.crash("web")
    web = rig.svc("web")
    assert web.incarnation != old and web.state == ServiceState.RUNNING
    [row] = await rig.rows("web")
    assert (row["retry_type"], row["case_id"], row["requested_by"], row["reason"]) == (
        "child_restart", "idle_failure", "daemon", "process_exit")
    assert row["detail"]["delay"] == 0.0 and row["detail"]["signal"] == 9
    alert = await rig.store.alert(row["alert_id"])
    assert alert["status"] == AlertState.HANDLED and alert["stable"] == 0


async def test_unstable_failures_back_off_stable_ones_come_back_at_once(rig):
    delays = []
    for _ in range(4):  # each incarnation dies before min_uptime: an unstable streak
        await rig.crash("web")
        await rig.until_running("web")
        delays.append((await rig.restarts("web"))[-1]["detail"]["delay"])
    assert delays == [0.0, 0.5, 1.0, 2.0]
    assert rig.svc("web").state == ServiceState.RUNNING
    await rig.advance(1.5)  # this one stays up past min_uptime: stable
    await rig.crash("web")
    assert (await rig.restarts("web"))[-1]["detail"]["delay"] == 0.0
    assert rig.svc("web").state == ServiceState.RUNNING


async def test_a_crash_loop_is_flagged_escalated_once_and_ends_after_a_quiet_window(rig):
    for _ in range(5):
        await rig.crash("web")
        await rig.advance(4.0)
    web = rig.svc("web")
    assert web.crash_looping and web.state == ServiceState.RUNNING  # never given up
    rows = await rig.rows("web")
    loops = [r for r in rows if r["retry_type"] == "escalation"]
    assert [(r["reason"], r["hop"], r["case_id"]) for r in loops] == [
        ("crash_looping", "daemon->daemon", "crash_loop_started")]
    # what TRON saw of the failure that started the loop, from its alert (the loop's id is the alert's + ":loop")
    assert loops[0]["alert_id"].endswith(":loop") and loops[0]["detail"].get("detected_by") == "process_exit", loops[0]
    flagged = [r["detail"]["crash_looping"] for r in rows if r["retry_type"] == "child_restart"]
    assert flagged == [False, False, True, True, True]  # from the max_restarts-th failure in the window
    assert len(await rig.store.events(kind="crash_loop_started")) == 1
    await rig.advance(61.0)
    await rig.daemon.router.watchdog_tick()
    assert not rig.svc("web").crash_looping
    assert len(await rig.store.events(kind="crash_loop_ended")) == 1


async def test_a_program_that_cannot_start_fails_alone_and_keeps_being_retried(tmp_path):
    # The bring-up waits for a start that never settles up to start_timeout + 1 s of real time
    # (asyncio, not the rig's clock): 1 s here, not POLICY's 10; nothing else here depends on it.
    r = Rig(tmp_path, mesh(policy={"start_timeout": 1.0}, ghost={"command": ["ghost-bin"], "port": 7001},
                           root={"role": "root", "port": 7002}))
    r.spawner.failures["ghost"] = "command not found: ghost-bin"
    await r.start()
    try:
        assert r.svc("root").state == ServiceState.RUNNING  # the rest of the mesh came up
        ghost = r.svc("ghost")
        assert ghost.last_failure["reason"] == "spawn_failed"
        assert ghost.last_failure["detail"]["error"] == "command not found: ghost-bin"
        await r.advance(20.0)
        rows = await r.restarts("ghost")
        assert len(rows) >= 4 and rows[-1]["detail"]["delay"] > 0  # backing off, not given up
        del r.spawner.failures["ghost"]
        await r.advance(5.0)
        assert r.svc("ghost").state == ServiceState.RUNNING
    finally:
        await r.stop()


async def test_an_agent_keeps_its_listening_socket_across_restarts_and_a_stop_closes_it(rig):
    worker = rig.svc("worker")
    held = worker.listener
    assert held is not None and not held.closed and rig.svc("web").listener is None  # a plain command binds its own
    first = [s for s in rig.spawner.spawned if s.name == "worker"][-1]
    assert first.listen_fd == held.fileno() and first.env["LISTEN_FDS"] == "1" and first.env["LISTEN_FDNAMES"] == "worker"
    assert "LISTEN_FDS" not in [s for s in rig.spawner.spawned if s.name == "web"][-1].env
    await rig.crash("worker")
    await rig.until_running("worker")
    again = [s for s in rig.spawner.spawned if s.name == "worker"][-1]
    assert worker.listener is held and not held.closed and again.listen_fd == held.fileno()  # the same socket
    await rig.daemon.operators.act("stop", "worker", actor="ops", reason="maintenance")
    assert held.closed and worker.listener is None  # nothing listens on a stopped service's port
    await rig.daemon.operators.act("start", "worker", actor="ops", reason="back")
    await rig.settle()
    assert worker.listener is not None and worker.listener is not held
    await rig.stop()
    assert all(listener.closed for listener in rig.spawner.listeners)  # nor once the mesh is down


async def test_a_port_someone_else_holds_is_a_start_failure_that_names_it(tmp_path):
    r = Rig(tmp_path, mesh(policy={"start_timeout": 1.0}, root={"role": "root", "port": 7002},  # as above
                           app={"command": ["gunicorn", "app:app"], "port": 7004, "socket": "inherit"}))
    r.spawner.busy_ports.add(7004)
    await r.start()
    try:
        app = r.svc("app")
        assert r.svc("root").state == ServiceState.RUNNING
        assert app.last_failure["reason"] == "spawn_failed"
        assert app.last_failure["detail"]["error"] == "port 7004 is already in use"
        assert [s.name for s in r.spawner.spawned] == ["root"]  # nothing was started without its socket
        r.spawner.busy_ports.clear()
        await r.advance(5.0)
        assert app.state == ServiceState.RUNNING and app.listener is not None
        assert [s for s in r.spawner.spawned if s.name == "app"][-1].env["LISTEN_FDS"] == "1"
    finally:
        await r.stop()


async def test_an_operator_stop_is_never_undone_by_the_ladder(rig):
    await rig.daemon.operators.act("stop", "web", actor="ops", reason="maintenance")
    assert rig.svc("web").state == ServiceState.STOPPED and rig.svc("web").stopped
    req = RestartRequest(service="web", replaces=rig.svc("web").incarnation, alert_id="a-x", reason="x",
                         case="idle_failure", requested_by="daemon")
    answer = await rig.daemon.carrier.restart(req)
    assert answer["status"] == "stale" and answer["case"] == "stopped_request"
    await rig.advance(5.0)
    assert rig.svc("web").state == ServiceState.STOPPED
    await rig.daemon.operators.act("start", "web", actor="ops", reason="done")
    await rig.settle()
    assert rig.svc("web").state == ServiceState.RUNNING
    audit = [e["payload"] for e in await rig.store.events(kind="audit")]
    assert [(a["what"], a["outcome"], a["who"]) for a in audit] == [("stop", "stopped", "ops"),
                                                                    ("start", "starting", "ops")]


async def test_restart_requests_are_idempotent_and_guarded_by_the_incarnation(rig):
    current = rig.svc("web").incarnation
    req = RestartRequest(service="web", replaces=current, alert_id="a-1", reason="operator_test",
                         case="idle_failure", requested_by="daemon")
    first = await rig.daemon.carrier.restart(req)
    again = await rig.daemon.carrier.restart(req)
    stale = await rig.daemon.carrier.restart(req.model_copy(update={"alert_id": "a-2"}))
    await rig.settle()
    assert (first["status"], again["status"], stale["status"]) == ("accepted", "duplicate", "stale")
    assert len([r for r in await rig.rows("web") if r["retry_type"] == "child_restart"]) == 1


async def test_an_alert_no_ancestor_takes_is_undeliverable_then_the_daemon_decides(rig):
    rig.answer = None  # root does not answer
    await _task_for(rig, "worker")  # a failure with a task in flight: the parent's to decide
    old = await rig.crash("worker")
    assert any(url.endswith("/handle_child_timeout") for url, _ in rig.posts)
    [row] = await rig.restarts("worker")
    assert row["requested_by"] == "daemon" and row["case_id"] == "restart_with_task"
    assert len(await rig.store.events(kind="alert_undeliverable")) == 1
    assert rig.svc("worker").incarnation != old


async def test_an_alert_carries_the_view_its_parent_decides_on(rig):
    """The parent gets with the alert what GET /ladder/view would answer it (decider, alert,
    the daemon's clock reading): it decides without a round trip of its own."""
    rig.answer = None
    await _task_for(rig, "worker")
    old = await rig.crash("worker")
    [(url, alert)] = [(u, p) for u, p in rig.posts if u.endswith("/handle_child_timeout")]
    assert alert["handled"] is None and alert["carry"] is True
    view = LadderView.model_validate(alert["view"])
    assert (view.decider, view.service.name, view.service.incarnation, view.alert_status) == (
        "root", "worker", old, "pending")
    assert view.task is not None and view.task.task_id == "r-1.0"
    assert isinstance(decide(ChildFailed(alert["alert_id"], "worker", old, "process_exit", True, "r-1.0"), view,
                             view.now, view.policy), Restart)
    row = await rig.store.alert(alert["alert_id"])
    assert "view" not in row and "view" not in (row["detail"] or {})  # never persisted


async def test_an_ancestor_that_answers_without_acting_is_passed_over(rig):
    async def shrug(url, payload):
        return {"action": "ignore"}

    rig.answer = shrug
    old = await rig.crash("worker")
    [row] = await rig.rows("worker")
    assert row["requested_by"] == "daemon"
    assert rig.svc("worker").incarnation != old


def telling(rig: Rig, told: list):
    """The worker's parent (root) as common/ladder_parent.py answers an alert the daemon
    handled already: told, nothing decided; what it was told, and the worker's state then,
    go to ``told``."""
    async def answer(url, alert):
        told.append((alert, rig.svc(alert["service"]).state))
        return {"action": "told", "handled": alert["handled"]}
    return answer


async def test_an_idle_failure_is_restarted_at_once_and_its_parent_told_after(rig):
    """No task in flight: the ladder's table has one answer (idle_failure), whoever reads
    it. The daemon reads it on the parent's view and carries it without waiting for the
    parent's round trip; the parent is told once the worker is back, with no view and
    nothing to carry, and the alert is delivered to it."""
    told: list = []
    rig.answer = telling(rig, told)
    old = await rig.crash("worker")
    [row] = await rig.restarts("worker")
    assert (row["requested_by"], row["case_id"], row["decided_by"]) == ("daemon", "idle_failure", "policy")
    assert row["detail"]["decided_for"] == "root"  # on root's view: what root would have decided
    await rig.until_running("worker")
    await rig.settle()
    [(alert, state)] = told
    assert (alert["alert_id"], alert["handled"], alert["view"], alert["carry"]) == (
        row["alert_id"], "restart:idle_failure", None, False)
    assert state == ServiceState.RUNNING  # told after the restart, not before it
    stored = await rig.store.alert(row["alert_id"])
    assert (stored["status"], stored["delivered_to"]) == ("handled", "root")
    assert rig.svc("worker").incarnation != old
    assert [url for url, _ in rig.posts if "/control/" in url] == []
    assert await rig.store.events(kind="alert_undeliverable") == []


async def test_an_idle_failure_nobody_can_be_told_of_stays_handled(rig):
    """The parent is down: the restart happened all the same, and the alert is not made
    undeliverable (nor decided again by the daemon)."""
    rig.answer = None
    old = await rig.crash("worker")
    await rig.until_running("worker")
    await rig.settle()
    [row] = await rig.restarts("worker")
    assert row["requested_by"] == "daemon" and row["case_id"] == "idle_failure"
    assert (await rig.store.alert(row["alert_id"]))["status"] == "handled"
    assert await rig.store.events(kind="alert_undeliverable") == []
    assert rig.svc("worker").incarnation != old
    assert len([u for u, _ in rig.posts if u.endswith("/handle_child_timeout")]) == 1  # root, the only ancestor


async def test_a_new_crash_loop_episode_is_still_the_parents_to_decide(rig):
    """The failure that starts a crash-loop episode is not taken at once: its escalation
    climbs from the parent, so the parent gets the alert with its view, as before."""
    told: list = []
    asked: list = []

    async def answer(url, alert):
        if alert["handled"] is not None:
            return await telling(rig, told)(url, alert)
        asked.append(alert)
        view = LadderView.model_validate(alert["view"])
        event = ChildFailed(alert["alert_id"], alert["service"], alert["incarnation"], alert["reason"], True, None)
        return await carry_out(decide(event, view, view.now, view.policy), event, rig.daemon.carrier.actions)

    rig.answer = answer
    for _ in range(3):  # POLICY: max_restarts 3 in the window
        await rig.crash("worker")
        await rig.advance(4.0)
    assert len(told) == 2 and len(asked) == 1, (told, asked)
    assert LadderView.model_validate(asked[0]["view"]).service.name == "worker"
    rows = await rig.rows("worker")
    assert [r["case_id"] for r in rows if r["retry_type"] == "escalation"] == ["crash_loop_started"]
    assert rig.svc("worker").crash_looping


async def _task_for(rig, agent="root", task_id="r-1.0"):
    await rig.store.create_run("r-1", "build it", False)
    await rig.store.upsert_task({"task_id": task_id, "run_id": "r-1", "agent": agent, "parent_agent": "gateway",
                                 "kind": "run", "prompt": "build it"})
    await rig.store.task_progress(task_id, rig.svc(agent).incarnation, "delegated")
    rig.svc(agent).task_id = task_id


async def test_a_held_task_approved_on_another_provider_is_handed_to_the_running_incarnation(rig):
    """A task parked for an operator with nobody waiting with it (its agent restarted, or it
    came from a replica scaled away), approved on ollama: the agent's provider changes in
    place, and the task goes to the incarnation that runs now. It was deferred for a
    replacement on the new provider that nothing had asked for: the task sat assigned."""
    from tron.common.ladder import Approval

    await _task_for(rig, agent="worker", task_id="r-1.0")
    worker = rig.svc("worker")
    old = worker.incarnation
    assert worker.provider == "anthropic"
    assert await rig.store.park_task("r-1.0", "all_providers_down", "awaiting_operator", lease=None)
    await rig.daemon.providers.approve(await rig.store.task("r-1.0"), Approval(by="ops", provider="ollama"))
    await rig.daemon.providers.tick_held()
    for _ in range(20):
        await rig.advance(0.05)
        if [b for u, b in rig.posts if u.endswith("/tasks")]:
            break
    dispatched = [body for url, body in rig.posts if url.endswith("/tasks")]
    assert {(b["task_id"], b["provider"]) for b in dispatched} == {("r-1.0", "ollama")}, dispatched
    assert worker.incarnation == old and worker.provider == "ollama" and not worker.switched_away
    assert (await rig.store.task("r-1.0"))["status"] in ("assigned", "running")


async def test_a_held_task_approved_while_the_roots_switch_is_under_way_waits_for_the_replacement(rig):
    """The root switched the worker to ollama (its restart not yet begun): a held task approved
    meanwhile must not go to the incarnation about to be replaced (it stays switched away)."""
    from tron.common.ladder import Approval
    from tron.common.models import SwitchRequest

    await _task_for(rig, agent="worker", task_id="r-1.0.0")
    await rig.store.hold_task("r-1.0.0", "non_retryable:authentication_error")
    await rig.store.upsert_task({"task_id": "r-1.0.1", "run_id": "r-1", "agent": "worker", "parent_agent": "gateway",
                                 "kind": "run", "prompt": "p"})
    assert await rig.store.park_task("r-1.0.1", "all_providers_down", "awaiting_operator", lease=None)
    worker = rig.svc("worker")
    old = worker.incarnation
    answer = await rig.daemon.carrier.switch(SwitchRequest(
        service="worker", alert_id="a-1", task_id="r-1.0.0", to_provider="ollama",
        reason="non_retryable:authentication_error", case="switch_provider", delay=1.0, requested_by="root"))
    assert answer["status"] == "accepted" and worker.switched_away
    await rig.daemon.providers.approve(await rig.store.task("r-1.0.1"), Approval(by="ops", provider="ollama"))
    await rig.daemon.providers.tick_held()
    assert worker.incarnation == old and worker.switched_away
    assert [b for u, b in rig.posts if u.endswith("/tasks")] == []


async def test_a_parked_poll_from_an_incarnation_no_longer_current_is_told_to_abandon(rig):
    """An incarnation stopped, replaced or scaled away while its long poll waited must not
    resume the task (it is the next incarnation's, or a sibling's, now)."""
    from tron.common.ladder import Approval
    from tron.common.models import ProviderCall

    await _task_for(rig, agent="worker", task_id="r-1.0")
    worker = rig.svc("worker")
    assert await rig.store.park_task("r-1.0", "all_providers_down", "awaiting_operator", lease=worker.incarnation)
    await rig.daemon.providers.approve(await rig.store.task("r-1.0"), Approval(by="ops", provider="ollama"))
    stale = await rig.daemon.providers.park(ProviderCall(service="worker", incarnation="i-gone", task_id="r-1.0",
                                                         provider="anthropic"))
    assert stale["action"] == "abandon" and "no longer" in stale["why"], stale
    assert (await rig.store.task("r-1.0"))["status"] == "parked"
    current = await rig.daemon.providers.park(ProviderCall(service="worker", incarnation=worker.incarnation,
                                                           task_id="r-1.0", provider="anthropic"))
    assert current["action"] == "resume" and current["provider"] == "ollama", current


async def test_a_beat_read_after_its_task_ended_does_not_bring_the_task_back(rig):
    from tron.common.models import Beat

    await _task_for(rig, agent="worker", task_id="r-1.0")
    worker = rig.svc("worker")
    rig.daemon.monitor.beat("worker", worker.incarnation, 5, rig.clock.now(), task_id="r-1.0", progress="step:1/2")
    await rig.daemon.ledger.finish_task("r-1.0", TaskState.DONE, "ok", None, {}, worker.incarnation)
    assert worker.task_id is None and rig.daemon.monitor.snapshot("worker").task_id is None
    late = Beat(service="worker", incarnation=worker.incarnation, pid=worker.child.pid, seq=7, task_id="r-1.0",
                progress="step:2/2")
    await rig.daemon.on_beat(late)  # sent before the finish, read after it
    assert (worker.task_id, worker.progress) == (None, None)
    await rig.crash("worker")
    [row] = await rig.restarts("worker")
    assert (row["case_id"], row["task_id"], row["run_id"]) == ("idle_failure", None, None)


async def test_a_task_climbs_the_whole_ladder_and_ends_within_its_bound(rig):
    """The root's own task, decided by the daemon (the top for its children): restarts
    with the task, a provider switch, then a permanent failure; the run fails."""
    await _task_for(rig)
    for _ in range(10):
        task = await rig.store.task("r-1.0")
        if task["status"] in (TaskState.DONE, TaskState.FAILED):
            break
        rig.svc("root").task_id = "r-1.0"
        await rig.crash("root")
        await rig.advance(4.0)
    task = await rig.store.task("r-1.0")
    rows = await rig.store.task_history("r-1.0")
    kinds = [r["retry_type"] for r in rows]
    assert kinds == ["child_restart"] * 3 + ["llm_change", "permanent_failure"], kinds
    assert task["status"] == "failed" and task["failure"]["reason"] == "max_provider_switches_exceeded"
    assert task["attempt"] <= 1 + 3 + 1
    assert (await rig.store.run("r-1"))["status"] == "failed"
    assert rows[3]["to_provider"] == "ollama" and rig.svc("root").provider == "ollama"
    assert rig.svc("root").state == ServiceState.RUNNING  # the service itself came back, idle


async def test_a_switched_task_waits_for_the_incarnation_on_the_new_provider(rig):
    """The old incarnation may turn healthy (or claim) between the switch and its
    replacement: it must not get the freed task, or the task fails again on the provider
    it was moved away from and the root switches it back (seen in CI: three switches)."""
    from tron.common.models import SwitchRequest

    await _task_for(rig, agent="worker", task_id="r-1.0.0")
    await rig.store.hold_task("r-1.0.0", "non_retryable:authentication_error")
    worker = rig.svc("worker")
    old = worker.incarnation
    assert worker.provider == "anthropic"
    answer = await rig.daemon.carrier.switch(SwitchRequest(
        service="worker", alert_id="a-1", task_id="r-1.0.0", to_provider="ollama",
        reason="non_retryable:authentication_error", case="switch_provider", delay=1.0, requested_by="root"))
    assert answer["status"] == "accepted"
    assert worker.incarnation == old and worker.switched_away
    await rig.daemon.ledger.redispatch(worker)  # the old incarnation's health check lands now
    dispatched = [body for url, body in rig.posts if url.endswith("/tasks")]
    assert dispatched == []
    for _ in range(40):
        await rig.advance(0.25)
        if worker.incarnation != old and worker.state == ServiceState.RUNNING:
            break
    assert worker.incarnation != old and worker.state == ServiceState.RUNNING and not worker.switched_away
    await rig.daemon.ledger.redispatch(worker)
    dispatched = [body for url, body in rig.posts if url.endswith("/tasks")]
    assert dispatched and {(b["task_id"], b["provider"]) for b in dispatched} == {("r-1.0.0", "ollama")}
    assert (await rig.store.task("r-1.0.0"))["provider"] == "ollama"


async def test_a_task_held_for_a_decision_that_never_comes_is_decided_by_the_watchdog(rig):
    await _task_for(rig, agent="worker", task_id="r-1.0.0")
    await rig.store.hold_task("r-1.0.0", "max_restarts_exceeded")
    await rig.advance(30.0)
    await rig.daemon.router.watchdog_tick()
    await rig.settle()
    rows = await rig.store.task_history("r-1.0.0")
    assert [r["retry_type"] for r in rows] == ["llm_change"] and rows[0]["requested_by"] == "daemon"
    assert (await rig.store.task("r-1.0.0"))["status"] in ("assigned", "running")
    assert len(await rig.store.events(kind="watchdog_decides")) == 1


@pytest.fixture
async def pair(tmp_path):
    """Two programmers under the root, as two replicas are: a held task moves between them."""
    r = Rig(tmp_path, mesh(root={"role": "root", "port": 7002},
                           **{"w-1": {"role": "programmer", "port": 7003, "parent": "root"},
                              "w-2": {"role": "programmer", "port": 7004, "parent": "root"}}))
    await r.start()
    yield r
    await r.stop()


async def _held_on_w2(rig) -> dict:
    """A task of w-2 failed on anthropic and held for the top's decision (alert a-2, escalated)."""
    from tron.common.models import Alert, EscalationRecord

    await _task_for(rig, agent="w-2", task_id="r-1.0")
    w2 = rig.svc("w-2")
    await rig.store.insert_alert(Alert(alert_id="a-2", service="w-2", incarnation=w2.incarnation, reason="no_progress",
                                       task_id="r-1.0", run_id="r-1").model_dump(mode="json"), stable=True)
    answer = await rig.daemon.carrier.escalation(EscalationRecord(
        alert_id="a-2", service="w-2", task_id="r-1.0", reason="max_restarts_exceeded", case="task_restarts_exhausted",
        from_service="root", to_service="daemon"))
    assert answer["status"] == "recorded"
    return await rig.store.task("r-1.0")


def _dispatched(rig) -> set[tuple[str, str, str]]:
    return {(url.split(":")[-1].split("/")[0], b["task_id"], b["provider"]) for url, b in rig.posts
            if url.endswith("/tasks")}


async def test_a_held_task_moved_to_a_sibling_already_on_the_next_provider_is_handed_to_it_without_a_restart(pair):
    """w-2's task failed on anthropic; the sibling it moves to (w-2 scaled away) runs on ollama
    already. The daemon's decision counts from anthropic, the provider the task failed on: a
    switch to ollama, where the sibling is, so the sibling is not restarted and gets the task
    now. Counted from the sibling's own provider, it switched the sibling to anthropic, the
    failing one, and restarted it."""
    rig = pair
    await _held_on_w2(rig)
    w1 = rig.svc("w-1")
    w1.provider = w1.spawned_provider = "ollama"
    old = w1.incarnation
    await rig.store.requeue_tasks("w-2", to_agent="w-1")
    task = await rig.store.task("r-1.0")
    assert (task["agent"], task["status"]) == ("w-1", "escalated")
    await rig.daemon.router.decide_held(await rig.daemon.router.held_event(task, "held_task_moved", {"from_agent": "w-2"}))
    await rig.settle()
    [row] = [r for r in await rig.store.task_history("r-1.0") if r["retry_type"] == "llm_change"]
    assert (row["agent_id"], row["from_provider"], row["to_provider"]) == ("w-1", "anthropic", "ollama"), row
    assert (w1.incarnation, w1.provider, w1.switched_away) == (old, "ollama", False)
    assert _dispatched(rig) == {("7003", "r-1.0", "ollama")}, rig.posts
    assert (await rig.store.task("r-1.0"))["status"] in ("assigned", "running")


async def test_a_roots_switch_that_lands_after_its_task_moved_to_a_sibling_is_carried_to_the_sibling(pair):
    """The root's switch for w-2 waited (w-2 stopping) while a scale-down moved the held task
    to w-1: the task is released where it is now, and w-1, on anthropic, is moved to ollama
    (its replacement gets the task). Released as it was, the task sat assigned to w-1, on the
    provider it failed on, with nothing to hand it over."""
    from tron.common.models import SwitchRequest

    rig = pair
    await _held_on_w2(rig)
    w1 = rig.svc("w-1")
    old = w1.incarnation
    await rig.store.requeue_tasks("w-2", to_agent="w-1")
    answer = await rig.daemon.carrier.switch(SwitchRequest(
        service="w-2", alert_id="a-2", task_id="r-1.0", to_provider="ollama", reason="max_restarts_exceeded",
        case="switch_provider", requested_by="root"))
    assert answer["status"] == "accepted", answer
    assert w1.provider == "ollama" and w1.switched_away
    for _ in range(40):
        await rig.advance(0.25)
        if w1.incarnation != old and w1.state == ServiceState.RUNNING:
            break
    assert w1.incarnation != old and not w1.switched_away
    await rig.daemon.ledger.redispatch(w1)
    assert ("7003", "r-1.0", "ollama") in _dispatched(rig), rig.posts


async def test_new_settings_apply_at_once_and_are_kept_in_the_overlay(rig, tmp_path):
    d = rig.daemon
    d.config_path = tmp_path / "mesh.toml"
    await d.apply_policy({"miss_threshold": 6, "max_restarts": 5}, actor="ops@ui")
    assert (d.policy().miss_threshold, d.policy().max_restarts) == (6, 5)
    assert d.monitor.snapshot("root").beat_timeout == 6.0  # running incarnations are re-timed
    assert (tmp_path / "mesh.overlay.toml").read_text().count("=") == 2
    with pytest.raises(ValidationError, match="miss_threshold"):
        await d.apply_policy({"miss_threshold": 0}, actor="ops@ui")
    assert d.policy().miss_threshold == 6  # an invalid change changed nothing
    audit, refused = [e["payload"] for e in await rig.store.events(kind="audit")]
    assert audit["changed"]["miss_threshold"] == {"from": 3, "to": 6} and audit["who"] == "ops@ui"
    # ... and is in the audit trail all the same: every operator action, accepted or refused
    assert refused["who"] == "ops@ui" and refused["what"] == "settings"
    assert refused["outcome"].startswith("refused: invalid settings: miss_threshold")
    assert "miss_threshold" in refused["fields"]


async def _fail_for_good(rig, n: int, reason: str):
    from tron.common.models import PermanentFailure

    run_id, task_id = f"r-{n}", f"r-{n}.0"
    await rig.store.create_run(run_id, "build it", False)
    await rig.store.upsert_task({"task_id": task_id, "run_id": run_id, "agent": "worker", "parent_agent": "root",
                                 "kind": "step", "prompt": "p"})
    return await rig.daemon.carrier.fail(PermanentFailure(
        alert_id=f"a-{n}", service="worker", task_id=task_id, reason="max_provider_switches_exceeded",
        case="switches_exhausted", detail={"last_reason": reason}, requested_by="root"))


async def test_the_third_identical_failure_pauses_the_lane_and_new_tasks_are_refused(rig):
    for n, reason in enumerate(["overloaded_error", "authentication_error", "rate_limit_error"]):
        answer = await _fail_for_good(rig, n, reason)
        assert answer["lane"]["paused"] is False  # three different ways of failing: no trip
    for n in range(3, 5):
        assert (await _fail_for_good(rig, n, f"timeout after {n}.5s on run-{n}abcdef"))["lane"]["paused"] is False
    answer = await _fail_for_good(rig, 5, "timeout after 9.1s on run-ffffff")
    assert answer["lane"] == {**answer["lane"], "paused": True, "trips": 3, "lane": "programmer"}
    refusal = await rig.daemon.breaker.refusal("worker")
    assert refusal["reason"] == "lane_paused" and "tron lane resume programmer" in refusal["message"]
    assert len(await rig.store.events(kind="lane_paused")) == 1
    [alert] = [a for a in await rig.store.open_alerts() if a["reason"] == "lane_paused"]
    assert alert["agent"] == "lane:programmer" and alert["detail"]["lane"] == "programmer"
    # it counts as no failure of a service: no backoff, no crash loop
    assert alert["alert_id"] not in {f["alert_id"] for f in await rig.store.failures("worker", limit=10)}
    await rig.daemon.operators.lane("resume", "programmer", actor="ops", reason="fixed the prompt")
    assert await rig.daemon.breaker.refusal("worker") is None
    assert (await rig.store.alert(alert["alert_id"]))["status"] == "handled"
    rig.clock.advance(3601)  # and an old trip no longer counts
    assert (await _fail_for_good(rig, 6, "timeout after 1s on run-eeeeee"))["lane"]["paused"] is False


async def test_a_paused_service_takes_no_new_tasks(rig):
    await rig.daemon.operators.act("pause", "worker", actor="ops", reason="maintenance")
    assert (await rig.daemon.breaker.refusal("worker"))["reason"] == "service_paused"
    again = await rig.daemon.operators.act("pause", "worker", actor="ops", reason="twice")
    assert again["status"] == "already_paused"
    await rig.daemon.operators.act("resume", "worker", actor="ops", reason="done")
    assert await rig.daemon.breaker.refusal("worker") is None


async def test_a_stopped_service_takes_no_new_tasks_until_started(rig):
    await rig.daemon.operators.act("stop", "worker", actor="ops", reason="maintenance")
    refusal = await rig.daemon.breaker.refusal("worker")
    assert refusal["reason"] == "service_stopped" and "tron start worker" in refusal["message"]
    await rig.daemon.operators.act("start", "worker", actor="ops", reason="done")
    assert await rig.daemon.breaker.refusal("worker") is None


async def test_task_actions_follow_the_task_machine_and_act_once(rig):
    from tron.services.daemon.audit import Refused

    tasks = rig.daemon.tasks
    await _task_for(rig, agent="worker", task_id="r-1.0")
    await rig.store.add_checkpoint("r-1.0", 1, "draft", "the draft", "i-x")
    await rig.store.add_checkpoint("r-1.0", 2, "review", "the review", "i-x")
    with pytest.raises(Refused, match="from_step must be between 1 and 3"):
        await tasks.act("resume", "r-1.0", actor="ops", reason="x", from_step=7)
    resumed = await tasks.act("resume", "r-1.0", actor="ops", reason="redo the review", from_step=2,
                              request_id="req-1")
    assert resumed["kept"] == [1] and resumed["set_aside"] == [2]
    again = await tasks.act("resume", "r-1.0", actor="ops", reason="redo the review", from_step=2,
                            request_id="req-1")
    assert again["repeated"] is True  # the same request acts once
    await rig.settle()
    rig.store.checkpoints_[("r-1.0", 1)]["output"] = "tampered"  # someone edits the registry by hand
    with pytest.raises(Refused, match="checkpoint 1 \\(draft\\) does not match its hash"):
        await tasks.act("hard_reset", "r-1.0", actor="ops", reason="replay")
    cancelled = await tasks.act("cancel", "r-1.0", actor="ops", reason="not needed")
    assert cancelled["tasks"] == ["r-1.0"] and (await rig.store.task("r-1.0"))["status"] == "cancelled"
    assert (await rig.store.run("r-1"))["status"] == "cancelled"
    assert (await tasks.act("cancel", "r-1.0", actor="ops", reason="again"))["status"] == "already_cancelled"
    retried = await tasks.act("retry", "r-1.0", actor="ops", reason="now")
    assert retried["status"] == "reopened" and retried["tasks"] == ["r-1.0"]
    assert (await rig.store.run("r-1"))["status"] == "running"
    with pytest.raises(Refused, match="no task 'r-9'"):
        await tasks.act("retry", "r-9", actor="ops", reason="x")
    audit = [e["payload"] for e in await rig.store.events(kind="audit")]
    assert [(a["what"], a["outcome"].split(":")[0]) for a in audit] == [
        ("task_resume", "refused"), ("task_resume", "retrying"), ("task_hard_reset", "refused"),
        ("task_cancel", "cancelled"), ("task_cancel", "already_cancelled"), ("task_retry", "reopened")]


@pytest.mark.parametrize("verb", ["resume", "hard_reset"])
async def test_a_refused_resume_or_hard_reset_changes_nothing(rig, verb):
    from tron.services.daemon.audit import Refused

    await _task_for(rig, agent="worker", task_id="r-2.0")
    for n, name in ((1, "draft"), (2, "review")):
        await rig.store.add_checkpoint("r-2.0", n, name, f"the {name}", "i-x")
    await rig.daemon.ledger.finish_task("r-2.0", TaskState.DONE, "finished", None, {}, "i-x")
    with pytest.raises(Refused, match="is done: nothing to retry"):
        await rig.daemon.tasks.act(verb, "r-2.0", actor="ops", reason="x", from_step=1)
    assert [m["step"] for m in await rig.store.checkpoints("r-2.0")] == [1, 2]  # nothing set aside
    assert "r-2.0" not in rig.daemon.ledger.replay  # no replay armed for a later retry


class ScriptedChecks:
    """Probe answers from a script, one per check of each use; every check is noted with
    the clock's time. An exhausted script passes."""

    def __init__(self, svc, clock) -> None:
        self.spec, self.clock = svc.spec, clock
        self.script: dict[str, list[bool]] = {"liveness": [], "readiness": []}
        self.calls: list[tuple[str, float]] = []

    async def check(self, svc, probe):
        use = "liveness" if probe is self.spec.liveness else "readiness"
        self.calls.append((use, self.clock.now()))
        ok = self.script[use].pop(0) if self.script[use] else True
        return ok, "scripted"


@pytest.fixture
async def probed(tmp_path):
    probe = {"exec": {"command": ["true"]}, "interval": 1.0}
    r = Rig(tmp_path, mesh(web={"command": ["web-server"], "port": 7001, "startup": probe,
                                "readiness": {**probe, "failure_threshold": 2, "success_threshold": 2},
                                "liveness": {**probe, "failure_threshold": 3, "initial_delay": 5.0}}))
    await r.start()
    r.checks = r.daemon.probes.checks = ScriptedChecks(r.svc("web"), r.clock)
    yield r
    await r.stop()


async def test_probes_keep_their_thresholds_and_initial_delay_while_running(probed):
    """Kubernetes' rules after the start: readiness needs success_threshold passes in a
    row to be ready and failure_threshold failures in a row to be not ready; liveness is
    not asked before its initial_delay and alerts on failure_threshold failures in a row."""
    rig, web = probed, probed.svc("web")
    started, first = web.started_at, web.incarnation
    assert web.state == ServiceState.RUNNING and not web.ready  # started by its startup probe only

    async def readiness(results: list[bool]) -> None:
        rig.checks.script["readiness"] = list(results)
        while rig.checks.script["readiness"]:
            await rig.advance(0.25)

    steps = [  # (readiness answers, ready after them)
        ([True], False), ([True], True),  # two passes in a row
        ([False], True), ([True, False], True),  # a failure, then a pass breaks the streak
        ([False], False),  # the second failure in a row
        ([True, False, True], False), ([True], True)]
    for results, ready in steps:
        await readiness(results)
        assert web.ready is ready, (results, ready)
    assert min(t for use, t in rig.checks.calls if use == "liveness") >= started + 5.0
    rig.checks.script["liveness"] = [False, False, True, False, False, False]
    while rig.checks.script["liveness"]:
        await rig.advance(0.25)
    await rig.advance(1.0)
    [row] = await rig.rows("web")
    assert row["reason"] == "liveness_failed" and web.incarnation != first
    alert = await rig.store.alert(row["alert_id"])
    assert alert["detail"]["failures"] == 3


async def test_settings_that_cannot_be_kept_are_not_applied(rig, monkeypatch):
    import errno

    import tron.services.daemon.core as core

    def full(*_):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(core, "write_overlay", full)
    before = rig.daemon.policy()
    with pytest.raises(OSError):
        await rig.daemon.apply_policy({"max_restarts": before.max_restarts + 1}, actor="test")
    assert rig.daemon.policy() == before
    [refused] = [e["payload"] for e in await rig.store.events(kind="audit")]  # not applied, but audited
    assert refused["who"] == "test" and refused["outcome"].startswith("refused: not saved to ")
    assert "No space left on device" in refused["outcome"]


async def test_a_leased_task_its_agent_stops_naming_is_lost_and_restarted_with_it(rig):
    """No task runs forever, even one its agent lost: beats that stop naming a task the
    registry has leased to the incarnation raise task_lost after the grace (5 s here), and
    the ladder restarts the agent with the task."""
    await _task_for(rig, agent="worker", task_id="r-1.0.0")
    worker = rig.svc("worker")
    first = worker.incarnation
    await rig.beats("worker", ["r-1.0.0"], 10.0)  # named: nothing happens however long it runs
    await rig.beats("worker", [], 3.0)  # unnamed, within the grace (a result on its way)
    await rig.beats("worker", ["r-1.0.0"], 1.0)  # named again: the clock starts over
    await rig.beats("worker", [], 4.0)
    assert worker.incarnation == first and await rig.rows("worker") == []
    await rig.beats("worker", [], 2.0)
    [row] = await rig.rows("worker")
    assert (row["retry_type"], row["reason"], row["task_id"]) == ("child_restart", "task_lost", "r-1.0.0"), row
    assert worker.incarnation != first
    task = await rig.store.task("r-1.0.0")
    assert task["status"] in ("assigned", "running") and task["attempt"] == 2, task


async def test_a_request_repeated_after_a_daemon_restart_acts_once(tmp_path):
    from tron.services.daemon.audit import Audit

    store = MemoryStore(clock=FakeClock())
    acted = []

    async def act():
        acted.append(1)
        return {"status": "paused", "service": "worker"}

    first = Audit(store)
    answer = await first.run(act, actor="ops", what="service_pause", target="worker", state=lambda: "running",
                             reason="", request_id="req-1")
    again = Audit(store)  # the next daemon, on the same registry
    assert await again.load() == 1
    repeated = await again.run(act, actor="ops", what="service_pause", target="worker", state=lambda: "running",
                               reason="", request_id="req-1")
    assert acted == [1] and repeated == {**answer, "repeated": True}
    await again.run(act, actor="ops", what="service_pause", target="worker", state=lambda: "running",
                    reason="", request_id="req-2")
    assert acted == [1, 1]


async def test_a_start_that_cannot_be_prepared_is_a_spawn_failure_not_a_hang(rig, monkeypatch):
    """Whatever fails before the fork (the environment, a template) ends as spawn_failed,
    and the ladder retries: no service stays STARTING with nobody watching it."""
    sup = rig.daemon.sup
    real = sup._spawn_spec
    calls = []

    def once(svc, incarnation, env):
        calls.append(svc.name)
        if len(calls) == 1:
            raise KeyError("'cwd'")
        return real(svc, incarnation, env)

    monkeypatch.setattr(sup, "_spawn_spec", once)
    old = await rig.crash("web")
    await rig.until_running("web")
    web = rig.svc("web")
    assert web.state == ServiceState.RUNNING and web.incarnation != old and calls == ["web", "web"]
    rows = await rig.rows("web")
    assert [r["reason"] for r in rows] == ["process_exit", "spawn_failed"], rows
    [event] = await rig.store.events(kind="spawn_failed")
    assert "cannot prepare its start: KeyError" in event["payload"]["error"]


async def test_a_starting_agents_first_accepted_beat_is_its_health(rig):
    """The runtime beats only once it listens, with the incarnation's own token: its first
    accepted beat makes it healthy even before its /health has answered (that connection
    waits in the held socket's backlog behind the new process's start)."""
    async def never(svc, incarnation):
        return False

    rig.daemon.sup.healthy_now = never
    old = await rig.crash("worker")
    worker = rig.svc("worker")
    assert worker.incarnation != old and worker.state == ServiceState.STARTING
    await rig.settle()
    assert worker.state == ServiceState.STARTING  # no beat, no answer: not healthy
    stale = await rig.daemon.on_beat(Beat(service="worker", incarnation=old, pid=worker.child.pid, seq=5))
    assert str(stale) != "accepted"
    await rig.settle()
    assert worker.state == ServiceState.STARTING  # the old incarnation's beat proves nothing
    verdict = await rig.daemon.on_beat(Beat(service="worker", incarnation=worker.incarnation, pid=worker.child.pid,
                                            seq=0))
    assert str(verdict) == "accepted"
    await rig.settle()
    assert worker.state == ServiceState.RUNNING and worker.ready


async def test_a_starting_agents_first_beat_brings_its_health_check_forward(rig):
    """The health check of a new incarnation polls; a beat from it (it serves by then) makes
    the next check happen now rather than after the poll interval: the fake clock never
    moves here, so only the beat can end the wait."""
    serving = False

    async def healthy(svc, incarnation):
        return serving and svc.incarnation == incarnation and svc.child is not None and svc.child.alive

    rig.daemon.sup.healthy_now = healthy
    old = await rig.crash("worker")
    worker = rig.svc("worker")
    assert worker.incarnation != old and worker.state == ServiceState.STARTING  # not serving yet: it waits
    serving = True
    await rig.settle()
    assert worker.state == ServiceState.STARTING  # the clock has not moved: no poll came
    verdict = await rig.daemon.on_beat(Beat(service="worker", incarnation=worker.incarnation, pid=worker.child.pid,
                                            seq=0))
    assert str(verdict) == "accepted"
    await rig.settle()
    assert worker.state == ServiceState.RUNNING and worker.ready


async def test_a_task_handed_to_an_agent_that_never_takes_it_is_lost_and_restarted_with_it(rig):
    """A task assigned to an agent whose beats never name it (its POST /tasks refused it: a bug
    in the agent, which stays healthy) is task_lost after the grace, like a leased one; the
    ladder restarts the agent with it (the new incarnation is handed it again)."""
    await rig.store.create_run("r-1", "build it", False)
    await rig.store.upsert_task({"task_id": "r-1.0.0", "run_id": "r-1", "agent": "worker", "parent_agent": "root",
                                 "kind": "run", "prompt": "build it"})
    assert (await rig.store.task("r-1.0.0"))["status"] == "assigned"
    worker = rig.svc("worker")
    first = worker.incarnation
    await rig.beats("worker", [], 4.0)  # within the grace (a hand-over on its way)
    assert worker.incarnation == first and await rig.rows("worker") == []
    await rig.beats("worker", [], 2.0)
    [row] = await rig.rows("worker")
    assert (row["retry_type"], row["reason"], row["task_id"]) == ("child_restart", "task_lost", "r-1.0.0"), row
    assert worker.incarnation != first


async def test_housekeeping_outlives_a_reap_that_fails_for_lack_of_file_descriptors(rig, monkeypatch):
    """A flood of connections that takes every descriptor makes the reap of strays fail
    (EMFILE on /proc): the housekeeping (watchdog, log rotation, backups) must go on after it."""
    import errno

    from tron.services.daemon import core

    failures = []

    def no_descriptors(tracked):
        failures.append(tracked)
        raise OSError(errno.EMFILE, "Too many open files", "/proc/self/stat")

    ticks = []
    real_tick = rig.daemon.router.watchdog_tick

    async def counted_tick():
        ticks.append(rig.clock.now())
        await real_tick()

    monkeypatch.setattr(core, "reap_strays", no_descriptors)
    monkeypatch.setattr(rig.daemon.router, "watchdog_tick", counted_tick)
    waited = 0.0
    while (len(failures) < 2 or len(ticks) < 4) and waited < 30.0:
        await rig.advance(1.0)
        waited += 1.0
    assert len(failures) >= 2 and len(ticks) >= 4, (failures, ticks)
    assert ticks[-1] > ticks[0]  # ticks went on after the first failed reap
