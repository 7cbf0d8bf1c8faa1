"""Follow one service's log file for the web UI, across its restarts.

Every incarnation of a service appends to the same ``<home>/logs/<name>.log`` (JSON
lines), so following the file follows the service through restarts. A file that shrank
or was replaced is read again from its start. Every read is bounded: a burst larger than
``max_bytes`` between two reads is skipped, with a line that says how much, so a chatty
service can never make the daemon read (or a browser receive) without limit.

On one machine the reads are plain file reads of at most a few hundred kilobytes from the
page cache, done on the event loop between two frames; they take microseconds. On a Ray
cluster ``NodeLogTail`` asks the service's node agent for the same chunks.
"""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path

from tron.services.daemon.logread import read_range

BACKLOG_LINES = 200
BACKLOG_BYTES = 64 * 1024
READ_BYTES = 256 * 1024
LINE_CHARS = 4000  # a longer line is cut: a page is no place for a megabyte of JSON

log = logging.getLogger("tron.daemon.ui")


class LogTail:
    def __init__(self, path: Path) -> None:
        self.path = path
        size, self._inode = self._size_and_inode()
        self.offset = self._line_start(size)
        self._partial = b""

    def _line_start(self, size: int) -> int:
        """Where the line being written at ``size`` begins: a tail starts on a whole line."""
        start = max(0, size - BACKLOG_BYTES)
        end = self._read(start, size - start).rfind(b"\n")
        return start + end + 1 if end >= 0 else size

    def _size_and_inode(self) -> tuple[int, int | None]:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return 0, None
        return st.st_size, st.st_ino

    def backlog(self, lines: int = BACKLOG_LINES, max_bytes: int = BACKLOG_BYTES) -> list[str]:
        """The last lines before the point this tail follows from (what a new viewer sees)."""
        end = self.offset - len(self._partial)  # a line still being written comes with read_new
        start = max(0, end - max_bytes)
        data = self._read(start, end - start)
        if start > 0:
            data = data.split(b"\n", 1)[1] if b"\n" in data else b""  # the first line is cut
        return _lines(data)[-lines:]

    def read_new(self, max_bytes: int = READ_BYTES) -> list[str]:
        """The complete lines written since the last read."""
        size, inode = self._size_and_inode()
        out: list[str] = []
        if inode != self._inode or size < self.offset:  # created, replaced or truncated: start again
            if self._inode is not None:
                out.append(f"-- {self.path.name} was replaced or truncated; reading it from the start --")
            self.offset, self._inode, self._partial = 0, inode, b""
        if size - self.offset > max_bytes:
            out.append(f"-- {size - self.offset - max_bytes} bytes skipped: written faster than they can be shown --")
            self.offset, self._partial = size - max_bytes, b""
        if size == self.offset:
            return out
        data = self._partial + self._read(self.offset, size - self.offset)
        self.offset = size
        complete, _, self._partial = data.rpartition(b"\n")
        if len(self._partial) > max_bytes:  # a line with no end in sight: show what there is
            complete, self._partial = data, b""
        return out + _lines(complete)

    def _read(self, start: int, length: int) -> bytes:
        return read_range(self.path, start, length)


def _lines(data: bytes) -> list[str]:
    return [line[:LINE_CHARS] for line in data.decode("utf-8", "replace").splitlines() if line.strip()]


class NodeLogTail:
    """A LogTail for a mesh on a Ray cluster: the log is on the service's node, read through
    the daemon's ``reach.service_log`` (its node agent) in bounded chunks from a cursor.

    Each read runs as a task of its own, one at a time per log, and hands its lines to
    ``publish`` when it is done: a node that is slow to answer never holds up the UI's loop.
    """

    def __init__(self, daemon, name: str) -> None:
        self.daemon, self.name = daemon, name
        self.cursor: dict = {}  # inode, offset, node: where the next read starts
        self._reading: asyncio.Task | None = None
        self._unreachable = False

    async def _read(self, **query) -> dict | None:
        from tron.services.daemon.reach import LogQuery, service_log
        from tron.services.daemon.spawner import SpawnError

        try:
            answer = await service_log(self.daemon, self.name, LogQuery(**query))
        except SpawnError as err:
            self._unreachable = True
            log.warning("ui: the log of %s is not reachable: %s", self.name, err)
            return None
        self._unreachable = False
        return answer

    async def backlog(self, lines: int = BACKLOG_LINES) -> list[str]:
        """The last lines now (what a new viewer sees), read apart from the followed cursor."""
        answer = await self._read(lines=lines, max_bytes=BACKLOG_BYTES)
        return [] if answer is None else _lines(answer["data"].encode())

    def poll(self, publish) -> None:
        """Start the next read unless one is still under way; ``publish(lines)`` gets its lines."""
        if self._reading is None or self._reading.done():
            self._reading = asyncio.get_running_loop().create_task(self._follow(publish))

    async def _follow(self, publish) -> None:
        was_unreachable = self._unreachable
        if not self.cursor:  # the first read: from the end, as a new LogTail does
            answer = await self._read(lines=0)
        else:
            answer = await self._read(**self.cursor, lines=BACKLOG_LINES, max_bytes=READ_BYTES, skip_over=READ_BYTES)
        if answer is None:
            if not was_unreachable:
                publish([f"-- the log of {self.name} is not reachable now (its node agent does not answer) --"])
            return
        self.cursor = {"inode": answer["inode"], "offset": answer["offset"], "node": answer["node"]}
        out = ([answer["note"]] if answer["note"] else []) + _lines(answer["data"].encode())
        if out:
            publish(out)

    def close(self) -> None:
        if self._reading is not None:
            self._reading.cancel()
