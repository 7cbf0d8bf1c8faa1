"""The mesh's wire constants that need no pydantic: what a name and an id look like, and the
header a token travels in. ``models`` builds its field types from them; the CLI checks a name
with them before it asks the daemon, without importing pydantic (a `tron status` must answer
fast)."""

from __future__ import annotations

# Names and ids start with a letter or digit: never "." or "..", which a URL would resolve.
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"
ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.:-]*$"
NAME_MAX = 64
ID_MAX = 128
TOKEN_HEADER = "X-Tron-Token"
