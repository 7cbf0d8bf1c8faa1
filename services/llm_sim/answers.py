"""What the sim answers: a pure function from a provider-neutral request (`Ask`) to a
provider-neutral reply (`Reply`).

Each wire surface (anthropic_api, ollama_api, openai_api) only translates its request
into an Ask and the Reply into its own format, so all three decide tool calls,
structured output, stop sequences and token limits the same way, and the same input
always gets the same answer.

A token here is a whitespace-separated word: usage counts, `max_tokens` truncation and
count_tokens all use `count_tokens`, so they agree with each other.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from tron.services.llm_sim.schema_fake import fake_instance

_WORD = re.compile(r"\S+")


def count_tokens(text: str) -> int:
    return len(_WORD.findall(text))


class StopReason(StrEnum):
    """Why generation ended, in Anthropic's words; surfaces map them to their own."""

    END_TURN = "end_turn"
    MAX_TOKENS = "max_tokens"
    STOP_SEQUENCE = "stop_sequence"
    TOOL_USE = "tool_use"
    REFUSAL = "refusal"


class Shape(StrEnum):
    """How a `shaped` fault bends an otherwise normal reply (state.SHAPING_KINDS)."""

    EMPTY = "empty"  # no content at all, stop reason end_turn
    MAX_TOKENS = "max-tokens"  # cut off half-way, stop reason max_tokens
    REFUSAL = "refusal"  # the model declines
    BAD_TOOL_ARGS = "bad-tool-args"  # a tool call whose arguments fail the tool's schema


REFUSAL_TEXT = "I can't help with that."


class ToolMode(StrEnum):
    AUTO = "auto"  # call a relevant tool unless the last turn carries tool results
    ANY = "any"  # always call a tool (OpenAI "required")
    NONE = "none"  # never call one
    NAMED = "tool"  # call Ask.tool_name


@dataclass(frozen=True)
class Turn:
    role: str  # "user", "assistant", or "tool" (a tool result, whichever API carried it)
    text: str
    tool_calls: tuple[str, ...] = ()  # names of the tools an assistant turn called
    tool_name: str = ""  # for a "tool" turn: the tool whose result it is

    def key(self) -> tuple:
        # Plain turns keep their old digest, so answers do not change for plain chat.
        return (self.role, self.text) if not (self.tool_calls or self.tool_name) else (
            self.role, self.text, list(self.tool_calls), self.tool_name)


@dataclass(frozen=True)
class Conversation:
    system: str
    turns: tuple[Turn, ...]

    def digest(self) -> str:
        blob = json.dumps([self.system, [t.key() for t in self.turns]])
        return hashlib.sha256(blob.encode()).hexdigest()[:6]

    def word_count(self) -> int:
        return count_tokens(self.system) + sum(
            count_tokens(t.text) + len(t.tool_calls) for t in self.turns)

    def last_user(self) -> str:
        return next((t.text for t in reversed(self.turns) if t.role == "user"), "")

    def called_since_user(self) -> set[str]:
        """Tools called (or answered) since the last user turn that said something."""
        names: set[str] = set()
        for turn in reversed(self.turns):
            if turn.role == "user" and turn.text:
                break
            names.update(turn.tool_calls)
            if turn.tool_name:
                names.add(turn.tool_name)
        return names

    def pending_results(self) -> tuple[Turn, ...]:
        """The tool results the conversation ends with (what the model must answer)."""
        tail: list[Turn] = []
        for turn in reversed(self.turns):
            if turn.role != "tool":
                break
            tail.insert(0, turn)
        return tuple(tail)


@dataclass(frozen=True)
class ToolSpec:
    name: str
    description: str
    schema: Mapping[str, Any]  # JSON schema of the tool's input


@dataclass(frozen=True)
class Ask:
    provider: str
    convo: Conversation
    tools: tuple[ToolSpec, ...] = ()
    tool_mode: ToolMode = ToolMode.AUTO
    tool_name: str | None = None  # with ToolMode.NAMED
    output_schema: Mapping[str, Any] | None = None  # the text must be JSON valid against it
    json_mode: bool = False  # the text must be a JSON object (no schema)
    max_tokens: int | None = None
    stop: tuple[str, ...] = ()
    think: bool = False  # the model reasons first (Anthropic `thinking`, Ollama `think`)

    def input_tokens(self) -> int:
        """Words of the conversation, the tool definitions and the output schema."""
        tools = sum(count_tokens(f"{t.name} {t.description} {json.dumps(t.schema)}") for t in self.tools)
        schema = count_tokens(json.dumps(self.output_schema)) if self.output_schema else 0
        return max(1, self.convo.word_count() + tools + schema)


@dataclass(frozen=True)
class ToolCall:
    key: str  # deterministic hex; each surface turns it into its own id format
    name: str
    arguments: dict[str, Any] = field(default_factory=dict)

    def arguments_json(self) -> str:
        return json.dumps(self.arguments)


@dataclass(frozen=True)
class Reply:
    text: str
    tool_calls: tuple[ToolCall, ...]
    stop_reason: StopReason
    stop_sequence: str | None
    input_tokens: int
    output_tokens: int  # the thinking's tokens included, as the real APIs bill them
    thinking: str = ""  # the reasoning that came before the answer, when the Ask asked for it

    def chunks(self, words_per_chunk: int = 3) -> list[str]:
        """The text in small pieces whose concatenation is exactly the text."""
        return split_words(self.text, words_per_chunk)

    def thinking_chunks(self, words_per_chunk: int = 3) -> list[str]:
        return split_words(self.thinking, words_per_chunk) if self.thinking else []


def split_words(text: str, words_per_chunk: int = 3) -> list[str]:
    """`text` in pieces of a few words whose concatenation is exactly `text`."""
    words = re.findall(r"\s*\S+\s*", text) or [text]
    return ["".join(words[i : i + words_per_chunk]) for i in range(0, len(words), words_per_chunk)]


# --------------------------------------------------------------------------- text

_STEPS = (
    "restate the goal and its constraints",
    "sketch the smallest change that could work",
    "check it against one concrete example",
    "list the risks and how to roll back",
    "write down what was done for the next agent",
    "ask for a review before widening the change",
)
_CHOICE = re.compile(r"exactly one\s+word[^.]*?,\s*([A-Z]{3,})\s+or\s+([A-Z]{3,})", re.S)


def compose_text(provider: str, convo: Conversation) -> str:
    """A short, plausible, deterministic answer for a conversation.

    It embeds the provider, a digest of (system, messages) and the start of the last user
    message (or the tool results it answers), so callers can see who answered and what
    it was asked.
    """
    digest = convo.digest()
    tag = f"[sim:{provider}:{digest}]"
    results = convo.pending_results()
    if results:
        said = "; ".join(f"{t.tool_name or 'tool'} said {' '.join(t.text.split())[:80]}" for t in results)
        return f"{tag} Based on the tool results: {said}"
    last_user = convo.last_user()
    choice = _CHOICE.search(convo.system or "")
    if choice:
        # A prompt that asks for one of two words (the supervisor's advisor): answer
        # deterministically with one of them, so the caller's parsing is exercised.
        options = choice.group(1), choice.group(2)
        word = options[int(digest, 16) % 2] if "[pick-any]" in last_user else options[0]
        return f"{word}\n{tag} deterministic advice for: {' '.join(last_user.split())[:60]}"
    topic = " ".join(last_user.split())[:80]
    first = int(digest, 16) % len(_STEPS)
    steps = [_STEPS[(first + i) % len(_STEPS)] for i in range(3)]
    return f"{tag} Plan for: {topic}\n" + "\n".join(
        f"{n}. {step.capitalize()}." for n, step in enumerate(steps, 1))


def compose_thinking(provider: str, convo: Conversation) -> str:
    """The deterministic reasoning a thinking model shows before it answers."""
    digest = convo.digest()
    results = convo.pending_results()
    if results:
        return (f"[sim:{provider}:{digest}] thinking: the tool results are in "
                f"({', '.join(t.tool_name or 'tool' for t in results)}); summarise them for the user.")
    topic = " ".join(convo.last_user().split())[:80]
    return (f"[sim:{provider}:{digest}] thinking: the user asks about \"{topic}\". "
            "Work out the goal, then answer with a short plan.")


def limit_text(text: str, max_tokens: int | None, stop: tuple[str, ...]) -> tuple[str, StopReason, str | None]:
    """Cut `text` where generation would have ended: at the earliest stop sequence (which
    is not included) or after `max_tokens` tokens, whichever comes first."""
    cut, reason, matched = len(text), StopReason.END_TURN, None
    hits = sorted((text.find(s), s) for s in stop if s and s in text)
    if hits:
        (cut, matched), reason = hits[0], StopReason.STOP_SEQUENCE
    if max_tokens is not None:
        words = list(_WORD.finditer(text))
        if len(words) > max_tokens:
            end = words[max_tokens - 1].end() if max_tokens > 0 else 0
            if end < cut:
                cut, reason, matched = end, StopReason.MAX_TOKENS, None
    return text[:cut], reason, matched


# --------------------------------------------------------------------------- tools

_STOPWORDS = frozenset(
    "what when where which with that this from have your about please would could should "
    "there their them then than into just like make some tell does give".split())


def _words(text: str) -> set[str]:
    return {w for w in re.findall(r"[a-z0-9]+", text.lower()) if len(w) >= 4 and w not in _STOPWORDS}


def is_output_tool(tool: ToolSpec) -> bool:
    """A tool through which an agent framework takes its final answer rather than an
    action: pydantic-ai's `final_result` (`final_result_<Type>` when there are several)
    and LiteLLM's `json_tool_call` (how it asks Anthropic for a response_format)."""
    return tool.name.startswith("final_result") or tool.name == "json_tool_call"


def _most_relevant(ask: Ask, tools: list[ToolSpec]) -> tuple[ToolSpec, int]:
    """The tool sharing the most words with the last user message (the first on a tie)."""
    asked = _words(ask.convo.last_user())
    scores = [len(asked & _words(f"{t.name.replace('_', ' ')} {t.description}")) for t in tools]
    best = max(range(len(tools)), key=lambda i: (scores[i], -i))
    return tools[best], scores[best]


def choose_tool(ask: Ask) -> ToolSpec | None:
    """The tool the model calls, or None to answer in text (or structured output).

    Case table (NONE never calls a tool):

      mode   conversation ends with   call
      NAMED  a user turn              the named tool
      ANY    a user turn              the most relevant action tool (else the first),
                                      an output tool only when there is nothing else
      AUTO   a user turn              the most relevant tool; text when none is relevant
      AUTO   tool results             the output tool if there is one, else text
      NAMED  tool results             the named tool unless called since the last user
      ANY    tool results             turn; else the most relevant action tool not
                                      called since then; else the output tool; else text

    The last rows are why an agent whose every request forces a tool still finishes: a
    forced choice that ignored tool results would call the same tool forever.
    """
    if not ask.tools or ask.tool_mode is ToolMode.NONE:
        return None
    tools = list(ask.tools)
    outputs = [t for t in tools if is_output_tool(t)]
    allowed = [t for t in tools if t.name == ask.tool_name] if ask.tool_mode is ToolMode.NAMED else tools
    if not ask.convo.pending_results():
        if ask.tool_mode is ToolMode.NAMED:
            return allowed[0] if allowed else None
        actions = [t for t in tools if not is_output_tool(t)] or tools
        best, score = _most_relevant(ask, actions if ask.tool_mode is ToolMode.ANY else tools)
        return None if ask.tool_mode is ToolMode.AUTO and score == 0 else best
    if ask.tool_mode is ToolMode.AUTO:
        return outputs[0] if outputs else None
    called = ask.convo.called_since_user()
    fresh = [t for t in allowed if t.name not in called and not is_output_tool(t)]
    if fresh:
        return _most_relevant(ask, fresh)[0]
    return outputs[0] if outputs else None


def invalid_arguments(schema: Mapping[str, Any], valid: dict[str, Any]) -> dict[str, Any]:
    """Tool arguments that fail `schema`: `valid` with its first required property
    dropped, or else with its first property given a value of the wrong type. A schema
    that declares no property admits almost anything; it gets an unexpected key."""
    required = [n for n in schema.get("required") or () if n in valid]
    if required:
        return {k: v for k, v in valid.items() if k != required[0]}
    props = schema.get("properties") or {}
    if props:
        name = next(iter(props))
        declared = props[name].get("type") if isinstance(props[name], Mapping) else None
        return valid | {name: 12345 if declared == "string" else "sim-wrong-type"}
    return valid | {"sim_unexpected": True}


# --------------------------------------------------------------------------- json mode

_FENCE = re.compile(r"```(?:json)?[ \t]*\n(.*?)```", re.S)
MAX_JSON_PROBES = 200  # `{` positions tried per text when looking for a schema


def _json_values(text: str):
    """JSON values written in `text`: fenced blocks first, then bare objects."""
    for block in _FENCE.finditer(text):
        try:
            yield json.loads(block.group(1))
        except ValueError:
            continue
    decoder, at, probes = json.JSONDecoder(), text.find("{"), 0
    while at != -1 and probes < MAX_JSON_PROBES:
        probes += 1
        try:
            value, end = decoder.raw_decode(text, at)
        except ValueError:
            at = text.find("{", at + 1)
            continue
        yield value
        at = text.find("{", end)


def _is_schema(value: Any) -> bool:
    return isinstance(value, dict) and (
        isinstance(value.get("properties"), dict) or "$schema" in value
        or (value.get("type") == "array" and "items" in value))


def prompt_schema(convo: Conversation) -> Mapping[str, Any] | None:
    """A JSON schema written into the prompt (JSON mode asks for JSON without passing a
    schema, so prompts carry one): the last user message is searched first, then the
    system prompt, then earlier user messages."""
    users = [t.text for t in reversed(convo.turns) if t.role == "user"]
    for text in [*users[:1], convo.system, *users[1:]]:
        for value in _json_values(text):
            if _is_schema(value):
                return value
    return None


# --------------------------------------------------------------------------- respond


def respond(ask: Ask, shape: Shape | None = None) -> Reply:
    """The reply to an Ask: a tool call, structured JSON, or text, with its stop reason;
    `shape` bends it the way a shaped fault asks."""
    digest = ask.convo.digest()
    input_tokens = ask.input_tokens()
    if shape is Shape.EMPTY:
        return Reply("", (), StopReason.END_TURN, None, input_tokens, 0)
    if shape is Shape.REFUSAL:
        return Reply(REFUSAL_TEXT, (), StopReason.REFUSAL, None, input_tokens, count_tokens(REFUSAL_TEXT))
    thinking = compose_thinking(ask.provider, ask.convo) if ask.think else ""
    thought = count_tokens(thinking)
    tool = choose_tool(ask)
    if tool is None and shape is Shape.BAD_TOOL_ARGS and ask.tools and ask.tool_mode is not ToolMode.NONE:
        tool = next((t for t in ask.tools if not is_output_tool(t)), ask.tools[0])
    if tool is not None and shape is not Shape.MAX_TOKENS:
        seed = f"{digest}:{tool.name}"
        arguments = fake_instance(tool.schema, seed)
        if shape is Shape.BAD_TOOL_ARGS and isinstance(arguments, dict):
            arguments = invalid_arguments(tool.schema, arguments)
        call = ToolCall(hashlib.sha256(seed.encode()).hexdigest()[:24], tool.name, arguments)
        return Reply("", (call,), StopReason.TOOL_USE, None, input_tokens,
                     thought + count_tokens(call.arguments_json()), thinking)
    schema = ask.output_schema
    if schema is None and ask.json_mode:
        schema = prompt_schema(ask.convo)
    if schema is not None:
        full = json.dumps(fake_instance(schema, digest))
    elif ask.json_mode:
        full = json.dumps({"answer": compose_text(ask.provider, ask.convo)})
    else:
        full = compose_text(ask.provider, ask.convo)
    max_tokens = ask.max_tokens
    if shape is Shape.MAX_TOKENS:
        half = max(1, count_tokens(full) // 2)
        max_tokens = half if max_tokens is None else min(max_tokens, half)
    text, reason, matched = limit_text(full, max_tokens, ask.stop)
    if shape is Shape.MAX_TOKENS and reason is StopReason.END_TURN:  # a one-word answer is "cut" too
        reason = StopReason.MAX_TOKENS
    return Reply(text, (), reason, matched, input_tokens, thought + count_tokens(text), thinking)


def embedding(model: str, text: str, dims: int) -> list[float]:
    """A deterministic unit vector for (model, text).

    It is read from a SHAKE-256 stream, so a shorter vector is a prefix of a longer one
    before normalising: asking for fewer `dimensions` truncates and renormalises, as
    Ollama and OpenAI do.
    """
    raw = hashlib.shake_256(f"{model}\0{text}".encode()).digest(2 * dims)
    values = struct.unpack(f"<{dims}h", raw)
    norm = math.sqrt(sum(v * v for v in values)) or 1.0
    return [v / norm for v in values]
