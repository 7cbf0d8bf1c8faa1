"""The Ollama API's model management: POST /api/pull, POST /api/create, POST /api/copy,
DELETE /api/delete. What they make or remove shows in /api/tags, /api/show and the
generation endpoints at once (the app's catalog, state.py's SimState.catalog).

Progress is streamed as Ollama's server streams it (server/images.go PullModel,
server/download.go, server/create.go): NDJSON status objects, `pulling <digest[7:19]>`
lines with digest/total/completed per layer, then "verifying sha256 digest", "writing
manifest" and "success"; with `stream: false` only the last object, {"status":
"success"}. Errors before any output are {"error": ...} with the status Ollama uses.
The sim has no registry to ask, so every well-formed name can be pulled.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from typing import Any

from aiohttp import web
from pydantic import Field

from tron.common.clock import utc_iso
from tron.services.llm_sim.catalog import OllamaModel, guessed_ollama_model, ollama_name
from tron.services.llm_sim.ollama_api import model_digest
from tron.services.llm_sim.state import SIM_STATE
from tron.services.llm_sim.wire import Lenient, SimError, parse_body, surface_endpoint

INVALID_NAME = "invalid model name"  # Ollama's errtypes.InvalidModelNameErrMsg
# host/namespace/model:tag, each part as Ollama's model.ParseName accepts it.
_NAME = re.compile(r"^(?:[a-z0-9][a-z0-9._-]*(?::\d+)?/){0,2}[a-z0-9_][a-z0-9._-]{0,79}"
                   r"(?::[a-z0-9_][a-z0-9._-]{0,79})?$")
PROGRESS_STEPS = 4  # progress objects per pulled blob (the real server sends one every 60 ms)


class PullRequest(Lenient):
    model: str = ""
    name: str = ""  # the old spelling of `model`
    insecure: bool | None = None
    stream: bool | None = None


class CreateRequest(Lenient):
    model: str = ""
    name: str = ""
    from_: str | None = Field(None, alias="from")
    system: str | None = None
    template: str | None = None
    license: str | list[str] | None = None
    parameters: dict[str, Any] | None = None
    messages: list[dict[str, Any]] | None = None
    files: dict[str, str] | None = None
    adapters: dict[str, str] | None = None
    quantize: str | None = None
    stream: bool | None = None


class CopyRequest(Lenient):
    source: str = ""
    destination: str = ""


class DeleteRequest(Lenient):
    model: str = ""
    name: str = ""


def valid_name(raw: str) -> str:
    """Ollama's canonical form of `raw`; SimError 400 "invalid model name" if it is none."""
    name = ollama_name(raw) if raw.strip() else ""
    if not name or not _NAME.match(name):
        raise SimError(400, "invalid_request_error", INVALID_NAME)
    return name


def _digest(*parts: str) -> str:
    return "sha256:" + hashlib.sha256("\0".join(parts).encode()).hexdigest()


def _blobs(model: OllamaModel) -> list[tuple[str, int]]:
    """(digest, size) of a model's blobs: the weights, template, params, then the config."""
    small = [("template", 1_429), ("params", 148), ("config", 487)]
    weights = max(1, model.size - sum(size for _, size in small))
    return [(_digest(model.name, "weights"), weights)] + [(_digest(model.name, what), size) for what, size in small]


def pull_progress(model: OllamaModel, cached: bool) -> list[dict[str, Any]]:
    """The progress objects of pulling `model`; blobs already there (`cached`) are
    reported once, complete, as Ollama reports a cache hit."""
    out: list[dict[str, Any]] = [{"status": "pulling manifest"}]
    for digest, total in _blobs(model):
        steps = [total] if cached else [total * i // PROGRESS_STEPS for i in range(PROGRESS_STEPS + 1)]
        for completed in steps:
            # Ollama's ProgressResponse omits a zero `completed` (omitempty).
            out.append({"status": f"pulling {digest[7:19]}", "digest": digest, "total": total}
                       | ({"completed": completed} if completed else {}))
    return out + [{"status": "verifying sha256 digest"}, {"status": "writing manifest"}, {"status": "success"}]


async def _progress(request: web.Request, objects: list[dict[str, Any]], stream: bool | None) -> web.StreamResponse:
    """Stream `objects` as NDJSON, or (stream false) answer with the last one alone."""
    if stream is False:
        return web.json_response(objects[-1])
    response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
    await response.prepare(request)
    for obj in objects:
        await response.write((json.dumps(obj) + "\n").encode())
    await response.write_eof()
    return response


def _install(request: web.Request, model: OllamaModel) -> None:
    state = request.app[SIM_STATE]
    state.catalog = state.catalog.with_ollama(dataclasses.replace(model, modified_at=utc_iso()))


@surface_endpoint("ollama", counted=False)
async def pull(request: web.Request) -> web.StreamResponse:
    """POST /api/pull: the model is "downloaded" and listed from then on."""
    req: PullRequest = await parse_body(request, PullRequest)
    name = valid_name(req.model or req.name)
    known = request.app[SIM_STATE].catalog.ollama_model(name)
    model = known or guessed_ollama_model(name)
    objects = pull_progress(model, cached=known is not None)
    _install(request, model)
    return await _progress(request, objects, req.stream)


@surface_endpoint("ollama", counted=False)
async def create(request: web.Request) -> web.StreamResponse:
    """POST /api/create: a model FROM another (pulled first when missing, as Ollama
    does) with its own system prompt, template, parameters or license."""
    req: CreateRequest = await parse_body(request, CreateRequest)
    name = valid_name(req.model or req.name)
    if not req.from_ and not req.files:
        raise SimError(400, "invalid_request_error", "neither 'from' or 'files' was specified")
    objects: list[dict[str, Any]] = []
    if req.from_:
        base_name = valid_name(req.from_)
        base = request.app[SIM_STATE].catalog.ollama_model(base_name)
        if base is None:
            base = guessed_ollama_model(base_name)
            objects += pull_progress(base, cached=False)[:-1]
            _install(request, base)
    else:
        base = guessed_ollama_model(name)
    objects += [{"status": f"using existing layer {digest}"} for digest, _ in _blobs(base)[:-1]]
    own = {"system": req.system, "template": req.template, "license": json.dumps(req.license) if req.license else None,
           "params": json.dumps(req.parameters, sort_keys=True) if req.parameters else None,
           "messages": json.dumps(req.messages) if req.messages else None}
    objects += [{"status": f"creating new layer {_digest(name, what, value)}"} for what, value in own.items() if value]
    objects += [{"status": "writing manifest"}, {"status": "success"}]
    system = req.system if req.system is not None else base.system
    _install(request, dataclasses.replace(base, name=name, parent=base.name, system=system,
                                          digest=_digest(name, base.name, system or "")[7:]))
    return await _progress(request, objects, req.stream)


@surface_endpoint("ollama", counted=False)
async def copy(request: web.Request) -> web.Response:
    """POST /api/copy: 200 with no body, or 404 when the source is not there."""
    req: CopyRequest = await parse_body(request, CopyRequest)
    if not req.source.strip() or not _NAME.match(ollama_name(req.source)):
        raise SimError(400, "invalid_request_error", f'source "{req.source}" is invalid')
    if not req.destination.strip() or not _NAME.match(ollama_name(req.destination)):
        raise SimError(400, "invalid_request_error", f'destination "{req.destination}" is invalid')
    source = request.app[SIM_STATE].catalog.ollama_model(req.source)
    if source is None:
        raise SimError(404, "not_found_error", f'model "{req.source}" not found')
    _install(request, dataclasses.replace(source, name=ollama_name(req.destination), digest=model_digest(source)))
    return web.Response(status=200)


@surface_endpoint("ollama", counted=False)
async def delete(request: web.Request) -> web.Response:
    """DELETE /api/delete: 200 with no body, or 404 when there is no such model."""
    req: DeleteRequest = await parse_body(request, DeleteRequest)
    raw = req.model or req.name
    name = valid_name(raw)
    state = request.app[SIM_STATE]
    if state.catalog.ollama_model(name) is None:
        raise SimError(404, "not_found_error", f"model '{raw}' not found")
    state.catalog = state.catalog.without_ollama(name)
    state.loaded.touch(name, 0)  # a deleted model is unloaded too
    return web.Response(status=200)
