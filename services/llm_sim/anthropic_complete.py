"""The legacy Anthropic Text Completions API: POST /v1/complete, which the SDK's
`client.completions.create` calls (examples/text_completions_*.py).

Request {model, prompt, max_tokens_to_sample, stop_sequences?, stream?}; the prompt is
"\\n\\nHuman: ...\\n\\nAssistant:" turns. Reply {"type": "completion", "id", "completion",
"stop_reason": "stop_sequence" | "max_tokens", "stop", "model"}; streamed as `event:
completion` objects (stop_reason null until the last) with a `ping` after the first, and
the Messages API's `event: error` for a fault part-way.
"""

from __future__ import annotations

import re
import secrets
from typing import Any

from aiohttp import web
from pydantic import Field

from tron.services.llm_sim.answers import Ask, Conversation, Reply, StopReason, Turn, respond
from tron.services.llm_sim.anthropic_api import require_key, require_model
from tron.services.llm_sim.state import SIM_STATE
from tron.services.llm_sim.wire import (
    Delivery,
    Lenient,
    SimError,
    anthropic_error_body,
    parse_body,
    request_id,
    serve,
    sse,
    surface_endpoint,
)

HUMAN_PROMPT = "\n\nHuman:"
AI_PROMPT = "\n\nAssistant:"
_TURN = re.compile(r"\n\n(Human|Assistant):")


class CompletionRequest(Lenient):
    model: str = Field(min_length=1)
    prompt: str
    max_tokens_to_sample: int = Field(ge=1)
    stop_sequences: list[str] | None = None
    stream: bool = False

    def conversation(self) -> Conversation:
        """The prompt's turns; SimError 400 for a prompt that is not Human/Assistant turns
        ending with an Assistant turn, as the API refuses it."""
        if not self.prompt.startswith(HUMAN_PROMPT):
            raise SimError(400, "invalid_request_error", 'prompt must start with "\\n\\nHuman:" turn')
        if AI_PROMPT not in self.prompt:
            raise SimError(400, "invalid_request_error", 'prompt must contain "\\n\\nAssistant:" turn')
        parts = _TURN.split(self.prompt)[1:]  # role, text, role, text, ...
        turns = [Turn("user" if role == "Human" else "assistant", text.strip())
                 for role, text in zip(parts[::2], parts[1::2])]
        if turns[-1].role != "assistant" or turns[-1].text:
            raise SimError(400, "invalid_request_error", 'prompt must end with "\\n\\nAssistant:" turn')
        return Conversation("", tuple(t for t in turns[:-1] if t.text))

    def ask(self) -> Ask:
        # The model stops at the next "\n\nHuman:" whether asked to or not.
        stop = tuple(dict.fromkeys([*(self.stop_sequences or ()), HUMAN_PROMPT]))
        return Ask("anthropic", self.conversation(), max_tokens=self.max_tokens_to_sample, stop=stop)


def _stop(reply: Reply) -> tuple[str, str | None]:
    if reply.stop_reason is StopReason.MAX_TOKENS:
        return "max_tokens", None
    return "stop_sequence", reply.stop_sequence or HUMAN_PROMPT


def _completion(cid: str, model: str, text: str, reply: Reply | None) -> dict[str, Any]:
    reason, stop = _stop(reply) if reply is not None else (None, None)
    return {"type": "completion", "id": cid, "completion": text, "stop_reason": reason, "model": model,
            "stop": stop, "log_id": cid}


@surface_endpoint("anthropic")
async def complete(request: web.Request) -> web.StreamResponse:
    """POST /v1/complete."""
    require_key(request)
    req: CompletionRequest = await parse_body(request, CompletionRequest)
    require_model(request.app[SIM_STATE].catalog, req.model)
    ask = req.ask()

    async def render(request: web.Request, delivery: Delivery):
        reply = respond(ask, delivery.shape)
        delivery.bill(req.model, reply.input_tokens, reply.output_tokens)
        cid = "compl_sim_" + secrets.token_hex(12)
        headers = {"request-id": request_id()}
        text = " " + reply.text if reply.text else ""  # the answer follows "Assistant:" after a space
        if not req.stream:
            return await delivery.json(request, _completion(cid, req.model, text, reply), headers, len(reply.chunks()))
        pieces = [" " + c if i == 0 else c for i, c in enumerate(reply.chunks()) if c] if text else []
        events = [sse("completion", _completion(cid, req.model, piece, None)) for piece in pieces]
        events.insert(min(1, len(events)), sse("ping", {"type": "ping"}))
        if delivery.midstream:
            events = events[:2] + [sse("error", anthropic_error_body("overloaded_error", "Overloaded"))]
        else:
            events.append(sse("completion", _completion(cid, req.model, "", reply)))
        response, completed = await delivery.stream(request, "text/event-stream; charset=utf-8", events, headers)
        return response, completed and not delivery.midstream

    return await serve(request, "anthropic", req.stream, render)
