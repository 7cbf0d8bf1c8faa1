"""JSON-lines logs, one object per line, secrets redacted.

Every process logs to its stdout, which the spawner appends to ``<home>/logs/<name>.log``.
Structured fields (service, incarnation, reason, task, run, alert) go in ``extra=`` and
come out as keys, so ``tron logs`` and tests can rely on them. ``comms()`` appends one
line per inter-service message to the shared comms log; a line it cannot write (a full
disk) is counted in ``comms_lost``, never raised: the message goes on.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

from tron.common import telemetry
from tron.common.clock import utc_iso
from tron.common.redaction import redact

_STD = set(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message", "asctime", "taskName"}
_context: dict[str, Any] = {}
_comms_path: Path | None = None
comms_lost = 0  # lines this process could not write (a full disk): counted, never raised


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {"ts": utc_iso(), "level": record.levelname.lower(), "logger": record.name}
        out.update(_context)
        out.update(telemetry.log_ids())  # {} unless a traced task runs here
        out["msg"] = record.getMessage()
        for key, value in record.__dict__.items():
            if key not in _STD and not key.startswith("_"):
                out[key] = value
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return redact(json.dumps(out, default=str))


class AcceptFlood(logging.Filter):
    """asyncio logs an error, with its traceback, for every accept() that finds no descriptor
    left (EMFILE: a flood of connections held open), thousands a second: the log grows past
    its size limit meanwhile, since its rotation needs a descriptor too. Passed once per
    ``every`` seconds, without the traceback, with how many were not (``suppressed_before``)."""

    MESSAGE = "socket.accept() out of system resource"

    def __init__(self, every: float = 10.0) -> None:
        super().__init__()
        self.every = every
        self.last = float("-inf")
        self.suppressed = 0

    def filter(self, record: logging.LogRecord) -> bool:
        if not str(record.msg).startswith(self.MESSAGE):
            return True
        now = time.monotonic()
        if now - self.last < self.every:
            self.suppressed += 1
            return False
        self.last = now
        record.exc_info, record.exc_text = None, None
        record.suppressed_before = self.suppressed
        self.suppressed = 0
        return True


def setup(service: str, *, incarnation: str | None = None, level: str | None = None,
          comms_path: Path | None = None) -> None:
    """Configure the root logger for a service process (idempotent)."""
    global _comms_path
    _context.clear()
    _context["service"] = service
    if incarnation:
        _context["incarnation"] = incarnation
    _comms_path = comms_path
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(JsonFormatter())
    root.addHandler(handler)
    _set_level(root, level or os.environ.get("TRON_LOG_LEVEL", "INFO"))
    # The SDKs and aiohttp's access log are noisy at INFO and add nothing here.
    for noisy in ("aiohttp.access", "httpx", "httpcore", "anthropic", "asyncio"):
        _set_level(logging.getLogger(noisy), logging.WARNING)
    aio = logging.getLogger("asyncio")
    if not any(isinstance(f, AcceptFlood) for f in aio.filters):
        aio.addFilter(AcceptFlood())


def _set_level(logger: logging.Logger, level: str | int) -> None:
    """Only a change: every setLevel clears the cache of every logger there is (the SDKs make
    hundreds), which in an incarnation forked from the fork server copies their pages."""
    wanted = logging.getLevelName(level.upper()) if isinstance(level, str) else level
    if not isinstance(wanted, int) or logger.level != wanted:
        logger.setLevel(level.upper() if isinstance(level, str) else level)


def comms(kind: str, /, *, src: str, dst: str, **ids: Any) -> None:
    """One line per inter-service message: what, from, to, and its correlation ids."""
    if _comms_path is None:
        return
    line = {"ts": utc_iso(), "mono": round(time.monotonic(), 4), "kind": kind, "src": src, "dst": dst}
    line.update({("detail_kind" if k == "kind" else k): v for k, v in ids.items() if v is not None})
    data = (redact(json.dumps(line, default=str)) + "\n").encode()
    # One write() on an O_APPEND descriptor: lines from many processes do not interleave.
    # A log that cannot be written (a full disk) must never stop the message it describes.
    global comms_lost
    try:
        fd = os.open(_comms_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, data)
        finally:
            os.close(fd)
    except OSError as err:
        comms_lost += 1
        if comms_lost == 1 or comms_lost % 1000 == 0:
            logging.getLogger("tron.logs").warning("comms log not written (%d lines lost so far): %s", comms_lost,
                                                   err)
