"""Notifications that reach people: the pure half (the daemon's half is
services/daemon/notify.py).

Vocabulary:

- entry: one ``[[notify]]`` table of the mesh file: where to POST (``url``), which event
  kinds it wants (``events``, default all of ``EVENT_KINDS``), the name of the environment
  variable holding its signing secret (``secret_env``: the mesh file never holds a
  secret), the body's shape (``format``: ``json`` or ``slack``), a per-attempt
  ``timeout`` and ``max_attempts``.
- message: what is sent for one registry event, the same for every entry:
  ``{id, kind, ts, agent, run_id, task_id, payload, mesh, drill}``.
- delivery: one message to one entry; each attempt ends ``delivered``, ``retrying`` or
  ``gave_up`` (``Outcome``), decided by ``next_step`` from the answer.

Every request carries ``X-Tron-Signature: sha256=<hex>``, the HMAC-SHA256 of the exact
body bytes with the entry's secret; a receiver checks it with ``verify``.

Pure: no I/O, no clock of its own (the wall clock and the random source are arguments).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import random
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timezone
from email.utils import parsedate_to_datetime
from enum import StrEnum
from typing import Any, Callable, Literal, TypedDict
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, field_validator

# What an entry can ask for (its default: all of them).
EventKind = Literal["permanent_failure", "awaiting_operator", "budget_exceeded", "crash_loop_started",
                    "lane_paused", "provider_opened", "registry_degraded"]
EVENT_KINDS: tuple[EventKind, ...] = ("permanent_failure", "awaiting_operator", "budget_exceeded",
                                      "crash_loop_started", "lane_paused", "provider_opened", "registry_degraded")
TEST_KIND = "test"  # `tron notify test`: sent whatever an entry's events are

SIGNATURE_HEADER = "X-Tron-Signature"
EVENT_HEADER = "X-Tron-Event"
DELIVERY_HEADER = "X-Tron-Delivery"

BACKOFF_INITIAL = 0.5
BACKOFF_FACTOR = 2.0
BACKOFF_MAX = 30.0
BACKOFF_JITTER = 0.2
RETRY_AFTER_MAX = 300.0  # a receiver's Retry-After is honoured up to this


class NotifyEntry(BaseModel):
    """One ``[[notify]]`` table. The secret is read from the environment when a request is
    signed; at load time its variable must be set (the error names it)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    url: str
    events: tuple[EventKind, ...] = EVENT_KINDS
    secret_env: str = Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$", max_length=128)
    format: Literal["json", "slack"] = "json"
    timeout: float = Field(5.0, gt=0, le=300)
    max_attempts: int = Field(6, ge=1, le=100)

    @field_validator("url")
    @classmethod
    def _http_without_password(cls, url: str) -> str:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"{url!r} is not an http:// or https:// URL")
        if parts.password is not None:
            raise ValueError("a password in the URL: the mesh file never holds a secret (the signature's "
                             "secret comes from the environment, secret_env)")
        return url

    def missing_secret(self) -> str | None:
        """Why this entry cannot sign, or None. Checked when the daemon starts (it refuses
        to start without it), not when the mesh file is read: `tron status` in a shell that
        lacks the variable still works."""
        if not os.environ.get(self.secret_env):
            return (f"[[notify]] {self.where}: the environment variable {self.secret_env} is not set (or empty): "
                    "the signing secret comes from the environment only")
        return None

    def secret(self) -> str:
        """The signing secret, read now (a variable unset since load signs with nothing)."""
        return os.environ.get(self.secret_env, "")

    @property
    def where(self) -> str:
        """The receiver, safe to record: scheme, host and port, no user, path or query (a
        webhook's path or query often is its credential)."""
        parts = urlsplit(self.url)
        port = f":{parts.port}" if parts.port else ""
        return f"{parts.scheme}://{parts.hostname}{port}"


def missing_secrets(entries: list[NotifyEntry]) -> list[str]:
    """Why each entry that cannot sign cannot (``missing_secret``): a start and a reload that
    name such an entry are refused, fail closed (a receiver that cannot be signed for is no
    receiver)."""
    return [why for e in entries if (why := e.missing_secret()) is not None]


def wanted(entry: NotifyEntry, kind: str) -> bool:
    """Does this entry get events of this kind? A test event goes to every entry."""
    return kind == TEST_KIND or kind in entry.events


# -- signing ---------------------------------------------------------------------------------


def sign(body: bytes, secret: str) -> str:
    """The ``X-Tron-Signature`` value: ``sha256=`` and the hex HMAC-SHA256 of ``body``."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def verify(body: bytes, secret: str, signature: str | None) -> bool:
    """A receiver's check: is ``signature`` the header Tron sends for exactly ``body``?
    Constant-time; a missing or malformed header is simply wrong."""
    if not signature:
        return False
    return hmac.compare_digest(sign(body, secret).encode(), signature.encode("utf-8", "replace"))


# -- what is sent ----------------------------------------------------------------------------


class Message(TypedDict):
    """What is sent for one registry event (the ``json`` format's body)."""

    id: int | None  # the event row's; None for what no row holds (the registry refusing writes)
    kind: str
    ts: str | None
    agent: str | None
    run_id: str | None
    task_id: str | None
    payload: dict[str, object]  # the event's own JSON
    mesh: str
    drill: str | None


def message(row: Mapping[str, Any], *, mesh: str, kind: str | None = None) -> Message:
    """The body of a notification for one registry event row (``kind`` overrides the
    row's, as for the test event). The row's values are as the engine gave them."""
    return {"id": row.get("id"), "kind": kind or row["kind"], "ts": row.get("ts"), "agent": row.get("agent"),
            "run_id": row.get("run_id"), "task_id": row.get("task_id"), "payload": row.get("payload") or {},
            "mesh": mesh, "drill": row.get("drill")}


# kind -> one line; fields from the message and its payload, a missing one shown as "?".
_SUMMARIES = {
    "permanent_failure": "{agent}: task {task_id} failed for good: {reason}",
    "awaiting_operator": "{agent}: task {task_id} waits for an operator: {reason}",
    "budget_exceeded": "{agent}: task {task_id} is over its budget: {reason}",
    "crash_loop_started": "{agent} is crash-looping: {reason}",
    "lane_paused": "a lane is paused (by {by}): {reason}",
    "provider_opened": "provider {provider} is open (no calls go to it): {reason}",
    "registry_degraded": "the registry refuses writes ({reason}); the mesh runs on, rows kept in memory",
    TEST_KIND: "test notification (tron notify test)",
}


class _Blank(dict[str, object]):
    def __missing__(self, key: str) -> str:
        return "?"


def summary(msg: Message) -> str:
    """One line a person reads first: ``[mesh] kind: what happened``."""
    fields = _Blank({k: v for k, v in (msg.get("payload") or {}).items() if v is not None})
    fields.update({k: v for k, v in (("agent", msg.get("agent")), ("task_id", msg.get("task_id")),
                                     ("run_id", msg.get("run_id"))) if v is not None})
    line = _SUMMARIES.get(msg["kind"], msg["kind"].replace("_", " ")).format_map(fields)
    drill = f" (drill {msg['drill']})" if msg.get("drill") else ""
    return f"[{msg['mesh']}] {msg['kind']}{drill}: {line}"[:500]


def slack_message(msg: Message) -> dict[str, object]:
    """Slack's incoming-webhook shape: the summary as text, and blocks with the ids."""
    ids = " · ".join(f"{k} `{v}`" for k, v in (("id", msg.get("id")), ("agent", msg.get("agent")),
                                                 ("run_id", msg.get("run_id")), ("task_id", msg.get("task_id")))
                     if v is not None)
    return {"text": summary(msg),
            "blocks": [{"type": "section", "text": {"type": "mrkdwn", "text": summary(msg)}},
                       {"type": "context", "elements": [{"type": "mrkdwn",
                                                         "text": f"{msg.get('ts') or ''} {ids}".strip()}]}]}


def body(msg: Message, fmt: str) -> bytes:
    """The exact bytes sent (and signed)."""
    return json.dumps(slack_message(msg) if fmt == "slack" else msg, separators=(",", ":"), default=str).encode()


# -- retries ---------------------------------------------------------------------------------


class Outcome(StrEnum):
    DELIVERED = "delivered"
    RETRYING = "retrying"
    GAVE_UP = "gave_up"


@dataclass(frozen=True)
class Step:
    outcome: Outcome
    delay: float = 0.0  # before the next attempt, when retrying


def backoff(attempt: int, *, rng: Callable[[], float] = random.random, initial: float = BACKOFF_INITIAL,
            factor: float = BACKOFF_FACTOR, max_backoff: float = BACKOFF_MAX, jitter: float = BACKOFF_JITTER) -> float:
    """Delay after failed attempt number ``attempt`` (1 = the first).

    Parameters: ``rng`` returns a float in [0, 1); ``jitter`` the fraction of the delay
    that is randomised (0.2 means +-20 %).
    Returns: ``initial * factor**(attempt-1)``, jittered, never above ``max_backoff``.
    """
    delay = initial * factor ** min(max(attempt, 1) - 1, 64)
    delay *= 1 + jitter * (2 * rng() - 1)
    return max(0.0, min(delay, max_backoff))


def retry_after(value: str | None, *, wall: float) -> float | None:
    """Seconds a ``Retry-After`` header asks for (delta-seconds or an HTTP date, read
    against ``wall``, the epoch time now), capped at RETRY_AFTER_MAX; None when absent
    or unreadable."""
    if not value:
        return None
    value = value.strip()
    if re.fullmatch(r"\d+(\.\d+)?", value):
        return min(float(value), RETRY_AFTER_MAX)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return max(0.0, min(when.timestamp() - wall, RETRY_AFTER_MAX))


def retryable(status: int | str) -> bool:
    """A connection error or timeout (a string), 5xx and 429 are worth another attempt;
    any other answer (a 4xx, a redirect) will not change by asking again."""
    return isinstance(status, str) or status >= 500 or status == 429


def next_step(status: int | str, attempt: int, max_attempts: int, *, retry_after_s: float | None = None,
              rng: Callable[[], float] = random.random) -> Step:
    """What follows attempt number ``attempt`` that ended with ``status`` (an HTTP status,
    or the error as text): delivered, another attempt after a delay (the receiver's
    Retry-After when it gave one, else the backoff), or giving up."""
    if isinstance(status, int) and 200 <= status < 300:
        return Step(Outcome.DELIVERED)
    if not retryable(status) or attempt >= max_attempts:
        return Step(Outcome.GAVE_UP)
    return Step(Outcome.RETRYING, retry_after_s if retry_after_s is not None else backoff(attempt, rng=rng))


def describe_error(err: BaseException) -> str:
    """A failed attempt's status, as recorded: the error's class and message."""
    if isinstance(err, TimeoutError):
        return "timeout"
    text = str(err)
    return f"{type(err).__name__}: {text}"[:200] if text else type(err).__name__


__all__ = ["EVENT_KINDS", "NotifyEntry", "Outcome", "Step", "backoff", "body", "message", "next_step", "retry_after",
           "sign", "slack_message", "summary", "verify", "wanted"]
