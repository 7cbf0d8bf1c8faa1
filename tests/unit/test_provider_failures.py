"""classify() on real SDK exceptions built the way the SDKs build them from a response:
retry_after and limits from the failing response's headers, usage_limit, stream_cut,
and the failure class of every reason."""

from __future__ import annotations

import datetime as dt

import anthropic
import httpx
import httpx2  # the HTTP library anthropic 2.x is built on
import ollama
import openai
import pytest

from tron.common.providers import NON_RETRYABLE, ProviderFailure, classify, failure_class
from tron.common.providers.failures import reading_stream

NOW = dt.datetime(2025, 3, 1, 12, 0, 0, tzinfo=dt.timezone.utc).timestamp()
_A_REQ = httpx2.Request("POST", "https://api.anthropic.com/v1/messages")


def _response_lib(cls: type):
    # Each SDK's status errors take a response of the HTTP library that SDK is built on.
    return httpx2 if cls.__module__.startswith("anthropic") else httpx


def _status_error(cls: type, status: int, body: dict | None, headers: dict, url: str):
    lib = _response_lib(cls)
    response = lib.Response(status, request=lib.Request("POST", url), json=body, headers=headers)
    return cls(f"Error code: {status} - {body}", response=response, body=body)


def _anthropic(cls, status, etype, message="boom", headers=None):
    body = {"type": "error", "error": {"type": etype, "message": message}} if etype else None
    return _status_error(cls, status, body, headers or {}, "https://api.anthropic.com/v1/messages")


def _openai(cls, status, code, message="boom", headers=None):
    body = {"error": {"message": message, "type": "requests", "code": code}}
    # the SDK hands the error object, not the envelope, to the exception
    lib = _response_lib(cls)
    response = lib.Response(status, request=lib.Request("POST", "https://api.openai.com/v1/chat/completions"),
                            json=body, headers=headers or {})
    return cls(message, response=response, body=body["error"])


ANTHROPIC_429_HEADERS = {
    "retry-after": "2", "retry-after-ms": "1500",
    "anthropic-ratelimit-requests-limit": "50", "anthropic-ratelimit-requests-remaining": "0",
    "anthropic-ratelimit-requests-reset": "2025-03-01T12:00:02Z",
    "anthropic-ratelimit-tokens-limit": "90000", "anthropic-ratelimit-tokens-remaining": "80000",
    "anthropic-ratelimit-tokens-reset": "2025-03-01T12:00:30Z",
}
OPENAI_429_HEADERS = {
    "retry-after": "20",
    "x-ratelimit-limit-requests": "60", "x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": "20s",
    "x-ratelimit-limit-tokens": "150000", "x-ratelimit-remaining-tokens": "149000",
    "x-ratelimit-reset-tokens": "6m0s",
}

# (exception, provider, reason, retryable, retry_after, limits)
CASES = [
    (_anthropic(anthropic.RateLimitError, 429, "rate_limit_error", headers=ANTHROPIC_429_HEADERS), "anthropic",
     "rate_limit_error", True, 1.5,
     {"requests_limit": 50, "requests_remaining": 0, "requests_reset_s": 2,
      "tokens_limit": 90000, "tokens_remaining": 80000, "tokens_reset_s": 30}),
    (_anthropic(anthropic.RateLimitError, 429, "rate_limit_error", headers={"retry-after": "3"}), "anthropic",
     "rate_limit_error", True, 3.0, {}),
    (_anthropic(anthropic.RateLimitError, 429, "rate_limit_error",
                "You have reached your specified API usage limits. You will regain access on 2025-04-01",
                headers={"retry-after": "2592000"}), "anthropic",
     "usage_limit", True, 2592000.0, {}),
    (_anthropic(anthropic.APIStatusError, 402, "billing_error", "Your credit balance is too low"), "anthropic",
     "usage_limit", True, None, {}),
    (_anthropic(anthropic.OverloadedError, 529, "overloaded_error", headers={"retry-after": "10"}), "anthropic",
     "overloaded_error", True, 10.0, {}),
    (_anthropic(anthropic.AuthenticationError, 401, "authentication_error"), "anthropic",
     "authentication_error", False, None, {}),
    # An `event: error` in a 200 stream keeps the stream's headers.
    (_anthropic(anthropic.APIStatusError, 200, "overloaded_error",
                headers={"anthropic-ratelimit-requests-remaining": "7"}), "anthropic",
     "overloaded_error", True, None, {"requests_remaining": 7}),
    (_openai(openai.RateLimitError, 429, "rate_limit_exceeded", headers=OPENAI_429_HEADERS), "openai",
     "rate_limit_error", True, 20.0,
     {"requests_limit": 60, "requests_remaining": 0, "requests_reset_s": 20,
      "tokens_limit": 150000, "tokens_remaining": 149000, "tokens_reset_s": 360}),
    (_openai(openai.RateLimitError, 429, "insufficient_quota", "You exceeded your current quota",
             headers={"retry-after-ms": "3600000"}), "openai",
     "usage_limit", True, 3600.0, {}),
    (_openai(openai.InternalServerError, 503, None, headers={"retry-after": "Sat, 01 Mar 2025 12:01:00 GMT"}),
     "openai", "overloaded_error", True, 60.0, {}),
    (_openai(openai.AuthenticationError, 401, "invalid_api_key"), "openai",
     "authentication_error", False, None, {}),
    # Ollama's ResponseError carries no headers.
    (ollama.ResponseError("too many requests", 429), "ollama", "rate_limit_error", True, None, {}),
]


@pytest.mark.parametrize("exc,provider,reason,retryable,retry_after,limits", CASES,
                         ids=[f"{c[1]}-{c[0].__class__.__name__}-{c[2]}" for c in CASES])
def test_classify_reads_retry_after_and_limits(exc, provider, reason, retryable, retry_after, limits):
    failure = classify(exc, provider, now=NOW)
    assert (failure.reason, failure.retryable) == (reason, retryable)
    assert failure.retry_after == retry_after
    assert failure.limits == limits
    assert failure.to_dict()["retry_after"] == retry_after and failure.to_dict()["limits"] == limits
    assert failure.to_dict()["failure_class"] == ("provider" if retryable else "request")


def test_a_cut_stream_is_not_a_failure_to_connect():
    cut = httpx2.RemoteProtocolError("peer closed connection without sending complete message body "
                                     "(incomplete chunked read)", request=_A_REQ)
    # anthropic wraps the HTTP library's error when the body is read in its stream
    wrapped = anthropic.APIConnectionError(message=f"Connection failed: {cut}", request=_A_REQ)
    wrapped.__cause__ = cut
    refused = anthropic.APIConnectionError(request=_A_REQ)
    assert classify(wrapped, "anthropic").reason == "stream_cut"
    assert classify(refused, "anthropic").reason == "connection_error"
    # What the caller knows decides: any dropped connection after the answer started is a cut.
    assert classify(refused, "anthropic", midstream=True).reason == "stream_cut"
    assert classify(ConnectionResetError(104, "reset"), "ollama", midstream=True).reason == "stream_cut"
    failure = classify(wrapped, "anthropic")
    assert (failure.retryable, failure.midstream, failure.failure_class) == (True, True, "provider")


def test_reading_stream_classifies_as_midstream_and_keeps_the_streams_limits():
    with pytest.raises(ProviderFailure) as err:
        with reading_stream("openai", {"requests_remaining": 3.0}):
            raise httpx.RemoteProtocolError("peer closed")
    assert (err.value.reason, err.value.midstream, err.value.limits) == ("stream_cut", True, {"requests_remaining": 3.0})
    assert isinstance(err.value.__cause__, httpx.RemoteProtocolError)
    with pytest.raises(ProviderFailure) as err:
        with reading_stream("ollama"):
            raise httpx.ReadTimeout("", request=httpx.Request("POST", "http://h/api/chat"))
    assert (err.value.reason, err.value.midstream) == ("timeout", True)
    own = ProviderFailure("anthropic", "overloaded_error")
    with pytest.raises(ProviderFailure) as err:
        with reading_stream("anthropic", {"requests_remaining": 1.0}):
            raise own
    assert err.value is own


@pytest.mark.parametrize("reason,cls", [
    *[(r, "request") for r in sorted(NON_RETRYABLE)],
    *[(r, "provider") for r in ("overloaded_error", "rate_limit_error", "usage_limit", "api_error", "timeout",
                                "connection_error", "stream_cut", "stream_error", "empty_answer", "max_tokens",
                                "refusal", "invalid_tool_arguments", "repeated_output",
                                "unexpected_error:ValueError")],
])
def test_failure_class(reason, cls):
    assert failure_class(reason) == cls
    assert ProviderFailure("anthropic", reason).failure_class == cls


def test_failure_constructed_without_headers_has_none_and_empty():
    failure = ProviderFailure("anthropic", "timeout")
    assert (failure.retry_after, failure.limits) == (None, {})
