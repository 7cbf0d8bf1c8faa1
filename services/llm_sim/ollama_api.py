"""The Ollama API surface: /api/chat and /api/generate (tools, `format`, num_predict,
stop, load/unload), /api/embed and /api/embeddings, /api/show, /api/ps, /api/tags,
/api/version and /.

Error texts follow Ollama 0.12's server (server/routes.go): chat, generate and show
answer an unknown model with 404 "model 'x' not found", embed and embeddings (which go
through the scheduler) with 404 'model "x" not found, try pulling it first'.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from collections.abc import Callable
from typing import Any, Literal

from aiohttp import web
from pydantic import Field

from tron.common.clock import utc_iso
from tron.services.llm_sim.answers import (
    Ask,
    Conversation,
    Reply,
    StopReason,
    ToolSpec,
    Turn,
    count_tokens,
    embedding,
    respond,
)
from tron.services.llm_sim.catalog import OllamaModel
from tron.services.llm_sim.state import SIM_STATE
from tron.services.llm_sim.wire import FAULT_ERRORS, Delivery, Lenient, SimError, parse_body, serve, surface_endpoint

OLLAMA_SERVER_VERSION = "0.12.0-llm-sim"
DEFAULT_KEEP_ALIVE_S = 300.0  # Ollama keeps a model loaded 5 minutes after its last use
MODIFIED_AT = "2025-01-01T00:00:00Z"
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h)")
_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


class OllamaFunctionCall(Lenient):
    name: str = ""
    arguments: dict[str, Any] | str = Field(default_factory=dict)


class OllamaToolCall(Lenient):
    function: OllamaFunctionCall


class OllamaMessage(Lenient):
    role: str
    content: str | None = ""
    tool_calls: list[OllamaToolCall] | None = None
    tool_name: str | None = None  # on role "tool": which tool answered


class OllamaFunction(Lenient):
    name: str = Field(min_length=1)
    description: str | None = ""
    parameters: dict[str, Any] | None = None


class OllamaTool(Lenient):
    type: str = "function"
    function: OllamaFunction


class OllamaOptions(Lenient):
    num_predict: int | None = None  # -1 (and -2): no limit
    stop: list[str] | None = None


class _OllamaGeneration(Lenient):
    model: str = Field(min_length=1)
    stream: bool | None = None  # Ollama streams unless told otherwise
    format: Literal["", "json"] | dict[str, Any] | None = None
    options: OllamaOptions | None = None
    keep_alive: float | str | None = None
    think: bool | Literal["low", "medium", "high"] | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None

    def thinks(self, model: OllamaModel) -> bool:
        """Whether the answer reasons first. As Ollama's server does: a model with the
        thinking capability thinks unless told `think: false`; asking one without it to
        think is a 400."""
        if "thinking" in model.capabilities:
            return self.think is not False
        if self.think:
            raise SimError(400, "invalid_request_error", f'"{self.model}" does not support thinking')
        return False

    def check_logprobs(self) -> None:
        if self.top_logprobs is not None and not 0 <= self.top_logprobs <= 20:
            raise SimError(400, "invalid_request_error", "top_logprobs must be between 0 and 20")

    def limits(self, model: OllamaModel) -> dict[str, Any]:
        """Ask keyword arguments for format, num_predict, stop and think."""
        opts = self.options or OllamaOptions()
        return {
            "output_schema": self.format if isinstance(self.format, dict) else None,
            "json_mode": self.format == "json",
            "max_tokens": opts.num_predict if opts.num_predict and opts.num_predict > 0 else None,
            "stop": tuple(opts.stop or ()),
            "think": self.thinks(model),
        }


class OllamaChatRequest(_OllamaGeneration):
    messages: list[OllamaMessage] = Field(default_factory=list)
    tools: list[OllamaTool] | None = None

    def conversation(self, default_system: str = "") -> Conversation:
        system = "\n".join(m.content or "" for m in self.messages if m.role == "system") or default_system
        turns: list[Turn] = []
        called: list[str] = []  # the last assistant turn's calls, to name unnamed results
        for msg in self.messages:
            if msg.role == "system":
                continue
            calls = tuple(c.function.name for c in msg.tool_calls or ())
            if msg.role == "tool":
                name = msg.tool_name or (called.pop(0) if called else "")
                turns.append(Turn("tool", msg.content or "", tool_name=name))
                continue
            called = list(calls)
            turns.append(Turn(msg.role, msg.content or "", calls))
        return Conversation(system, tuple(turns))

    def ask(self, model: OllamaModel) -> Ask:
        tools = tuple(ToolSpec(t.function.name, t.function.description or "",
                               t.function.parameters or {"type": "object"}) for t in self.tools or ())
        return Ask("ollama", self.conversation(model.system), tools, **self.limits(model))


class OllamaGenerateRequest(_OllamaGeneration):
    prompt: str = ""
    suffix: str = ""  # fill-in-the-middle: the text after the answer
    system: str = ""

    def ask(self, model: OllamaModel) -> Ask:
        prompt = self.prompt + (f"\n{self.suffix}" if self.suffix else "")
        convo = Conversation(self.system or model.system, (Turn("user", prompt),))
        return Ask("ollama", convo, **self.limits(model))


class OllamaShowRequest(Lenient):
    model: str = ""
    name: str = ""  # the old spelling of `model`


class OllamaEmbedRequest(Lenient):
    model: str = Field(min_length=1)
    input: str | list[Any] | None = None
    dimensions: int | None = None
    keep_alive: float | str | None = None


class OllamaEmbeddingsRequest(Lenient):
    model: str = Field(min_length=1)
    prompt: str = ""
    keep_alive: float | str | None = None


# --------------------------------------------------------------------------- helpers


def keep_alive_seconds(value: float | str | None) -> float | None:
    """Ollama's keep_alive (seconds, or a Go duration such as "5m") in seconds; None
    means forever (a negative value); 0 unloads at once."""
    if value is None:
        return DEFAULT_KEEP_ALIVE_S
    if isinstance(value, str):
        text = value.strip()
        try:
            value = float(text)
        except ValueError:
            parts = _DURATION_PART.findall(text.lstrip("+-"))
            if not parts or "".join(n + u for n, u in parts) != text.lstrip("+-"):
                raise SimError(400, "invalid_request_error", f'time: invalid duration "{text}"') from None
            value = sum(float(n) * _UNITS[u] for n, u in parts) * (-1 if text.startswith("-") else 1)
    return None if value < 0 else float(value)


def _known(request: web.Request, name: str, message: str) -> OllamaModel:
    """The catalog entry for `name`, or SimError 404 with `message` ({} = the name)."""
    model = request.app[SIM_STATE].catalog.ollama_model(name)
    if model is None:
        raise SimError(404, "not_found_error", message.format(name))
    return model


def _generation_model(request: web.Request, name: str, verb: str) -> OllamaModel:
    model = _known(request, name, "model '{}' not found")
    if "completion" not in model.capabilities:
        raise SimError(400, "invalid_request_error", f'"{name}" does not support {verb}')
    return model


def _stats(reply: Reply, started: float) -> dict[str, Any]:
    total_ns = max(1, int((time.monotonic() - started) * 1e9))
    return {
        "done": True,
        "done_reason": "length" if reply.stop_reason is StopReason.MAX_TOKENS else "stop",
        "total_duration": total_ns,
        "load_duration": 0,
        "prompt_eval_count": reply.input_tokens,
        "prompt_eval_duration": total_ns // 4,
        "eval_count": reply.output_tokens,
        "eval_duration": total_ns // 2,
    }


def _ndjson(obj: dict[str, Any]) -> bytes:
    # The client json.loads() every line, so no blank lines ever.
    return (json.dumps(obj) + "\n").encode()


def _tool_calls(reply: Reply) -> list[dict[str, Any]]:
    # Ollama 0.12 omits `index` when it is 0 and sends no call id.
    return [{"function": {"name": c.name, "arguments": c.arguments} | ({"index": i} if i else {})}
            for i, c in enumerate(reply.tool_calls)]


Payload = Callable[[str, list[dict[str, Any]], str], dict[str, Any]]


def _logprobs(text: str, top: int | None) -> dict[str, Any]:
    """{"logprobs": [...]} for `text`, one entry per token (a word and the space before
    it), each with `top` alternatives, the token itself first; the values are
    deterministic."""
    entries = []
    for token in re.findall(r"\s*\S+|\s+$", text):
        seed = int(hashlib.sha256(token.encode()).hexdigest()[:8], 16)
        logprob = -round((seed % 2000) / 1000, 4)
        entry: dict[str, Any] = {"token": token, "logprob": logprob, "bytes": list(token.encode())}
        if top:
            alternatives = [{"token": token, "logprob": logprob, "bytes": list(token.encode())}]
            for rank in range(1, top):
                alt = f"{token.strip()[:1] or '_'}{rank}"
                alternatives.append({"token": alt, "logprob": round(logprob - 1.5 * rank, 4),
                                     "bytes": list(alt.encode())})
            entry["top_logprobs"] = alternatives
        entries.append(entry)
    return {"logprobs": entries}


def _render_generation(model: str, req: _OllamaGeneration, ask: Ask, payload: Payload):
    """Render /api/chat and /api/generate alike; payload(text, tool_calls, thinking) is
    the endpoint's own part of each object. Thinking comes first, as its own pieces."""
    started = time.monotonic()
    stream = req.stream is not False

    async def render(request: web.Request, delivery: Delivery):
        reply = respond(ask, delivery.shape)
        delivery.bill(model, reply.input_tokens, reply.output_tokens)

        def part(text: str, calls: list[dict[str, Any]] | None = None, thinking: str = "") -> dict[str, Any]:
            body = {"model": model, "created_at": utc_iso(), **payload(text, calls or [], thinking)}
            return body | (_logprobs(text, req.top_logprobs) if req.logprobs and text else {})

        if not stream:
            body = part(reply.text, _tool_calls(reply), reply.thinking) | _stats(reply, started)
            return await delivery.json(request, body, deltas=len(reply.chunks()))
        lines = [_ndjson(part("", thinking=chunk) | {"done": False}) for chunk in reply.thinking_chunks()]
        lines += [_ndjson(part(chunk) | {"done": False}) for chunk in reply.chunks() if chunk]
        if reply.tool_calls:
            lines.append(_ndjson(part("", _tool_calls(reply)) | {"done": False}))
        if delivery.midstream:
            lines = lines[:2] + [_ndjson({"error": FAULT_ERRORS["ollama"]["midstream"].message})]
        else:
            lines.append(_ndjson(part("") | _stats(reply, started)))
        response, completed = await delivery.stream(request, "application/x-ndjson", lines)
        return response, completed and not delivery.midstream

    return render


def _render_load(model: str, keep_alive: float | None, payload: dict[str, Any]):
    """What an empty chat or generate gets: the model is (un)loaded, nothing generated."""

    async def render(request: web.Request, delivery: Delivery):
        return web.json_response({"model": model, "created_at": utc_iso(), **payload, "done": True,
                                  "done_reason": "unload" if keep_alive == 0 else "load"}), True

    return render


# --------------------------------------------------------------------------- endpoints


def _chat_payload(text: str, calls: list[dict[str, Any]], thinking: str) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": text}
    if thinking:
        message["thinking"] = thinking
    return {"message": message | ({"tool_calls": calls} if calls else {})}


def _generate_payload(text: str, calls: list[dict[str, Any]], thinking: str) -> dict[str, Any]:
    return {"response": text} | ({"thinking": thinking} if thinking else {})


@surface_endpoint("ollama")
async def chat(request: web.Request) -> web.StreamResponse:
    """POST /api/chat."""
    req: OllamaChatRequest = await parse_body(request, OllamaChatRequest)
    req.check_logprobs()
    model = _generation_model(request, req.model, "chat")
    ask = req.ask(model) if req.messages else None
    keep_alive = keep_alive_seconds(req.keep_alive)
    request.app[SIM_STATE].loaded.touch(model.name, keep_alive)
    if ask is None:
        render = _render_load(req.model, keep_alive, {"message": {"role": "assistant", "content": ""}})
        return await serve(request, "ollama", False, render)
    return await serve(request, "ollama", req.stream is not False,
                       _render_generation(req.model, req, ask, _chat_payload))


@surface_endpoint("ollama")
async def generate(request: web.Request) -> web.StreamResponse:
    """POST /api/generate."""
    req: OllamaGenerateRequest = await parse_body(request, OllamaGenerateRequest)
    req.check_logprobs()
    model = _generation_model(request, req.model, "generate")
    ask = req.ask(model) if req.prompt else None
    keep_alive = keep_alive_seconds(req.keep_alive)
    request.app[SIM_STATE].loaded.touch(model.name, keep_alive)
    if ask is None:
        return await serve(request, "ollama", False, _render_load(req.model, keep_alive, {"response": ""}))
    render = _render_generation(req.model, req, ask, _generate_payload)
    return await serve(request, "ollama", req.stream is not False, render)


def _embed_inputs(raw: str | list[Any] | None) -> list[str]:
    if raw is None or raw == "":
        return []
    if isinstance(raw, str):
        return [raw]
    if not all(isinstance(item, str) for item in raw):
        raise SimError(400, "invalid_request_error", "invalid input type")
    return raw


@surface_endpoint("ollama")
async def embed(request: web.Request) -> web.StreamResponse:
    """POST /api/embed: one unit vector per input."""
    req: OllamaEmbedRequest = await parse_body(request, OllamaEmbedRequest)
    inputs = _embed_inputs(req.input)
    model = _known(request, req.model, 'model "{}" not found, try pulling it first')
    request.app[SIM_STATE].loaded.touch(model.name, keep_alive_seconds(req.keep_alive))
    dims = model.embedding_length
    if req.dimensions and 0 < req.dimensions < dims:
        dims = req.dimensions
    started = time.monotonic()

    async def render(request: web.Request, delivery: Delivery):
        total_ns = max(1, int((time.monotonic() - started) * 1e9))
        body = {"model": req.model, "embeddings": [embedding(model.name, text, dims) for text in inputs]}
        if inputs:
            body |= {"total_duration": total_ns, "load_duration": 0,
                     "prompt_eval_count": sum(count_tokens(text) for text in inputs)}
        return web.json_response(body), True

    return await serve(request, "ollama", False, render)


@surface_endpoint("ollama")
async def embeddings(request: web.Request) -> web.StreamResponse:
    """POST /api/embeddings: the legacy single-prompt form."""
    req: OllamaEmbeddingsRequest = await parse_body(request, OllamaEmbeddingsRequest)
    model = _known(request, req.model, 'model "{}" not found, try pulling it first')
    request.app[SIM_STATE].loaded.touch(model.name, keep_alive_seconds(req.keep_alive))

    async def render(request: web.Request, delivery: Delivery):
        vector = embedding(model.name, req.prompt, model.embedding_length) if req.prompt else []
        return web.json_response({"embedding": vector}), True

    return await serve(request, "ollama", False, render)


def model_digest(model: OllamaModel) -> str:
    """The manifest digest /api/tags reports (a copy keeps its source's, as in Ollama)."""
    return model.digest or hashlib.sha256(model.name.encode()).hexdigest()


def _model_entry(model: OllamaModel) -> dict[str, Any]:
    return {"name": model.name, "model": model.name, "size": model.size,
            "digest": model_digest(model), "details": model.details}


@surface_endpoint("ollama", counted=False)
async def show(request: web.Request) -> web.Response:
    """POST /api/show: a model's details, capabilities and model_info."""
    req: OllamaShowRequest = await parse_body(request, OllamaShowRequest)
    name = req.model or req.name
    if not name:
        raise SimError(400, "invalid_request_error", "model is required")
    model = _known(request, name, "model '{}' not found")
    arch = model.family
    system = f'SYSTEM """{model.system}"""\n' if model.system else ""
    return web.json_response({
        "license": "",
        "modelfile": f'# Modelfile generated by "ollama show"\n# To build a new Modelfile based on this, '
                     f"replace FROM with:\n# FROM {model.name}\n\nFROM {model.parent or model.name}\n{system}",
        "parameters": "",
        "template": "{{ .Prompt }}",
        "details": model.details,
        "model_info": {"general.architecture": arch, "general.basename": model.name.split(":")[0],
                       f"{arch}.context_length": model.context_length,
                       f"{arch}.embedding_length": model.embedding_length},
        "capabilities": list(model.capabilities),
        "modified_at": model.modified_at or MODIFIED_AT,
    } | ({"system": model.system} if model.system else {}))


@surface_endpoint("ollama", counted=False)
async def ps(request: web.Request) -> web.Response:
    """GET /api/ps: the models used within their keep_alive, longest-lived first."""
    state = request.app[SIM_STATE]
    by_name = {m.name: m for m in state.catalog.ollama}
    models = []
    for name, expires in state.loaded.current():
        model = by_name.get(name)
        if model is None:  # deleted while loaded
            continue
        expires_at = utc_iso(expires)
        models.append(_model_entry(model) | {"expires_at": expires_at, "size_vram": model.size,
                                             "context_length": 4096})
    return web.json_response({"models": models})


async def tags(request: web.Request) -> web.Response:
    """GET /api/tags: the models the sim has "pulled"."""
    catalog = request.app[SIM_STATE].catalog
    return web.json_response({"models": [_model_entry(m) | {"modified_at": m.modified_at or MODIFIED_AT}
                                          for m in catalog.ollama]})


async def version(request: web.Request) -> web.Response:
    return web.json_response({"version": OLLAMA_SERVER_VERSION})


async def root(request: web.Request) -> web.Response:
    return web.Response(text="Ollama is running")
