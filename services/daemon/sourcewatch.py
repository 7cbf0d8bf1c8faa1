"""Has any source file the fork server imported changed? Asked at every fork and hand-over.

The answer is a stat of each file against the mtime the server read (~70 files: 0.25 ms of a
standby's CPU at its hand-over, on the restart's path). The kernel can say first whether
anything in their directories changed at all: an inotify instance watching them, made by the
server before it reads the mtimes and inherited by every child it forks. Nobody reads its
events, so once anything changed it stays readable for good, and every later check stats
every file as before (and finds the change, or finds a false alarm: an editor's swap file).
Until then a check is one ``select()`` with no wait. Where inotify cannot be had (no
instances left for the user, a file system without it) every check stats.
"""

from __future__ import annotations

import ctypes
import os
import select
from collections.abc import Iterable

IN_MODIFY, IN_ATTRIB, IN_CLOSE_WRITE = 0x2, 0x4, 0x8
IN_MOVED_FROM, IN_MOVED_TO, IN_CREATE, IN_DELETE = 0x40, 0x80, 0x100, 0x200
IN_DELETE_SELF, IN_MOVE_SELF = 0x400, 0x800
CHANGES = (IN_MODIFY | IN_ATTRIB | IN_CLOSE_WRITE | IN_MOVED_FROM | IN_MOVED_TO | IN_CREATE | IN_DELETE
           | IN_DELETE_SELF | IN_MOVE_SELF)
IN_NONBLOCK = os.O_NONBLOCK


class SourceWatch:
    """The directories of the server's source files, watched (``quiet()``: nothing changed
    in them since ``watch`` was called for them)."""

    def __init__(self) -> None:
        self.fd: int | None = None
        self.dirs: set[str] = set()
        self.broken: str | None = None  # why every check stats, once inotify failed
        self._libc = None

    def watch(self, paths: Iterable[str]) -> None:
        """Watch the directories of ``paths`` (before their mtimes are read: a change between
        the two is then seen)."""
        if self.broken:
            return
        try:
            if self.fd is None:
                self._libc = ctypes.CDLL(None, use_errno=True)
                fd = self._libc.inotify_init1(IN_NONBLOCK)
                if fd < 0:
                    raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))
                self.fd = fd
            for d in sorted({os.path.dirname(p) for p in paths} - self.dirs):
                if self._libc.inotify_add_watch(self.fd, os.fsencode(d), CHANGES) < 0:
                    raise OSError(ctypes.get_errno(), f"{os.strerror(ctypes.get_errno())}: {d}")
                self.dirs.add(d)
        except (OSError, AttributeError) as err:  # (AttributeError: a libc without inotify)
            self.broken = f"inotify: {err}"
            self.close()

    def quiet(self) -> bool:
        """Nothing changed in the watched directories (False: it may have; stat and see)."""
        if self.fd is None:
            return False
        try:
            return not select.select([self.fd], [], [], 0)[0]
        except (OSError, ValueError):
            return False

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
        self.dirs.clear()

    @property
    def how(self) -> str:
        return "inotify" if self.fd is not None else f"stat ({self.broken or 'not watching'})"
