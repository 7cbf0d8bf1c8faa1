"""Benchmarks: measurements, not tests. Run each from the repository root as
``python -m benchmarks.<name>``; see benchmarks/README.md."""

from __future__ import annotations

import json
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
