"""The daemon's HTTP API on 127.0.0.1: beats, status, process control, events, metrics.

Everything that changes state needs the mesh token; every body is a pydantic model.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import time

from aiohttp import web

from common import logs
from common.config import DAEMON
from common.http import TOKEN_KEY, error, parse, require_token
from common.models import DrillMark, Respawn, FailureReport, PermanentFailure, Reason, Beat, Escalation, EscalationRecord, RestartRequest, RunCreate, TaskFinish, TaskRecord
from common.monitor import Verdict
from services.daemon.core import Daemon, new_id
from services.daemon.states import State

DAEMON_KEY = web.AppKey("daemon", Daemon)

_VERDICT_STATUS = {Verdict.UNKNOWN: 404, Verdict.STALE: 409, Verdict.DUPLICATE: 409}


def _daemon(request: web.Request) -> Daemon:
    return request.app[DAEMON_KEY]


def _service(d: Daemon, name: str):
    st = d.services.get(name)
    if st is None:
        raise web.HTTPNotFound(text=f'{{"error": "no service named {name!r}"}}', content_type="application/json")
    return st


async def health(request: web.Request) -> web.Response:
    d = _daemon(request)
    return web.json_response({"status": "ok", "role": DAEMON, "pid": os.getpid(),
                              "uptime": round(time.monotonic() - d.started_mono, 1)})


@require_token
async def beat(request: web.Request) -> web.Response:
    d = _daemon(request)
    b = await parse(request, Beat)
    verdict = await d.on_beat(b)
    if verdict is Verdict.ACCEPTED:
        return web.json_response({"ok": True})
    messages = {
        Verdict.UNKNOWN: f"no service named {b.service!r} is watched",
        Verdict.STALE: f"incarnation {b.incarnation} of {b.service} is not the current one",
        Verdict.DUPLICATE: f"sequence number {b.seq} was already received",
    }
    return error(_VERDICT_STATUS[verdict], messages[verdict], verdict=str(verdict))


async def status(request: web.Request) -> web.Response:
    return web.json_response(_daemon(request).status())


async def events(request: web.Request) -> web.Response:
    d = _daemon(request)
    try:
        since = int(request.query.get("since", "0"))
        limit = min(int(request.query.get("limit", "200")), 1000)
    except ValueError:
        return error(400, "since and limit must be integers")
    return web.json_response(await d.registry.events(since, limit, request.query.get("kind")))


async def metrics(request: web.Request) -> web.Response:
    d = _daemon(request)
    d.metrics.services_up.set(sum(1 for s in d.services.values() if s.state == State.RUNNING))
    return web.Response(body=d.metrics.render(), content_type="text/plain", charset="utf-8")


async def ladder(request: web.Request) -> web.Response:
    d = _daemon(request)
    _service(d, request.match_info["name"])
    return web.json_response(await d.ladder(request.match_info["name"], request.query.get("task_id")))


@require_token
async def restart(request: web.Request) -> web.Response:
    d = _daemon(request)
    req = await parse(request, RestartRequest)
    _service(d, req.service)
    result = await d.restart(req)
    code = {"accepted": 202, "duplicate": 200, "stale": 409}[result["status"]]
    return web.json_response(result, status=code)


@require_token
async def escalation(request: web.Request) -> web.Response:
    d = _daemon(request)
    rec = await parse(request, EscalationRecord)
    st = _service(d, rec.service)
    esc = Escalation(alert_id=rec.alert_id, service=rec.service, incarnation=st.incarnation or "none",
                     reason=rec.reason, detail=rec.detail, task_id=rec.task_id, run_id=rec.run_id,
                     provider=st.provider, restarts=rec.restarts, path=[rec.from_service, rec.to_service],
                     decided_by=rec.decided_by)
    if "incarnation" in rec.detail and isinstance(rec.detail["incarnation"], str):
        esc.incarnation = rec.detail["incarnation"]
    return web.json_response(await d.give_up(esc, by=rec.from_service, to=rec.to_service))


@require_token
async def create_run(request: web.Request) -> web.Response:
    d = _daemon(request)
    body = await parse(request, RunCreate)
    run_id = new_id("run-")
    await d.registry.create_run(run_id, body.prompt, body.drill)
    return web.json_response({"run_id": run_id}, status=201)


async def get_run(request: web.Request) -> web.Response:
    d = _daemon(request)
    run = await d.registry.run(request.match_info["run_id"])
    if run is None:
        return error(404, f"no run {request.match_info['run_id']!r}")
    return web.json_response(run)


@require_token
async def finish_run(request: web.Request) -> web.Response:
    d = _daemon(request)
    body = await parse(request, TaskFinish)
    run_id = request.match_info["run_id"]
    if await d.registry.run(run_id) is None:
        return error(404, f"no run {run_id!r}")
    failure = {"reason": body.reason, **body.detail} if body.status == "failed" else None
    return web.json_response({"changed": await d.finish_run(run_id, body.status, body.result, failure)})


@require_token
async def record_task(request: web.Request) -> web.Response:
    d = _daemon(request)
    rec = await parse(request, TaskRecord)
    _service(d, rec.agent)
    if await d.registry.run(rec.run_id) is None:
        return error(404, f"no run {rec.run_id!r}")
    row, created = await d.registry.upsert_task(rec.model_dump())
    logs.comms("task_assigned", src=rec.parent_agent, dst=rec.agent, task=rec.task_id, run=rec.run_id)
    return web.json_response({"task": row, "created": created}, status=201 if created else 200)


async def get_task(request: web.Request) -> web.Response:
    d = _daemon(request)
    row = await d.registry.task(request.match_info["task_id"])
    if row is None:
        return error(404, f"no task {request.match_info['task_id']!r}")
    row["ladder"] = await d.registry.task_ladder(row["task_id"])
    return web.json_response(row)


@require_token
async def finish_task(request: web.Request) -> web.Response:
    d = _daemon(request)
    body = await parse(request, TaskFinish)
    task_id = request.match_info["task_id"]
    if await d.registry.task(task_id) is None:
        return error(404, f"no task {task_id!r}")
    changed = await d.finish_task(task_id, body.status, body.result, body.reason, body.detail, body.incarnation)
    return web.json_response({"changed": changed})


@require_token
async def report_failure(request: web.Request) -> web.Response:
    """An agent saw a failure TRON cannot (a provider error): it enters the same ladder."""
    d = _daemon(request)
    rep = await parse(request, FailureReport)
    st = _service(d, rep.service)
    if st.incarnation != rep.incarnation:
        return error(409, f"incarnation {rep.incarnation} of {rep.service} is not the current one")
    signal = d.monitor.raise_alert(rep.service, rep.incarnation, Reason.PROVIDER_FAILURE, time.monotonic(),
                                   {"error_reason": rep.reason, **rep.detail})
    if signal is None:
        return web.json_response({"status": "already_alerted"})
    if rep.task_id and signal.task_id != rep.task_id:
        signal = dataclasses.replace(signal, task_id=rep.task_id)  # failed before a beat carried the task
    d._spawn_bg(d.on_signal(signal, retryable=rep.retryable), f"report {rep.service}")
    return web.json_response({"status": "alerted"}, status=202)


@require_token
async def permanent_failure(request: web.Request) -> web.Response:
    d = _daemon(request)
    rec = await parse(request, PermanentFailure)
    _service(d, rec.service)
    return web.json_response(await d.permanent_failure(rec))


@require_token
async def drill(request: web.Request) -> web.Response:
    d = _daemon(request)
    mark = await parse(request, DrillMark)
    previous = d.registry.drill
    if mark.name:
        d.registry.drill = mark.name
        await d.registry.event("drill_started", {"drill": mark.name})
    else:
        await d.registry.event("drill_ended", {"drill": previous})
        d.registry.drill = None
    return web.json_response({"drill": d.registry.drill, "previous": previous})


@require_token
async def respawn(request: web.Request) -> web.Response:
    d = _daemon(request)
    body = await parse(request, Respawn)
    _service(d, body.service)
    answer = await d.respawn(body.service, body.reason)
    return web.json_response(answer, status=202 if answer["status"] == "starting" else 200)


@require_token
async def shutdown(request: web.Request) -> web.Response:
    d = _daemon(request)
    asyncio.get_running_loop().call_soon(d.request_shutdown)
    return web.json_response({"status": "stopping"}, status=202)


def make_app(daemon: Daemon) -> web.Application:
    app = web.Application(client_max_size=256 * 1024)
    app[DAEMON_KEY] = daemon
    app[TOKEN_KEY] = daemon.token
    app.router.add_get("/health", health)
    app.router.add_get("/status", status)
    app.router.add_get("/events", events)
    app.router.add_get("/metrics", metrics)
    app.router.add_post("/beat", beat)
    app.router.add_get("/agents/{name}/ladder", ladder)
    app.router.add_post("/control/restart", restart)
    app.router.add_post("/control/escalation", escalation)
    app.router.add_post("/control/shutdown", shutdown)
    app.router.add_post("/control/report_failure", report_failure)
    app.router.add_post("/control/permanent_failure", permanent_failure)
    app.router.add_post("/control/drill", drill)
    app.router.add_post("/control/respawn", respawn)
    app.router.add_post("/runs", create_run)
    app.router.add_get("/runs/{run_id}", get_run)
    app.router.add_post("/runs/{run_id}/finish", finish_run)
    app.router.add_post("/tasks", record_task)
    app.router.add_get("/tasks/{task_id}", get_task)
    app.router.add_post("/tasks/{task_id}/finish", finish_task)
    return app
