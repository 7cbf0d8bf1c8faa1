"""The daemon's HTTP API on 127.0.0.1.

Every endpoint but /health, /status and /metrics needs a credential, and each says whose
(``allow``; services/daemon/access.py): the operator's token or a UI session for the
operator verbs, a viewer's for reads, an agent's own credential for its own calls only
(403 naming the missing scope otherwise). Every body and every query is a pydantic model,
so bad input is a 4xx that says what is wrong and changes nothing.

    GET  /health /status /events /metrics
    POST /beat                                        heartbeats (token)
    POST /beats                                       a node agent's batch of beats, a verdict per beat (token)
    GET  /ladder/view                                 what a decider sees before it decides
    POST /control/{restart,escalation,switch,permanent_failure,report_failure}   ladder steps (token)
    POST /handle_grandchild_failure                   an escalation reaching the daemon, the top (token)
    POST /services/{name}/{restart,stop,start}        operator verbs, audited (token)
    POST /control/{drill,shutdown}                    (token)
    POST /runs, /tasks, /tasks/{id}/finish, /tasks/{id}/checkpoint, /runs/{id}/finish   (token)
    GET  /runs/{id} /tasks/{id} /tasks/{id}/checkpoints
    GET  /providers                                   every provider's health (token)
    POST /providers/{acquire,outcome,park}            an agent's calls under the governor (token)
    POST /providers/{name}/{drain,restore}            operator verbs, audited (token)
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import ipaddress
import json
import logging
import os
import shlex
import socket
import time
from typing import Any, Literal

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from tron.common import telemetry
from tron.common import credentials
from tron.common.config import DAEMON
from tron.common.http import AUTH_KEY, TOKEN_KEY, error, parse, parse_empty, parse_query
from tron.common.models import MAX_BATCH_BEATS, MAX_BATCH_BODY, BeatBatch, validation_messages
from tron.common.ladder import Escalated
from tron.common.lanes import every_lane
from tron.common.models import (Beat, CheckpointRecord, DrillMark, Escalation, EscalationRecord, FailureReport, IdStr,
                                LadderQuery, Msg, NameStr, OperatorAction, PermanentFailure, Reason, RestartRequest,
                                ParkRequest, ProviderCall, ProviderOutcome, RunCreate, SwitchRequest, TaskFinish, TaskRecord,
                                UsageReport)
from tron.common.monitor import Verdict
from tron.common.wire import TOKEN_HEADER
from tron.common.settings import field_errors, read_overlay
from tron.common.states import RunState, ServiceState, TaskState
from tron.services.daemon.access import CALLER_KEY, Caller, Kind, Refusal, Scope
from tron.services.daemon import reach
from tron.services.daemon.core import VERDICT_STATUS, Daemon, verdict_message
from tron.services.daemon.operators import SERVICE_VERBS, Refused
from tron.services.daemon.audit import PATH_KEPT, PEER, RECORDED, printable
from tron.services.daemon.peer import unix_user
from tron.services.daemon.providers import ProviderDesk
from tron.services.daemon.spawner import SpawnError
from tron.services.daemon.task_actions import TASK_VERBS
from tron.services.daemon.supervisor import new_id
from tron.services.daemon.ui import setup_ui
from tron.services.daemon.ui.context import UI_KEY
from tron.services.daemon.ui.auth import LOOPBACK_NAMES

log = logging.getLogger("tron.daemon.api")
DAEMON_KEY = web.AppKey("daemon", Daemon)


class EventsQuery(BaseModel):
    model_config = ConfigDict(extra="forbid")
    since: int = Field(0, ge=0, le=2**62)
    limit: int = Field(200, ge=1, le=1000)
    kind: str | None = Field(None, max_length=64, pattern=r"^[a-z_]+$")
    agent: NameStr | None = None


def _d(request: web.Request) -> Daemon:
    return request.app[DAEMON_KEY]


def _service(d: Daemon, name: str):
    svc = d.sup.services.get(name)
    if svc is None:
        raise web.HTTPNotFound(text=json.dumps({"error": f"no service named {name!r}"}), content_type="application/json")
    return svc


def _id(request: web.Request, key: str) -> str:
    """A path segment that must be an id: anything else is a 400, never a lookup."""
    value = request.match_info[key]
    try:
        return _IdCheck(id=value).id
    except ValueError:
        raise web.HTTPBadRequest(text=f'{{"error": "{key} is not a valid id"}}', content_type="application/json")


class _IdCheck(BaseModel):
    id: IdStr


# -- who may call what (services/daemon/access.py) ---------------------------------------------


def allow(*scopes: Scope):
    """Decorator: who may reach an endpoint at all. An operator (token or UI session) may
    reach every one; a viewer the READ ones; an agent the SELF, CHILDREN and RUNS ones,
    whose handlers then check that it speaks for itself (``_own``, ``_parent_of``). 401
    without a credential; 403 naming the scope, counted and audited, for the wrong one."""

    def wrap(handler):
        async def guarded(request: web.Request) -> web.StreamResponse:
            d = _d(request)
            caller = d.access.identify(request)
            if caller is None:
                return error(401, f"missing or wrong {TOKEN_HEADER} header: this endpoint needs a credential "
                                  "(the operator's token, a viewer's for reads, or an agent's own)")
            if not caller.is_operator and not any(_reaches(caller, s) for s in scopes):
                return await _refuse(request, caller, scopes[0],
                                     f"{caller.actor} ({caller.kind}) may not {request.method} {request.path}: "
                                     f"it needs the {scopes[0]} scope")
            # An operator's action (an endpoint only an operator may reach), refused: audited too.
            # Not the agents' protocol an operator's credential may also speak (a beat, a peer token).
            acting = caller.is_operator and request.method != "GET" and scopes == (Scope.OPERATOR,)
            recorded = RECORDED.set(False)
            peer = PEER.set(functools.cache(lambda: unix_user(request)))
            try:
                resp = await handler(request)
            except Refusal as r:
                return await _refuse(request, caller, r.scope, r.why)
            except (web.HTTPBadRequest, web.HTTPUnprocessableEntity, web.HTTPRequestEntityTooLarge) as bad:
                if acting:  # an operator's action refused: audited too
                    await _audit_invalid(request, caller, bad)
                raise
            else:
                # A refusal the handler answered itself (an invalid body, a state that does not
                # allow it, an unknown target), unless it audited it already (Audit.run, ...).
                if acting and isinstance(resp, web.Response) and 400 <= resp.status < 500 and not RECORDED.get():
                    await _audit_invalid(request, caller, resp)
                return resp
            finally:
                RECORDED.reset(recorded)
                PEER.reset(peer)

        guarded.__name__ = handler.__name__
        guarded.__doc__ = handler.__doc__
        return guarded

    return wrap


def _reaches(caller: Caller, scope: Scope) -> bool:
    if scope is Scope.READ:
        return caller.can_read
    if scope is Scope.RELAY:
        return caller.kind is Kind.RELAY
    return scope in (Scope.SELF, Scope.CHILDREN, Scope.RUNS) and caller.kind is Kind.AGENT


async def _refuse(request: web.Request, caller: Caller, scope: Scope, why: str) -> web.Response:
    _d(request).metrics.requests_refused.labels(scope=str(scope)).inc()
    if await _audit_refused(request, caller, f"refused: missing scope {scope}", why,
                            agent=caller.name if caller.kind is Kind.AGENT else None):
        log.warning("refused", extra={"actor": caller.actor, "scope": str(scope),
                                      "path": printable(request.path, PATH_KEPT)})
    return error(403, why, scope=str(scope), verdict="forbidden")


async def _audit_invalid(request: web.Request, caller: Caller, bad: web.HTTPException | web.Response) -> None:
    """An operator's request refused (for its input: 400, 413, 422; for the state or the
    target: 404, 409): an audit row, like any refused action."""
    try:
        why = json.loads(bad.text or "{}").get("error") or bad.reason
    except (ValueError, AttributeError):
        why = bad.text or bad.reason
    await _audit_refused(request, caller, f"refused ({bad.status}): {printable(str(why), 2 * PATH_KEPT)}", "")


async def _audit_refused(request: web.Request, caller: Caller, outcome: str, why: str, **extra) -> bool:
    """A refused request's audit row, within its credential's refusal budget (past it, counted
    and said once, then named by the next audited row's ``unaudited_before``); True if audited.
    The path as sent is the caller's text: escaped and cut, as it is printed."""
    d = _d(request)
    audited, unaudited = d.refusals.admit(caller.actor, time.monotonic())
    if not audited and unaudited == 1:
        log.warning("%s: more than %d refused requests in %.0f s: the rest are counted, not audited one by one",
                    caller.actor, d.refusals.audited, d.refusals.window, extra={"actor": caller.actor})
    if audited:
        await d.audit.record(caller.actor, printable(f"{request.method} {request.path}", PATH_KEPT),
                             printable(request.path, PATH_KEPT), "", "", outcome, printable(why, 2 * PATH_KEPT),
                             **extra, **({"unaudited_before": unaudited} if unaudited else {}))
    return audited


def _caller(request: web.Request) -> Caller:
    return request[CALLER_KEY]


def _own(request: web.Request, service: str, incarnation: str | None) -> Caller:
    """An agent speaks only for its own service and incarnation (an operator for any)."""
    caller = _caller(request)
    if caller.kind is Kind.AGENT and (service != caller.name or incarnation not in (None, caller.incarnation)):
        raise Refusal(Scope.SELF, f"{caller.actor} speaks only for itself, not for {service}/{incarnation}")
    return caller


def _parent_of(request: web.Request, *services: str) -> Caller:
    """A ladder step for descendants: an agent takes it only for its own."""
    caller = _caller(request)
    if caller.kind is Kind.AGENT:
        d = _d(request)
        for name in services:
            if name not in d.config.services or caller.name not in d.config.ancestors(name):
                raise Refusal(Scope.CHILDREN, f"{caller.actor} may act only for its own descendants, "
                                              f"not for {name}")
    return caller


async def _task_of_service(request: web.Request, task_id: str | None, service: str, run_id: str | None = None) -> None:
    """A ladder step an agent takes for a descendant is about that descendant's own task (and
    its run): naming another subtree's task beside one's own child is refused (403). A task
    the registry does not have (a drill's runaway, known only from the beats) harms nobody's
    work: the step goes on, as the carrier decides it. The operator's steps are not limited."""
    caller = _caller(request)
    if caller.kind is not Kind.AGENT or task_id is None:
        return
    task = await _d(request).store.task(task_id)
    if task is None:
        return
    if task["agent"] != service or (run_id is not None and task["run_id"] != run_id):
        raise Refusal(Scope.CHILDREN, f"task {task_id} is {task['agent']}'s (run {task['run_id']}), not "
                                      f"{service}'s{f' in run {run_id}' if run_id else ''}: {caller.actor} acts "
                                      "only on its descendants' own tasks")


async def _decider(request: web.Request, requested_by: str, task_id: str | None, service: str,
                   run_id: str | None = None) -> None:
    """An agent's decision is its own (the record names who decided) about its descendant's task."""
    if _caller(request).kind is Kind.AGENT:
        _own(request, requested_by, None)
    await _task_of_service(request, task_id, service, run_id)


def _gateway(request: web.Request) -> Caller:
    caller = _caller(request)
    if caller.kind is Kind.AGENT and _d(request).config.services[caller.name].role != "gateway":
        raise Refusal(Scope.RUNS, f"{caller.actor} is no gateway: only the gateway role creates and finishes runs")
    return caller


def _reader_of(request: web.Request, task: dict) -> None:
    """A task is read by the operator and viewers, by its own agent and by the one that created it."""
    caller = _caller(request)
    if caller.kind is Kind.AGENT and caller.name not in (task["agent"], task["parent_agent"]):
        raise Refusal(Scope.CHILDREN, f"{caller.actor} reads only its own tasks and those it created, "
                                      f"not {task['task_id']}")



async def health(request: web.Request) -> web.Response:
    """Public: up, for how long, and its home (`tron up` tells its own daemon from another
    home's on the same port by it); the pid to a caller with a credential."""
    d = _d(request)
    answer = {"status": "ok", "role": DAEMON, "home": str(d.home.root),
              "uptime": round(d.clock.now() - d.started_at, 1)}
    if d.access.identify(request) is not None:
        answer["pid"] = os.getpid()
        answer["registry"] = d.registry_health()  # what a CLI reading the file directly must warn of
    return web.json_response(answer)


@allow(Scope.SELF)
async def beat(request: web.Request) -> web.Response:
    d = _d(request)
    b = await parse(request, Beat)
    _own(request, b.service, b.incarnation)
    status, answer = await d.judge_beat(b)
    return web.json_response(answer, status=status)


FORBIDDEN = "forbidden"  # a beat in a batch whose credential may not speak for its agent


async def _read_batch(request: web.Request) -> BeatBatch:
    """The batch's body, read up to MAX_BATCH_BODY (the app's own limit is the single beat's
    size) and validated in one pass over the raw bytes: 413 over a limit, 400 if anything
    in it is malformed (the index of the bad beat named)."""
    too_large = web.HTTPRequestEntityTooLarge
    if request.content_length is not None and request.content_length > MAX_BATCH_BODY:
        raise too_large(max_size=MAX_BATCH_BODY, actual_size=request.content_length, content_type="application/json",
                        text=f'{{"error": "a batch is at most {MAX_BATCH_BODY} bytes"}}')
    chunks, size = [], 0
    async for chunk in request.content.iter_any():
        size += len(chunk)
        if size > MAX_BATCH_BODY:
            raise too_large(max_size=MAX_BATCH_BODY, actual_size=size, content_type="application/json",
                            text=f'{{"error": "a batch is at most {MAX_BATCH_BODY} bytes"}}')
        chunks.append(chunk)
    try:
        batch = BeatBatch.model_validate_json(b"".join(chunks) or b"null")
    except ValidationError as err:
        problems = "; ".join(f"{where or 'body'}: {what}" for where, what in validation_messages(err)[:5])
        raise web.HTTPBadRequest(text=json.dumps({"error": f"malformed batch, nothing taken: {problems}"}),
                                 content_type="application/json") from None
    if len(batch.beats) > MAX_BATCH_BEATS:
        raise too_large(max_size=MAX_BATCH_BEATS, actual_size=len(batch.beats), content_type="application/json",
                        text=f'{{"error": "a batch is at most {MAX_BATCH_BEATS} beats, not {len(batch.beats)}"}}')
    return batch


@allow(Scope.SELF, Scope.RELAY)
async def beats(request: web.Request) -> web.Response:
    """Many agents' beats in one request: a node agent's for the agents it runs (an agent's
    own credential covers itself only). Each beat is judged as ``POST /beat`` judges it;
    the answer says, in order, what became of each (``verdicts``) and, for each one not
    accepted, the status and message the single beat would have had (``refused``)."""
    d = _d(request)
    batch = await _read_batch(request)
    caller = _caller(request)
    speaks_for = d.access.speaks_for(caller)
    allowed = [speaks_for(b.service, b.incarnation) for b in batch.beats]
    judged = iter(await d.on_beats([b for b, ok in zip(batch.beats, allowed) if ok]))
    verdicts = [next(judged) if ok else FORBIDDEN for ok in allowed]
    accepted = Verdict.ACCEPTED
    refused = [{"index": i, "service": b.service, "incarnation": b.incarnation, "verdict": str(v),
                "status": 403 if v == FORBIDDEN else VERDICT_STATUS[v],
                "error": f"{caller.actor} may not speak for {b.service}/{b.incarnation}" if v == FORBIDDEN
                else verdict_message(b, v)}
               for i, (b, v) in enumerate(zip(batch.beats, verdicts)) if v is not accepted]
    outside = [f"{r['service']}/{r['incarnation']}" for r in refused if r["verdict"] == FORBIDDEN]
    if outside:
        d.metrics.requests_refused.labels(scope=str(Scope.RELAY)).inc(len(outside))
        await d.audit.record(caller.actor, f"{request.method} {request.path}", request.path, "", "",
                             f"refused: missing scope {Scope.RELAY}", f"beats for agents it does not run: "
                             f"{', '.join(outside[:20])}" + (f" and {len(outside) - 20} more" if len(outside) > 20
                                                              else ""),
                             agent=caller.name if caller.kind is Kind.AGENT else None)
        log.warning("refused beats in a batch", extra={"actor": caller.actor, "scope": str(Scope.RELAY),
                                                      "count": len(outside)})
    if caller.kind is Kind.RELAY:  # its node's lease runs from here (services/daemon/fencing.py)
        d.access.renewed(caller.name, time.monotonic())
    answer = {"ok": True, "interval": d.policy().heartbeat_interval, "accepted": len(verdicts) - len(refused),
              "verdicts": verdicts, "refused": refused}
    d.metrics.beats_batched.inc(answer["accepted"])
    if d.config.hosts:
        answer["hosts"] = d.config.hosts
    return web.json_response(answer)


async def status(request: web.Request) -> web.Response:
    """Everything to an operator or a viewer; to anyone else what a load balancer needs."""
    d = _d(request)
    caller = d.access.identify(request)
    return web.json_response(d.status() if caller is not None and caller.can_read else d.public_status())


@allow(Scope.READ)
async def events(request: web.Request) -> web.Response:
    q = parse_query(request, EventsQuery)
    return web.json_response(await _d(request).store.events(q.since, q.limit, q.kind, q.agent))


async def metrics(request: web.Request) -> web.Response:
    d = _d(request)
    if not d.config.mesh.metrics_public:
        caller = d.access.identify(request)
        if caller is None:
            return error(401, f"missing or wrong {TOKEN_HEADER} header: metrics_public is false")
        if not caller.can_read:
            return await _refuse(request, caller, Scope.READ, f"{caller.actor} may not read the metrics")
    d.metrics.services_up.set(d.running())
    d.metrics.crash_looping.set(sum(1 for s in d.sup.services.values() if s.crash_looping))
    registry = d.registry_health()
    d.metrics.registry_degraded.set(int(registry["state"] != "ok"))
    d.metrics.registry_pending.set(registry.get("pending", 0))
    return web.Response(body=d.metrics.render(), content_type="text/plain", charset="utf-8")


@allow(Scope.READ, Scope.CHILDREN)
async def ladder_view(request: web.Request) -> web.Response:
    d = _d(request)
    q = parse_query(request, LadderQuery)
    _service(d, q.service)
    if _caller(request).kind is Kind.AGENT:
        _own(request, q.decider, None)
        _parent_of(request, q.service)
    if q.decider != DAEMON:
        _service(d, q.decider)
    view = await d.carrier.view(q.service, decider=q.decider, alert_id=q.alert_id, task_id=q.task_id)
    return web.json_response(view.model_dump(mode="json"))


# -- ladder steps ----------------------------------------------------------------------------


@allow(Scope.CHILDREN)
async def restart(request: web.Request) -> web.Response:
    d = _d(request)
    req = await parse(request, RestartRequest)
    _service(d, req.service)
    _parent_of(request, req.service)
    if _caller(request).kind is Kind.AGENT:
        _own(request, req.requested_by, None)
    await _task_of_service(request, req.task_id, req.service)
    result = await d.carrier.restart(req)
    return web.json_response(result, status={"accepted": 202, "duplicate": 200, "stale": 409}[result["status"]])


@allow(Scope.CHILDREN)
async def escalation(request: web.Request) -> web.Response:
    d = _d(request)
    rec = await parse(request, EscalationRecord)
    _service(d, rec.service)
    _parent_of(request, rec.service)
    if _caller(request).kind is Kind.AGENT:
        _own(request, rec.from_service, None)
    await _task_of_service(request, rec.task_id, rec.service, rec.run_id)
    return web.json_response(await d.carrier.escalation(rec))


@allow(Scope.CHILDREN)
async def switch(request: web.Request) -> web.Response:
    d = _d(request)
    req = await parse(request, SwitchRequest)
    for name in [req.service, *req.services]:
        _service(d, name)
    _parent_of(request, req.service, *req.services)
    await _decider(request, req.requested_by, req.task_id, req.service)
    answer = await d.carrier.switch(req)
    return web.json_response(answer, status=422 if answer["status"] == "refused" else 200)


@allow(Scope.CHILDREN)
async def park(request: web.Request) -> web.Response:
    """The top's Park decision on a held task: the human rung (awaiting_operator)."""
    d = _d(request)
    req = await parse(request, ParkRequest)
    _service(d, req.service)
    _parent_of(request, req.service)
    await _decider(request, req.requested_by, req.task_id, req.service)
    answer = await d.carrier.park(req)
    return web.json_response(answer, status=422 if answer["status"] == "refused" else 200)


@allow(Scope.CHILDREN)
async def permanent_failure(request: web.Request) -> web.Response:
    d = _d(request)
    rec = await parse(request, PermanentFailure)
    _service(d, rec.service)
    _parent_of(request, rec.service)
    await _decider(request, rec.requested_by, rec.task_id, rec.service, rec.run_id)
    answer = await d.carrier.fail(rec)
    return web.json_response(answer, status=422 if answer["status"] == "refused" else 200)


@allow(Scope.CHILDREN)
async def grandchild_failure(request: web.Request) -> web.Response:
    """An escalation whose next ancestor is the daemon: the daemon decides as the top."""
    d = _d(request)
    esc = await parse(request, Escalation)
    _service(d, esc.service)
    _parent_of(request, esc.service)
    await _task_of_service(request, esc.task_id, esc.service)
    event = Escalated(esc.alert_id, esc.service, esc.reason, esc.kind, esc.task_id)
    return web.json_response(await d.carrier.decide_here(event))


@allow(Scope.SELF)
async def report_failure(request: web.Request) -> web.Response:
    """An agent saw a failure TRON cannot (a provider error): it enters the same ladder."""
    d = _d(request)
    rep = await parse(request, FailureReport)
    svc = _service(d, rep.service)
    _own(request, rep.service, rep.incarnation)
    if svc.incarnation != rep.incarnation:
        return error(409, f"incarnation {rep.incarnation} of {rep.service} is not the current one",
                     verdict="stale_incarnation")
    if rep.task_id:
        await _own_task(request, rep.task_id)
    signal = d.monitor.raise_alert(rep.service, rep.incarnation, Reason.PROVIDER_FAILURE, d.clock.now(),
                                   {"error_reason": rep.reason, "retryable": rep.retryable, **rep.detail})
    if signal is None:
        return web.json_response({"status": "already_alerted"})
    if rep.task_id and signal.task_id != rep.task_id:
        signal = dataclasses.replace(signal, task_id=rep.task_id)  # failed before a beat carried the task
    d.background(d.router.on_signal(signal, retryable=rep.retryable), f"report {rep.service}")
    return web.json_response({"status": "alerted"}, status=202)


# -- providers --------------------------------------------------------------------------------


def _current(d: Daemon, name: str, incarnation: str) -> None:
    svc = _service(d, name)
    if svc.incarnation != incarnation:
        raise web.HTTPConflict(text=json.dumps({"error": f"incarnation {incarnation} of {name} is not the current one",
                                                "verdict": "stale_incarnation"}), content_type="application/json")


async def _own_task(request: web.Request, task_id: str) -> dict | None:
    """The task, if it is the calling agent's own (403 when it is another's)."""
    task = await _d(request).store.task(task_id)
    caller = _caller(request)
    if task is not None and caller.kind is Kind.AGENT and task["agent"] != caller.name:
        raise Refusal(Scope.SELF, f"task {task_id} is {task['agent']}'s: {caller.actor} acts only on its own tasks")
    return task


def _provider_call(model, act, what: str, *, needs_task: bool = False):
    """An agent's call to the provider desk (``act``: the ProviderDesk method that answers
    it): the body names the calling incarnation, which must be the current one (409
    otherwise: the agent was replaced and must stop). ``needs_task``: the body must name one."""
    @allow(Scope.SELF)
    async def handler(request: web.Request) -> web.Response:
        d = _d(request)
        body = await parse(request, model)
        _own(request, body.service, body.incarnation)
        _current(d, body.service, body.incarnation)
        if body.task_id:
            await _own_task(request, body.task_id)
        elif needs_task:
            return error(422, "task_id: a parked task is named by its id")
        return web.json_response(await act(d.providers, body))

    handler.__name__ = f"provider_{act.__name__}"
    handler.__doc__ = what
    return handler


@allow(Scope.READ)
async def get_providers(request: web.Request) -> web.Response:
    d = _d(request)
    return web.json_response({"providers": d.providers.status(), "chain": list(d.config.providers.chain),
                              "on_all_down": d.config.providers.on_all_down, "failback": d.failback.state()})


def _provider_action(verb: str):
    @allow(Scope.OPERATOR)
    async def handler(request: web.Request) -> web.Response:
        d = _d(request)
        name = request.match_info["name"]
        if name not in d.providers.board.providers:
            return error(404, f"no provider {name!r} in this mesh ({', '.join(d.providers.board.providers)})")
        body = await _operator_body(request)
        act = d.providers.drain if verb == "drain" else d.providers.restore

        async def run() -> dict:
            return await act(name, actor=_actor(request), reason=body.reason)

        answer = await d.audit.run(run, actor=_actor(request), what=f"provider_{verb}", target=name,
                                   reason=body.reason, request_id=body.request_id,
                                   state=lambda: str(d.providers.board[name].state))
        return web.json_response(answer)

    handler.__name__ = f"provider_{verb}"
    return handler


# -- operators --------------------------------------------------------------------------------


def _actor(request: web.Request) -> str:
    """Who did it, as the credential says: never the body's ``actor``."""
    return _caller(request).actor


async def _operator_body(request: web.Request) -> OperatorAction:
    return await parse(request, OperatorAction) if request.can_read_body else OperatorAction()


def _answer(answer: dict) -> web.Response:
    accepted = answer["status"] in ("restarting", "starting", "retrying", "reopened")
    return web.json_response(answer, status=202 if accepted else 200)


def _operator(verb: str):
    @allow(Scope.OPERATOR)
    async def handler(request: web.Request) -> web.Response:
        d = _d(request)
        name = request.match_info["name"]
        group = name not in d.sup.services and d.replicas.of(name)
        if not group:
            _service(d, name)
        body = await _operator_body(request)
        try:
            if group:  # a replicated service: every replica, a restart rolling (replicas.py)
                answer = await d.replicas.act(verb, name, actor=_actor(request), reason=body.reason,
                                              request_id=body.request_id, force=body.force)
            else:
                answer = await d.operators.act(verb, name, actor=_actor(request), reason=body.reason,
                                               request_id=body.request_id, force=body.force)
        except Refused as err:
            return error(err.status, str(err))
        return _answer(answer)

    handler.__name__ = f"operator_{verb}"
    return handler


def _task_action(verb: str):
    @allow(Scope.OPERATOR)
    async def handler(request: web.Request) -> web.Response:
        d = _d(request)
        task_id = _id(request, "task_id")
        body = await _operator_body(request)
        if verb == "resume" and body.from_step is None:
            return error(422, "from_step: resume needs the step to go on from")
        try:
            answer = await d.tasks.act(verb, task_id, actor=_actor(request), reason=body.reason,
                                       request_id=body.request_id, from_step=body.from_step, provider=body.provider)
        except Refused as err:
            return error(err.status, str(err))
        return _answer(answer)

    handler.__name__ = f"task_{verb}"
    return handler


def _lane_action(verb: str):
    @allow(Scope.OPERATOR)
    async def handler(request: web.Request) -> web.Response:
        d = _d(request)
        body = await _operator_body(request)
        try:
            answer = await d.operators.lane(verb, request.match_info["lane"], actor=_actor(request), reason=body.reason,
                                            request_id=body.request_id)
        except Refused as err:
            return error(err.status, str(err))
        return _answer(answer)

    handler.__name__ = f"lane_{verb}"
    return handler


def _spawning_action(verb: str):
    @allow(Scope.OPERATOR)
    async def handler(request: web.Request) -> web.Response:
        d = _d(request)
        body = await _operator_body(request)
        return _answer(await d.operators.spawning(verb, actor=_actor(request), reason=body.reason,
                                                  request_id=body.request_id))

    handler.__name__ = f"spawning_{verb}"
    return handler


def _node_action(verb: str):
    """A drill's node loss (``lose``) and its end (``restore``), on a Ray cluster."""
    @allow(Scope.OPERATOR)
    async def handler(request: web.Request) -> web.Response:
        d = _d(request)
        body = await _operator_body(request)
        cluster = d.cluster
        if cluster is None:
            return error(409, "not a cluster: [cluster] engine is \"local\", there is one node")
        key = request.match_info["node"]
        node = cluster.find_node(key) if len(key) >= 4 else None
        if node is None:
            return error(404, f"no single Ray node matches {key!r} (give 4 or more characters of its id, or its address)")

        async def action() -> dict:
            if verb == "lose":
                return {"status": "lost", **await cluster.lose(node)}
            await cluster.restore(node)
            return {"status": "restored", "node": node.node_id}

        answer = await d.audit.run(action, actor=_actor(request), what=f"node_{verb}", target=node.node_id,
                                   state=lambda: "cordoned" if node.cordoned else "placing", reason=body.reason,
                                   request_id=body.request_id)
        return web.json_response(answer)

    handler.__name__ = f"node_{verb}"
    return handler


@allow(Scope.READ)
async def get_lanes(request: web.Request) -> web.Response:
    d = _d(request)
    return web.json_response(every_lane(await d.store.lanes(), (svc.spec.role for svc in d.sup.services.values())))


@allow(Scope.READ)
async def get_settings(request: web.Request) -> web.Response:
    d = _d(request)
    return web.json_response({"policy": d.policy().model_dump(), "overlay": str(d.overlay),
                              "overlaid": sorted(read_overlay(d.overlay))})


@allow(Scope.OPERATOR)
async def put_settings(request: web.Request) -> web.Response:
    """Partial policy numbers, validated as a whole by the mesh file's own model; on any
    error nothing is applied and each message is returned next to its field."""
    d = _d(request)
    body = await parse(request, SettingsChange)
    try:
        policy = await d.apply_policy(body.policy, actor=_actor(request))
    except ValidationError as err:
        return error(422, "invalid settings; nothing was changed", fields=field_errors(err))
    except OSError as err:  # the overlay could not be kept (a full disk): not applied either
        return error(507, f"settings not saved to {d.overlay}: {err.strerror or err}; nothing was changed")
    return web.json_response({"policy": policy.model_dump(), "overlay": str(d.overlay)})


class Scale(Msg):
    replicas: int = Field(ge=1, le=64)
    actor: str | None = Field(None, max_length=64)
    reason: str = Field("operator", min_length=1, max_length=256)


@allow(Scope.OPERATOR)
async def scale_service(request: web.Request) -> web.Response:
    """`tron scale NAME N`: the running number of replicas of a replicated service."""
    d = _d(request)
    name = request.match_info["name"]
    body = await parse(request, Scale)
    actor = _actor(request)
    try:
        answer = await d.audit.run(lambda: d.replicas.scale(name, body.replicas, actor=actor), actor=actor,
                                   what="scale", target=name, state=lambda: str(len(d.replicas.of(name))),
                                   reason=body.reason, request_id=None)
    except Refused as err:
        return error(err.status, str(err))
    return web.json_response(answer)


class ReloadQuery(BaseModel):
    model_config = ConfigDict(extra="forbid")
    dry_run: bool = False


@allow(Scope.OPERATOR)
async def reload_mesh(request: web.Request) -> web.Response:
    """`tron reload [--dry-run]`: mesh.toml's difference, applied (audited) or only planned.
    An invalid or unappliable file is a 400 naming every error; nothing changes."""
    from tron.services.daemon.reload import ReloadRefused

    d = _d(request)
    q = parse_query(request, ReloadQuery)
    body = await _operator_body(request)
    try:
        if q.dry_run:
            answer = await d.reload(dry_run=True, actor=_actor(request))
        else:
            answer = await d.reload_audited(actor=_actor(request), reason=body.reason, request_id=body.request_id)
    except ReloadRefused as err:
        return error(err.status, "; ".join(err.errors))
    except Refused as err:
        return error(err.status, str(err))
    return web.json_response(answer)


class SettingsChange(Msg):
    # Any: the Policy model judges each value (strict: "600" is no number, inf is refused),
    # so a lax coercion here cannot let a string or an infinity through.
    policy: dict[str, Any] = Field(min_length=1, max_length=64)  # {}: nothing to set (it wrote an empty overlay)
    actor: str | None = Field(None, max_length=64)


@allow(Scope.OPERATOR)
async def drill(request: web.Request) -> web.Response:
    d = _d(request)
    mark = await parse(request, DrillMark)
    previous = d.store.drill
    if mark.name:
        d.store.drill = mark.name
        await d.store.event("drill_started", {"drill": mark.name})
    else:
        await d.store.event("drill_ended", {"drill": previous})
        d.store.drill = None
    return web.json_response({"drill": d.store.drill, "previous": previous})


@allow(Scope.READ)
async def service_log(request: web.Request) -> web.Response:
    """A chunk of a service's log from a cursor, read on whatever node it runs (reach.py)."""
    d = _d(request)
    name = request.match_info["name"]
    _service(d, name)
    q = parse_query(request, reach.LogQuery)
    try:
        return web.json_response(await reach.service_log(d, name, q))
    except Refused as err:
        return error(err.status, str(err))
    except SpawnError as err:  # its node agent is gone or does not answer: nothing to read now
        return error(503, str(err), service=name)


@allow(Scope.OPERATOR)
async def signal_service(request: web.Request) -> web.Response:
    """A drill's fault (kill, stop, cont) for one incarnation, through its spawner; audited."""
    d = _d(request)
    name = request.match_info["name"]
    svc = _service(d, name)
    body = await parse(request, reach.SignalRequest)
    try:
        answer = await d.audit.run(lambda: reach.signal_service(d, name, body), actor=_actor(request),
                                   what=f"signal_{body.signal}", target=name, state=lambda: str(svc.state),
                                   reason=body.reason, request_id=body.request_id)
    except Refused as err:
        return error(err.status, str(err))
    return web.json_response(answer)


@allow(Scope.READ)
async def service_processes(request: web.Request) -> web.Response:
    """What is left of one incarnation's process tree, read on the node it ran on."""
    d = _d(request)
    name = request.match_info["name"]
    _service(d, name)
    q = parse_query(request, reach.ProcessesQuery)
    try:
        return web.json_response({"service": name, "processes": await reach.leftover_processes(d, name, q)})
    except Refused as err:
        return error(err.status, str(err))


@allow(Scope.OPERATOR)
async def take_backup(request: web.Request) -> web.Response:
    await parse_empty(request)
    answer = await _d(request).backup()
    status = {"taken": 201, "refused": 409}.get(answer["status"], 500)
    return web.json_response(answer, status=status)


@allow(Scope.OPERATOR)
async def shutdown(request: web.Request) -> web.Response:
    d = _d(request)
    await parse_empty(request)
    asyncio.get_running_loop().call_soon(d.request_shutdown)
    return web.json_response({"status": "stopping", "pid": os.getpid()}, status=202)


# -- runs and tasks ---------------------------------------------------------------------------


@allow(Scope.RUNS)
async def create_run(request: web.Request) -> web.Response:
    d = _d(request)
    body = await parse(request, RunCreate)
    _gateway(request)
    run_id = new_id("run-")
    await d.store.create_run(run_id, body.prompt, body.drill)
    if body.budget_usd is not None or body.budget_tokens is not None:
        await d.store.set_run_budget(run_id, body.budget_usd, body.budget_tokens)
    return web.json_response({"run_id": run_id}, status=201)


@allow(Scope.READ, Scope.RUNS)
async def get_run(request: web.Request) -> web.Response:
    d = _d(request)
    run_id = _id(request, "run_id")
    _gateway(request)
    run = await d.store.run(run_id)
    if run is None:
        return error(404, f"no run {run_id!r}")
    # What it waits for, if anything, and what it has spent (a follower shows both).
    run["parked"] = [{"task_id": t["task_id"], "agent": t["agent"], "kind": t["parked_reason"],
                      **d.providers.hint(t["task_id"], t["parked_reason"])}
                     for t in await d.store.tasks_of_run(run_id) if t["status"] == TaskState.PARKED]
    run["spend"] = await d.store.spend(run_id=run_id)
    return web.json_response(run)


@allow(Scope.OPERATOR)
async def run_budget(request: web.Request) -> web.Response:
    """`tron run budget RUN --usd N --tokens N`: a run's budget, raised (or set) by an
    operator, audited; a task parked at it goes on within a moment."""
    d = _d(request)
    run_id = _id(request, "run_id")
    body = await _operator_body(request)
    if body.usd is None and body.tokens is None:
        return error(422, "usd or tokens: name the new budget")
    run = await d.store.run(run_id)
    if run is None:
        return error(404, f"no run {run_id!r}")
    if run["status"] != RunState.RUNNING:  # its tasks are over: a budget would only let leftovers spend
        return error(409, f"run {run_id} is {run['status']}: a budget applies only to a running run "
                          f"(`tron task retry` reopens a failed one)", verdict="run_finished")
    usd = body.usd if body.usd is not None else run.get("budget_usd")
    tokens = body.tokens if body.tokens is not None else run.get("budget_tokens")

    async def act() -> dict:
        await d.store.set_run_budget(run_id, usd, tokens)
        d.providers.wake()
        return {"status": "budget_set", "run_id": run_id, "usd": usd, "tokens": tokens}

    async def state() -> str:
        row = await d.store.run(run_id)
        return f"usd={row.get('budget_usd')} tokens={row.get('budget_tokens')}"

    return web.json_response(await d.audit.run(act, actor=_actor(request), what="run_budget", target=run_id,
                                                reason=body.reason, request_id=body.request_id, state=state))


@allow(Scope.SELF)
async def task_usage(request: web.Request) -> web.Response:
    """A contract agent's LLM call, reported by itself: its tokens get their cost."""
    d = _d(request)
    task_id = _id(request, "task_id")
    rep = await parse(request, UsageReport)
    _own(request, rep.service, rep.incarnation)
    _current(d, rep.service, rep.incarnation)
    task = await d.store.task(task_id)
    if task is None:
        return error(404, f"no task {task_id!r}")
    if task["agent"] != rep.service:
        return error(403, f"task {task_id} is {task['agent']}'s: {rep.service} reports only its own calls")
    row = await d.spend.record(rep, agent=rep.service, incarnation=rep.incarnation, task=task, ok=True, source="agent")
    return web.json_response({"status": "recorded", "cost_usd": row["cost_usd"], "priced": bool(row["priced"])})


@allow(Scope.RUNS)
async def finish_run(request: web.Request) -> web.Response:
    d = _d(request)
    body = await parse(request, TaskFinish)
    _gateway(request)
    run_id = _id(request, "run_id")
    if await d.store.run(run_id) is None:
        return error(404, f"no run {run_id!r}")
    failure = {"reason": body.reason, **body.detail} if body.status == "failed" else None
    return web.json_response({"changed": await d.store.finish_run(run_id, body.status, body.result, failure)})


@allow(Scope.CHILDREN, Scope.RUNS)
async def record_task(request: web.Request) -> web.Response:
    d = _d(request)
    rec = await parse(request, TaskRecord)
    existing = await d.store.task(rec.task_id)
    group = None
    if rec.agent not in d.sup.services and d.replicas.of(rec.agent):  # a replicated agent: one of its replicas
        group = rec.agent
        rec = rec.model_copy(update={"agent": existing["agent"] if existing else await d.replicas.pick(rec.agent)})
    _service(d, rec.agent)
    caller = _caller(request)
    if caller.kind is Kind.AGENT:  # sub-tasks for its own children; a gateway: a run's first task
        _own(request, rec.parent_agent, None)
        spec, me = d.config.services[rec.agent], d.config.services[caller.name]
        if spec.parent != caller.name and not (me.role == "gateway" and spec.parent == DAEMON):
            raise Refusal(Scope.CHILDREN, f"{caller.actor} gives tasks only to its own children, not to {rec.agent}")
    if await d.store.run(rec.run_id) is None:
        return error(404, f"no run {rec.run_id!r}")
    if existing is None:  # a parent re-delegating after its restart finds its task, paused or not
        refusal = await d.breaker.refusal(rec.agent, given_to=group)
        if refusal is not None:
            return error(409, refusal["message"], **{k: v for k, v in refusal.items() if k != "message"})
    if rec.traceparent is None and telemetry.enabled():  # an operator's or a script's task: a trace of its own
        rec = rec.model_copy(update={"traceparent": telemetry.new_root(
            "task", **{"tron.task.id": rec.task_id, "tron.run.id": rec.run_id, "gen_ai.agent.name": rec.agent})})
    row, created = await d.store.upsert_task(rec.model_dump())
    svc = d.sup[rec.agent]
    up = svc.state == ServiceState.RUNNING  # else the daemon hands it the task when it is next healthy
    if created and rec.parent_agent not in d.sup.services and up:
        # An operator's or a script's task: no parent service will push it, so the daemon
        # does (an agent that is down gets it when it is next healthy; a command claims it).
        d.background(d.ledger.dispatch(svc, row, resumed=False), f"dispatch {rec.task_id}")
    # Where the agent that has it listens (a parent posts it there): one of a replicated
    # service's replicas may be newer than the parent's copy of the mesh file. ``dispatch``:
    # whether the parent should post it there now. Not while the agent is down or coming up:
    # the daemon hands its open tasks to the incarnation that comes up (Ledger.redispatch),
    # and a parent's post, queued on the held socket meanwhile, reached that incarnation as a
    # second copy of the task, with the attempt before the restart's: started, then cancelled
    # by the daemon's (an LLM call paid for nothing) or the other way round.
    return web.json_response({"task": row, "created": created, "url": d.config.url(rec.agent),
                              "dispatch": up},
                             status=201 if created else 200)


class Claim(Msg):
    service: NameStr
    incarnation: IdStr


class ClaimQuery(BaseModel):
    model_config = ConfigDict(extra="forbid")
    format: Literal["json", "shell"] = "json"


@allow(Scope.SELF)
async def claim_task(request: web.Request) -> web.Response:
    """The agent contract's pull side (an agent that serves no HTTP, in any language):
    the next task of this incarnation, leased to it, with its last checkpoint; 204 when
    there is none. ``format=shell``: KEY=value lines a shell can eval."""
    d = _d(request)
    q = parse_query(request, ClaimQuery)
    body = await parse(request, Claim)
    svc = _service(d, body.service)
    _own(request, body.service, body.incarnation)
    if svc.incarnation != body.incarnation:
        return error(409, f"incarnation {body.incarnation} of {body.service} is not the current one",
                     verdict="stale_incarnation")
    tasks = [t for t in await d.store.open_tasks(svc.name)
             if t["status"] == TaskState.ASSIGNED or t["lease_incarnation"] == body.incarnation]
    if not tasks or svc.switched_away:  # the replacement, on the new provider, takes it
        return web.Response(status=204)
    task = tasks[0]
    await d.store.task_progress(task["task_id"], body.incarnation, None)
    assign = await d.ledger.assignment(task, svc.provider)
    # The id this attempt's span is to have (common/telemetry.py): the daemon's ladder spans hang under it.
    span_id = telemetry.attempt_span_hex(assign.traceparent, assign.task_id, assign.attempt)
    if q.format == "json":
        return web.json_response({**assign.model_dump(mode="json"), "span_id": span_id})
    done = assign.checkpoint or {}
    fields = {"TASK_ID": assign.task_id, "RUN_ID": assign.run_id, "KIND": assign.kind, "PROMPT": assign.prompt,
              "ATTEMPT": assign.attempt, "PROVIDER": assign.provider or "", "DONE_STEP": done.get("step", 0),
              "DONE_OUTPUT": done.get("output", ""), "TRACEPARENT": assign.traceparent or "", "SPAN_ID": span_id or ""}
    return web.Response(text="".join(f"{k}={shlex.quote(str(v))}\n" for k, v in fields.items()),
                        content_type="text/plain")


@allow(Scope.READ, Scope.CHILDREN)
async def get_task(request: web.Request) -> web.Response:
    d = _d(request)
    task_id = _id(request, "task_id")
    row = await d.store.task(task_id)
    if row is None:
        return error(404, f"no task {task_id!r}")
    _reader_of(request, row)
    row["ladder"] = await d.store.task_counts(task_id)
    return web.json_response(row)


@allow(Scope.SELF)
async def finish_task(request: web.Request) -> web.Response:
    d = _d(request)
    body = await parse(request, TaskFinish)
    task_id = _id(request, "task_id")
    task = await _own_task(request, task_id)
    if task is None:
        return error(404, f"no task {task_id!r}")
    caller = _caller(request)
    if caller.kind is Kind.AGENT:
        _own(request, caller.name, body.incarnation)
        body = body.model_copy(update={"incarnation": caller.incarnation})
    if body.attempt is not None and body.attempt != task["attempt"]:
        # An earlier attempt's late word (an operator retried the task meanwhile): not this one's end.
        return error(409, f"task {task_id} is on attempt {task['attempt']}, not {body.attempt}",
                     verdict="stale_attempt")
    changed = await d.ledger.finish_task(task_id, TaskState(body.status), body.result, body.reason, body.detail,
                                         body.incarnation)
    return web.json_response({"changed": changed})


@allow(Scope.SELF)
async def checkpoint(request: web.Request) -> web.Response:
    d = _d(request)
    body = await parse(request, CheckpointRecord)
    task_id = _id(request, "task_id")
    task = await _own_task(request, task_id)
    if task is None:
        return error(404, f"no task {task_id!r}")
    caller = _caller(request)
    if caller.kind is Kind.AGENT:
        _own(request, caller.name, body.incarnation)
        body = body.model_copy(update={"incarnation": caller.incarnation})
    if task["status"] not in (TaskState.ASSIGNED, TaskState.RUNNING):
        return error(409, f"task {task_id} is {task['status']}: only a live task records checkpoints")
    try:
        row, created = await d.store.add_checkpoint(task_id, body.step, body.step_id, body.output, body.incarnation)
    except ValueError as err:
        return error(413, str(err))
    svc = d.sup.services.get(task["agent"])
    if created and svc is not None and svc.spec.restart_above_memory and body.incarnation:
        await d.recycle_at_checkpoint(svc, body.incarnation, task_id, body.step)
    return web.json_response({"checkpoint": {k: row[k] for k in ("step", "step_id", "hash")}, "created": created},
                             status=201 if created else 200)


@allow(Scope.READ, Scope.SELF)
async def get_checkpoints(request: web.Request) -> web.Response:
    d = _d(request)
    task_id = _id(request, "task_id")
    if await _own_task(request, task_id) is None:
        return error(404, f"no task {task_id!r}")
    return web.json_response(await d.store.checkpoints(task_id))


# -- notifications ----------------------------------------------------------------------------


class NotifyTest(Msg):
    entry: int | None = Field(None, ge=0, le=10_000)  # one [[notify]] entry (its index), else every one
    reason: str = Field("notify test", min_length=1, max_length=256)
    actor: str | None = Field(None, max_length=64)
    request_id: IdStr | None = None


@allow(Scope.OPERATOR)
async def notify_test(request: web.Request) -> web.Response:
    """A ``test`` notification through the same path as the real ones (the registry, the
    notifier's queue, the signature); audited. 202: queued, the delivery is in `tron notify log`."""
    d = _d(request)
    body = await parse(request, NotifyTest) if request.can_read_body else NotifyTest()
    entries = d.notifier.entry_indexes() if d.notifier is not None else []
    if not entries:
        return error(409, "the mesh file has no [[notify]] entry: nothing to test")
    if body.entry is not None and body.entry not in entries:
        return error(404, f"no [[notify]] entry {body.entry} (the mesh file has {len(entries)}: "
                          f"0 to {len(entries) - 1})")
    actor = _actor(request)

    async def run() -> dict:
        await d.store.event("notify_test", {"entry": body.entry, "by": actor, "reason": body.reason})
        return {"status": "queued", "entries": entries if body.entry is None else [body.entry]}

    answer = await d.audit.run(run, actor=actor, what="notify_test",
                               target="notify" + ("" if body.entry is None else f" {body.entry}"),
                               state=lambda: "", reason=body.reason, request_id=body.request_id)
    return web.json_response(answer, status=202)


# -- credentials --------------------------------------------------------------------------------


class PeerRequest(Msg):
    to: NameStr


@allow(Scope.CHILDREN)
async def peer_token(request: web.Request) -> web.Response:
    """A token to call one of our services' endpoints with: for the operator any service,
    for an agent the services it works with (its parent, its children; a gateway the
    top-level ones). Good only at that service, for a few minutes."""
    d = _d(request)
    body = await parse(request, PeerRequest)
    _service(d, body.to)
    caller = _caller(request)
    if caller.kind is Kind.AGENT and not d.access.may_call(caller.name, body.to):
        raise Refusal(Scope.CHILDREN, f"{caller.actor} does not call {body.to}: only its parent and children")
    name = caller.name if caller.kind is Kind.AGENT else f"{caller.kind}:{caller.name}"
    token = d.access.peer_token(name, body.to)
    if token is None:
        return error(409, f"{body.to} has no running incarnation to call", verdict="not_running")
    return web.json_response({"token": token, "to": body.to, "expires": credentials.peer_expires(token)})


class TokenCreate(Msg):
    name: NameStr
    viewer: bool = False


@allow(Scope.OPERATOR)
async def list_tokens(request: web.Request) -> web.Response:
    return web.json_response({"tokens": _d(request).access.listing()})


@allow(Scope.OPERATOR)
async def create_token(request: web.Request) -> web.Response:
    """`tron token create NAME [--viewer]`: the token is shown once; the daemon keeps its hash."""
    d = _d(request)
    body = await parse(request, TokenCreate)
    try:
        token = d.access.create(body.name, viewer=body.viewer)
    except ValueError as err:
        return error(422, str(err))
    except KeyError as err:
        return error(409, err.args[0])
    role = "viewer" if body.viewer else "operator"
    await d.audit.record(_actor(request), "token_create", body.name, "", role, "created", "")
    return web.json_response({"name": body.name, "role": role, "token": token}, status=201)


@allow(Scope.OPERATOR)
async def revoke_token(request: web.Request) -> web.Response:
    """`tron token revoke NAME`: refused from the next request on, no restart needed."""
    d = _d(request)
    name = request.match_info["name"]
    await parse_empty(request)
    try:
        d.access.revoke(name)
    except KeyError as err:
        return error(404, err.args[0])
    ui = request.app.get(UI_KEY)
    ended = ui.sessions.end_minted_by(name) if ui is not None else 0  # its web UI sessions die with it
    await d.audit.record(_actor(request), "token_revoke", name, "", "", "revoked", "", sessions_ended=ended)
    return web.json_response({"name": name, "status": "revoked", "sessions_ended": ended})


@functools.cache
def _machine_names() -> frozenset[str]:
    return frozenset({*LOOPBACK_NAMES, socket.gethostname().lower(), socket.getfqdn().lower()})


def _own_names(d: Daemon) -> set[str]:
    """The host names this daemon answers to: loopback's, this machine's, and the mesh's
    (mesh.bind, mesh.advertise, where services on other machines run): read afresh, since
    a reload may change them."""
    mesh = d.config.mesh
    return {*_machine_names(), *(n.lower() for n in (mesh.bind, mesh.advertise, *d.config.hosts.values()) if n)}


@web.middleware
async def host_guard(request: web.Request, handler) -> web.StreamResponse:
    """A request naming a host this daemon does not know is refused before anything reads
    it: a web page whose name was pointed at 127.0.0.1 (DNS rebinding) would otherwise read
    the public endpoints (/status, /health, /metrics) from the user's browser. An address
    (no name to rebind) and the daemon's own names pass; tokens guard everything else."""
    host = (request.url.host or "").strip("[]").lower()
    if host and host not in LOOPBACK_NAMES:  # the common case decided before any name is looked up
        try:
            ipaddress.ip_address(host)
        except ValueError:
            if host not in (names := _own_names(_d(request))):
                return error(403, f"this daemon answers to its own names ({', '.join(sorted(names))}) or an "
                                  f"address, not {host!r}: a page that pointed another name at it is refused")
    return await handler(request)


def make_app(daemon: Daemon) -> web.Application:
    app = web.Application(client_max_size=256 * 1024, middlewares=[host_guard])
    app[DAEMON_KEY] = daemon
    app[TOKEN_KEY] = daemon.token
    # require_token (the UI's login code, its pages' API): an operator, by token or session
    app[AUTH_KEY] = lambda request: (c := daemon.access.identify(request)) is not None and c.is_operator
    r = app.router
    r.add_get("/health", health)
    r.add_get("/status", status)
    r.add_get("/events", events)
    r.add_get("/metrics", metrics)
    r.add_post("/beat", beat)
    r.add_post("/beats", beats)
    r.add_get("/ladder/view", ladder_view)
    r.add_post("/control/restart", restart)
    r.add_post("/control/escalation", escalation)
    r.add_post("/control/switch", switch)
    r.add_post("/control/permanent_failure", permanent_failure)
    r.add_post("/control/park", park)
    r.add_post("/control/report_failure", report_failure)
    r.add_post("/control/drill", drill)
    r.add_post("/control/shutdown", shutdown)
    r.add_post("/control/backup", take_backup)
    r.add_post("/handle_grandchild_failure", grandchild_failure)
    for verb in SERVICE_VERBS:
        r.add_post(f"/services/{{name}}/{verb}", _operator(verb))
    for verb in TASK_VERBS:
        r.add_post(f"/tasks/{{task_id}}/{verb.replace('_', '-')}", _task_action(verb))
    r.add_get("/lanes", get_lanes)
    r.add_get("/providers", get_providers)
    r.add_post("/providers/acquire", _provider_call(
        ProviderCall, ProviderDesk.acquire,
        "Before a call to a provider: go, wait, or the ladder's decision when it is open."))
    r.add_post("/providers/outcome", _provider_call(
        ProviderOutcome, ProviderDesk.outcome,
        "After a call: ok, or a classified failure, answered with the ladder's decision."))
    r.add_post("/providers/park", _provider_call(
        ProviderCall, ProviderDesk.park, "A parked task's agent waits here (long poll) for a provider to come back.",
        needs_task=True))
    for verb in ("drain", "restore"):
        r.add_post(f"/providers/{{name}}/{verb}", _provider_action(verb))
    for verb in ("lose", "restore"):
        r.add_post(f"/nodes/{{node}}/{verb}", _node_action(verb))
    for verb in ("pause", "resume"):
        r.add_post(f"/lanes/{{lane}}/{verb}", _lane_action(verb))
        r.add_post(f"/spawning/{verb}", _spawning_action(verb))
    r.add_get("/settings", get_settings)
    r.add_put("/settings", put_settings)
    r.add_post("/reload", reload_mesh)
    r.add_post("/services/{name}/scale", scale_service)
    r.add_get("/services/{name}/log", service_log)
    r.add_post("/services/{name}/signal", signal_service)
    r.add_get("/services/{name}/processes", service_processes)
    r.add_post("/runs", create_run)
    r.add_get("/runs/{run_id}", get_run)
    r.add_post("/runs/{run_id}/finish", finish_run)
    r.add_post("/runs/{run_id}/budget", run_budget)
    r.add_post("/tasks", record_task)
    r.add_post("/tasks/claim", claim_task)
    r.add_get("/tasks/{task_id}", get_task)
    r.add_post("/tasks/{task_id}/finish", finish_task)
    r.add_post("/tasks/{task_id}/checkpoint", checkpoint)
    r.add_post("/tasks/{task_id}/usage", task_usage)
    r.add_get("/tasks/{task_id}/checkpoints", get_checkpoints)
    r.add_post("/notify/test", notify_test)
    r.add_post("/auth/peer", peer_token)
    r.add_get("/tokens", list_tokens)
    r.add_post("/tokens", create_token)
    r.add_post("/tokens/{name}/revoke", revoke_token)
    setup_ui(app, daemon)
    return app
