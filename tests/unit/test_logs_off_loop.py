"""The daemon's log and comms lines are written on a thread of their own: logging one never
waits for the disk, the lines come out in order, and a flush (at exit) waits for them all."""

from __future__ import annotations

import io
import json
import logging
import threading
import time

import pytest

from tron.common import logs


class SlowStream(io.StringIO):
    """A stream whose writes wait until ``opened`` is set: a disk whose journal is committing."""

    def __init__(self) -> None:
        super().__init__()
        self.opened = threading.Event()
        self.writers: set[str] = set()

    def write(self, text: str) -> int:
        self.writers.add(threading.current_thread().name)
        self.opened.wait(10)
        return super().write(text)


@pytest.fixture
def writer():
    yield logs.Writer()


def test_a_log_line_does_not_wait_for_its_write_and_a_flush_waits_for_them_all(writer):
    stream = SlowStream()
    handler = logs.OffLoopHandler(stream, writer)
    handler.setFormatter(logging.Formatter("%(message)s"))
    log = logging.getLogger("test.off_loop")
    log.propagate = False
    log.addHandler(handler)
    try:
        began = time.monotonic()
        for i in range(50):
            log.warning("line %d", i)
        assert time.monotonic() - began < 5  # the stream blocks every write for up to 10 s: none was waited for
        assert stream.getvalue() == ""
        assert not writer.drain(timeout=0.05)  # still held by the disk
        stream.opened.set()
        handler.flush()
        assert stream.getvalue().splitlines() == [f"line {i}" for i in range(50)]
        assert stream.writers == {"tron-log-writer"}
    finally:
        log.removeHandler(handler)


def test_comms_lines_go_through_the_writer_in_order_and_a_full_disk_is_counted(tmp_path, monkeypatch, writer):
    path = tmp_path / "comms.jsonl"
    monkeypatch.setattr(logs, "_comms_path", path)
    monkeypatch.setattr(logs, "_writer", writer)
    for i in range(20):
        logs.comms("alert", src="daemon", dst="root", alert=f"a-{i}")
    assert writer.drain()
    assert [json.loads(line)["alert"] for line in path.read_text().splitlines()] == [f"a-{i}" for i in range(20)]
    lost = logs.comms_lost
    monkeypatch.setattr(logs, "_comms_path", tmp_path / "gone" / "comms.jsonl")  # cannot be opened
    logs.comms("alert", src="daemon", dst="root", alert="a-x")
    assert writer.drain()
    assert logs.comms_lost == lost + 1


def test_without_off_loop_nothing_changes(tmp_path, monkeypatch):
    path = tmp_path / "comms.jsonl"
    monkeypatch.setattr(logs, "_comms_path", path)
    monkeypatch.setattr(logs, "_writer", None)
    logs.comms("alert", src="daemon", dst="root", alert="a-1")
    assert json.loads(path.read_text())["alert"] == "a-1"  # written before comms() returned
