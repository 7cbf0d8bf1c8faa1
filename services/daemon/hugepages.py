"""The fork server's heap in huge pages, so that an agent's death costs the kernel little.

A killed process is known dead (its pidfd turns readable) only once the kernel has torn its
memory down, and an agent forked from the warm fork server maps the server's whole heap
(~125 MB of anonymous memory: the agent code, aiohttp, pydantic, the LLM SDKs): ~32,000
4 KiB pages, each counted and uncounted one by one at every fork and every death. In 2 MiB
pages the same heap is ~60 large frames. A child's own writes soon split its mapping of them
into 4 KiB entries (a write copies only its own 4 KiB page; the server's mapping stays
whole), but the pages it did not write stay the server's huge frames, which the kernel
copies and frees a frame's run of entries at a time, not page by page. Measured on children
that rehearsed an agent's start as a standby does (``benchmarks/kill_teardown.py``): a kill
until the pidfd says so, 5.1 -> 2.7 ms; 20 killed at once, the last known dead after 43 ->
27 ms, for 80 -> 50 ms of the machine's CPU.

``collapse()`` asks the kernel to rewrite the server's private anonymous memory in huge
pages now (``MADV_COLLAPSE``, Linux 6.1+), once the heap is built and frozen: children forked
after it share the huge frames. The kernel does this whatever the machine's THP setting;
Tron leaves it alone where an operator set THP to "never". It costs ~0.2 s of the server's
CPU for the warm heap (off every agent's path) and ~10 ms for the cold one, within a time
budget. Children forked before it keep the old pages (memory that is then no longer shared
with the server). Where the kernel cannot (older than 6.1, THP compiled out, no memory for a
huge page) nothing changes but the answer, which says why: the fork server logs it, and its
children are forked as before.
"""

from __future__ import annotations

import ctypes
import errno
import os
import time
from dataclasses import dataclass, field

MADV_COLLAPSE = 25  # linux/mman.h, since 6.1
HUGE = 2 << 20  # a PMD's reach with 4 KiB pages (x86-64, arm64): hpage_pmd_size says the machine's
SETTINGS = "/sys/kernel/mm/transparent_hugepage"


def huge_page_size(settings: str = SETTINGS) -> int:
    """The machine's huge page (``hpage_pmd_size``: 512 MiB on arm64 with 64 KiB pages), else 2 MiB."""
    try:
        with open(f"{settings}/hpage_pmd_size") as f:
            return int(f.read())
    except (OSError, ValueError):
        return HUGE


@dataclass
class Collapsed:
    """What ``collapse()`` did: bytes now in huge pages, huge-page ranges the kernel refused (by
    errno name; "unfinished": left when the budget ran out), seconds spent, and why nothing
    could be done when that is so."""

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


def ranges(maps: str, huge: int = HUGE) -> list[tuple[int, int]]:
    """The ``huge``-aligned spans of ``/proc/PID/maps`` text worth collapsing: private,
    writable and anonymous (no file behind them, the brk heap, or an anonymous mapping a
    program named, ``[anon:...]``), each cut to whole huge pages."""
    out = []
    for line in maps.splitlines():
        parts = line.split(maxsplit=5)
        if len(parts) < 5:
            continue
        span, perms = parts[0], parts[1]
        path = parts[5].strip() if len(parts) > 5 else ""
        if "w" not in perms or "p" not in perms or not (path in ("", "[heap]") or path.startswith("[anon:")):
            continue
        lo, hi = (int(x, 16) for x in span.split("-"))
        lo, hi = (lo + huge - 1) & ~(huge - 1), hi & ~(huge - 1)
        if hi > lo:
            out.append((lo, hi))
    return out


def unavailable_reason(settings: str = SETTINGS) -> str | None:
    """Why huge pages are not for the fork server on this machine, or None when they may be."""
    try:
        with open(f"{settings}/enabled") as f:
            setting = f.read()
    except OSError:
        return "transparent huge pages are not in this kernel"
    if "[never]" in setting:
        return f"transparent huge pages are set to never ({settings}/enabled): the operator's choice is kept"
    return None


def _advice_known(libc) -> bool:
    """The kernel knows MADV_COLLAPSE: advice on an empty range is accepted (EINVAL before 6.1)."""
    return libc.madvise(ctypes.c_void_p(os.sysconf("SC_PAGE_SIZE")), 0, MADV_COLLAPSE) == 0


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
    if not _advice_known(libc):
        out.unavailable = "the kernel does not collapse memory into huge pages (MADV_COLLAPSE needs Linux 6.1+)"
        return out
    huge = huge_page_size()
    with open(f"/proc/{os.getpid()}/maps") as f:
        spans = ranges(f.read(), huge)
    for lo, hi in spans:
        for at in range(lo, hi, huge):
            if time.monotonic() - started > budget:
                out.refused["unfinished"] = out.refused.get("unfinished", 0) + 1
            elif libc.madvise(at, huge, MADV_COLLAPSE) == 0:
                out.bytes += huge
            else:
                name = errno.errorcode.get(ctypes.get_errno(), "?")
                out.refused[name] = out.refused.get(name, 0) + 1
    out.seconds = time.monotonic() - started
    if not out.bytes and out.refused and "unfinished" not in out.refused:
        # (THP turned off for this process by prctl, say, or memory too fragmented to compact)
        out.unavailable = f"the kernel refused every range ({', '.join(sorted(out.refused))})"
    return out
