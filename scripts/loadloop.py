"""A client that never stops asking: HTTP requests in a tight loop against one port, each
on a new connection (as a caller that does not pool would), counting what a restart did to
them. Used by ``tron drill handover``, its tests and benchmarks/socket_handover.py.

Every request ends one of three ways:
- answered: any HTTP response, with its latency;
- refused: the connection was refused (nothing listened: the socket was not held);
- failed: connected, then cut off or timed out (it was inside the killed process).
"""

from __future__ import annotations

import http.client
import threading
import time
from dataclasses import dataclass, field

from tron.scripts.stats import percentile


@dataclass
class Counts:
    answered: int = 0
    refused: int = 0
    failed: int = 0
    latencies: list[float] = field(default_factory=list)  # seconds, of answered requests
    errors: dict[str, int] = field(default_factory=dict)  # failed and refused, by exception

    def summary(self) -> dict:
        lat = sorted(self.latencies)
        ms = (lambda q: round(percentile(lat, q) * 1000, 2)) if lat else (lambda q: None)
        return {"answered": self.answered, "refused": self.refused, "failed": self.failed,
                "p50_ms": ms(0.5), "p99_ms": ms(0.99), "max_ms": round(lat[-1] * 1000, 1) if lat else None,
                "errors": dict(self.errors)}


class RequestLoop:
    """``workers`` threads asking ``GET path`` on 127.0.0.1:``port`` until ``stop``."""

    def __init__(self, port: int, path: str = "/health", *, workers: int = 1, timeout: float = 10.0) -> None:
        self.port, self.path, self.timeout = port, path, timeout
        self.counts = Counts()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, daemon=True, name=f"loadloop-{i}")
                         for i in range(workers)]

    def __enter__(self) -> "RequestLoop":
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> Counts:
        self._stop.set()
        for t in self._threads:
            if t.is_alive():
                t.join(self.timeout + 1)
        return self.counts

    def _run(self) -> None:
        while not self._stop.is_set():
            started = time.perf_counter()
            conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=self.timeout)
            outcome, error = "failed", None
            try:
                conn.connect()
            except ConnectionRefusedError as err:
                outcome, error = "refused", err
            except OSError as err:
                error = err
            else:
                try:
                    conn.request("GET", self.path, headers={"Connection": "close"})
                    conn.getresponse().read()
                    outcome = "answered"
                except (OSError, http.client.HTTPException) as err:
                    error = err
            finally:
                conn.close()
            with self._lock:
                c = self.counts
                if outcome == "answered":
                    c.answered += 1
                    c.latencies.append(time.perf_counter() - started)
                else:
                    setattr(c, outcome, getattr(c, outcome) + 1)
                    name = type(error).__name__
                    c.errors[name] = c.errors.get(name, 0) + 1
            if outcome == "refused":
                time.sleep(0.001)  # a refusal is instant: do not spin the core the restart needs
