"""Argument types of the `tron` command line that argparse's `type=int` lets through: a
count that must lie in a range. `tron history --limit 99999999999999999999` ended in an
OverflowError traceback from SQLite, `--limit -1` silently meant "everything". And the
provider kinds as choices that are read only when a command takes one."""

from __future__ import annotations

import argparse
from collections.abc import Callable, Iterator, Sequence
from typing import overload


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


class LazyChoices(Sequence[str]):
    """argparse ``choices`` read when used: the provider kinds are found by importing every
    provider module (pydantic and all), which a `tron status` must not pay for. argparse reads
    them only to check a value, to say what is allowed, and to show help; give the argument a
    ``metavar``, or argparse lists them when the parser is built. They are read again at every
    use, not kept: a kind registered after the first read (a plugin, a test) is a choice too."""

    def __init__(self, load: Callable[[], Sequence[str]]) -> None:
        self._load = load

    def _all(self) -> Sequence[str]:
        return tuple(self._load())

    @overload
    def __getitem__(self, index: int) -> str: ...
    @overload
    def __getitem__(self, index: slice) -> Sequence[str]: ...

    def __getitem__(self, index: int | slice) -> str | Sequence[str]:
        return self._all()[index]

    def __iter__(self) -> Iterator[str]:  # one read for the whole walk (argparse lists them in its errors)
        return iter(self._all())

    def __len__(self) -> int:
        return len(self._all())

    def __contains__(self, value: object) -> bool:
        return value in self._all()


def provider_names() -> Sequence[str]:
    """The registered provider kinds (tron.common.providers imports every one)."""
    from tron.common import providers

    return providers.names()


PROVIDERS = LazyChoices(provider_names)
