"""Issue 20, item 4 (CLI half): a name or id the CLI puts in a daemon URL is checked with
the daemon's own rule (tron.common.models' NameStr / IdStr) before any request, and quoted.
``tron task hard-reset 'x/cancel?'`` was carried out as a cancel; now it is a one-line
error, exit 2, and the daemon hears nothing."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from tests.harness import send_json

from tron.common.paths import Home
from tron.scripts import tron

TRON = str(Path(sys.executable).parent / "tron")


class FakeDaemon:
    """A daemon that answers every request with 200 and remembers each (method, raw path):
    a request the CLI should not have sent is seen, not merely refused."""

    def __init__(self, home: Home) -> None:
        self.seen: list[tuple[str, str]] = []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def _answer(self) -> None:
                fake.seen.append((self.command, self.path))
                length = int(self.headers.get("Content-Length") or 0)
                self.rfile.read(length)
                body = {"status": "ok", "home": str(home.root)} if self.path == "/health" else \
                    {"status": "done", "usd": 1.0, "tokens": None}
                send_json(self, body)

            do_GET = do_POST = _answer

            def log_message(self, *args) -> None:  # quiet
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True)

    @property
    def posts(self) -> list[str]:
        return [path for method, path in self.seen if method == "POST"]


@pytest.fixture
def daemon(tmp_path):
    home = Home.resolve(tmp_path / "home")
    home.ensure()
    fake = FakeDaemon(home)
    fake.thread.start()
    home.token_file.write_text("test-token\n")
    home.daemon_file.write_text(json.dumps({"pid": 1, "port": fake.server.server_address[1]}))
    yield home, fake
    fake.server.shutdown()
    fake.server.server_close()


BAD = [
    (["task", "hard-reset", "x/cancel?"], "task id"),  # the adversary's row: was a cancel
    (["task", "cancel", "../../services/root/stop"], "task id"),
    (["task", "retry", "t1?x=1"], "task id"),
    (["task", "approve", "t1#frag"], "task id"),
    (["task", "fail", ""], "task id"),
    (["task", "resume", "t1\n", "--from-step", "2"], "task id"),
    (["task", "show", "a b"], "task id"),
    (["task", "cancel", "t" * 129], "task id"),
    (["task", "cancel", ".hidden"], "task id"),
    (["restart", "root/stop"], "service name"),
    (["stop", ".."], "service name"),
    (["pause", "root%2Fstop"], "service name"),
    (["resume", "root:1"], "service name"),  # ':' is for ids, not names
    (["lane", "pause", "programmer/../x"], "lane"),
    (["lane", "resume", "programmer?"], "lane"),
    (["provider", "drain", "anthropic/restore"], "provider name"),
    (["provider", "restore", "ollama?x"], "provider name"),
    (["run", "budget", "r1/../../tasks/t/cancel", "--usd", "5"], "run id"),
]


@pytest.mark.parametrize("argv,what", BAD, ids=[" ".join(a)[:40] for a, _ in BAD])
def test_a_bad_id_or_name_is_refused_before_any_request(daemon, capsys, argv, what):
    home, fake = daemon
    code = tron.main(["--home", str(home.root), *argv])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.count("\n") == 1 and f"is not a valid {what}" in err, err
    assert fake.seen == []  # not even /health: nothing reached the daemon


GOOD = [
    (["task", "hard-reset", "run-1a2b.0"], "/tasks/run-1a2b.0/hard-reset"),
    (["task", "cancel", "r:7.3_x-y"], "/tasks/r%3A7.3_x-y/cancel"),
    (["restart", "root"], "/services/root/restart"),
    (["lane", "pause", "programmer"], "/lanes/programmer/pause"),
    (["provider", "drain", "ollama"], "/providers/ollama/drain"),
    (["run", "budget", "run-1a2b", "--usd", "5"], "/runs/run-1a2b/budget"),
]


@pytest.mark.parametrize("argv,path", GOOD, ids=[g[1] for g in GOOD])
def test_a_good_id_or_name_reaches_the_daemon_as_one_path_segment(daemon, capsys, argv, path):
    home, fake = daemon
    assert tron.main(["--home", str(home.root), *argv]) == 0, capsys.readouterr().err
    assert fake.posts == [path]


def test_the_tron_command_refuses_a_bad_task_id_by_validation_not_for_want_of_a_daemon(tmp_path):
    run = subprocess.run([TRON, "--home", str(tmp_path / "home"), "task", "hard-reset", "x/cancel?"],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 2, run.stderr
    assert run.stderr.splitlines() == [run.stderr.strip()]  # one line
    assert "'x/cancel?' is not a valid task id" in run.stderr and "not running" not in run.stderr
    assert run.stdout == ""


@pytest.mark.parametrize("span, ok", [("1h", True), ("30m", True), ("2.5d", True), ("99999999999d", False),
                                      ("1e9d", False), ("-1h", False), ("an hour", False), ("1w", False)])
def test_cost_since_is_a_span_or_a_clear_error(span, ok):
    from tron.scripts.cost_cli import SpanError, since_iso

    if ok:
        assert since_iso(span).endswith("Z")
    else:
        with pytest.raises(SpanError, match="--since"):
            since_iso(span)
