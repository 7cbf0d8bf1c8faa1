"""Answers that are 200 OK but broken, turned into ProviderFailures.

A provider can answer and still fail the task: nothing in the answer, an answer cut at
max_tokens where the step needs it whole, a refusal, tool arguments that do not fit their
schema, or the same output over and over. Each is a provider-class failure (retryable):
the ladder retries it like an overload, and it never counts against the agent process.

Pure: no I/O, no clock. Each check returns the failure, or None when the answer passes.

    failure = check_reply(reply, checks, complete=step.needs_whole_answer)
    failure = check_tool_calls("anthropic", message, tools)
    failure = guard.check(reply.text, checks.repeat_limit, provider=reply.provider)
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from tron.common.providers.base import LLMReply, ProviderFailure, get
from tron.common.redaction import redact

CHECK_REASONS = ("empty_answer", "max_tokens", "refusal", "invalid_tool_arguments", "repeated_output")


class OutputChecks(BaseModel):
    """Which checks run on every answer (config; each can be turned off).

    empty: an answer with no text (and no tool call) fails.
    refusal: a refusal (the provider's stop reason, or OpenAI's message.refusal) fails.
    max_tokens: an answer cut at max_tokens fails; off by default (a cut answer is often
      fine), on per call for a step that needs the whole answer (``complete=True``).
    tool_schema: tool arguments are checked against the tool's schema.
    repeat_limit: the same output this many times within one task fails (0: off).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    empty: bool = True
    refusal: bool = True
    max_tokens: bool = False
    tool_schema: bool = True
    repeat_limit: int = Field(3, ge=0)


def _broken(provider: str, reason: str, message: str, limits: Mapping[str, float] | None = None) -> ProviderFailure:
    return ProviderFailure(provider, reason, retryable=True, message=message, limits=limits)


def check_reply(reply: LLMReply, checks: OutputChecks, *, complete: bool = False) -> ProviderFailure | None:
    """The first way ``reply`` is broken under ``checks`` (refusal, then max_tokens, then
    empty_answer), or None. complete: this step needs the whole answer, so a reply cut at
    max_tokens fails even when ``checks.max_tokens`` is off. The failure keeps the reply's
    rate-limit ``limits`` (the call itself succeeded)."""
    if checks.refusal and (reply.refusal or reply.stop_reason == "refusal"):
        return _broken(reply.provider, "refusal", "the model refused to answer", reply.limits)
    if (checks.max_tokens or complete) and reply.stop_reason == "max_tokens":
        return _broken(reply.provider, "max_tokens",
                       f"the answer was cut at max_tokens ({reply.output_tokens} tokens)", reply.limits)
    if checks.empty and not reply.text.strip() and reply.stop_reason != "tool_use":
        return _broken(reply.provider, "empty_answer", "the answer has no text", reply.limits)
    return None


def reply_of(provider: str, response: Any) -> LLMReply:
    """A raw non-streamed SDK response (what ``call_llm``'s request returns) read as an
    LLMReply: text, normalised stop_reason, refusal, token counts. ``provider`` names the
    kind that reads it (anthropic Message, openai ChatCompletion or Responses Response,
    ollama ChatResponse or GenerateResponse)."""
    return get(provider).reply_of(response)


def check_tool_calls(provider: str, response: Any, tools: Any) -> ProviderFailure | None:
    """The first tool call in ``response`` whose arguments do not fit the schema of the tool
    of that name in ``tools`` (as the caller passed them to the SDK), or None.

    Fails with ``invalid_tool_arguments`` for arguments that are not a JSON object, that
    break the schema, or a call to a tool that is not in ``tools``. A tool given without a
    schema (a server tool, an ollama Python function) has its name checked only."""
    import jsonschema  # only callers that use tools pay for it

    schemas = get(provider).tool_schemas(tools)
    for call in get(provider).tool_calls(response):
        def broken(why: str) -> ProviderFailure:
            return _broken(provider, "invalid_tool_arguments", redact(f"tool {call.name!r}: {why}"))

        if call.name not in schemas:
            return broken(f"not one of the tools given ({sorted(n for n in schemas if n)})")
        arguments = call.arguments
        if isinstance(arguments, (str, bytes)):
            try:
                arguments = json.loads(arguments or "{}")  # an empty string is how some servers say "no arguments"
            except ValueError as err:
                return broken(f"arguments are not JSON ({err})")
        if arguments is None:
            arguments = {}
        if not isinstance(arguments, dict):
            return broken(f"arguments are a {type(arguments).__name__}, not an object")
        schema = schemas[call.name]
        if not schema:
            continue
        if hasattr(schema, "model_dump"):  # an SDK's own schema model
            schema = schema.model_dump(exclude_none=True)
        validator = jsonschema.validators.validator_for(schema)(schema)
        error = jsonschema.exceptions.best_match(validator.iter_errors(arguments))
        if error is not None:
            where = error.json_path if error.path else "the arguments"
            return broken(f"{where}: {error.message}")
    return None


def _digest(text: str) -> str:
    return hashlib.sha256(" ".join(text.split()).encode()).hexdigest()


class RepeatGuard:
    """The outputs of one task, to catch a model that gives the same answer again and again
    (a loop a retry cannot fix on the same provider). Outputs are compared after collapsing
    whitespace; only their digests are kept. Empty outputs are not counted (``empty`` is
    their check)."""

    def __init__(self) -> None:
        self._counts: Counter[str] = Counter()

    def seen(self, text: str) -> int:
        """Record ``text``; how many times this output has now been seen (0 for empty)."""
        if not text.strip():
            return 0
        digest = _digest(text)
        self._counts[digest] += 1
        return self._counts[digest]

    def check(self, text: str, limit: int, *, provider: str = "") -> ProviderFailure | None:
        """Record ``text``; ``repeated_output`` when it has now been seen ``limit`` times
        (limit 0: never)."""
        count = self.seen(text)
        if limit and count >= limit:
            return _broken(provider, "repeated_output", f"the same output {count} times in this task")
        return None
