"""``os.environ`` as a plain dict, decoded again only when the environment changed.

Every read of ``os.environ`` decodes (and every lookup encodes) on the way: a walk of the
whole environment is ~100 of them. The daemon walks it on every restart (what a child
inherits) and for every log line and event it redacts (the values of the secret
variables); an incarnation does so for its first log line. A comparison of CPython's
bytes dict behind ``os.environ`` with the one last decoded is one C-level pass, with no
decoding at all.
"""

from __future__ import annotations

import os
from typing import Mapping

_snapshot: tuple[dict[bytes, bytes], dict[str, str]] | None = None


def current() -> Mapping[str, str]:
    """The process's environment now, as a plain mapping shared by every caller until the
    environment changes: read it, copy it (``dict(...)``) to change it. The same object is
    returned while nothing changed, so a cache of what is derived from it can key on it."""
    global _snapshot
    data = getattr(os.environ, "_data", None)  # CPython's bytes -> bytes dict behind os.environ
    if not isinstance(data, dict):
        return dict(os.environ)
    snap = _snapshot
    if snap is None:
        plain = dict(os.environ)
    elif snap[0] == data:
        return snap[1]
    else:  # only what changed is decoded (an incarnation unsets LISTEN_PID once it took its socket)
        plain = _updated(*snap, data)
    _snapshot = (dict(data), plain)
    return plain


def _updated(seen: dict[bytes, bytes], plain: dict[str, str], data: dict[bytes, bytes]) -> dict[str, str]:
    out = dict(plain)  # os.environ decodes as fsdecode does (the file system's encoding, surrogateescape)
    for key in seen.keys() - data.keys():
        out.pop(os.fsdecode(key), None)
    for key, value in data.items():
        if seen.get(key) != value:
            out[os.fsdecode(key)] = os.fsdecode(value)
    return out


def adopt(env: Mapping[str, str]) -> None:
    """``os.environ`` was just made exactly ``env`` (a fork server's incarnation, at its
    hand-over): ``current()`` answers with a copy of it, not a decoding of the environment."""
    global _snapshot
    data = getattr(os.environ, "_data", None)
    if isinstance(data, dict):
        # Every name of ``env`` is set (the caller made it so): the same count, the same names.
        _snapshot = (dict(data), dict(env)) if len(data) == len(env) else None
