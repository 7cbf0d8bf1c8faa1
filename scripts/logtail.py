"""`tron logs`: a merged, prefixed, coloured tail of service logs.

Each service's log is ``<home>/logs/<name>.log`` across incarnations, so following the
file follows the service through restarts; the log pump rotates it into ``<name>.log.1``
and older, which a tail reads when the current file is short and a follower reads to its
end when the file is rotated under it. Lines are decoded with replacement (odd
or binary output never breaks the tail); JSON lines are shown as ``name | level msg k=v``.

On a Ray cluster a service's log is on its node: ``DaemonLog`` reads it through the daemon
(``GET /services/{name}/log``, which asks the node agent) in bounded chunks from a cursor,
so ``tron logs NAME`` and ``-f`` follow it wherever it runs, through restarts and moves.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from tron.services.daemon.audit import printable

COLOURS = ["36", "32", "33", "35", "34", "96", "92", "93", "95", "94"]
LEVEL = {"warning": "33", "error": "31", "critical": "1;31"}
SKIP = {"ts", "level", "logger", "msg", "service"}


def format_line(name: str, raw: bytes, colour: str, use_colour: bool) -> str:
    text = raw.decode("utf-8", errors="replace").rstrip("\n")
    text = "".join(ch if ch.isprintable() or ch == "\t" else "\ufffd" for ch in text)
    body = text
    level = ""
    try:
        obj = json.loads(text)
        if isinstance(obj, dict) and "msg" in obj:
            level = str(obj.get("level", ""))
            extras = " ".join(f"{k}={v}" for k, v in obj.items() if k not in SKIP)
            body = f"{obj.get('ts', '')[11:23]} {level:<7} {obj['msg']}" + (f"  {extras}" if extras else "")
            # JSON's escapes are decoded now: a \n or \u001b a caller put in a value (an agent's
            # failure reason) would forge a line or drive the terminal. Shown escaped instead.
            body = printable(body, keep="\t")
    except (json.JSONDecodeError, TypeError):
        pass
    if not use_colour:
        return f"{name:>14} | {body}"
    lvl = LEVEL.get(level)
    body = f"\x1b[{lvl}m{body}\x1b[0m" if lvl else body
    return f"\x1b[{colour}m{name:>14}\x1b[0m | {body}"


def of_trace(raw: bytes, trace_id: str) -> bool:
    """A JSON line logged inside a span of that trace (common/logs.py adds trace_id)."""
    if trace_id.encode() not in raw:  # most lines: no parse
        return False
    try:
        obj = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False
    return isinstance(obj, dict) and obj.get("trace_id") == trace_id


def _traced(files: dict[str, Path], trace_id: str) -> list[tuple[str, str, bytes]]:
    """Every line of the trace in the named logs, in time order: (ts, name, line)."""
    found = []
    for name, path in files.items():
        for part in [*reversed(_rotated(path)), path]:  # what the log pump rotated away too
            if part.exists():
                with open(part, "rb") as f:
                    found += [(str(json.loads(raw).get("ts", "")), name, raw) for raw in f if of_trace(raw, trace_id)]
    return sorted(found, key=lambda t: t[0])


def _rotated(path: Path) -> list[Path]:
    """The files the log pump rotated ``path`` into, newest first: name.log.1, name.log.2, ..."""
    found = []
    for i in range(1, 1000):
        older = path.with_name(f"{path.name}.{i}")
        if not older.exists():
            break
        found.append(older)
    return found


def _tail_of(path: Path, n: int, upto: int | None = None) -> list[bytes]:
    """The last ``n`` whole lines of one file (of its first ``upto`` bytes), reading at most
    its last 64 KiB per line asked."""
    with open(path, "rb") as f:
        size = f.seek(0, 2) if upto is None else min(upto, f.seek(0, 2))
        want = min(size, 64 * 1024 * max(1, min(n, 16)))
        f.seek(size - want)
        lines = f.read(want).splitlines(keepends=True)
    if want < size and lines:
        lines = lines[1:]  # cut in the middle
    return lines[-n:]


def _last_lines(path: Path, n: int, upto: int | None = None) -> list[bytes]:
    """The last ``n`` lines of a log, across its rotated files when the current one has fewer;
    ``upto``: of the current file's first bytes only (its size when a follow starts there)."""
    if n <= 0:
        return []
    lines = _tail_of(path, n, upto) if path.exists() else []
    for older in _rotated(path):
        if len(lines) >= n:
            break
        try:
            lines = _tail_of(older, n - len(lines)) + lines
        except FileNotFoundError:  # rotated away meanwhile
            break
    return lines[-n:]


class DaemonLog:
    """One service's log read through the daemon, wherever the service runs.

    ``fetch(name, query)`` asks ``GET /services/{name}/log`` and returns (status, body).
    """

    def __init__(self, name: str, fetch) -> None:
        self.name, self.fetch = name, fetch
        self.cursor: dict = {}
        self.unreachable: str | None = None  # why the last read failed (said once)

    def _get(self, **query) -> dict | None:
        code, body = self.fetch(self.name, query)
        if code == 200 and isinstance(body, dict):
            self.unreachable = None
            self.cursor = {"inode": body["inode"], "offset": body["offset"], "node": body["node"]}
            return body
        why = body.get("error") if isinstance(body, dict) else body
        if why != self.unreachable:
            self.unreachable = why
            print(f"tron logs: {self.name}: the log cannot be read now ({code}): {why}", file=sys.stderr)
        return None

    def last(self, n: int) -> list[bytes]:
        """The last ``n`` lines, and the cursor after them."""
        body = self._get(lines=max(0, min(n, 1000)))
        return [] if body is None else _split(body)

    def new(self, rounds: int = 16) -> list[bytes]:
        """What was written since the last read (up to ``rounds`` chunks at once)."""
        out: list[bytes] = []
        for _ in range(rounds):
            if not self.cursor:  # never read (the daemon did not answer): from now on
                body = self._get(lines=0)
            elif self.cursor["inode"] is None:  # there was no file yet: all of it
                body = self._get(lines=1000, node=self.cursor["node"])
            else:
                body = self._get(**self.cursor)
            if body is None:
                break
            out += _split(body)
            if not body["more"]:
                break
        return out


def _split(body: dict) -> list[bytes]:
    note = [body["note"].encode()] if body.get("note") else []
    return note + body["data"].encode().splitlines()


def tail(logs_dir: Path, names: list[str], *, follow: bool, lines: int, out=None,
         stop_after: float | None = None, trace: str | None = None,
         remote: dict[str, DaemonLog] | None = None) -> int:
    """``trace``: only the lines logged inside that trace (32 hex digits), every one of them.
    ``remote``: the services whose log is read through the daemon (on a Ray node)."""
    remote = remote or {}
    named = bool(names)  # only these, even when every one of them is read through the daemon
    names = [n for n in names if n not in remote]
    out = out or sys.stdout
    use_colour = out.isatty() if hasattr(out, "isatty") else False
    if names:
        missing = [n for n in names if not (logs_dir / f"{n}.log").exists()]
        if missing and not follow:
            print(f"tron logs: no log for {', '.join(missing)} in {logs_dir}", file=sys.stderr)
            return 2
    colour_of: dict[str, str] = {}
    offsets: dict[str, int] = {}
    inodes: dict[str, int] = {}  # a new inode under the name: the log was rotated

    def files() -> dict[str, Path]:
        found = {p.stem: p for p in sorted(logs_dir.glob("*.log")) if p.stem not in remote}
        return {n: found.get(n, logs_dir / f"{n}.log") for n in names} if named else found

    if trace:
        for name in files():
            colour_of[name] = COLOURS[len(colour_of) % len(COLOURS)]
        for _, name, raw in _traced(files(), trace):
            out.write(format_line(name, raw, colour_of[name], use_colour) + "\n")
    for name, path in files().items():
        colour_of.setdefault(name, COLOURS[len(colour_of) % len(COLOURS)])
        if path.exists():
            # The size first: the follow goes on from there, so a line the pump writes while
            # the last lines are read is shown by the follow, not skipped.
            st = path.stat()
            offsets[name], inodes[name] = st.st_size, st.st_ino
            for raw in [] if trace else _last_lines(path, lines, st.st_size):
                out.write(format_line(name, raw, colour_of[name], use_colour) + "\n")
    for name, log in remote.items():
        colour_of.setdefault(name, COLOURS[len(colour_of) % len(COLOURS)])
        for raw in log.last(1000 if trace else lines):
            if not trace or of_trace(raw, trace):
                out.write(format_line(name, raw, colour_of[name], use_colour) + "\n")
    out.flush()
    if not follow:
        return 0
    partial: dict[str, bytes] = {}
    started = time.monotonic()
    try:
        while stop_after is None or time.monotonic() - started < stop_after:
            wrote = False
            for name, path in files().items():
                colour_of.setdefault(name, COLOURS[len(colour_of) % len(COLOURS)])
                try:
                    st = path.stat()
                except FileNotFoundError:
                    continue
                size, pos = st.st_size, offsets.get(name, 0)
                chunk = partial.pop(name, b"")
                if inodes.get(name, st.st_ino) != st.st_ino:
                    # Rotated: what was written to the old file after our last read is in .1.
                    older = path.with_name(path.name + ".1")
                    try:
                        if older.stat().st_ino == inodes[name]:
                            with open(older, "rb") as f:
                                f.seek(pos)
                                chunk += f.read()
                    except FileNotFoundError:
                        pass
                    pos = 0
                elif size < pos:
                    pos = 0  # truncated: start again from the top
                inodes[name] = st.st_ino
                if size == pos and not chunk:
                    continue
                with open(path, "rb") as f:
                    f.seek(pos)
                    chunk += f.read(size - pos)
                offsets[name] = size
                *complete, rest = chunk.split(b"\n")
                if rest:
                    partial[name] = rest
                for raw in complete:
                    if trace and not of_trace(raw, trace):
                        continue
                    out.write(format_line(name, raw, colour_of[name], use_colour) + "\n")
                    wrote = True
            for name, log in remote.items():
                for raw in log.new():
                    if trace and not of_trace(raw, trace):
                        continue
                    out.write(format_line(name, raw, colour_of[name], use_colour) + "\n")
                    wrote = True
            if wrote:
                out.flush()
            time.sleep(0.2)
    except KeyboardInterrupt:
        pass
    return 0
