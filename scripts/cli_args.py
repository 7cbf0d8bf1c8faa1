"""Argument types of the `tron` command line that argparse's `type=int` lets through: a
count that must lie in a range. `tron history --limit 99999999999999999999` ended in an
OverflowError traceback from SQLite, `--limit -1` silently meant "everything"."""

from __future__ import annotations

import argparse
from collections.abc import Callable


def bounded_int(lo: int, hi: int) -> Callable[[str], int]:
    """An argparse type: an integer between ``lo`` and ``hi``, else argparse's usage error (exit 2)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid int value: {text!r}") from None
        if not lo <= value <= hi:
            raise argparse.ArgumentTypeError(f"{value} is not between {lo} and {hi:,}")
        return value

    parse.__name__ = "int"
    return parse


LIMIT = bounded_int(1, 1_000_000)  # rows of a listing (--limit)
LINES = bounded_int(0, 1_000_000)  # lines of a tail (-n): 0 with -f follows only what comes next
