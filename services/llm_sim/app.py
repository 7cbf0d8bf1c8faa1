"""llm_sim: a local stand-in for the Anthropic Messages API, the Ollama API and the
OpenAI-compatible chat API.

It speaks enough of each wire format for the real `anthropic`, `ollama` and `openai`
SDKs (and LiteLLM on top of them) to work unchanged, answers deterministically (same
request, same answer), and lets tests and operators inject provider faults at run time
through `/sim/faults`.

Surfaces (answers are decided once, in answers.py, and rendered per API):

    anthropic  POST /v1/messages (text, tool_use with tool_choice auto/any/tool/none,
               output_config.format / output_format json_schema, stop_sequences,
               max_tokens, SSE streaming incl. input_json_delta),
               POST /v1/messages/count_tokens, GET /v1/models[/{id}], extended
               thinking blocks, POST /v1/complete (legacy Text Completions,
               anthropic_complete.py), the Message Batches API under
               /v1/messages/batches (anthropic_batches.py)
    ollama     POST /api/chat, /api/generate (tools, format "json" or a schema,
               options.num_predict and stop), POST /api/embed, /api/embeddings,
               POST /api/show, GET /api/ps, /api/tags, /api/version, /,
               POST /api/pull, /api/create, /api/copy, DELETE /api/delete
               (ollama_models.py; what they make is listed by /api/tags), `think`
               (thinking-capable models think unless told not to) and `logprobs`
    openai     POST /v1/chat/completions (tools/tool_calls, response_format,
               max_tokens / max_completion_tokens, stop, SSE with data: [DONE]),
               POST /v1/responses (the Responses API: input items, instructions,
               function tools, tool_choice, text.format, max_output_tokens,
               previous_response_id, SSE with named events),
               POST /v1/embeddings, GET /v1/models[/{id}]

GET /v1/models[/{id}] answers in Anthropic's shape when the request carries an
`anthropic-version` header (the Anthropic SDK always sends one) and in OpenAI's shape
otherwise. Unknown models get each API's own 404; catalog.py says which names are known
and how to add more (make_app(models=...) or TRON_SIM_*_MODELS).

Fault control contract (all JSON):

    PUT    /sim/faults/{provider}   FaultSpec: {"kind": K, "latency_ms": 0, "times": null,
                                     "after": 0, "duration_ms": null, "retry_after_ms": null}
    DELETE /sim/faults/{provider}   clear one provider's fault
    DELETE /sim/faults              clear every fault
    GET    /sim/faults              {"providers": {P: {"fault": FaultSpec | null,
                                     "remaining": n | null, "passing": n,
                                     "expires_in_ms": n | null,
                                     "counters": {"requests", "served", "faults_injected",
                                     "rate_limited", "by_kind": {K: n}, "hanging"}}}} (no token)
    POST   /sim/counters/reset      zero every provider's counters (DELETE /sim/counters
                                     too); answers {"reset": {P: counters before}}

Providers: anthropic, ollama, openai (one fault covers chat completions and responses).
Kinds, by where they act (state.py):

  refused    overloaded (529 anthropic, 503 ollama and openai), rate-limit (429 with
             retry-after seconds rounded up, and on anthropic/openai retry-after-ms and
             each API's exhausted rate-limit headers: anthropic-ratelimit-{requests,
             tokens,input-tokens,output-tokens}-{limit,remaining,reset} with an RFC 3339
             reset, x-ratelimit-{limit,remaining,reset}-{requests,tokens} with a
             duration such as "1m30s"), usage-limit (429 quota exhausted: anthropic
             rate_limit_error, openai insufficient_quota; retry_after_ms defaults to
             1 h), error (500), auth (401)
  held       latency (delay, then answer), hang (never answer), stall (a stream sends
             its first event, then nothing for latency_ms or until the client leaves;
             without a stream it is a hang), trickle (one streamed delta per latency_ms,
             default 200; a plain answer is late by as much)
  broken     midstream (streams end with the API's in-stream error; plain requests get a
             500), cut (half a body, or a stream up to half-way through one event or
             line, then the connection is dropped)
  shaped     200s a client must cope with: empty (no content, end_turn), max-tokens
             (half the answer, max_tokens / length), refusal (anthropic stop_reason
             refusal, openai message.refusal, ollama a text refusal), bad-tool-args (with
             tools, a tool call whose arguments fail the tool's schema)

PUT and DELETE need `X-Tron-Token: <token>` when the app was made with a token. A fault
applies to the generation and embedding endpoints only (/v1/messages,
/v1/chat/completions, /v1/responses, /v1/embeddings, /api/chat, /api/generate,
/api/embed, /api/embeddings), so /api/tags, /api/version, /api/show, /api/ps,
/v1/models, /v1/messages/count_tokens and / stay usable as liveness probes. Requests
refused before generation (bad body, unknown model, missing key) count as received but
do not consume a fault. `latency_ms` delays the refused, broken and shaped kinds before
they take effect; `times` makes the fault clear itself after that many requests (each
request, an SDK's own retries included, uses one) and `duration_ms` that long after it
was set, whichever comes first. `after` lets that many requests through untouched before
the fault takes effect (they use none of `times`; `duration_ms` counts from the PUT).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping

from aiohttp import web

from tron.services.llm_sim import (
    anthropic_api,
    anthropic_batches,
    anthropic_complete,
    control,
    ollama_api,
    ollama_models,
    openai_api,
    responses_api,
)
from tron.services.llm_sim.catalog import make_catalog
from tron.services.llm_sim.state import PROVIDERS, SIM_STATE, FaultSpec, SimState
from tron.services.llm_sim.wire import MAX_BODY

__all__ = ["MAX_BODY", "PROVIDERS", "SIM_STATE", "FaultSpec", "make_app"]

log = logging.getLogger("llm_sim")


@web.middleware
async def _log_requests(request: web.Request, handler):
    # Method, path and status only: headers (API keys, tokens) are never logged.
    started = time.monotonic()
    status = 500
    try:
        response = await handler(request)
        status = response.status
        return response
    except web.HTTPException as exc:
        status = exc.status
        raise
    finally:
        elapsed_ms = (time.monotonic() - started) * 1000
        log.info("%s %s -> %d (%.1f ms)", request.method, request.path, status, elapsed_ms)


async def _on_shutdown(app: web.Application) -> None:
    app[SIM_STATE].closing = True  # held requests see this within HOLD_POLL_S


def _by_client(anthropic, openai):
    """One route for /v1/models that both SDKs call: the anthropic-version header, which
    only Anthropic clients send, picks the answer's shape."""

    async def handler(request: web.Request) -> web.StreamResponse:
        chosen = anthropic if "anthropic-version" in request.headers else openai
        return await chosen(request)

    return handler


def make_app(*, token: str | None = None, models: Mapping[str, Iterable[str]] | None = None) -> web.Application:
    """The simulator app.

    token: guards PUT/DELETE /sim/faults when not None.
    models: extra model names per surface ("anthropic", "ollama", "openai"), added to
    the built-in catalog and to the TRON_SIM_*_MODELS environment lists.
    """
    app = web.Application(client_max_size=MAX_BODY, middlewares=[_log_requests])
    app[SIM_STATE] = SimState(token=token, catalog=make_catalog(models))
    app.on_shutdown.append(_on_shutdown)
    add = app.router
    add.add_post("/v1/messages", anthropic_api.messages)
    add.add_post("/v1/messages/count_tokens", anthropic_api.count_tokens)
    add.add_post("/v1/complete", anthropic_complete.complete)
    anthropic_batches.add_routes(add)
    add.add_get("/v1/models", _by_client(anthropic_api.list_models, openai_api.list_models))
    add.add_get("/v1/models/{model_id}", _by_client(anthropic_api.get_model, openai_api.get_model))
    add.add_post("/v1/chat/completions", openai_api.chat_completions)
    add.add_post("/v1/embeddings", openai_api.embeddings)
    add.add_post("/v1/responses", responses_api.create_response)
    add.add_post("/api/chat", ollama_api.chat)
    add.add_post("/api/generate", ollama_api.generate)
    add.add_post("/api/embed", ollama_api.embed)
    add.add_post("/api/embeddings", ollama_api.embeddings)
    add.add_post("/api/show", ollama_api.show)
    add.add_get("/api/ps", ollama_api.ps)
    add.add_get("/api/tags", ollama_api.tags)
    add.add_get("/api/version", ollama_api.version)
    add.add_post("/api/pull", ollama_models.pull)
    add.add_post("/api/create", ollama_models.create)
    add.add_post("/api/copy", ollama_models.copy)
    add.add_delete("/api/delete", ollama_models.delete)
    add.add_get("/", ollama_api.root)
    add.add_get("/sim/faults", control.get_faults)
    add.add_delete("/sim/faults", control.delete_all_faults)
    add.add_put("/sim/faults/{provider}", control.put_fault)
    add.add_delete("/sim/faults/{provider}", control.delete_fault)
    add.add_post("/sim/counters/reset", control.reset_counters)
    add.add_delete("/sim/counters", control.reset_counters)
    return app
