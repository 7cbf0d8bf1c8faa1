"""The fork server's heap in huge pages, so that an agent's death costs the kernel little.

A killed process is known dead (its pidfd turns readable) only once the kernel has torn its
memory down, and an agent forked from the warm fork server maps the server's whole heap
(~125 MB of anonymous memory: the agent code, aiohttp, pydantic, the LLM SDKs). In 4 KiB
pages that is ~32,000 page-table entries to copy at every fork and to drop at every death.
The same heap in 2 MiB pages is ~60: a child shares them as the server's, and a write of its
own copies only that 4 KiB page (the kernel splits the child's mapping of that huge page, not
the server's; its other pages stay in the huge page's frame, which the kernel frees in one
batch). Measured on children that rehearsed an agent's start as a standby does
(``benchmarks/kill_teardown.py``): a kill until the pidfd says so, 5.1 -> 2.7 ms; 20 killed
at once, the last known dead after 43 -> 27 ms, for 80 -> 50 ms of the machine's CPU.

``collapse()`` asks the kernel to rewrite the server's private anonymous memory in huge
pages now (``MADV_COLLAPSE``, Linux 6.1+, whatever the machine's THP setting short of
"never"), once the heap is built and frozen: children forked after it share the huge pages.
It costs ~0.2-0.3 s of the server's CPU once, off every agent's path. Where the kernel cannot
(older than 6.1, THP compiled out or set to never, no memory for a huge page) nothing
changes but the answer, which says why: the fork server logs it, and its children are forked
as before.
"""

from __future__ import annotations

import ctypes
import errno
import os
import time
from dataclasses import dataclass, field

MADV_COLLAPSE = 25  # linux/mman.h, since 6.1
HUGE = 2 << 20  # a PMD's reach on x86-64 and arm64 with 4 KiB pages


@dataclass
class Collapsed:
    """What ``collapse()`` did: bytes now in huge pages, 2 MiB ranges the kernel refused (by
    errno name), seconds spent, and why nothing could be done when that is so."""

    bytes: int = 0
    refused: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    unavailable: str | None = None

    def log_fields(self) -> dict:
        out: dict = {"mb": self.bytes // 2**20, "seconds": round(self.seconds, 3)}
        if self.refused:
            out["refused"] = self.refused
        if self.unavailable:
            out["unavailable"] = self.unavailable
        return out


def ranges(maps: str) -> list[tuple[int, int]]:
    """The 2 MiB-aligned spans of ``/proc/PID/maps`` text worth collapsing: private, writable
    and anonymous (no file behind them, or the brk heap), each cut to whole huge pages."""
    out = []
    for line in maps.splitlines():
        parts = line.split()
        if len(parts) < 5:
            continue
        span, perms = parts[0], parts[1]
        path = parts[5] if len(parts) > 5 else ""
        if "w" not in perms or "p" not in perms or path not in ("", "[heap]"):
            continue
        lo, hi = (int(x, 16) for x in span.split("-"))
        lo, hi = (lo + HUGE - 1) & ~(HUGE - 1), hi & ~(HUGE - 1)
        if hi > lo:
            out.append((lo, hi))
    return out


def unavailable_reason(setting_path: str = "/sys/kernel/mm/transparent_hugepage/enabled") -> str | None:
    """Why this machine has no huge pages for ``MADV_COLLAPSE``, or None when it may."""
    try:
        with open(setting_path) as f:
            setting = f.read()
    except OSError:
        return "transparent huge pages are not in this kernel"
    if "[never]" in setting:
        return f"transparent huge pages are set to never ({setting_path})"
    return None


def collapse(budget: float = 1.0) -> Collapsed:
    """Rewrite this process's private anonymous memory in huge pages (see the module doc),
    2 MiB at a time, for ``budget`` seconds at most: on a machine whose free memory is
    fragmented each huge page may have to be compacted first, and the server does not wait
    for that longer than this (what is left stays in 4 KiB pages, counted as "unfinished")."""
    started = time.monotonic()
    out = Collapsed(unavailable=unavailable_reason())
    if out.unavailable:
        return out
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    with open(f"/proc/{os.getpid()}/maps") as f:
        spans = ranges(f.read())
    for lo, hi in spans:
        for at in range(lo, hi, HUGE):
            if time.monotonic() - started > budget:
                out.refused["unfinished"] = out.refused.get("unfinished", 0) + 1
            elif libc.madvise(at, HUGE, MADV_COLLAPSE) == 0:
                out.bytes += HUGE
            else:
                name = errno.errorcode.get(ctypes.get_errno(), "?")
                out.refused[name] = out.refused.get(name, 0) + 1
    out.seconds = time.monotonic() - started
    if not out.bytes and out.refused and "unfinished" not in out.refused:
        # EINVAL for every range: a kernel before 6.1 does not know the advice.
        out.unavailable = ("the kernel does not collapse memory into huge pages (MADV_COLLAPSE needs Linux 6.1+)"
                           if set(out.refused) == {"EINVAL"} else "the kernel refused every range")
    return out
