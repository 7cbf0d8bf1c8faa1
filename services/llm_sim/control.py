"""The fault control endpoints, /sim/faults (contract in services/llm_sim/app.py)."""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Awaitable, Callable

from aiohttp import web
from pydantic import ValidationError

from tron.common.http import AUTH_KEY, parse_empty, token_matches
from tron.common.wire import TOKEN_HEADER
from tron.common import providers
from tron.services.llm_sim.state import PROVIDERS, SIM_STATE, FaultSpec
from tron.services.llm_sim.wire import SimError, describe, read_json

log = logging.getLogger("llm_sim")


def _control_error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


def _authorized(request: web.Request) -> bool:
    token = request.app[SIM_STATE].token
    if token is not None and AUTH_KEY in request.app:  # run by the daemon: a peer token made for it
        return bool(request.app[AUTH_KEY](request))
    return token is None or token_matches(request.headers.get(TOKEN_HEADER), token)


def _control(handler: Callable[[web.Request], Awaitable[web.Response]]):
    """Token check for state-changing control endpoints; nothing changes on 401."""

    @functools.wraps(handler)
    async def endpoint(request: web.Request) -> web.Response:
        if not _authorized(request):
            return _control_error(401, f"missing or invalid {TOKEN_HEADER} header")
        return await handler(request)

    return endpoint


def _path_provider(request: web.Request) -> str:
    """The API whose faults a path names: one of llm-sim's (PROVIDERS), or a registered
    provider kind's, whose ``sim_surface`` says which API stands in for it (a fault put on
    "openai_compatible" is put on the OpenAI API, so "openai" sees it too)."""
    provider = request.match_info["provider"]
    if provider in PROVIDERS:
        return provider
    if provider in providers.names():
        return providers.get(provider).sim_surface
    known = ", ".join(dict.fromkeys((*PROVIDERS, *providers.names())))
    raise web.HTTPNotFound(text=json.dumps({"error": f"unknown provider {provider!r}; expected one of {known}"}),
                           content_type="application/json")


@_control
async def put_fault(request: web.Request) -> web.Response:
    provider = _path_provider(request)
    try:
        fault = FaultSpec.model_validate(await read_json(request))
    except SimError as err:
        return _control_error(err.status, err.message)
    except ValidationError as exc:
        return _control_error(400, f"invalid fault: {describe(exc)}")
    sim = request.app[SIM_STATE]
    pstate = sim.providers[provider]
    pstate.set_fault(fault, sim.clock())
    log.info("fault set: %s %s latency_ms=%d times=%s after=%d duration_ms=%s retry_after_ms=%d", provider,
             fault.kind, fault.latency_ms, fault.times, fault.after, fault.duration_ms, fault.retry_after_ms)
    return web.json_response({"provider": provider, **pstate.snapshot(sim.clock())})


@_control
async def delete_fault(request: web.Request) -> web.Response:
    await parse_empty(request)
    provider = _path_provider(request)
    cleared = request.app[SIM_STATE].providers[provider].clear_fault()
    log.info("fault cleared: %s", provider)
    return web.json_response({"provider": provider, "cleared": cleared})


@_control
async def delete_all_faults(request: web.Request) -> web.Response:
    await parse_empty(request)
    providers = request.app[SIM_STATE].providers
    cleared = [name for name, pstate in providers.items() if pstate.clear_fault()]
    log.info("all faults cleared")
    return web.json_response({"cleared": cleared})


@_control
async def reset_counters(request: web.Request) -> web.Response:
    """POST /sim/counters/reset (or DELETE /sim/counters): every provider's counters to
    zero, faults untouched; the answer holds the counters as they were."""
    await parse_empty(request)
    providers = request.app[SIM_STATE].providers
    before = {name: p.counters.as_dict() for name, p in providers.items()}
    for pstate in providers.values():
        pstate.reset_counters()
    log.info("counters reset")
    return web.json_response({"reset": before})


async def get_faults(request: web.Request) -> web.Response:
    sim = request.app[SIM_STATE]
    now = sim.clock()
    return web.json_response({"providers": {name: p.snapshot(now) for name, p in sim.providers.items()}})
