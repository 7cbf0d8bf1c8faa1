"""The agent SDK on its own: heartbeats on a fake clock, resumable steps, how a task's
outcome reaches the daemon, and the bounded retries of hand-offs. The daemon is a fake
that records what it was sent and answers as scripted; no process, no socket."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from tron.common.agent import Abandon, Agent, Task, TaskFailed
from tron.common.clock import FakeClock
from tron.common.config import MeshConfig
from tron.common.http import MeshHTTPError
from tron.common.models import TaskAssign
from tron.common.service import ServiceContext, ServiceEnv, heartbeat_loop

DAEMON = "http://127.0.0.1:7000"


class FakeDaemon:
    """Stands in for ServiceContext.client: ``answers[(method, path)]`` is a value to
    return, an exception to raise, or a callable of the body giving either."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, object]] = []
        self.answers: dict[tuple[str, str], object] = {}

    async def _call(self, method: str, url: str, body=None):
        path = url.removeprefix(DAEMON)
        self.calls.append((method, path, body))
        answer = self.answers.get((method, path), {})
        if callable(answer) and not isinstance(answer, type):
            answer = answer(body)
            if asyncio.iscoroutine(answer):
                answer = await answer
        if isinstance(answer, BaseException):
            raise answer
        return answer

    async def post(self, url: str, body=None, **kw):
        return await self._call("POST", url, body)

    async def get(self, url: str, **kw):
        return await self._call("GET", url)

    def sent(self, method: str, path: str) -> list:
        return [b for m, p, b in self.calls if (m, p) == (method, path)]


class InstantClock(FakeClock):
    """Sleeps return at once, moving the clock and remembering how long they were."""

    def __init__(self) -> None:
        super().__init__()
        self.slept: list[float] = []

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.advance(max(0.0, seconds))
        await asyncio.sleep(0)


def make_ctx(**policy) -> ServiceContext:
    config = MeshConfig.model_validate({
        "policy": {"heartbeat_interval": 1.0, **policy},
        "services": {"worker": {"agent": "mine.steps:Steps", "port": 7001}}})
    env = ServiceEnv(service="worker", role="agent", port=7001, incarnation="i-000000000001", home=Path("/nonexistent"),
                     daemon_url=DAEMON, token_file=Path("/nonexistent/token"))
    ctx = ServiceContext(env, config, "t" * 32)
    ctx.client = FakeDaemon()
    return ctx


def make_agent(**policy) -> tuple[Agent, FakeDaemon, InstantClock]:
    agent = Agent(make_ctx(**policy))
    agent._tron.clock = InstantClock()
    return agent, agent._tron.ctx.client, agent._tron.clock


def assign(**kw) -> TaskAssign:
    return TaskAssign(**{"task_id": "run-1.0", "run_id": "run-1", "kind": "run", "prompt": "p", "reply_to": "operator",
                         **kw})


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


# -- heartbeats ------------------------------------------------------------------------------


async def test_beats_go_out_on_a_fixed_schedule_carrying_the_task_and_its_progress():
    ctx, clock = make_ctx(), FakeClock()
    ctx.task_id, ctx.progress = "run-1.0", "step:2/4"
    loop = asyncio.ensure_future(heartbeat_loop(ctx, clock))
    await settle()
    for _ in range(3):
        clock.advance(1.0)
        await settle()
    beats = ctx.client.sent("POST", "/beat")
    loop.cancel()
    assert [b.seq for b in beats] == [0, 1, 2, 3]
    assert {(b.task_id, b.progress, b.incarnation) for b in beats} == {("run-1.0", "step:2/4", "i-000000000001")}


async def test_the_daemons_answer_sets_the_interval():
    ctx, clock = make_ctx(), FakeClock()
    ctx.client.answers[("POST", "/beat")] = {"interval": 0.25}
    loop = asyncio.ensure_future(heartbeat_loop(ctx, clock))
    await settle()
    clock.advance(1.0)  # the first interval was 1.0 ...
    await settle()
    for _ in range(4):  # ... then every 0.25 s
        clock.advance(0.25)
        await settle()
    loop.cancel()
    assert len(ctx.client.sent("POST", "/beat")) == 6


async def test_after_a_stall_one_beat_goes_at_once_and_then_the_schedule_resumes():
    ctx, clock = make_ctx(), FakeClock(start=0.0)
    release = asyncio.Event()
    sent_at: list[float] = []

    async def beat(body):
        sent_at.append(clock.now())
        if body.seq == 1:
            await release.wait()  # the daemon (or this loop) stalls for five intervals
        return {}

    ctx.client.answers[("POST", "/beat")] = beat
    loop = asyncio.ensure_future(heartbeat_loop(ctx, clock))
    await settle()
    clock.advance(1.0)
    await settle()
    clock.advance(5.0)
    release.set()
    await settle()
    clock.advance(1.0)
    await settle()
    loop.cancel()
    assert sent_at == [0.0, 1.0, 6.0, 7.0]  # no burst of the missed beats


@pytest.mark.parametrize("status,verdict,advance,exits", [
    (409, "stale_incarnation", 0.0, True),  # a newer incarnation replaced us
    (404, "unknown_service", 5.0, False),  # not known yet: keep beating for stale_after
    (404, "unknown_service", 31.0, True),  # not known for stale_after: a ghost of an earlier daemon
    (500, None, 60.0, False),  # a daemon in trouble is no reason to stop
])
async def test_what_the_daemon_answers_decides_whether_the_agent_lives_on(status, verdict, advance, exits):
    ctx, clock = make_ctx(stale_after=30.0), FakeClock()
    body = '{"verdict": "%s"}' % verdict if verdict else "{}"
    ctx.client.answers[("POST", "/beat")] = MeshHTTPError(status, DAEMON + "/beat", body)
    loop = asyncio.ensure_future(heartbeat_loop(ctx, clock))
    await settle()
    for _ in range(int(advance)):
        clock.advance(1.0)
        await settle()
    assert ctx.superseded.is_set() is exits and loop.done() is exits
    loop.cancel()


# -- steps -----------------------------------------------------------------------------------


class Producer:
    def __init__(self, agent: Agent, task: Task) -> None:
        self.agent, self.task, self.seen = agent, task, []

    def __call__(self, n: int):
        async def produce(previous: str) -> str:
            self.seen.append((n, previous, self.task.progress))
            return f"out{n}"
        return produce

    async def run(self, steps: int = 4) -> list[str]:
        return [await self.agent.step(self.task, n, f"s{n}", self(n), total=steps) for n in range(1, steps + 1)]


async def test_fresh_steps_run_in_order_each_checkpointed_before_the_next():
    agent, daemon, _ = make_agent()
    task = Task(assign())
    p = Producer(agent, task)
    assert await p.run() == ["out1", "out2", "out3", "out4"]
    assert p.seen == [(1, "", "step:1/4"), (2, "out1", "step:2/4"), (3, "out2", "step:3/4"), (4, "out3", "step:4/4")]
    marks = daemon.sent("POST", "/tasks/run-1.0/checkpoint")
    assert [(m.step, m.step_id, m.output) for m in marks] == [(n, f"s{n}", f"out{n}") for n in range(1, 5)]
    assert daemon.sent("GET", "/tasks/run-1.0/checkpoints") == []


async def test_a_resumed_task_skips_what_was_done_and_reads_earlier_outputs_once():
    agent, daemon, _ = make_agent()
    daemon.answers[("GET", "/tasks/run-1.0/checkpoints")] = [
        {"step": 1, "step_id": "s1", "output": "old1"}, {"step": 2, "step_id": "s2", "output": "old2"}]
    task = Task(assign(checkpoint={"step": 2, "step_id": "s2", "output": "old2"}, progress="step:3/4"))
    p = Producer(agent, task)
    assert await p.run() == ["old1", "old2", "out3", "out4"]
    assert [s[:2] for s in p.seen] == [(3, "old2"), (4, "out3")]
    assert len(daemon.sent("GET", "/tasks/run-1.0/checkpoints")) == 1
    assert [m.step for m in daemon.sent("POST", "/tasks/run-1.0/checkpoint")] == [3, 4]


async def test_earlier_outputs_that_cannot_be_read_are_produced_again_not_invented():
    agent, daemon, _ = make_agent()
    daemon.answers[("GET", "/tasks/run-1.0/checkpoints")] = OSError("connection refused")
    task = Task(assign(checkpoint={"step": 2, "step_id": "s2", "output": "old2"}))
    p = Producer(agent, task)
    assert await p.run() == ["out1", "old2", "out3", "out4"]
    assert [s[0] for s in p.seen] == [1, 3, 4]


async def test_a_hard_reset_replays_every_verified_step_without_asking_the_registry():
    agent, daemon, _ = make_agent()
    replay = [{"step": 1, "step_id": "s1", "hash": "h1", "output": "v1"},
              {"step": 2, "step_id": "s2", "hash": "h2", "output": "v2"}]
    task = Task(assign(checkpoint=replay[-1], replay=replay))
    p = Producer(agent, task)
    assert await p.run(3) == ["v1", "v2", "out3"]
    assert daemon.sent("GET", "/tasks/run-1.0/checkpoints") == []


# -- outcomes ---------------------------------------------------------------------------------


class Scripted(Agent):
    def __init__(self, ctx, outcome) -> None:
        super().__init__(ctx)
        self.outcome = outcome

    async def work(self, task: Task) -> str:
        if isinstance(self.outcome, BaseException):
            raise self.outcome
        return self.outcome


@pytest.mark.parametrize("outcome,status,reason", [
    ("the answer", "done", None),
    (TaskFailed("no_sources", {"query": "q"}), "failed", "no_sources"),
    (ValueError("a bug"), "failed", "internal_error:ValueError"),
])
async def test_every_end_of_a_task_is_handed_to_the_daemon(outcome, status, reason):
    agent = Scripted(make_ctx(), outcome)
    agent._tron.clock = InstantClock()
    task = Task(assign())
    agent._tron.active[task.id] = task
    await agent._tron._run(task)
    [finish] = agent._tron.ctx.client.sent("POST", "/tasks/run-1.0/finish")
    assert (finish["status"], finish["reason"]) == (status, reason)
    assert finish["incarnation"] == "i-000000000001" and task.id not in agent._tron.active
    if status == "done":
        assert finish["result"] == "the answer"


async def test_a_later_attempt_replaces_a_running_one_whose_end_is_never_sent():
    started: list[int] = []
    release = asyncio.Event()

    class Slow(Agent):
        async def work(self, task: Task) -> str:
            started.append(task.assign.attempt)
            await release.wait()
            return f"attempt {task.assign.attempt}"

    agent = Slow(make_ctx())
    agent._tron.clock = InstantClock()
    assert agent._tron.take(assign(attempt=1))["status"] == "accepted"
    await settle()
    assert agent._tron.take(assign(attempt=1))["status"] == "already_running"
    assert agent._tron.take(assign(attempt=2))["status"] == "accepted"  # an operator retried it
    await settle()
    release.set()
    await settle()
    finishes = agent._tron.ctx.client.sent("POST", "/tasks/run-1.0/finish")
    assert started == [1, 2] and [(f["result"], f["attempt"]) for f in finishes] == [("attempt 2", 2)]
    assert agent._tron.active == {} and agent._tron._runs == {}


async def test_an_abandoned_task_is_left_to_the_ladder():
    agent = Scripted(make_ctx(), Abandon())
    await agent._tron._run(Task(assign()))
    assert agent._tron.ctx.client.sent("POST", "/tasks/run-1.0/finish") == []


@pytest.mark.parametrize("failures,tries,ok", [
    ([], 1, True),
    ([OSError("refused"), asyncio.TimeoutError()], 3, True),  # the daemon restarting: retried
    ([MeshHTTPError(503, "u", "busy")] * 3, 4, True),
    ([MeshHTTPError(422, "u", "bad")], 1, False),  # refused: retrying cannot help
    ([OSError("refused")] * 10, 5, False),  # bounded
])
async def test_hand_offs_retry_a_bounded_number_of_times_with_capped_backoff(failures, tries, ok):
    agent, _, clock = make_agent()
    queue = list(failures)
    attempts = []

    async def call():
        attempts.append(1)
        if queue:
            raise queue.pop(0)

    assert await agent._tron._retrying(call, what="x", attempts=5) is ok
    assert len(attempts) == tries
    assert all(0 < s <= 2.0 * 1.1 for s in clock.slept) and len(clock.slept) == tries - 1


# -- direct SDK calls ----------------------------------------------------------------------------


def governed(daemon: FakeDaemon, *decisions: dict) -> list[dict]:
    """The daemon's provider desk: every call admitted; each failure answered with the
    next of ``decisions``; successes acknowledged. Returns the outcomes it was sent."""
    queue = list(decisions)
    outcomes: list[dict] = []

    def outcome(body):
        outcomes.append(body)
        return {"action": "done"} if body["ok"] else queue.pop(0)

    daemon.answers[("POST", "/providers/acquire")] = {"action": "go"}
    daemon.answers[("POST", "/providers/outcome")] = outcome
    return outcomes


async def test_a_direct_sdk_call_returns_what_the_sdk_returned(monkeypatch):
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-ant-test")
    agent, daemon, _ = make_agent()
    outcomes = governed(daemon)
    reply = await agent.call_llm(Task(assign()), lambda client: _answer(client))
    assert reply == "AsyncAnthropic" and daemon.sent("POST", "/control/report_failure") == []
    assert [(o["provider"], o["ok"], o["task_id"]) for o in outcomes] == [("anthropic", True, "run-1.0")]


async def _answer(client):
    return type(client).__name__


@pytest.mark.parametrize("key,error,reason,retryable", [
    ("sk-ant-test", asyncio.TimeoutError(), "timeout", True),
    ("sk-ant-test", ConnectionRefusedError("refused"), "connection_error", True),
    (None, None, "not_configured", False),  # no key and no llm-sim: said, not crashed on
])
async def test_a_failed_sdk_call_is_classified_and_the_ladder_answers_it(monkeypatch, key, error, reason, retryable):
    if key:
        monkeypatch.setenv("ANTHROPIC_API_KEY", key)
    else:
        monkeypatch.delenv("ANTHROPIC_API_KEY", raising=False)
    agent, daemon, _ = make_agent()
    outcomes = governed(daemon, {"action": "fail", "reason": "all_providers_down: ..."})

    async def request(client):
        raise error

    with pytest.raises(Abandon):
        await agent.call_llm(Task(assign()), request)
    [sent] = outcomes
    failure = sent["failure"]
    assert (failure["reason"], failure["retryable"], sent["task_id"], sent["ok"]) == (reason, retryable, "run-1.0", False)
    assert key is None or key not in str(sent)
    assert daemon.sent("POST", "/control/report_failure") == []  # no alert: no process is killed for it


class Answers:
    """A provider whose answers are scripted per call: an exception to raise, or a text."""

    def __init__(self, *script) -> None:
        self.script = list(script)
        self.calls: list[str] = []

    def provider_for(self, name: str, **kw):
        from tron.common.providers import LLMReply

        outer = self

        class One:
            async def complete(self, **kw):
                outer.calls.append(name)
                step = outer.script.pop(0)
                if isinstance(step, BaseException):
                    raise step
                return LLMReply(provider=name, model=f"{name}-model", text=step, input_tokens=3, output_tokens=2,
                                streamed=False)

        return One()


async def test_retry_in_place_then_switch_in_place_then_success_in_one_incarnation(monkeypatch):
    agent, daemon, clock = make_agent()
    outcomes = governed(daemon, {"action": "retry", "delay": 2.5, "case": "rate_limit_wait"},
                        {"action": "switch", "provider": "ollama", "delay": 0.0, "case": "provider_open"})
    answers = Answers(asyncio.TimeoutError(), asyncio.TimeoutError(), "answer")
    monkeypatch.setattr("tron.common.providers.provider_for", answers.provider_for)
    task = Task(assign(), provider="anthropic")
    assert await agent.llm(task, "p") == "answer"
    assert answers.calls == ["anthropic", "anthropic", "ollama"]
    assert [(o["provider"], o["ok"]) for o in outcomes] == [("anthropic", False), ("anthropic", False), ("ollama", True)]
    assert outcomes[-1]["usage"]["model"] == "ollama-model" and outcomes[-1]["usage"]["input_tokens"] == 3
    assert 2.5 in clock.slept and task.provider == "ollama"
    assert task.waiting == 0


class TwoSteps(Agent):
    """Step 1 through llm (any provider), step 2 a provider-specific SDK call."""

    def __init__(self, ctx) -> None:
        super().__init__(ctx)
        self.sdk_calls: list[tuple[str, str]] = []

    async def work(self, task: Task) -> str:
        first = await self.step(task, 1, "draft", lambda _: self.llm(task, "draft"))

        async def request(client):
            self.sdk_calls.append((type(client).__name__, self.model))
            if len(self.sdk_calls) == 1:
                raise asyncio.TimeoutError()
            return f"{first} + {self.provider}"

        return await self.step(task, 2, "tools", lambda _: self.call_llm(task, request))


async def test_a_provider_specific_call_moved_by_the_ladder_reruns_the_work_from_its_last_step(monkeypatch):
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-ant-test")
    ctx = make_ctx()
    agent = TwoSteps(ctx)
    agent._tron.clock = InstantClock()
    daemon = ctx.client
    governed(daemon, {"action": "switch", "provider": "ollama", "delay": 0.0, "case": "provider_open"})
    answers = Answers("the draft")
    monkeypatch.setattr("tron.common.providers.provider_for", answers.provider_for)
    agent._tron.take(assign())
    [finish] = await wait_for_async(lambda: daemon.sent("POST", "/tasks/run-1.0/finish"))
    assert finish["status"] == "done" and finish["result"] == "the draft + ollama", finish
    # step 1 ran once (its output kept), step 2 again on Ollama, with Ollama's client and model
    assert answers.calls == ["anthropic"]
    assert agent.sdk_calls == [("AsyncAnthropic", "claude-sonnet-4-5"), ("AsyncClient", "llama3.1")]
    assert [c.step for c in daemon.sent("POST", "/tasks/run-1.0/checkpoint")] == [1, 2]


async def wait_for_async(probe, timeout: float = 30.0):
    """Until ``probe`` answers, polled every 5 ms: the first call may import an LLM SDK (over a
    second on a loaded machine), so the bound is generous; a quick pass stays quick."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = probe()
        if got:
            return got
        await asyncio.sleep(0.005)
    raise AssertionError(f"not within {timeout:.0f}s")


async def test_a_parked_task_waits_at_the_desk_and_resumes_on_the_provider_it_is_given(monkeypatch):
    agent, daemon, _ = make_agent()
    governed(daemon, {"action": "park", "reason": "all_providers_down: ..."})
    polls = [{"action": "park"}, {"action": "park"}, {"action": "resume", "provider": "ollama"}]
    waiting_seen = []

    def park(body):
        waiting_seen.append(agent._tron.ctx.waiting)
        return polls.pop(0)

    daemon.answers[("POST", "/providers/park")] = park
    answers = Answers(asyncio.TimeoutError(), "ok")
    monkeypatch.setattr("tron.common.providers.provider_for", answers.provider_for)
    task = Task(assign(), provider="anthropic")
    agent._tron.active[task.id] = task
    assert await agent.llm(task, "p") == "ok"
    assert answers.calls == ["anthropic", "ollama"] and waiting_seen == [True, True, True]
    assert task.waiting == 0 and not agent._tron.ctx.waiting


async def test_without_the_daemon_a_failure_falls_back_to_an_alert(monkeypatch):
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-ant-test")
    agent, daemon, _ = make_agent()
    daemon.answers[("POST", "/providers/acquire")] = ConnectionRefusedError("daemon down")
    daemon.answers[("POST", "/providers/outcome")] = ConnectionRefusedError("daemon down")

    async def request(client):
        raise asyncio.TimeoutError()

    with pytest.raises(Abandon):
        await agent.call_llm(Task(assign()), request)
    [report] = daemon.sent("POST", "/control/report_failure")
    assert report["reason"] == "timeout"


async def test_an_empty_answer_and_a_repeated_one_are_provider_failures(monkeypatch):
    from tron.common.providers import LLMReply, StubProvider

    agent, daemon, _ = make_agent()
    outcomes = governed(daemon, {"action": "retry", "delay": 0}, {"action": "fail", "reason": "repeated_output"})
    answers = iter(["", "same", "same", "same"])

    class Scripted(StubProvider):
        async def complete(self, **kw):
            return LLMReply(provider="anthropic", model="m", text=next(answers), input_tokens=1, output_tokens=1,
                            streamed=False)

    monkeypatch.setattr("tron.common.providers.provider_for", lambda name, **kw: Scripted(name))
    task = Task(assign())
    assert await agent.llm(task, "p") == "same"  # the empty answer was retried
    assert await agent.llm(task, "p") == "same"
    with pytest.raises(Abandon):  # the third identical answer in one task: a loop
        await agent.llm(task, "p")
    reasons = [o["failure"]["reason"] if not o["ok"] else "ok" for o in outcomes]
    assert reasons == ["empty_answer", "ok", "ok", "repeated_output"], reasons


# -- the public surface ---------------------------------------------------------------------------

PUBLIC = {"role", "uses_llm", "system", "work", "add_routes", "name", "incarnation", "children", "provider", "model",
          "client", "step", "set_progress", "llm", "call_llm", "delegate"}


def test_tron_sdk_is_the_documented_surface_and_agent_has_nothing_else_public():
    import tron.sdk

    assert sorted(tron.sdk.__all__) == ["Agent", "Task", "TaskAssign", "TaskFailed"]
    assert tron.sdk.Agent is Agent and tron.sdk.Task is Task and tron.sdk.TaskFailed is TaskFailed
    public = {n for n in dir(tron.sdk.Agent) if not n.startswith("_")}
    assert public == PUBLIC, public ^ PUBLIC  # a new public name is a promise: README "Bring your own agent"
    private = {n for n in vars(tron.sdk.Agent) if n.startswith("_") and not n.startswith("__")}
    assert private == {"_tron_runtime"}, private  # the runtime itself is the instance's one `_tron`


class Clashing(Agent):
    """A user's agent whose own names are the ones Tron's runtime and ladder use."""

    uses_llm = True
    view = take = actions = active = waiting = early = parent = daemon = policy = "the user's"
    config = ctx = clock = runtime = make_app = checkpoint = under_ladder = provider_settings = "the user's"
    provider = model = incarnation = "the user's"

    def __init__(self, ctx) -> None:
        super().__init__(ctx)
        self.name = "my own name"  # the runtime answers to the service's name, not this
        self._steps_seen: list[str] = []

    def client(self, provider=None):  # the user's own client, not an SDK's
        return "the user's client"

    async def work(self, task: Task) -> str:
        await self.step(task, 1, "draft", lambda _: self.llm(task, "draft"))
        self.set_progress(task, "between")
        return await self.step(task, 2, "final", lambda previous: _upper(previous + " / " + self.client()))


async def _upper(text: str) -> str:
    return text.upper()


async def test_a_subclass_using_the_runtimes_own_names_runs_a_task_to_its_end(monkeypatch):
    ctx = make_ctx()
    agent = Clashing(ctx)
    agent._tron.clock = InstantClock()
    daemon = ctx.client
    outcomes = governed(daemon)
    monkeypatch.setattr("tron.common.providers.provider_for", Answers("the draft").provider_for)
    assert agent._tron.take(assign())["status"] == "accepted"
    [finish] = await wait_for_async(lambda: daemon.sent("POST", "/tasks/run-1.0/finish"))
    assert (finish["status"], finish["result"]) == ("done", "THE DRAFT / THE USER'S CLIENT"), finish
    assert [c.step for c in daemon.sent("POST", "/tasks/run-1.0/checkpoint")] == [1, 2]
    assert {o["service"] for o in outcomes} == {"worker"} and agent.name == "my own name"
    assert agent._tron.active == {} and ctx.tasks == []


def mesh_ctx(name: str, *, drills: bool = True) -> ServiceContext:
    """The context of ``name`` in a mesh of a parent ``boss`` and its child ``worker``."""
    config = MeshConfig.model_validate({
        "drills": {"enabled": drills},
        "services": {"boss": {"agent": "mine.boss:Boss", "port": 7002},
                     "worker": {"agent": "mine.steps:Steps", "port": 7001, "parent": "boss"}}})
    env = ServiceEnv(service=name, role="agent", port=7001, incarnation="i-000000000001", home=Path("/nonexistent"),
                     daemon_url=DAEMON, token_file=Path("/nonexistent/token"))
    ctx = ServiceContext(env, config, "t" * 32)
    ctx.client = FakeDaemon()
    return ctx


@pytest.mark.parametrize("name,drills,expected", [
    ("boss", True, {"/handle_child_timeout": 401, "/handle_grandchild_failure": 401, "/drill/runaway": 401}),
    ("worker", True, {"/handle_child_timeout": 404, "/handle_grandchild_failure": 404, "/drill/runaway": 401}),
    ("boss", False, {"/handle_child_timeout": 401, "/handle_grandchild_failure": 401, "/drill/runaway": 404}),
    ("worker", False, {"/handle_child_timeout": 404, "/handle_grandchild_failure": 404, "/drill/runaway": 404}),
])
async def test_only_a_parent_serves_the_ladders_endpoints_and_the_drill_hook_only_when_drills_are_on(
        name, drills, expected):
    from aiohttp.test_utils import TestClient, TestServer

    from tron.common.agent_runtime import agent_app

    agent = Agent(mesh_ctx(name, drills=drills))
    assert (agent._tron.parent is not None) is (name == "boss")
    async with TestClient(TestServer(agent_app(agent), host="127.0.0.1")) as client:
        got = {}
        for path in expected:
            async with client.post(path, json={}) as resp:  # no token: 401 where it exists, before any work
                got[path] = resp.status
        async with client.post("/tasks", json={}) as resp:
            assert resp.status == 401  # every agent takes tasks
    assert got == expected


async def test_a_parent_told_of_a_restart_the_daemon_carried_answers_without_deciding():
    """An alert marked ``handled`` (an idle failure's restart, carried by the daemon) is news:
    the parent answers ``told``, reads no view and asks the daemon for nothing. The same
    alert without the mark is decided (here: it reads the view it was not sent)."""
    from aiohttp.test_utils import TestClient, TestServer

    from tron.common import credentials
    from tron.common.agent_runtime import agent_app
    from tron.common.http import AUTH_KEY

    ctx = mesh_ctx("boss")
    agent = Agent(ctx)
    app = agent_app(agent)
    app[AUTH_KEY] = ctx.peer_ok  # as common/service.py serves it: the daemon's peer tokens
    token = credentials.peer_token(credentials.inbound_key(ctx.token), "daemon", "boss")
    alert = {"alert_id": "a-1", "service": "worker", "incarnation": "i-000000000002", "reason": "process_exit",
             "handled": "restart:idle_failure"}
    async with TestClient(TestServer(app, host="127.0.0.1")) as client:
        async with client.post("/handle_child_timeout", json=alert, headers={"X-Tron-Token": token}) as resp:
            assert resp.status == 200
            assert await resp.json() == {"action": "told", "handled": "restart:idle_failure"}
        assert ctx.client.calls == []
        async with client.post("/handle_child_timeout", json={**alert, "handled": None},
                               headers={"X-Tron-Token": token}) as resp:
            assert resp.status == 500  # it went on to decide: asked for the view (this fake answers {})
    assert [(m, p.partition("?")[0]) for m, p, _ in ctx.client.calls] == [("GET", "/ladder/view")]


RUNNING_CHILD = {"task_id": "run-1.0.0", "run_id": "run-1", "agent": "helper", "status": "running", "result": None,
                 "failure": None}


def _delegating_agent(child_row: dict, started: list[int] | None = None):
    """An agent ``worker`` whose task delegates to ``helper`` (each attempt it starts noted in
    ``started``); the daemon's POST /tasks says the child's task is running, GET
    /tasks/run-1.0.0 answers ``child_row``."""
    config = MeshConfig.model_validate({
        "policy": {"heartbeat_interval": 1.0},
        "services": {"worker": {"agent": "mine.steps:Steps", "port": 7001},
                     "helper": {"agent": "mine.steps:Steps", "port": 7002, "parent": "worker"}}})
    ctx = make_ctx()
    ctx.config = config

    class Delegating(Agent):
        async def work(self, task: Task) -> str:
            if started is not None:
                started.append(task.assign.attempt)
            return await self.delegate(task, "helper", 0, "part", "p")

    agent = Delegating(ctx)
    agent._tron.config = config
    agent._tron.clock = InstantClock()
    agent._tron.result_recheck = 0.01
    daemon = agent._tron.ctx.client
    daemon.answers[("POST", "/tasks")] = lambda body: {"task": {"task_id": body.task_id, "agent": "helper",
                                                                "status": "running", "attempt": 1, "progress": None}}
    daemon.answers[("GET", "/tasks/run-1.0.0")] = lambda _: dict(child_row)
    return agent, daemon


async def test_a_later_attempt_that_delegates_hears_its_childs_result_though_the_older_one_waited_for_it():
    """CI's chaos drill hung here: a restarted root took the same task twice (attempt 1, then 2)
    while attempt 1 waited for its child. The cancelled attempt's clean-up ran after attempt 2
    had begun to wait for the same child task, and took attempt 2's waiter away: the child's
    result found no one, and the run waited for task_timeout times every attempt."""
    from tron.common.models import TaskResult

    started: list[int] = []
    agent, daemon = _delegating_agent(RUNNING_CHILD, started)
    agent._tron.take(assign(attempt=1))
    await settle()
    assert started == [1] and "run-1.0.0" in agent._tron.waiting  # attempt 1 waits for its child
    agent._tron.take(assign(attempt=2))
    await settle()
    assert started == [1, 2]
    result = TaskResult(task_id="run-1.0.0", run_id="run-1", status="done", result="the part", service="helper",
                        incarnation="i-000000000002")
    assert agent._tron._resolve(result), "the child's result found nobody waiting for it"
    await settle()
    finishes = daemon.sent("POST", "/tasks/run-1.0/finish")
    assert [(f["result"], f["attempt"]) for f in finishes] == [("the part", 2)]


@pytest.mark.parametrize("row,finish", [
    ({"status": "done", "result": "the part", "failure": None}, {"status": "done", "result": "the part"}),
    ({"status": "failed", "result": None, "failure": {"reason": "no_sources", "query": "q"}},
     {"status": "failed", "reason": "child_task_failed"}),
])
async def test_a_childs_result_recorded_but_never_delivered_is_taken_from_the_registry(row, finish):
    agent, daemon = _delegating_agent({"task_id": "run-1.0.0", "run_id": "run-1", "agent": "helper", **row})
    agent._tron.take(assign())
    for _ in range(200):
        if daemon.sent("POST", "/tasks/run-1.0/finish"):
            break
        await asyncio.sleep(0.005)
    [sent] = daemon.sent("POST", "/tasks/run-1.0/finish")
    assert {k: sent[k] for k in finish} == finish
    if row["status"] == "failed":
        assert sent["detail"]["reason"] == "no_sources" and sent["detail"]["detail"] == {"query": "q"}
    assert agent._tron.waiting == {}


async def test_a_child_still_running_is_waited_for_and_its_delivered_result_taken():
    agent, daemon = _delegating_agent(RUNNING_CHILD)
    agent._tron.take(assign())
    for _ in range(100):
        if len(daemon.sent("GET", "/tasks/run-1.0.0")) >= 3:
            break
        await asyncio.sleep(0.005)
    assert len(daemon.sent("GET", "/tasks/run-1.0.0")) >= 3 and daemon.sent("POST", "/tasks/run-1.0/finish") == []
    from tron.common.models import TaskResult

    assert agent._tron._resolve(TaskResult(task_id="run-1.0.0", run_id="run-1", status="done", result="late",
                                           service="helper"))
    await settle()
    [sent] = daemon.sent("POST", "/tasks/run-1.0/finish")
    assert sent["result"] == "late"


@pytest.mark.parametrize("dispatch,posted", [(None, 1), (True, 1), (False, 0)])
async def test_a_parent_posts_its_child_the_task_unless_the_daemon_says_it_hands_it_over(dispatch, posted):
    agent, daemon = _delegating_agent(RUNNING_CHILD)
    running = {"task_id": "run-1.0.0", "agent": "helper", "status": "running", "attempt": 1, "progress": None}
    daemon.answers[("POST", "/tasks")] = {"task": running, **({} if dispatch is None else {"dispatch": dispatch})}
    agent._tron.take(assign())
    await settle()
    assert len(daemon.sent("POST", "http://127.0.0.1:7002/tasks")) == posted
    from tron.common.models import TaskResult

    assert agent._tron._resolve(TaskResult(task_id="run-1.0.0", run_id="run-1", status="done", result="ok",
                                           service="helper"))
    await settle()
    assert [f["result"] for f in daemon.sent("POST", "/tasks/run-1.0/finish")] == ["ok"]
