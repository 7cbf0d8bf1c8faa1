"""One authority per home: the daemon holds ``<home>/run/tron.lock`` while it runs."""

from __future__ import annotations

import fcntl
import os

from tron.common.paths import Home


class StartError(Exception):
    """The daemon cannot start; the message says why."""


class HomeLock:
    def __init__(self, home: Home) -> None:
        self.home = home
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock or refuse, naming the daemon that holds it; held already, nothing."""
        if self._fd is not None:
            return
        self.home.ensure()
        fd = os.open(self.home.lock_file, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 64).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise StartError(
                f"another tron daemon (pid {holder}) already runs on home {self.home.root}; "
                "use `tron status`, or `tron down` first"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._fd = fd

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
