"""What providers say in response headers about when to come back, as plain numbers.

Pure functions of (headers, now). ``now`` is wall-clock seconds since the epoch: the
providers give some reset times as absolute dates, and only the wall clock relates them
to this machine. Every result is relative (seconds from now), so nothing downstream
holds a wall-clock time. A header that does not parse is left out, never an error: a
malformed hint must not fail a call that worked.

Limits use one key set for every provider (LIMIT_KEYS, floats, only those present):
``requests_limit``, ``requests_remaining``, ``requests_reset_s``, ``tokens_limit``,
``tokens_remaining``, ``tokens_reset_s``.
"""

from __future__ import annotations

import datetime as dt
import email.utils
import math
import re
from collections.abc import Mapping

LIMIT_KEYS = ("requests_limit", "requests_remaining", "requests_reset_s",
              "tokens_limit", "tokens_remaining", "tokens_reset_s")

_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|h|m|s)")
_UNIT_S = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def _lower(headers: Mapping[str, str]) -> dict[str, str]:
    # httpx headers are case-insensitive already; plain dicts from tests are not.
    return {k.lower(): v for k, v in headers.items()}


def parse_number(text: str | None) -> float | None:
    """A finite, non-negative number, or None."""
    if text is None:
        return None
    try:
        value = float(text.strip())
    except ValueError:
        return None
    return value if math.isfinite(value) and value >= 0 else None


def parse_duration(text: str | None) -> float | None:
    """Seconds in a Go-style duration as OpenAI sends it ("1s", "6m0s", "250ms", "1h2m3.5s"),
    or a bare number of seconds; None when it is neither."""
    if text is None:
        return None
    text = text.strip()
    if (bare := parse_number(text)) is not None:
        return bare
    parts = _DURATION_PART.findall(text)
    if not parts or "".join(n + u for n, u in parts) != text:
        return None
    return sum(float(n) * _UNIT_S[u] for n, u in parts)


def seconds_until_date(text: str | None, now: float) -> float | None:
    """Seconds from ``now`` to an RFC 3339 time (Anthropic's resets) or an HTTP date
    (``retry-after``); 0 when it is past, None when it is neither."""
    if text is None:
        return None
    text = text.strip()
    try:
        when = dt.datetime.fromisoformat(text.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(text)
        except (TypeError, ValueError, IndexError):
            return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.timezone.utc)  # both formats mean UTC when they omit it
    return max(0.0, when.timestamp() - now)


def retry_after(headers: Mapping[str, str] | None, now: float) -> float | None:
    """Seconds to wait before retrying: ``retry-after-ms`` when present (more precise, and
    what the anthropic and openai SDKs prefer), else ``retry-after`` as seconds or as an
    HTTP date. Kept as given however long (a usage limit may say hours)."""
    if not headers:
        return None
    h = _lower(headers)
    if (ms := parse_number(h.get("retry-after-ms"))) is not None:
        return ms / 1000.0
    value = h.get("retry-after")
    if (seconds := parse_number(value)) is not None:
        return seconds
    return seconds_until_date(value, now)


def _family(h: dict[str, str], prefix: str, now: float) -> dict[str, float]:
    """limit/remaining/reset_s of one ``anthropic-ratelimit-<what>-`` family."""
    out = {}
    if (limit := parse_number(h.get(prefix + "limit"))) is not None:
        out["limit"] = limit
    if (remaining := parse_number(h.get(prefix + "remaining"))) is not None:
        out["remaining"] = remaining
    if (reset := seconds_until_date(h.get(prefix + "reset"), now)) is not None:
        out["reset_s"] = reset
    return out


def anthropic_limits(headers: Mapping[str, str] | None, now: float) -> dict[str, float]:
    """Anthropic's ``anthropic-ratelimit-{requests,tokens}-{limit,remaining,reset}`` (reset an
    RFC 3339 time). ``tokens-*`` is the most restrictive token limit in effect; when it is
    absent, the input- or output-tokens family with less remaining stands in for it."""
    if not headers:
        return {}
    h = _lower(headers)
    out: dict[str, float] = {}
    for what in ("requests", "tokens"):
        family = _family(h, f"anthropic-ratelimit-{what}-", now)
        if not family and what == "tokens":
            candidates = [f for f in (_family(h, f"anthropic-ratelimit-{io}-tokens-", now)
                                      for io in ("input", "output")) if f]
            family = min(candidates, key=lambda f: f.get("remaining", math.inf), default={})
        out.update({f"{what}_{k}": v for k, v in family.items()})
    return out


def openai_limits(headers: Mapping[str, str] | None, now: float) -> dict[str, float]:
    """OpenAI's ``x-ratelimit-{limit,remaining,reset}-{requests,tokens}`` (reset a duration
    such as "6m0s"). ``now`` is unused (the resets are relative) but kept for symmetry."""
    if not headers:
        return {}
    h = _lower(headers)
    out: dict[str, float] = {}
    for what in ("requests", "tokens"):
        if (limit := parse_number(h.get(f"x-ratelimit-limit-{what}"))) is not None:
            out[f"{what}_limit"] = limit
        if (remaining := parse_number(h.get(f"x-ratelimit-remaining-{what}"))) is not None:
            out[f"{what}_remaining"] = remaining
        if (reset := parse_duration(h.get(f"x-ratelimit-reset-{what}"))) is not None:
            out[f"{what}_reset_s"] = reset
    return out
