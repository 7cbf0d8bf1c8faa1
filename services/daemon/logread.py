"""A service's log read in bounded chunks from a cursor, wherever the service runs.

The daemon answers ``GET /services/{name}/log`` with this (services/daemon/reach.py): from
the file itself for a service on its own machine, from the node agent
(services/daemon/node_agent.py ``read_log``) for one a Ray node runs, which reads its
node's file with this same function. So ``tron logs`` and the web UI's log pane follow a
service the same way on every node.

A follower keeps a cursor: the file's inode and an offset in it. The first read (no
cursor) gives the last ``lines`` lines and the cursor at the end of the file; every read
after gives the whole lines written since, at most ``max_bytes`` of them, and the cursor
to read from next (``more``: there is more already). A cursor into a file the log pump has
since rotated goes on in ``name.log.1`` to its end, then in the new file from its start;
a file that shrank is read again from its start. Only whole lines are handed out (a line
longer than a chunk is handed out in pieces), decoded with replacement, so a cursor never
points into the middle of a character.
"""

from __future__ import annotations

import os
from pathlib import Path

MAX_CHUNK = 256 * 1024  # bytes one read hands out at most
MAX_LINES = 1000  # lines a first read may ask for
TAIL_BYTES_PER_LINE = 64 * 1024  # a first read looks this far back per line asked (at most 16 lines' worth)


def read_log(path: Path, *, inode: int | None = None, offset: int | None = None, lines: int = 0,
             max_bytes: int = MAX_CHUNK, skip_over: int | None = None, moved: bool = False) -> dict:
    """One chunk of the log at ``path`` for the cursor (``inode``, ``offset``).

    Parameters:
        lines: with no cursor, how many of the last lines to hand out (0: none, only the cursor).
        skip_over: a follower that has fallen more than this many bytes behind skips to the
            newest ``max_bytes`` (the web UI: a page cannot show everything a burst wrote).
        moved: the service now runs on another node than the cursor's: a cursor whose file
            is not here either (another disk) starts from the last ``lines`` lines.

    Returns ``{"data", "inode", "offset", "size", "more", "note"}``: ``data`` the whole lines
    read (text), ``inode``/``offset`` the cursor to read from next, ``note`` a line for the
    reader when lines were skipped or the file was replaced (else None).
    """
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return _answer("", None, 0, 0, note=None)
    if inode is None or offset is None:
        data, end = _last_lines(path, st.st_size, lines)
        return _answer(_decode(data), st.st_ino, end, st.st_size)
    note = None
    if inode != st.st_ino:
        older = path.with_name(path.name + ".1")
        try:
            ost = os.stat(older)
        except FileNotFoundError:
            ost = None
        if ost is not None and ost.st_ino == inode:
            if offset < ost.st_size:  # what was written before the rotation: rotated files end whole
                data = read_range(older, offset, min(ost.st_size - offset, max_bytes))
                return _answer(_decode(data), inode, offset + len(data), ost.st_size, more=True)
        elif moved:
            data, end = _last_lines(path, st.st_size, lines)
            return _answer(_decode(data), st.st_ino, end, st.st_size,
                           note=f"-- {path.name} on this node, from its last {lines} lines --")
        else:
            note = f"-- {path.name} was replaced; reading it from the start --"
        offset = 0
    elif offset > st.st_size:
        note, offset = f"-- {path.name} was truncated; reading it from the start --", 0
    if skip_over is not None and st.st_size - offset > skip_over:
        start = max(offset, st.st_size - max_bytes)
        head = read_range(path, start, min(st.st_size - start, LONGEST_SKIP))
        first = head.find(b"\n")  # go on from a line's start
        skipped = start - offset + (first + 1 if first >= 0 else 0)
        note, offset = f"-- {skipped} bytes skipped: written faster than they can be shown --", offset + skipped
    want = min(st.st_size - offset, max_bytes)
    data = read_range(path, offset, want)
    end = data.rfind(b"\n")
    if end >= 0:
        data = data[:end + 1]
    elif len(data) < max_bytes:
        data = b""  # a line still being written: it comes whole with a later read
    nxt = offset + len(data)
    return _answer(_decode(data), st.st_ino, nxt, st.st_size, more=nxt < st.st_size and bool(data), note=note)


LONGEST_SKIP = 64 * 1024  # how far past a skip point a line start is looked for


def _answer(data: str, inode: int | None, offset: int, size: int, *, more: bool = False,
            note: str | None = None) -> dict:
    return {"data": data, "inode": inode, "offset": offset, "size": size, "more": more, "note": note}


def _decode(data: bytes) -> str:
    return data.decode("utf-8", errors="replace")


def read_range(path: Path, start: int, length: int) -> bytes:
    """``length`` bytes of ``path`` from ``start`` (fewer at its end; none if it is gone)."""
    if length <= 0:
        return b""
    try:
        with open(path, "rb") as f:
            f.seek(start)
            return f.read(length)
    except FileNotFoundError:
        return b""


def _last_lines(path: Path, size: int, n: int) -> tuple[bytes, int]:
    """The last ``n`` whole lines before ``size``, and where the next read starts: after the
    last whole line (a line still being written comes with that read)."""
    if size <= 0:
        return b"", 0
    want = min(size, TAIL_BYTES_PER_LINE * min(max(n, 1), 16))
    data = read_range(path, size - want, want)
    cut = data.rfind(b"\n")
    if cut < 0:  # no whole line in reach: follow from here
        return b"", size - want if want == size else size
    end = size - want + cut + 1
    found = data[:cut + 1].splitlines(keepends=True)
    if want < size and found:
        found = found[1:]  # cut in the middle
    return b"".join(found[-n:]) if n > 0 else b"", end
