"""common/trace_export.py: spans exported from a process of their own (the shipped default),
to a real OTLP/HTTP receiver in this test process (the SDK's protobuf decoded back), a
collector that is down, one that hangs, and a traced process killed with SIGKILL."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import psutil
import pytest
from opentelemetry import trace
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from tron.common import telemetry
from tron.common.models import TaskAssign
from tron.common.telemetry import TelemetrySection, attempt_span_id
from tests.harness import REPO, wait_for


class Receiver:
    """An OTLP/HTTP traces receiver: every span it is sent, decoded, by name."""

    def __init__(self) -> None:
        spans = self.spans = []
        lock = self.lock = threading.Lock()

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                request = ExportTraceServiceRequest.FromString(body)
                with lock:
                    for rs in request.resource_spans:
                        resource = {a.key: a.value for a in rs.resource.attributes}
                        for ss in rs.scope_spans:
                            spans.extend((resource, s) for s in ss.spans)
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def named(self, name: str) -> list:
        with self.lock:
            return [s for _, s in self.spans if s.name == name]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver():
    r = Receiver()
    yield r
    r.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _fds(pid: int) -> set[str]:
    out = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            out.add(os.readlink(f"/proc/{pid}/fd/{fd}"))
        except FileNotFoundError:  # closed since the listing (its connection to the collector)
            continue
    return out


class Reply:
    model, input_tokens, output_tokens, stop_reason = "claude-x", 12, 34, "end_turn"
    cache_read_tokens = cache_write_tokens = 0
    text = "the answer"


def test_spans_are_exported_by_a_process_of_their_own_with_their_parents_links_events_and_attributes(receiver):
    held = socket.socket()  # ours, opened before the fork: the exporter process must not keep it open
    held.bind(("127.0.0.1", 0))
    held.listen(1)
    try:
        assert telemetry.setup(TelemetrySection(otlp_endpoint=receiver.url), service="svc", incarnation="inc-1",
                               env={})
        process = telemetry._on.process
        assert process is not None and process.pid is None  # forked with the first hand-over, not at set-up
        with telemetry.run_span("r-1", "prompt"):
            parent_tp = telemetry.current_traceparent()
        trace_id = int(parent_tp.split("-")[1], 16)
        assign = TaskAssign(task_id="r-1.0", run_id="r-1", kind="run", prompt="p", reply_to="gateway",
                            traceparent=parent_tp, attempt=2)
        with telemetry.task_span("root", assign, "anthropic") as task:
            telemetry.event(task, "retry", case="provider_retry")
            with telemetry.llm_span("anthropic", "claude-x") as call:
                telemetry.llm_result(call, Reply())
            telemetry.task_result(task, "failed", "boom", "anthropic")
        assert telemetry._on.processor.force_flush(10_000)  # served: the exporter process is past its start
        assert process.pid not in (None, os.getpid())
        assert f"socket:[{os.fstat(held.fileno()).st_ino}]" not in _fds(process.pid)
        [run] = receiver.named("run")
        [attempt] = receiver.named("invoke_agent root")
        [chat] = receiver.named("chat claude-x")
        assert int.from_bytes(attempt.trace_id, "big") == trace_id
        assert int.from_bytes(attempt.span_id, "big") == attempt_span_id(trace_id, "r-1.0", 2)
        assert attempt.parent_span_id == run.span_id and chat.parent_span_id == attempt.span_id
        assert [int.from_bytes(link.span_id, "big") for link in attempt.links] == \
            [attempt_span_id(trace_id, "r-1.0", 1)]
        [event] = attempt.events
        assert event.name == "tron.ladder.retry"
        assert {a.key: a.value.string_value for a in event.attributes} == {"tron.case": "provider_retry"}
        assert attempt.status.code == 2  # STATUS_CODE_ERROR
        attrs = {a.key: a.value for a in chat.attributes}
        assert attrs["gen_ai.operation.name"].string_value == "chat"
        assert attrs["gen_ai.usage.output_tokens"].int_value == 34
        assert [v.string_value for v in attrs["gen_ai.response.finish_reasons"].array_value.values] == ["end_turn"]
        assert chat.kind == 3  # SPAN_KIND_CLIENT
        assert chat.start_time_unix_nano < chat.end_time_unix_nano
        resource = next(r for r, s in receiver.spans if s.name == "run")
        assert resource["service.name"].string_value == "svc"
        assert resource["service.instance.id"].string_value == "inc-1"
    finally:
        telemetry.shutdown(5)
        held.close()
    assert not process._alive()  # ended, and reaped, by shutdown


def test_a_failed_llm_call_is_a_span_with_its_error(receiver):
    telemetry.setup(TelemetrySection(otlp_endpoint=receiver.url), service="svc", env={})
    try:
        with pytest.raises(TimeoutError):
            with telemetry.llm_span("ollama", "llama"):
                raise TimeoutError("no answer")
        assert telemetry._on.processor.force_flush(10_000)
    finally:
        telemetry.shutdown(5)
    [chat] = receiver.named("chat llama")
    assert chat.status.code == 2
    assert {a.key: a.value.string_value for a in chat.attributes}["error.type"] == "TimeoutError"


def test_spans_a_collector_that_is_down_cannot_take_are_counted_dropped():
    before = telemetry.dropped()
    telemetry.setup(TelemetrySection(otlp_endpoint=f"http://127.0.0.1:{_free_port()}", export_timeout=0.5),
                    service="svc", env={})
    try:
        for n in range(7):
            with telemetry.step_span("t", n, "s"):
                pass
        for _ in range(2):  # each flush publishes the count again: the same count
            telemetry._on.processor.force_flush(10_000)
            assert telemetry.dropped() - before == 7  # told by the exporter process, through the shared page
    finally:
        telemetry.shutdown(5)
    assert telemetry.dropped() - before == 7  # still counted once the exporter process is gone


def test_a_hung_collector_holds_no_stop_and_what_it_held_is_counted_dropped():
    silent = socket.socket()  # accepts and never answers
    silent.bind(("127.0.0.1", 0))
    silent.listen(64)
    before = telemetry.dropped()
    telemetry.setup(TelemetrySection(otlp_endpoint=f"http://127.0.0.1:{silent.getsockname()[1]}",
                                     export_timeout=30), service="svc", env={})
    process = telemetry._on.process
    try:
        for n in range(5):
            with telemetry.step_span("t", n, "s"):
                pass
        wait_for(lambda: process.sent == 5, 30, "the spans handed to the exporter process")
        telemetry.shutdown(timeout=0.2)  # returns although the export hangs: the exporter process is killed
        assert not process._alive()
        assert telemetry.dropped() - before == 5
    finally:
        telemetry.shutdown()
        silent.close()


KILLED = """
import os, signal, sys
from tron.common import telemetry
from tron.scripts.client import wait_for
telemetry.setup(telemetry.TelemetrySection(otlp_endpoint=sys.argv[1]), service="killed", env={})
for n in range(3):
    with telemetry.step_span("t", n, "handed over"):
        pass
process = telemetry._on.process
wait_for(lambda: process.sent == 3, 30, "the hand-over")
print(process.pid, flush=True)
with telemetry.step_span("t", 9, "open"):  # not ended when the process dies: lost with it
    os.kill(os.getpid(), signal.SIGKILL)
"""


def test_spans_handed_over_before_a_kill_9_are_still_exported(receiver):
    proc = subprocess.run([sys.executable, "-c", KILLED, receiver.url], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    exporter = int(proc.stdout.split()[0])
    wait_for(lambda: len(receiver.named("step 2 handed over")) == 1, 30, "the spans handed over, exported")
    wait_for(lambda: not psutil.pid_exists(exporter) or psutil.Process(exporter).status() == psutil.STATUS_ZOMBIE,
             30, "the exporter process to end after its parent")
    assert [s.name for s in receiver.named("step 0 handed over") + receiver.named("step 1 handed over")] == \
        ["step 0 handed over", "step 1 handed over"]
    assert receiver.named("step 9 open") == []


def test_with_no_process_to_fork_spans_are_exported_from_a_thread(receiver, monkeypatch):
    def refused():
        raise BlockingIOError(11, "Resource temporarily unavailable")  # fork's EAGAIN: pids_max reached

    monkeypatch.setattr(os, "fork", refused)
    assert telemetry.setup(TelemetrySection(otlp_endpoint=receiver.url), service="svc", env={})
    try:
        with telemetry.step_span("t", 1, "s"):
            pass
        assert telemetry._on.processor.force_flush(10_000)
        assert telemetry._on.process.pid is None and telemetry._on.process.fallback is not None
    finally:
        telemetry.shutdown(5)
    assert len(receiver.named("step 1 s")) == 1


@pytest.mark.parametrize("parent", ["none", "local", "remote-sampled", "remote-unsampled"])
@pytest.mark.parametrize("fails", [False, True])
def test_an_llm_span_handed_over_directly_is_the_record_the_sdk_span_would_make(receiver, monkeypatch, parent, fails):
    """``llm_span`` hands the exporter process a record made without an SDK span: the same
    record as the SDK's span gives (``record``), but its ids and times, under every kind of
    parent, and nothing when the parent was not sampled (ParentBased, as the SDK samples)."""
    assert telemetry.setup(TelemetrySection(otlp_endpoint=receiver.url), service="svc", env={})
    on = telemetry._on
    try:
        assert on.direct is on.process is not None
        handed: list[tuple] = []
        monkeypatch.setattr(on.process, "hand", handed.append)

        def one() -> None:
            with contextlib.ExitStack() as stack:
                if parent == "local":
                    stack.enter_context(telemetry.run_span("r-1", "prompt"))
                elif parent.startswith("remote"):
                    flags = "01" if parent == "remote-sampled" else "00"
                    remote = telemetry._parse(f"00-{'ab' * 16}-{'cd' * 8}-{flags}")
                    stack.enter_context(trace.use_span(trace.NonRecordingSpan(remote)))
                try:
                    with telemetry.llm_span("anthropic", "claude-x") as call:
                        telemetry.llm_result(call, Reply())
                        if fails:
                            raise TimeoutError("no answer")
                except TimeoutError:
                    pass

        one()
        monkeypatch.setattr(on, "direct", None)
        one()
    finally:
        telemetry.shutdown(5)
    chats = [r for r in handed if r[0] == "chat claude-x"]
    if parent == "remote-unsampled":
        assert chats == []
        return
    direct, sdk = chats
    ids = (1, 2, 4, 7, 8)  # trace id, span id, parent id, start, end
    assert [v for i, v in enumerate(direct) if i not in ids] == [v for i, v in enumerate(sdk) if i not in ids]
    assert direct[2] != 0 and direct[1] != 0 and direct[7] <= direct[8]
    assert (direct[4] == 0) == (parent == "none")
    if parent == "remote-sampled":
        assert direct[1] == int("ab" * 16, 16) and direct[4] == int("cd" * 8, 16) and direct[5] is True
