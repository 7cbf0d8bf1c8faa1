"""A program that writes down what happens to it, for tests that check a promise against
what the program itself saw (the signal it got, the headers a probe sent, how many callers
were inside it at once), never against Tron's report of it.

    witness.py trap OUT               notes the stop signal it gets (SIGTERM, SIGINT, SIGQUIT,
                                      SIGHUP, SIGUSR1, SIGUSR2) and exits 0
    witness.py stubborn OUT           notes SIGTERM and goes on, noting every 50 ms that it is
                                      still alive, until SIGKILL ends it
    witness.py probed OUT PORT FILE   an HTTP server on PORT: every GET is answered with the
                                      status written in FILE and noted with its headers
    witness.py barrier OUT N          an HTTP server on the socket it inherits as fd 3 (it never
                                      calls listen() itself): each request is held until N are
                                      inside at once (or 2 s passed), and the peak is noted

OUT gets one JSON object a line: {"pid", "at" (time.time()), "event", ...}.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

OUT = Path(sys.argv[2])
_write = threading.RLock()  # a signal handler may note while the main thread is noting


def note(event: str, **fields) -> None:
    line = json.dumps({"pid": os.getpid(), "at": time.time(), "event": event, **fields})
    with _write, OUT.open("a") as f:
        f.write(line + "\n")
        f.flush()


def trap() -> None:
    def stop(signum, _frame):
        note("signal", signal=signal.Signals(signum).name)
        os._exit(0)

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(sig, stop)
    note("started")
    while True:
        time.sleep(1)


def stubborn() -> None:
    termed = threading.Event()

    def ignore(signum, _frame):
        note("signal", signal=signal.Signals(signum).name)
        termed.set()

    signal.signal(signal.SIGTERM, ignore)
    note("started")
    termed.wait()
    while True:  # until SIGKILL
        note("alive")
        time.sleep(0.05)


def probed(port: int, status_file: Path) -> None:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            status = int(status_file.read_text().strip())
            note("request", path=self.path, status=status, headers=dict(self.headers))
            self.send_response(status)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    note("started")
    server.serve_forever()


def barrier(n: int) -> None:
    lock = threading.Condition()
    state = {"inside": 0, "peak": 0, "arrived": 0, "batch": 0}

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            with lock:
                state["inside"] += 1
                if state["inside"] > state["peak"]:
                    state["peak"] = state["inside"]
                    note("peak", inside=state["peak"])
                state["arrived"] += 1
                batch = state["batch"]
                if state["arrived"] == n:  # the n-th caller lets the whole batch go
                    state["arrived"], state["batch"] = 0, batch + 1
                    lock.notify_all()
                # (at most 2 s: callers that stop asking must not leave the others hanging)
                elif not lock.wait_for(lambda: state["batch"] != batch, timeout=2.0):
                    state["arrived"] -= 1
                # out before the answer: a caller's next request can only come after it
                state["inside"] -= 1
            self.send_response(200)
            self.send_header("Content-Length", "2")
            self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(b"ok")

        def log_message(self, *args):
            pass

    assert os.environ.get("LISTEN_FDS") == "1", "started without a socket to inherit"
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler, bind_and_activate=False)
    server.socket.close()
    server.socket = socket.socket(fileno=3)  # the daemon's listening socket, its backlog untouched
    server.server_address = server.socket.getsockname()
    note("started")
    server.serve_forever()


if __name__ == "__main__":
    mode = sys.argv[1]
    if mode == "trap":
        trap()
    elif mode == "stubborn":
        stubborn()
    elif mode == "probed":
        probed(int(sys.argv[3]), Path(sys.argv[4]))
    elif mode == "barrier":
        barrier(int(sys.argv[3]))
    else:
        sys.exit(f"unknown mode {mode!r}")
