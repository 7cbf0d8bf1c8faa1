"""The Anthropic Message Batches API: client.messages.batches.{create, retrieve, list,
cancel, delete, results}.

    POST   /v1/messages/batches                {requests: [{custom_id, params}]}
    GET    /v1/messages/batches                 a page (limit, after_id, before_id), newest first
    GET    /v1/messages/batches/{id}
    POST   /v1/messages/batches/{id}/cancel
    DELETE /v1/messages/batches/{id}            only once it has ended
    GET    /v1/messages/batches/{id}/results    JSONL, one {custom_id, result} a line

A batch is answered when it is created (the same answers /v1/messages gives), but it
shows as the real API shows a new one: the create call says in_progress with every
request `processing` and no results_url; from the next look on it has ended, with its
counts and a results_url on this server (the SDK fetches whatever URL it is given, so
it must not be the real API's). A request the Messages API would refuse (unknown model,
a bad thinking budget, ...) gets an `errored` result with that error; a malformed
request list is a 400 for the whole batch. Cancelling before the first look cancels
every request (`canceled` results).
"""

from __future__ import annotations

import json
import re
import secrets
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from aiohttp import web
from pydantic import Field, ValidationError

from tron.services.llm_sim.anthropic_api import AnthropicRequest, answer, paged, require_key
from tron.services.llm_sim.state import SIM_STATE
from tron.services.llm_sim.wire import (
    Lenient,
    SimError,
    anthropic_error_body,
    describe,
    parse_body,
    request_id,
    surface_endpoint,
)

BATCH_TTL_S = 24 * 3600  # a batch expires a day after it was created
MAX_REQUESTS = 100_000
_CUSTOM_ID = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")


def _iso(wall: float | None) -> str | None:
    if wall is None:
        return None
    return datetime.fromtimestamp(wall, timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class BatchRequest(Lenient):
    custom_id: str
    params: dict[str, Any]


class BatchCreate(Lenient):
    requests: list[BatchRequest] = Field(min_length=1, max_length=MAX_REQUESTS)


@dataclass
class MessageBatch:
    id: str
    created: float
    results: list[dict[str, Any]]  # {custom_id, result}, in request order
    cancel_initiated: float | None = None
    ended: float | None = None
    archived: bool = False
    counts: dict[str, int] = field(default_factory=dict)

    def settle(self) -> None:
        """Called on every look after the creation: by then the batch has ended."""
        if self.ended is None:
            if self.cancel_initiated is not None:
                self.results = [{"custom_id": r["custom_id"], "result": {"type": "canceled"}} for r in self.results]
            self.ended = time.time()

    def as_json(self, base_url: str) -> dict[str, Any]:
        counts = {"processing": 0, "succeeded": 0, "errored": 0, "canceled": 0, "expired": 0}
        if self.ended is None:
            counts["processing"] = len(self.results)
        else:
            for r in self.results:
                counts[r["result"]["type"]] += 1
        status = "ended" if self.ended is not None else "canceling" if self.cancel_initiated else "in_progress"
        return {
            "id": self.id, "type": "message_batch", "processing_status": status, "request_counts": counts,
            "created_at": _iso(self.created), "expires_at": _iso(self.created + BATCH_TTL_S),
            "ended_at": _iso(self.ended), "cancel_initiated_at": _iso(self.cancel_initiated),
            "archived_at": None,
            "results_url": f"{base_url}/v1/messages/batches/{self.id}/results" if self.ended is not None else None,
        }


def _base_url(request: web.Request) -> str:
    return f"{request.scheme}://{request.host}"


def _result(state, item: BatchRequest, index: int) -> dict[str, Any]:
    try:
        req = AnthropicRequest.model_validate(item.params)
    except ValidationError as exc:
        raise SimError(400, "invalid_request_error", f"requests.{index}.params: {describe(exc)}") from None
    try:
        message = answer(state, req)
    except SimError as err:
        error = anthropic_error_body(err.etype, err.message) | {"request_id": request_id()}
        return {"custom_id": item.custom_id, "result": {"type": "errored", "error": error}}
    return {"custom_id": item.custom_id, "result": {"type": "succeeded", "message": message}}


def _batch(request: web.Request) -> MessageBatch:
    batch_id = request.match_info["batch_id"]
    batch = request.app[SIM_STATE].batches.get(batch_id)
    if batch is None or batch.archived:
        raise SimError(404, "not_found_error", f"message_batch_id: no batch found with id {batch_id!r}")
    return batch


def _json(body: dict[str, Any]) -> web.Response:
    return web.json_response(body, headers={"request-id": request_id()})


@surface_endpoint("anthropic", counted=False)
async def create(request: web.Request) -> web.Response:
    require_key(request)
    state = request.app[SIM_STATE]
    body: BatchCreate = await parse_body(request, BatchCreate)
    seen: set[str] = set()
    for index, item in enumerate(body.requests):
        if not _CUSTOM_ID.match(item.custom_id):
            raise SimError(400, "invalid_request_error",
                           f"requests.{index}.custom_id: String should match pattern '^[a-zA-Z0-9_-]{{1,64}}$'")
        if item.custom_id in seen:
            raise SimError(400, "invalid_request_error",
                           f"requests.{index}.custom_id: duplicate custom_id {item.custom_id!r}; each must be unique")
        seen.add(item.custom_id)
    results = [_result(state, item, index) for index, item in enumerate(body.requests)]
    batch = MessageBatch("msgbatch_sim_" + secrets.token_hex(12), time.time(), results)
    state.batches[batch.id] = batch
    return _json(batch.as_json(_base_url(request)))


@surface_endpoint("anthropic", counted=False)
async def retrieve(request: web.Request) -> web.Response:
    require_key(request)
    batch = _batch(request)
    batch.settle()
    return _json(batch.as_json(_base_url(request)))


@surface_endpoint("anthropic", counted=False)
async def list_batches(request: web.Request) -> web.Response:
    require_key(request)
    batches = [b for b in reversed(request.app[SIM_STATE].batches.values()) if not b.archived]
    for b in batches:
        b.settle()
    ids, envelope = paged(request, [b.id for b in batches])
    by_id = {b.id: b for b in batches}
    return _json({"data": [by_id[i].as_json(_base_url(request)) for i in ids], **envelope})


@surface_endpoint("anthropic", counted=False)
async def cancel(request: web.Request) -> web.Response:
    require_key(request)
    batch = _batch(request)
    if batch.ended is None and batch.cancel_initiated is None:
        batch.cancel_initiated = time.time()
    body = batch.as_json(_base_url(request))
    batch.settle()
    return _json(body)


@surface_endpoint("anthropic", counted=False)
async def delete(request: web.Request) -> web.Response:
    require_key(request)
    batch = _batch(request)
    batch.settle()
    if batch.ended is None:
        raise SimError(400, "invalid_request_error",
                       "Message batch is still in progress; cancel it and wait for it to end before deleting it.")
    batch.archived = True
    return _json({"id": batch.id, "type": "message_batch_deleted"})


@surface_endpoint("anthropic", counted=False)
async def results(request: web.Request) -> web.Response:
    require_key(request)
    batch = _batch(request)
    batch.settle()
    if batch.ended is None:
        raise SimError(400, "invalid_request_error", f"Batch {batch.id} has not finished processing")
    body = "".join(json.dumps(r) + "\n" for r in batch.results)
    return web.Response(body=body.encode(), content_type="application/binary", headers={"request-id": request_id()})


def add_routes(router: web.UrlDispatcher) -> None:
    router.add_post("/v1/messages/batches", create)
    router.add_get("/v1/messages/batches", list_batches)
    router.add_get("/v1/messages/batches/{batch_id}", retrieve)
    router.add_delete("/v1/messages/batches/{batch_id}", delete)
    router.add_post("/v1/messages/batches/{batch_id}/cancel", cancel)
    router.add_get("/v1/messages/batches/{batch_id}/results", results)
