"""The log pump: Tron owns the write side of every service's log, so no log fills the disk.

A program's stdout and stderr are the write end of a pipe; the pump holds the read end and
writes whole lines to ``<home>/logs/<name>.log``. Because the pump is the only writer it
can rotate (``name.log`` -> ``name.log.1`` ... ``name.log.<backups>``, the oldest
dropped) between two lines: no line is lost or cut at a rotation, and there is no
copy-truncate race. Per service, more than ``rate_limit`` lines in a second are dropped
and counted, and the count is written once when the second is over (journald's
``RateLimitBurst``). When the disk holding the logs has less than ``min_free`` bytes free,
the pump stops writing logs first (the registry and recovery go on), says so once, loudly,
and counts what it dropped until there is room again.

A line with no newline yet is written out once it waited long enough (``partial_due``): a
prompt is seen while its program waits.

The pump is its own process in its own session, as the services are: a daemon that is
killed leaves it running, and the programs keep writing (a pipe without a reader would
kill them with SIGPIPE). The next daemon finds it on its socket and goes on using it. The
daemon holds a copy of every read end too (``LogPumpClient``): a pump that dies is started
again and handed them, and no program ever writes to a pipe without a reader.

Protocol: one JSON object per line on a Unix socket.
    {"op": "ping"}                                        -> {"ok": true, "pid": ...}
    {"op": "attach", "path", "max_bytes", "backups", "rate_limit"} + the read end (SCM_RIGHTS)
                                                          -> {"ok": true}
    {"op": "stats"}                                       -> {"ok": true, "disk_full": ..., "logs": {...}}
    {"op": "sync", "path"}                                -> {"ok": true} once that log's pipes are drained
    {"op": "pipes", "after": fd}                          -> {"ok": true, "pipes": [{"path", ...}], "last", "more"}
                                                             + a copy of each one's read end (SCM_RIGHTS)
    {"op": "exit"}                                        -> {"ok": true}; exits once every pipe is drained
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import select
import selectors
import signal
import socket
import stat
import subprocess
import sys
import time
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

from tron.common.processes import readable
from tron.services.daemon import unixline

log = logging.getLogger("tron.logpump")

CHUNK = 1 << 16
LONGEST_LINE = 1 << 16  # a "line" with no newline this long is written as it is
DISK_CHECK_EVERY = 1.0  # seconds between two looks at the free space
# A line with no newline yet ("Password: ", a progress bar) is written out, ended by a newline,
# once no byte came for PARTIAL_IDLE s, or once it is PARTIAL_MAX_AGE s old while bytes keep
# trickling in: a prompt is seen while its program waits, and a line that arrives in pieces
# (a buffered writer's 8 KiB cuts) is still joined, its pieces being microseconds apart.
PARTIAL_IDLE = 1.0
HAND_AT_ONCE = 200  # read ends handed back in one answer (SCM_RIGHTS takes at most 253)
PARTIAL_MAX_AGE = 5.0


def partial_due(first_at: float, last_at: float, now: float) -> bool:
    """Whether a line held without its newline since ``first_at`` (monotonic s), whose last
    byte came at ``last_at``, is to be written out as it is at ``now``."""
    return now - last_at >= PARTIAL_IDLE or now - first_at >= PARTIAL_MAX_AGE


def rotated(path: Path, backups: int) -> list[Path]:
    """A log's files, oldest first: name.log.<backups> ... name.log.1, name.log."""
    return [path.with_name(f"{path.name}.{i}") for i in range(backups, 0, -1)] + [path]


def rotate(path: Path, backups: int) -> None:
    """name.log -> name.log.1 -> ... -> name.log.<backups>; the oldest goes."""
    if backups <= 0:
        path.unlink(missing_ok=True)
        return
    path.with_name(f"{path.name}.{backups}").unlink(missing_ok=True)
    for i in range(backups - 1, 0, -1):
        older = path.with_name(f"{path.name}.{i}")
        if older.exists():
            older.rename(path.with_name(f"{path.name}.{i + 1}"))
    if path.exists():
        path.rename(path.with_name(f"{path.name}.1"))


def rotate_if_large(path: Path, max_bytes: int, backups: int, *, stdio: bool = False) -> bool:
    """Rotate a log the pump does not write: the comms log (every writer opens it by name
    for each line, so a rename loses nothing) and, with ``stdio``, the daemon's own log
    (its stdout and stderr are moved to the new file)."""
    try:
        st = path.stat()
    except FileNotFoundError:
        if stdio and _removed_file_on_stdout():  # `rm -rf logs`: our own log made again, not written to nowhere
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            _stdio_to(path)
            log.error("this log file was removed while the daemon ran; written again from here (earlier lines are gone)")
            return True
        return False
    if st.st_size <= max_bytes:
        return False
    if stdio:
        try:
            if os.fstat(1).st_ino != st.st_ino:
                return False  # our stdout is not that file (a terminal, a test's pipe)
        except OSError:
            return False
    if not stdio:
        rotate(path, backups)
        return True
    # The new file is opened before anything is renamed: with no descriptor left (EMFILE, a
    # flood of connections) this raises and nothing moves, so the next tick tries again. Opened
    # after the rotation, it failed with our stdout left on name.log.1 and no name.log, which
    # nothing would ever rotate again.
    fresh = path.with_name(f"{path.name}.new")
    fd = os.open(fresh, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        rotate(path, backups)
        os.replace(fresh, path)
        _stdio_to_fd(fd)
    finally:
        os.close(fd)
    return True


def _stdio_to(path: Path) -> None:
    """Our stdout and stderr to ``path`` (appended to, made if missing)."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        _stdio_to_fd(fd)
    finally:
        os.close(fd)


def _stdio_to_fd(fd: int) -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(fd, 1)
    os.dup2(fd, 2)


def _removed_file_on_stdout() -> bool:
    """Our stdout is a file no longer in any folder (a terminal or a pipe is not)."""
    try:
        st = os.fstat(1)
    except OSError:
        return False
    return stat.S_ISREG(st.st_mode) and st.st_nlink == 0


@dataclass
class Sink:
    """One log file and its limits, shared by every incarnation of its service."""

    path: Path
    max_bytes: int
    backups: int
    rate_limit: int | None
    fd: int = -1
    size: int = 0
    window: int = -1  # the second the rate is counted in
    in_window: int = 0
    dropped_rate: int = 0  # dropped in the current episode (said when it ends)
    dropped_disk: int = 0
    lines: int = 0
    rotations: int = 0
    total_dropped: int = 0
    reopened: int = 0  # times its file was found removed and made again

    def open(self) -> None:
        if self.fd < 0:
            self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)  # the home's logs/ is 0700
            self.fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            self.size = os.fstat(self.fd).st_size

    def reopen_if_removed(self) -> bool:
        """The open file was removed (``rm``, its folder's ``rm -rf``): what is written to it
        goes nowhere anyone can read. Closed, so the next line makes it again, and says so."""
        if self.fd < 0:
            return False
        try:
            if os.fstat(self.fd).st_nlink > 0:
                return False
        except OSError:
            pass
        os.close(self.fd)
        self.fd = -1
        self.reopened += 1
        self.say("this log file was removed while the service ran; written again from here (earlier lines are gone)")
        return True

    def _write(self, data: bytes) -> None:
        self.open()
        if self.size and self.size + len(data) > self.max_bytes:
            os.close(self.fd)
            self.fd = -1
            rotate(self.path, self.backups)
            self.rotations += 1
            self.open()
        view = memoryview(data)
        while view:
            n = os.write(self.fd, view)
            view = view[n:]
        self.size += len(data)

    def say(self, text: str) -> None:
        self._write((json.dumps({"ts": time.strftime("%Y-%m-%dT%H:%M:%S"), "level": "warning",
                                 "logger": "tron.logs", "msg": text}) + "\n").encode())

    def lines_in(self, data: bytes, now: float, disk_full: bool) -> None:
        """Whole lines, as the rate limit and the disk allow."""
        count = data.count(b"\n") or 1
        if disk_full:
            self.dropped_disk += count
            self.total_dropped += count
            return
        if self.dropped_disk:
            self.say(f"{self.dropped_disk} lines dropped: the disk was nearly full")
            self.dropped_disk = 0
        second = int(now)
        if second != self.window:
            self._end_window()
            self.window, self.in_window = second, 0
        if self.rate_limit is not None and self.in_window + count > self.rate_limit:
            room = max(0, self.rate_limit - self.in_window)
            kept = data
            if room:
                cut = -1
                for _ in range(room):
                    cut = data.index(b"\n", cut + 1)
                kept = data[:cut + 1]
            else:
                kept = b""
            if not self.dropped_rate:
                print(json.dumps({"msg": "log rate limit reached", "log": str(self.path),
                                  "limit": self.rate_limit}), flush=True)
            self.dropped_rate += count - room
            self.total_dropped += count - room
            self.in_window = self.rate_limit
            data, count = kept, room
        else:
            self.in_window += count
        if data:
            self.lines += count
            self._write(data)

    def _end_window(self) -> None:
        if self.dropped_rate:
            self.say(f"{self.dropped_rate} lines dropped: over log_rate_limit ({self.rate_limit} lines/s)")
            self.dropped_rate = 0

    def tick(self, now: float) -> None:
        if int(now) != self.window:
            self._end_window()

    def limits(self) -> dict:
        """What an ``attach`` names besides the path."""
        return {"max_bytes": self.max_bytes, "backups": self.backups, "rate_limit": self.rate_limit}

    def stats(self) -> dict:
        return {"bytes": self.size, "lines": self.lines, "rotations": self.rotations, "dropped": self.total_dropped,
                "reopened": self.reopened, "max_bytes": self.max_bytes, "backups": self.backups,
                "rate_limit": self.rate_limit}


@dataclass
class Pipe:
    fd: int
    sink: Sink
    partial: bytearray = field(default_factory=bytearray)
    partial_since: float = 0.0  # monotonic s: when the first byte of ``partial`` came
    last_byte: float = 0.0  # monotonic s: when the last byte came

    def due(self, now: float) -> bool:
        """Its unterminated line is to be written out now (``partial_due``)."""
        return bool(self.partial) and partial_due(self.partial_since, self.last_byte, now)

    def next_due(self) -> float | None:
        """When its unterminated line is due (monotonic s), None with none held."""
        if not self.partial:
            return None
        return min(self.last_byte + PARTIAL_IDLE, self.partial_since + PARTIAL_MAX_AGE)


class Pump:
    def __init__(self, sock_path: str, logs_dir: Path, min_free: int) -> None:
        self.sock_path = sock_path
        self.logs_dir = logs_dir
        self.min_free = min_free
        self.sinks: dict[str, Sink] = {}
        self.pipes: dict[int, Pipe] = {}
        self.sel = selectors.DefaultSelector()
        self.disk_full = False
        self.checked = 0.0
        self.exiting = False

    def check_disk(self, now: float) -> None:
        """Once a second: the free space, and any log file removed under an open sink."""
        if now - self.checked < DISK_CHECK_EVERY:
            return
        self.checked = now
        for sink in self.sinks.values():
            try:
                if sink.reopen_if_removed():
                    print(json.dumps({"level": "error", "msg": "a log file was removed while its service ran: made "
                                      "again", "path": str(sink.path)}), flush=True)
            except OSError as err:  # made again at its next line, or dropped as a full disk's are
                print(json.dumps({"level": "error", "msg": f"a removed log file cannot be made again: {err}",
                                  "path": str(sink.path)}), flush=True)
        try:
            st = os.statvfs(self.logs_dir)
            free = st.f_bavail * st.f_frsize
        except OSError:
            return
        if self.min_free < 0:  # not said: 100 MB, or 5 % of a smaller filesystem (journald keeps 15 %)
            self.min_free = min(100_000_000, st.f_blocks * st.f_frsize // 20)
        full = free < self.min_free
        if full != self.disk_full:
            self.disk_full = full
            print(json.dumps({"level": "error" if full else "info",
                              "msg": "disk nearly full: service logs are not written until there is room"
                              if full else "room on the disk again: service logs are written again",
                              "free_bytes": free, "min_free": self.min_free}), flush=True)

    def attach(self, req: dict, fd: int) -> None:
        path = str(req["path"])
        sink = self.sinks.get(path)
        if sink is None:
            sink = self.sinks[path] = Sink(Path(path), int(req["max_bytes"]), int(req["backups"]), req.get("rate_limit"))
        else:  # the newest incarnation's settings (a reload may have changed them)
            sink.max_bytes, sink.backups, sink.rate_limit = int(req["max_bytes"]), int(req["backups"]), \
                req.get("rate_limit")
        os.set_blocking(fd, False)
        self.pipes[fd] = Pipe(fd, sink)
        self.sel.register(fd, selectors.EVENT_READ, "pipe")

    def read(self, pipe: Pipe, now: float, mono: float | None = None) -> None:
        """What ``pipe`` holds now: whole lines written, the rest kept. ``now``: wall-clock s
        (the rate limit's seconds); ``mono``: monotonic s (how long a partial line is held)."""
        mono = time.monotonic() if mono is None else mono
        try:
            data = os.read(pipe.fd, CHUNK)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:  # every writer is gone: what is left is the last (unterminated) line
            if pipe.partial:
                pipe.sink.lines_in(bytes(pipe.partial) + b"\n", now, self.disk_full)
            self.sel.unregister(pipe.fd)
            os.close(pipe.fd)
            del self.pipes[pipe.fd]
            return
        if not pipe.partial:
            pipe.partial_since = mono
        pipe.last_byte = mono
        pipe.partial += data
        end = pipe.partial.rfind(b"\n")
        if end < 0 and len(pipe.partial) < LONGEST_LINE:
            return
        cut = end + 1 if end >= 0 else len(pipe.partial)
        whole = bytes(pipe.partial[:cut])
        del pipe.partial[:cut]
        if pipe.partial:  # what is left came with this read
            pipe.partial_since = mono
        self._write(pipe, whole, now)

    def flush_partials(self, now: float, mono: float) -> None:
        """Unterminated lines held too long (``partial_due``) written out, ended by a newline."""
        for pipe in self.pipes.values():
            if pipe.due(mono):
                whole = bytes(pipe.partial) + b"\n"
                pipe.partial.clear()
                self._write(pipe, whole, now)

    def _write(self, pipe: Pipe, whole: bytes, now: float) -> None:
        try:
            pipe.sink.lines_in(whole, now, self.disk_full)
        except OSError as err:  # ENOSPC before our own check saw it: counted, never fatal
            pipe.sink.dropped_disk += whole.count(b"\n")
            print(json.dumps({"level": "error", "msg": "log write failed", "log": str(pipe.sink.path),
                              "error": str(err)}), flush=True)

    def handle(self, conn: socket.socket) -> None:
        with conn:
            try:
                data, fds = unixline.receive(conn, 2)
                req = json.loads(data)
            except (OSError, ValueError) as err:
                reply = {"ok": False, "error": f"bad request: {err}"}
                fds = []
            else:
                reply = self.answer(req, fds)
            handed = reply.pop("_fds", [])
            try:
                line = json.dumps(reply).encode() + b"\n"
                sent = socket.send_fds(conn, [line], handed) if handed else 0
                conn.sendall(line[sent:])
            except OSError:
                pass

    def answer(self, req: dict, fds: list[int]) -> dict:
        op = req.get("op")
        if op == "ping":
            return {"ok": True, "pid": os.getpid()}
        if op == "stats":
            return {"ok": True, "pid": os.getpid(), "disk_full": self.disk_full, "pipes": len(self.pipes),
                    "logs": {Path(p).name: s.stats() for p, s in self.sinks.items()}}
        if op == "attach":
            if len(fds) != 1:
                for fd in fds:
                    os.close(fd)
                return {"ok": False, "error": "attach needs exactly one descriptor"}
            try:
                self.attach(req, fds[0])
            except (KeyError, ValueError, TypeError) as err:
                os.close(fds[0])
                return {"ok": False, "error": f"bad attach: {err}"}
            return {"ok": True}
        if op == "sync":  # what every pipe of that log holds now is written before the answer
            for pipe in [p for p in self.pipes.values() if str(p.sink.path) == str(req.get("path"))]:
                for _ in range(64):  # at most 4 MiB: a writer that keeps writing is not waited for
                    if pipe.fd not in self.pipes:
                        break
                    before = len(pipe.partial)
                    self.read(pipe, time.time())
                    if pipe.fd in self.pipes and len(pipe.partial) == before and not readable(pipe.fd):
                        break
            return {"ok": True}
        if op == "pipes":  # copies of the read ends, for the daemon to hold (LogPumpClient.hold)
            after = int(req.get("after", -1))
            batch = sorted(fd for fd in self.pipes if fd > after)[:HAND_AT_ONCE]
            return {"ok": True, "_fds": batch, "last": batch[-1] if batch else after,
                    "more": len(batch) == HAND_AT_ONCE,
                    "pipes": [{"path": str(self.pipes[fd].sink.path), **self.pipes[fd].sink.limits()} for fd in batch]}
        if op == "exit":
            self.exiting = True
            return {"ok": True}
        return {"ok": False, "error": f"unknown op {op!r}"}

    def serve(self) -> int:
        try:
            os.unlink(self.sock_path)
        except FileNotFoundError:
            pass
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        server.bind(self.sock_path)
        os.chmod(self.sock_path, 0o600)
        server.listen(256)  # a crash wave attaches many incarnations at once
        self.sel.register(server, selectors.EVENT_READ, "server")
        print(json.dumps({"msg": "log pump ready", "pid": os.getpid()}), flush=True)
        while True:
            now = time.time()
            self.check_disk(now)
            dues = [d for p in self.pipes.values() if (d := p.next_due()) is not None]
            wait = min([0.5, *(d - time.monotonic() for d in dues)])
            for key, _ in self.sel.select(timeout=max(0.0, wait)):
                if key.data == "server":
                    conn, _ = server.accept()
                    conn.settimeout(2.0)
                    self.handle(conn)
                else:
                    pipe = self.pipes.get(key.fd)
                    if pipe is not None:
                        self.read(pipe, now)
            if dues:
                self.flush_partials(now, time.monotonic())
            for sink in self.sinks.values():
                sink.tick(now)
            if self.exiting and not self.pipes:
                for sink in self.sinks.values():
                    sink.tick(now + 1)
                break
        server.close()
        try:
            os.unlink(self.sock_path)
        except FileNotFoundError:
            pass
        return 0


# -- the daemon's side ------------------------------------------------------------------------


class PumpState(StrEnum):
    """The pump as its daemon sees it."""

    DOWN = "down"  # not started yet, or could not be started
    UP = "up"
    RESTARTING = "restarting"  # it died; a new one is being started
    STOPPED = "stopped"  # asked to exit (tron down)


# Every edge the pump's state may take (LogPumpClient._become).
PUMP_EDGES: dict[PumpState, set[PumpState]] = {
    PumpState.DOWN: {PumpState.UP, PumpState.STOPPED},  # started or found; or never
    PumpState.UP: {PumpState.RESTARTING, PumpState.STOPPED},  # died; or asked to exit
    PumpState.RESTARTING: {PumpState.UP, PumpState.STOPPED},  # a new one handed the held pipes
    PumpState.STOPPED: set(),
}

RESTART_WINDOW = 10.0  # s: deaths within it count towards a slower restart
RESTART_FREE = 3  # deaths in the window restarted at once
RESTART_MAX_DELAY = 5.0
RESTART_WAIT = 3.0  # s a start waits for a pump being restarted before it writes its log itself


def restart_delay(deaths: list[float], now: float) -> float:
    """How long to wait before starting the pump again.

    Parameters:
        deaths: monotonic times of the pump's deaths, the latest included.
        now: monotonic time.

    Returns 0 (at once) for up to ``RESTART_FREE`` deaths in the last ``RESTART_WINDOW`` s;
    past that 0.5 s, doubling with each further death, at most ``RESTART_MAX_DELAY``: a pump
    that cannot live is not started in a tight loop, and one that died once is back at once.
    """
    recent = sum(1 for t in deaths if now - t < RESTART_WINDOW)
    if recent <= RESTART_FREE:
        return 0.0
    return min(RESTART_MAX_DELAY, 0.5 * 2 ** (recent - RESTART_FREE - 1))


@dataclass
class HeldPipe:
    """The daemon's copy of a pipe's read end: while it is open, a program writing to the
    pipe never meets a pipe without a reader (EPIPE, SIGPIPE), even with the pump dead;
    what it writes meanwhile waits in the pipe (64 KiB, then the writer blocks) for the
    next pump, which is handed the same read end."""

    fd: int
    path: str
    limits: dict


class LogPumpClient:
    """Starts (or finds) the home's pump, attaches each incarnation's output to it, and
    keeps it running.

    The pump's death is seen at once (its pidfd, on the event loop): it is said at error,
    ``pid`` is cleared, and a new pump is started (``restart_delay``) and handed every pipe
    still held (``HeldPipe``), so programs go on writing through it and what they wrote
    meanwhile reaches their logs. ``pipe_for`` returns None when no pump can take the log
    (none could be started, or one being restarted is not back within ``RESTART_WAIT``):
    the spawner then appends to the file itself, unrotated, and says so.
    """

    def __init__(self, sock_path: Path, own_log: Path, logs_dir: Path, env: dict[str, str], min_free: int) -> None:
        self.sock_path = str(sock_path)
        self.own_log = own_log
        self.logs_dir = logs_dir
        self.env = env
        self.min_free = min_free
        self.pid: int | None = None
        self.proc: subprocess.Popen | None = None
        self.state = PumpState.DOWN
        self.warned = False
        self.held: dict[int, HeldPipe] = {}  # our read end's fd -> it
        self.deaths: list[float] = []  # monotonic times, the last RESTART_WINDOW s' (restart_delay)
        self.died = 0  # deaths since this daemon started
        self.restarts = 0
        self.last_death: dict | None = None
        self._pidfd: int | None = None
        self._up = asyncio.Event()
        self._restarting: asyncio.Task | None = None
        self._slots = asyncio.Semaphore(6)

    def _call(self, req: dict, fds: tuple[int, ...] = (), timeout: float = 2.0) -> dict | None:
        try:
            return unixline.ask(self.sock_path, req, timeout=timeout, fds=fds)
        except (OSError, ValueError):
            return None

    async def start(self) -> None:
        """Find the pump an earlier daemon left (and hold its pipes), or start one (its own
        session: it outlives us)."""
        reply = await asyncio.to_thread(self._call, {"op": "ping"})
        if reply and reply.get("ok") and self._watch(reply["pid"]):
            self._now_up(reply["pid"])
            taken = await asyncio.to_thread(self._take_pipes)
            log.info("log pump found", extra={"pid": self.pid, "pipes": taken})
            return
        if await self._launch():
            self._now_up(self.proc.pid)
            log.info("log pump ready", extra={"pid": self.pid})
            return
        log.error("the log pump did not start (see %s): services write their logs themselves, unrotated",
                  self.own_log)

    async def _launch(self) -> bool:
        """A new pump (``proc``), answering on the socket and watched, not yet handed
        anything (``_now_up`` then); False when it did not come up."""
        self.logs_dir.mkdir(parents=True, exist_ok=True)
        try:
            with open(self.own_log, "ab", buffering=0) as out:
                self.proc = subprocess.Popen(
                    [sys.executable, "-m", "tron.services.daemon.logpump", self.sock_path, str(self.logs_dir),
                     str(self.min_free)], env={**self.env, "PYTHONUNBUFFERED": "1"}, stdin=subprocess.DEVNULL,
                    stdout=out, stderr=subprocess.STDOUT, start_new_session=True, close_fds=True)
        except OSError as err:
            log.error("cannot start the log pump: %s", err)
            return False
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and self.proc.poll() is None:
            reply = await asyncio.to_thread(self._call, {"op": "ping"}, (), 0.5)
            if reply and reply.get("ok") and reply.get("pid") == self.proc.pid:
                if not self._watch(self.proc.pid):
                    break  # died right after its answer
                return True
            await asyncio.sleep(0.02)
        if self.proc.poll() is None:
            self.proc.kill()  # hung
        self.proc.wait()
        return False

    def _become(self, state: PumpState, pid: int | None) -> None:
        """The one place the state changes; an edge not in ``PUMP_EDGES`` is a bug. (Each
        caller says the change in the log, with what caused it.)"""
        if state not in PUMP_EDGES[self.state]:
            raise RuntimeError(f"log pump: no edge {self.state} -> {state}")
        self.state, self.pid = state, pid
        if state == PumpState.UP:
            self._up.set()  # starts waiting for it (pipe_for) go on
        else:
            self._up.clear()

    def _now_up(self, pid: int) -> None:
        self._become(PumpState.UP, pid)

    def _watch(self, pid: int) -> bool:
        """``_on_death`` runs as soon as ``pid`` exits; False when it is gone already."""
        try:
            self._pidfd = os.pidfd_open(pid)
        except OSError:
            return False
        asyncio.get_running_loop().add_reader(self._pidfd, self._on_death, pid)
        return True

    def _unwatch(self) -> None:
        if self._pidfd is not None:
            asyncio.get_running_loop().remove_reader(self._pidfd)
            os.close(self._pidfd)
            self._pidfd = None

    def _on_death(self, pid: int) -> None:
        self._unwatch()
        status = None
        if self.proc is not None and self.proc.pid == pid:
            status = self.proc.wait()  # exited: reaped at once
            self.proc = None
        if self.state == PumpState.STOPPED:
            return  # it exited as asked
        now = time.monotonic()
        self.deaths = [t for t in self.deaths if now - t < RESTART_WINDOW] + [now]
        self.died += 1
        self.last_death = {"pid": pid, "status": status, "held_pipes": len(self.held), "at": time.time()}
        if self.state == PumpState.UP:  # (RESTARTING already: a new one died as it was handed the pipes)
            self._become(PumpState.RESTARTING, None)
        self.warned = False
        log.error("the log pump died (pid %s, %s): starting a new one; %d pipes are held for it meanwhile", pid,
                  "exit status unknown" if status is None else f"signal {-status}" if status < 0
                  else f"exit {status}", len(self.held), extra={"pid": pid, "status": status})
        if self._restarting is None or self._restarting.done():  # (else: one died as it was handed the pipes)
            self._restarting = asyncio.ensure_future(self._restart())

    async def _restart(self) -> None:
        """A new pump until one comes up, handed every pipe we hold before any new one is
        attached (``pipe_for`` waits for ``_up``): a pipe attached twice would have two
        readers in the pump, each with half of its lines."""
        while self.state == PumpState.RESTARTING:
            await asyncio.sleep(restart_delay(self.deaths, time.monotonic()))
            if self.state != PumpState.RESTARTING:
                return
            if not await self._launch():
                self.deaths.append(time.monotonic())  # a failed start slows the next one too
                log.error("the log pump did not start again (see %s); trying again", self.own_log)
                continue
            pid = self.proc.pid
            handed = 0
            for held in list(self.held.values()):
                handed += await self._attach(held.fd, held.path, held.limits)
            if self._pidfd is None or self.state != PumpState.RESTARTING:
                continue  # it died again while being handed them (said by _on_death), or we stop
            self._now_up(pid)
            self.restarts += 1
            self.prune()
            log.warning("log pump started again: %d held pipes handed to it", handed,
                        extra={"pid": pid, "restarts": self.restarts})

    def _take_pipes(self) -> int:
        """Copies of the read ends a pump we found holds (an earlier daemon attached them):
        held from now on, like our own."""
        after, taken = -1, 0
        while True:
            try:
                reply, fds = unixline.ask_fds(self.sock_path, {"op": "pipes", "after": after}, timeout=2.0)
            except (OSError, ValueError) as err:
                log.warning("the log pump did not hand its pipes over (%s): those are lost if it dies", err)
                return taken
            pipes = (reply or {}).get("pipes") or []
            if len(fds) != len(pipes):
                for fd in fds:
                    os.close(fd)
                return taken
            for fd, p in zip(fds, pipes):
                path = p.pop("path")
                self.held[fd] = HeldPipe(fd, path, p)
            taken += len(fds)
            if not reply or not reply.get("more"):
                return taken
            after = reply["last"]

    async def _attach(self, fd: int, path: str, limits: dict) -> bool:
        try:
            async with self._slots:  # a few at a time: a wave's last attach must not time out in the queue
                reply = await unixline.ask_async(self.sock_path, {"op": "attach", "path": path, **limits},
                                                 timeout=2.0, fds=(fd,))
        except (OSError, ValueError):
            reply = None
        return bool(reply and reply.get("ok"))

    def prune(self) -> None:
        """Held read ends whose writers are all gone (POLLHUP) are let go while a pump runs:
        it holds its own copy and reads what is left."""
        if self.state != PumpState.UP or not self.held or self._dead():
            return
        poller = select.poll()
        for fd in self.held:
            poller.register(fd, 0)  # POLLHUP and POLLERR are always reported
        for fd, _ in poller.poll(0):
            os.close(fd)
            del self.held[fd]

    async def pipe_for(self, path: Path, *, max_bytes: int, backups: int, rate_limit: int | None) -> int | None:
        """The write end of a pipe whose read end the pump now holds for ``path`` (and we
        hold too); the caller hands it to the child and closes it. None: write the file directly."""
        if self.state == PumpState.RESTARTING:
            try:  # back within a second, as a rule: worth waiting for rather than an unrotated log
                await asyncio.wait_for(self._up.wait(), RESTART_WAIT)
            except TimeoutError:
                pass
        if self.state != PumpState.UP:
            return self._unpumped(f"the log pump is {self.state}")
        limits = {"max_bytes": max_bytes, "backups": backups, "rate_limit": rate_limit}
        r, w = os.pipe()
        self.held[r] = HeldPipe(r, str(path), limits)
        if await self._attach(r, str(path), limits) or self._dead():
            return w  # (the pump died meanwhile: its successor is handed this one)
        del self.held[r]
        os.close(r)
        os.close(w)
        return self._unpumped("the log pump does not answer")

    def _dead(self) -> bool:
        """The pump died, whether or not ``_on_death`` has run yet."""
        if self.state == PumpState.RESTARTING:
            return True
        return self._pidfd is not None and readable(self._pidfd)

    def _unpumped(self, why: str) -> None:
        if not self.warned:
            self.warned = True
            log.error("%s: logs are written unrotated until it is back", why)
        return None

    def pids(self) -> set[int]:
        """Its processes: the pump, and one being started (not ``pid`` until it has the pipes)."""
        return {p for p in (self.pid, self.proc.pid if self.proc is not None else None) if p}

    def health(self) -> dict:
        """For /status and the daemon's events (once a second, by the housekeeping): held
        read ends whose writers are all gone are let go first (a stopped service's pipe was
        held until the next spawn of any service). One poll(0), nothing that waits."""
        self.prune()
        return {"state": str(self.state), "pid": self.pid, "died": self.died, "restarts": self.restarts,
                "held_pipes": len(self.held), "last_death": self.last_death}

    def sync(self, path: Path) -> None:
        """Until what the programs wrote to ``path``'s pipes so far is in the file (a start
        failure's reason is the last line its program wrote before it exited)."""
        if self.pid is not None:
            self._call({"op": "sync", "path": str(path)}, timeout=1.0)

    def stats(self) -> dict | None:
        return self._call({"op": "stats"}, timeout=0.5) if self.pid is not None else None

    async def stop(self) -> None:
        """After every service has stopped: the pump drains what is left, then exits."""
        was, pid = self.state, self.pid
        if was == PumpState.STOPPED:
            return  # stopped already
        self._become(PumpState.STOPPED, pid)
        if self._restarting is not None:
            self._restarting.cancel()
            await asyncio.gather(self._restarting, return_exceptions=True)
        self._unwatch()
        if was == PumpState.UP and pid is not None:
            await self._stop_pump(pid)
        for held in self.held.values():  # the pump had its own copies; nobody writes any more
            os.close(held.fd)
        self.held.clear()
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.kill()  # one being started as we stopped
            self.proc.wait()
            self.proc = None
        self.pid = None

    async def _stop_pump(self, pid: int) -> None:
        await asyncio.to_thread(self._call, {"op": "exit"})
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            if self.proc is not None:
                if self.proc.poll() is not None:
                    return
            else:
                try:
                    os.kill(pid, 0)
                except ProcessLookupError:
                    return
            await asyncio.sleep(0.02)
        log.warning("log pump %s did not exit; ending it", pid)
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def main(argv: list[str]) -> int:
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    return Pump(argv[0], Path(argv[1]), int(argv[2])).serve()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
