"""Benchmarks: measurements, not tests. Run each from the repository root as
``python -m benchmarks.<name>``; see benchmarks/README.md."""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path


def finish(path: Path | None, results: dict, leftovers: list, *, indent: int | None = 2) -> int:
    """A benchmark's last step: its raw samples to ``path`` (if given), and exit 1, loudly,
    when a process it started was left behind (it has been killed by then)."""
    if path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(results, indent=indent))
    if leftovers:
        print(f"LEFT BEHIND (killed): {leftovers}", file=sys.stderr)
        return 1
    return 0


def machine_cpu() -> float:
    """CPU seconds the machine has spent (user, nice, system, irq, softirq), all cores."""
    with open("/proc/stat") as f:
        fields = f.readline().split()[1:8]
    return (sum(int(x) for x in fields) - int(fields[3]) - int(fields[4])) / os.sysconf("SC_CLK_TCK")


def take_turns(rows: list, kills: int, block: int, rng, turn) -> None:
    """The rows take turns in blocks of ``block`` kills, the order shuffled per block, so
    the machine's noise lands on every row and only one row is under load at a time;
    ``turn(row, n, share)`` runs ``n`` kills of one row (each row has ``kills_left``) after
    ``share`` (1 / blocks) of its undisturbed baseline."""
    blocks = math.ceil(kills / block)
    for b in range(blocks):
        order = rows[:]
        rng.shuffle(order)
        for row in order:
            n = min(block, row.kills_left)
            if n:
                turn(row, n, 1 / blocks)
        print(f"  block {b + 1}/{blocks} done", file=sys.stderr, flush=True)
