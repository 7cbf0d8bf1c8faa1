"""What providers say in headers about when to come back: retry-after, Anthropic's
anthropic-ratelimit-*, OpenAI's x-ratelimit-*. Pure functions of (headers, now)."""

from __future__ import annotations

import datetime as dt

import httpx
import pytest

from tron.common.providers.headers import (
    LIMIT_KEYS,
    anthropic_limits,
    openai_limits,
    parse_duration,
    retry_after,
    seconds_until_date,
)

NOW = dt.datetime(2025, 3, 1, 12, 0, 0, tzinfo=dt.timezone.utc).timestamp()


@pytest.mark.parametrize("text,seconds", [
    ("1s", 1.0), ("6m0s", 360.0), ("250ms", 0.25), ("1h2m3.5s", 3723.5), ("0s", 0.0), ("2", 2.0),
    ("0.5", 0.5), ("17ms", 0.017), ("1m", 60.0), ("3us", 3e-6), ("1.5s", 1.5), (" 20ms ", 0.02),
    ("", None), ("soon", None), ("1x", None), ("1s junk", None), ("-1s", None), ("-3", None), (None, None),
])
def test_parse_duration(text, seconds):
    got = parse_duration(text)
    assert got == pytest.approx(seconds) if seconds is not None else got is None


@pytest.mark.parametrize("text,seconds", [
    ("2025-03-01T12:00:30Z", 30.0),
    ("2025-03-01T12:00:00.500Z", 0.5),
    ("2025-03-01T13:00:30+01:00", 30.0),
    ("2025-03-01T12:01:00", 60.0),  # no zone: UTC
    ("2025-03-01T11:59:00Z", 0.0),  # already past
    ("Sat, 01 Mar 2025 12:02:00 GMT", 120.0),  # an HTTP date (retry-after)
    ("not a date", None), ("", None), (None, None),
])
def test_seconds_until_date(text, seconds):
    got = seconds_until_date(text, NOW)
    assert got == pytest.approx(seconds) if seconds is not None else got is None


@pytest.mark.parametrize("headers,seconds", [
    ({"retry-after-ms": "1500", "retry-after": "2"}, 1.5),  # the precise one wins
    ({"retry-after": "2"}, 2.0),
    ({"Retry-After": "7"}, 7.0),  # any case
    ({"retry-after": "Sat, 01 Mar 2025 12:00:45 GMT"}, 45.0),
    ({"retry-after": "86400"}, 86400.0),  # a usage limit: a day, kept as given
    ({"retry-after-ms": "soon", "retry-after": "3"}, 3.0),  # a bad header falls back
    ({"retry-after": "whenever"}, None),
    ({}, None), (None, None),
])
def test_retry_after(headers, seconds):
    assert retry_after(headers, NOW) == seconds


def test_retry_after_reads_httpx_headers():
    assert retry_after(httpx.Headers({"Retry-After-Ms": "250"}), NOW) == 0.25


ANTHROPIC_FULL = {
    "anthropic-ratelimit-requests-limit": "50",
    "anthropic-ratelimit-requests-remaining": "49",
    "anthropic-ratelimit-requests-reset": "2025-03-01T12:00:01Z",
    "anthropic-ratelimit-tokens-limit": "90000",
    "anthropic-ratelimit-tokens-remaining": "0",
    "anthropic-ratelimit-tokens-reset": "2025-03-01T12:00:20Z",
    "anthropic-ratelimit-input-tokens-limit": "80000",
    "anthropic-ratelimit-input-tokens-remaining": "0",
    "anthropic-ratelimit-input-tokens-reset": "2025-03-01T12:00:20Z",
    "anthropic-ratelimit-output-tokens-limit": "10000",
    "anthropic-ratelimit-output-tokens-remaining": "9000",
    "anthropic-ratelimit-output-tokens-reset": "2025-03-01T12:00:02Z",
}


@pytest.mark.parametrize("headers,limits", [
    (ANTHROPIC_FULL, {"requests_limit": 50, "requests_remaining": 49, "requests_reset_s": 1,
                      "tokens_limit": 90000, "tokens_remaining": 0, "tokens_reset_s": 20}),
    # Without the combined tokens-* family, the input or output family with less left.
    ({k: v for k, v in ANTHROPIC_FULL.items() if "-ratelimit-tokens-" not in k},
     {"requests_limit": 50, "requests_remaining": 49, "requests_reset_s": 1,
      "tokens_limit": 80000, "tokens_remaining": 0, "tokens_reset_s": 20}),
    ({"anthropic-ratelimit-output-tokens-remaining": "12"}, {"tokens_remaining": 12}),
    ({"anthropic-ratelimit-requests-remaining": "3", "anthropic-ratelimit-requests-reset": "garbage"},
     {"requests_remaining": 3}),
    ({"anthropic-ratelimit-requests-limit": "-1"}, {}),
    ({"x-ratelimit-limit-requests": "60"}, {}),  # the other vendor's headers mean nothing here
    ({}, {}), (None, {}),
])
def test_anthropic_limits(headers, limits):
    assert anthropic_limits(headers, NOW) == limits


@pytest.mark.parametrize("headers,limits", [
    ({"x-ratelimit-limit-requests": "60", "x-ratelimit-remaining-requests": "59",
      "x-ratelimit-reset-requests": "1s", "x-ratelimit-limit-tokens": "150000",
      "x-ratelimit-remaining-tokens": "149984", "x-ratelimit-reset-tokens": "6m0s"},
     {"requests_limit": 60, "requests_remaining": 59, "requests_reset_s": 1,
      "tokens_limit": 150000, "tokens_remaining": 149984, "tokens_reset_s": 360}),
    ({"x-ratelimit-remaining-tokens": "0", "x-ratelimit-reset-tokens": "250ms"},
     {"tokens_remaining": 0, "tokens_reset_s": 0.25}),
    ({"X-RateLimit-Remaining-Requests": "5"}, {"requests_remaining": 5}),
    ({"x-ratelimit-reset-requests": "later"}, {}),
    ({"anthropic-ratelimit-requests-limit": "50"}, {}),
    ({}, {}), (None, {}),
])
def test_openai_limits(headers, limits):
    assert openai_limits(headers, NOW) == limits


def test_limit_keys_are_the_only_keys():
    both = {**ANTHROPIC_FULL, "x-ratelimit-limit-requests": "1", "x-ratelimit-reset-tokens": "1s"}
    assert set(anthropic_limits(both, NOW)) <= set(LIMIT_KEYS)
    assert set(openai_limits(both, NOW)) <= set(LIMIT_KEYS)
    assert all(isinstance(v, float) for v in anthropic_limits(both, NOW).values())
