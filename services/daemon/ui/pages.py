"""The web UI's HTTP handlers: login, pages, fragments, the event stream and its stats.

    POST /ui/login-code            mesh token: a one-time login code and its URL (`tron ui`)
    GET  /ui/login?code=...        spends the code, sets the session cookie, goes to /ui/
    POST /ui/logout                (CSRF)
    GET  /ui/                      the mesh: the service tree, live
    GET  /ui/panels                the mesh page's lanes and spawning panels (refetched after its actions)
    GET  /ui/services/{name}       a service: its row, its log (live), ladder history, task
    GET  /ui/services/{name}/ladder   the service page's history part (refetched live)
    GET  /ui/runs, /ui/runs/{id}, /ui/tasks/{id}
    GET  /ui/runs/{id}/spend       the run page's spend and budget (refetched after an action,
                                   and while the run runs)
    GET  /ui/tasks/{id}/state?was=STATUS   the task page's summary (refetched after an action,
                                   and while the task or its run is live; says when it moved)
    GET  /ui/tasks/{id}/actions    the task page's buttons (refetched when the status moved)
    GET  /ui/tasks/{id}/calls      the task page's LLM calls (refetched while the task is live)
    GET  /ui/charts, /ui/charts/data
    GET  /ui/settings, /ui/settings/form
    GET  /ui/events?topics=...     server-sent events (mesh, beats, svc:NAME, log:NAME; alert always)
    GET  /ui/stats                 open event streams and sessions (session or mesh token)
    GET  /ui/static/...            the UI's own files (no session needed: nothing in them is secret)

Actions are not here: the buttons call the daemon's API (see actions.py).
"""

from __future__ import annotations

import getpass
import logging
import math
import os
import re
import time
from pathlib import Path

from aiohttp import web
from pydantic import Field

from tron.common.config import ConfigError
from tron.common.telemetry import trace_link
from tron.common.http import TOKEN_KEY, error, parse, token_matches
from tron.common.models import Msg, OneLine
from tron.common.wire import TOKEN_HEADER
from tron.common.redaction import REDACTED
from tron.common.states import RunState, TaskState
from tron.common.settings import read_overlay
from tron.services.daemon.access import OPERATOR, Kind
from tron.services.daemon.peer import unix_user
from tron.services.daemon.ui import sse
from tron.services.daemon.ui.auth import REFUSAL_WINDOW, REFUSALS_AUDITED, Session, local_problem
from tron.services.daemon.ui.context import UI_KEY, Ui, guarded, page_context
from tron.services.daemon.ui.settings_form import form_groups
from tron.services.daemon.ui.views import (chart_data, run_budget, spend_by_task, spend_chart, spend_totals,
                                     suggest_usd, task_moving, tree)

log = logging.getLogger("tron.daemon.ui")

STATIC = Path(__file__).parent / "static"
_CODE = re.compile(r"^[A-Za-z0-9_-]{16,64}$")
# Why a login code was refused (auth.Sessions.refusal), as its audit row says it.
LOGIN_REFUSED = {"used": "the login code was already used", "expired": "the login code expired",
                 "superseded": "the login code was dropped for newer ones", "unknown": "no such login code",
                 "revoked": "the token that asked for the login code was revoked"}
_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
_ID = re.compile(r"^[A-Za-z0-9_.:-]{1,128}$")
RUNS_SHOWN = 100
HISTORY_SHOWN = 50
RECENT_SHOWN = 20
# LLM calls read for one page. A run's page groups its calls by task in Python (one read,
# not one per task); past this many, the totals come from the store's sums instead.
RUN_CALLS_READ = 5000
TASK_CALLS_SHOWN = 200
CHART_CALLS_READ = 20_000  # the spend chart's last 24 h
HOUR = 3600.0
DAY = 86400.0


# -- login --------------------------------------------------------------------------------------


class LoginCodeRequest(Msg):
    actor: OneLine | None = Field(None, max_length=64)
    viewer: bool = False  # a read-only session, even for the operator


async def login_code(request: web.Request) -> web.Response:
    """A one-time login code for `tron ui`; the URL it prints carries it. With the operator's
    token a session that may act; with a viewer's (or ``viewer``) one that only reads."""
    ui = request.app[UI_KEY]
    caller = ui.daemon.access.identify(request)
    if caller is None or caller.session:
        return error(401, f"missing or wrong {TOKEN_HEADER} header: a login code needs the operator's or a "
                          "viewer's token")
    if not caller.can_read:
        return error(403, f"{caller.actor} may not open web UI sessions: it needs the read scope", scope="read")
    problem = local_problem(request)
    if problem:
        return error(403, problem)
    body = await parse(request, LoginCodeRequest) if request.can_read_body else LoginCodeRequest()
    viewer = body.viewer or not caller.is_operator
    # The session acts as the credential that opened it: a named token's is recorded as that
    # token, whatever the body says; the mesh's own token (its owner, `tron ui`) may name the
    # person at the keyboard. Revoking the token ends the session (Sessions.end_minted_by).
    actor = (body.actor or f"{getpass.getuser()}@ui") if caller.kind is Kind.OPERATOR and caller.name == OPERATOR \
        else f"{caller.actor}@ui"
    code = ui.sessions.mint_code(actor, viewer=viewer, minted_by=caller.name)
    port = ui.daemon.config.mesh.daemon_port
    return web.json_response({"code": code, "url": f"http://127.0.0.1:{port}/ui/login?code={code}",
                              "expires_in": ui.sessions.code_ttl}, status=201)


async def login(request: web.Request) -> web.StreamResponse:
    ui = request.app[UI_KEY]
    problem = local_problem(request)
    if problem:
        return error(403, problem)
    code = request.query.get("code")
    if not code:
        return ui.templates.response("login.html", problem=None)
    session = ui.sessions.redeem(code) if _CODE.match(code) else None
    if session is None:
        why, minted_for = ui.sessions.refusal(code) if _CODE.match(code) else ("unknown", None)
        wait, unaudited = ui.sessions.refused()
        if wait > 0:  # past REFUSALS_AUDITED in the window: counted, and said with the next audited one
            if unaudited == 1:
                log.warning("ui: more than %d refused logins in %.0f s: the rest are answered 429 and counted",
                            REFUSALS_AUDITED, REFUSAL_WINDOW)
            seconds = math.ceil(wait)  # >= 1: the wait is > 0
            resp = error(429, f"too many refused logins: wait {seconds} s, or use a new login link "
                              "from `tron ui` (a good code still logs in)", retry_after=seconds)
            resp.headers["Retry-After"] = str(seconds)
            return resp
        # Audited as every refused action is, but never with the code: a wrong code may be a
        # mistyped good one, and a used one must not be handed to whoever reads the trail.
        await ui.daemon.store.event("audit", {"who": "anonymous@ui", "what": "ui_login", "target": "ui",
                                              "before": "", "after": "", "outcome": f"refused: {LOGIN_REFUSED[why]}",
                                              "reason": why, "code": REDACTED, "code_minted_for": minted_for,
                                              "peer": request.remote, "unaudited_before": unaudited,
                                              **_peer_user(request)})
        log.warning("ui: a login was refused: %s", LOGIN_REFUSED[why],
                    extra={"actor": minted_for or "", "outcome": f"refused: {why}", "unaudited_before": unaudited})
        return ui.templates.response("login.html", status=403,
                                     problem="This login link is used or expired. `tron ui` prints a new one.")
    await ui.daemon.store.event("audit", {"who": session.actor, "what": "ui_login", "target": "ui", "before": "",
                                          "after": "", "outcome": "session opened", "reason": "",
                                          "minted_by": session.minted_by, **_peer_user(request)})
    log.info("ui: session opened", extra={"actor": session.actor})
    resp = web.Response(status=303, headers={"Location": "/ui/", "Cache-Control": "no-store"})
    ui.sessions.set_cookie(resp, session)
    return resp


@guarded(mutating=True)
async def logout(request: web.Request, ui: Ui, session: Session) -> web.Response:
    ui.sessions.end(session)
    resp = web.Response(status=204, headers={"HX-Redirect": "/ui/login"})
    ui.sessions.clear_cookie(resp)
    return resp


# -- pages --------------------------------------------------------------------------------------


async def to_mesh(request: web.Request) -> web.Response:
    raise web.HTTPFound("/ui/")


@guarded()
async def mesh(request: web.Request, ui: Ui, session: Session) -> web.Response:
    await ui.live.refresh()
    rows = ui.live.rows()
    d = ui.daemon
    return ui.templates.response("mesh.html", **page_context(
        ui, session, "mesh,beats", rows_html=ui.live.mesh_html(rows), panels_html=await ui.live.render_panels(),
        daemon={"pid": os.getpid(), "port": d.config.mesh.daemon_port, "home": str(d.home.root)}))


def _service_row(ui: Ui, name: str) -> tuple[int, dict]:
    for depth, row in tree(ui.live.rows()):
        if row["name"] == name:
            return depth, row
    raise web.HTTPNotFound(text=f"no service named {name!r}")


async def _ladder(ui: Ui, name: str, row: dict) -> dict:
    """A service's history and work: ladder rows (with their case ids), recent alerts and
    operator actions, and its current task with its checkpoints."""
    store = ui.daemon.store
    alerts = []
    for e in ui.feed.recent("alert_raised", agent=name)[:RECENT_SHOWN]:
        alert = await store.alert(e["alert_id"]) or {}
        alerts.append({**e, "status": alert.get("status", "?"), "decision": alert.get("decision")})
    task_id = row["task"]
    if task_id is None:
        live = await store.live_tasks(name)
        task_id = live[0]["task_id"] if live else None
    task = await store.task(task_id) if task_id else None
    budgets = ui.daemon.config.budgets
    return {"name": name, "history": await store.history(HISTORY_SHOWN, agent=name), "alerts": alerts,
            "audits": ui.feed.recent("audit", agent=name)[:RECENT_SHOWN], "task": task,
            "counts": await store.task_counts(task_id) if task else None,
            "checkpoints": await store.checkpoints(task_id) if task else [],
            "spend": {"hour": await store.spend(agent=name, since_mono=ui.daemon.clock.now() - HOUR),
                      "all": await store.spend(agent=name), "usd_limit": budgets.service_usd_per_hour,
                      "tokens_limit": budgets.service_tokens_per_hour}}


@guarded()
async def panels(request: web.Request, ui: Ui, session: Session) -> web.Response:
    """The mesh page's lanes and spawning panels, drawn again at once after its own actions."""
    return ui.templates.html(await ui.live.render_panels())


@guarded()
async def service(request: web.Request, ui: Ui, session: Session) -> web.Response:
    name = request.match_info["name"]
    if not _NAME.match(name):
        raise web.HTTPBadRequest(text="not a service name")
    depth, row = _service_row(ui, name)
    await ui.live.refresh()
    return ui.templates.response("service.html", **page_context(
        ui, session, f"beats,svc:{name},log:{name}", row_html=ui.live.row_html(depth, row), s=row,
        log_path=str(ui.daemon.home.log_file(name)), **await _ladder(ui, name, row)))


@guarded()
async def service_ladder(request: web.Request, ui: Ui, session: Session) -> web.Response:
    name = request.match_info["name"]
    if not _NAME.match(name):
        raise web.HTTPBadRequest(text="not a service name")
    _, row = _service_row(ui, name)
    await ui.live.refresh()
    return ui.templates.response("_ladder.html", **await _ladder(ui, name, row))


@guarded()
async def runs(request: web.Request, ui: Ui, session: Session) -> web.Response:
    store = ui.daemon.store
    shown = [{**r, "tasks": len(await store.tasks_of_run(r["run_id"]))} for r in await store.runs(limit=RUNS_SHOWN)]
    return ui.templates.response("runs.html", **page_context(ui, session, "", runs=shown))


def _path_id(request: web.Request, key: str) -> str:
    value = request.match_info[key]
    if not _ID.match(value):
        raise web.HTTPBadRequest(text=f"{key} is not a valid id")
    return value


@guarded()
async def run(request: web.Request, ui: Ui, session: Session) -> web.Response:
    run_id = _path_id(request, "run_id")
    store = ui.daemon.store
    found = await store.run(run_id)
    if found is None:
        raise web.HTTPNotFound(text=f"no run {run_id!r}")
    tasks = await store.tasks_of_run(run_id)
    spend = await _run_spend(ui, found, tasks)
    tasks = [{**t, "counts": await store.task_counts(t["task_id"]), "spend": spend["by_task"].get(t["task_id"]),
              "trace_url": _trace_url(ui, t)} for t in tasks]
    # The run's trace is its first task's (the gateway's run span is that task's parent).
    run_trace = next((t["trace_url"] for t in tasks if t["trace_url"]), None)
    return ui.templates.response("run.html", **page_context(ui, session, "", run=found, tasks=tasks, run_trace=run_trace,
                                                            **spend))


def _trace_url(ui: Ui, task: dict) -> str | None:
    """The link to the task's trace, when `[telemetry] trace_url` names a viewer."""
    return trace_link(ui.daemon.config.telemetry.trace_url, task.get("traceparent"))


def _budget(ui: Ui, run: dict, spent: dict) -> tuple[dict, dict]:
    """The run's budget against what it spent, and the target its budget button is drawn for."""
    defaults = ui.daemon.config.budgets
    budget = run_budget(run, spent, default_usd=defaults.run_usd, default_tokens=defaults.run_tokens)
    return budget, {**run, "budget": budget["words"], "suggest_usd": suggest_usd(budget["usd"], spent["usd"])}


async def _run_spend(ui: Ui, run: dict, tasks: list[dict]) -> dict:
    """What the run page's spend part shows: the run's calls summed (tokens by kind, USD),
    per task, against its budget, and the budget button's target."""
    store = ui.daemon.store
    rows = await store.usage(run_id=run["run_id"], limit=RUN_CALLS_READ)
    totals = spend_totals(rows)
    partial = len(rows) >= RUN_CALLS_READ
    if partial:  # the kinds and the per-task columns are of the latest calls; the sums are exact
        totals.update(await store.spend(run_id=run["run_id"]))
    budget, target = _budget(ui, run, totals)
    at_budget = [t for t in tasks if t["status"] == TaskState.PARKED and t.get("parked_reason") == "budget_exceeded"]
    return {"spend": totals, "by_task": spend_by_task(rows), "partial": partial, "calls_read": RUN_CALLS_READ,
            "budget": budget, "run_target": target, "at_budget": at_budget,
            "spend_moving": run["status"] == RunState.RUNNING}


@guarded()
async def run_spend(request: web.Request, ui: Ui, session: Session) -> web.Response:
    run_id = _path_id(request, "run_id")
    found = await ui.daemon.store.run(run_id)
    if found is None:
        raise web.HTTPNotFound(text=f"no run {run_id!r}")
    spend = await _run_spend(ui, found, await ui.daemon.store.tasks_of_run(run_id))
    return ui.templates.response("_run_spend.html", run=found, **spend)


async def _task(ui: Ui, request: web.Request) -> tuple[dict, dict]:
    """The task named in the path, and what its page's summary shows."""
    task_id = _path_id(request, "task_id")
    store = ui.daemon.store
    found = await store.task(task_id)
    if found is None:
        raise web.HTTPNotFound(text=f"no task {task_id!r}")
    run = await store.run(found["run_id"])
    parked_for = (ui.daemon.clock.now() - found["held_since"]
                  if found["status"] == TaskState.PARKED and found.get("held_since") is not None else None)
    return found, {"task": found, "run": run, "counts": await store.task_counts(task_id),
                   "moving": task_moving(found, run), "spend": await store.spend(task_id=task_id),
                   "parked_for": parked_for}


async def _task_actions(ui: Ui, task: dict, next_step: int) -> dict:
    """The task page's buttons' targets: the task (with the step a resume goes on from, and
    the providers an approval may name), and its run while the task is parked at its budget."""
    target = {**task, "next_step": next_step, "chain": list(ui.daemon.config.providers.chain)}
    run_target = None
    if task["status"] == TaskState.PARKED and task.get("parked_reason") == "budget_exceeded":
        run = await ui.daemon.store.run(task["run_id"])
        if run is not None:
            _, run_target = _budget(ui, run, await ui.daemon.store.spend(run_id=run["run_id"]))
    return {"target": target, "run_target": run_target}


async def _task_calls(ui: Ui, task: dict, moving: bool) -> dict:
    """The task's LLM calls, newest first, and what they add up to."""
    store = ui.daemon.store
    rows = await store.usage(task_id=task["task_id"], limit=TASK_CALLS_SHOWN)
    totals = spend_totals(rows)
    if len(rows) >= TASK_CALLS_SHOWN:
        totals.update(await store.spend(task_id=task["task_id"]))
    return {"calls": rows, "calls_total": totals, "calls_moving": moving}


async def _next_step(ui: Ui, task_id: str) -> tuple[list[dict], int]:
    """The task's checkpoints, and the step a resume goes on from by default: the one after them."""
    checkpoints = await ui.daemon.store.checkpoints(task_id)
    return checkpoints, (checkpoints[-1]["step"] + 1 if checkpoints else 1)


@guarded()
async def task(request: web.Request, ui: Ui, session: Session) -> web.Response:
    found, summary = await _task(ui, request)
    checkpoints, next_step = await _next_step(ui, found["task_id"])
    return ui.templates.response("task.html", **page_context(
        ui, session, "", **summary, trace_url=_trace_url(ui, found),
        history=await ui.daemon.store.task_history(found["task_id"]),
        checkpoints=checkpoints, **await _task_actions(ui, found, next_step),
        **await _task_calls(ui, found, summary["moving"])))


@guarded()
async def task_state(request: web.Request, ui: Ui, session: Session) -> web.Response:
    found, summary = await _task(ui, request)
    resp = ui.templates.response("_task_state.html", **summary)
    if request.query.get("was", found["status"]) != found["status"]:
        resp.headers["HX-Trigger"] = "tron:task-moved"  # its buttons are drawn again (_task_actions.html)
    return resp


@guarded()
async def task_actions(request: web.Request, ui: Ui, session: Session) -> web.Response:
    found, _ = await _task(ui, request)
    _, next_step = await _next_step(ui, found["task_id"])
    return ui.templates.response("_task_actions.html", task=found, **await _task_actions(ui, found, next_step))


@guarded()
async def task_calls(request: web.Request, ui: Ui, session: Session) -> web.Response:
    found, summary = await _task(ui, request)
    return ui.templates.response("_task_calls.html", task=found, **await _task_calls(ui, found, summary["moving"]))


@guarded()
async def charts(request: web.Request, ui: Ui, session: Session) -> web.Response:
    return ui.templates.response("charts.html", **page_context(ui, session, ""))


@guarded()
async def charts_data(request: web.Request, ui: Ui, session: Session) -> web.Response:
    await ui.live.refresh()
    events = ui.feed.recent("alert_raised", "child_restart", "operator_restart", "recovered")
    now = time.time()
    data = chart_data(events, now, window=ui.feed.window)
    # Read by clock, bucketed by wall time: the chart is hours as a person reads them.
    calls = await ui.daemon.store.usage(since_mono=ui.daemon.clock.now() - DAY, limit=CHART_CALLS_READ)
    data["spend"] = spend_chart(calls, now, window=DAY, bucket=HOUR)
    data["spend"]["summary"]["partial"] = len(calls) >= CHART_CALLS_READ
    return web.json_response(data)


def _settings(ui: Ui) -> dict:
    d = ui.daemon
    try:
        overlaid, problem = set(read_overlay(d.overlay)), None
    except ConfigError as err:  # shown, not hidden: the next daemon start would refuse it too
        overlaid, problem = set(), str(err)
    return {"groups": form_groups(d.policy(), overlaid), "overlay": str(d.overlay), "overlaid": sorted(overlaid),
            "overlay_problem": problem}


@guarded()
async def settings(request: web.Request, ui: Ui, session: Session) -> web.Response:
    return ui.templates.response("settings.html", **page_context(ui, session, "", **_settings(ui)))


@guarded()
async def settings_form(request: web.Request, ui: Ui, session: Session) -> web.Response:
    return ui.templates.response("_settings_form.html", **_settings(ui))


# -- the stream ---------------------------------------------------------------------------------


def _topics(ui: Ui, raw: str) -> set[str] | None:
    """The topics a page asks for, each one that exists; None if any does not."""
    names = set(ui.daemon.sup.services)
    topics = {"alert"}
    for topic in filter(None, raw.split(",")):
        kind, _, name = topic.partition(":")
        if (kind in ("mesh", "beats") and not name) or (kind in ("svc", "log") and name in names):
            topics.add(topic)
        else:
            return None
    return topics if len(topics) <= 8 else None


@guarded()
async def events(request: web.Request, ui: Ui, session: Session) -> web.StreamResponse:
    topics = _topics(ui, request.query.get("topics", ""))
    if topics is None:
        return error(400, "topics: a comma-separated list of mesh, beats, svc:NAME, log:NAME")
    # A logout, a revoked token or the session's end closes the stream too: the session that
    # opened it is asked again before each message.
    return await sse.stream(request, ui.hub, topics, ui.live.on_open,
                            alive=lambda: ui.sessions.of(request) is not None, owner=session.minted_by or session.actor)


async def stats(request: web.Request) -> web.Response:
    """How many event streams are open (and were dropped): with a session or the mesh token."""
    ui = request.app[UI_KEY]
    problem = local_problem(request)
    if problem:
        return error(403, problem)
    if ui.sessions.of(request) is None and not token_matches(request.headers.get(TOKEN_HEADER),
                                                             request.app.get(TOKEN_KEY)):
        return error(401, "a web UI session or the mesh token is needed")
    return web.json_response({"sse_clients": len(ui.hub), "sse_dropped": ui.hub.dropped,
                              "sse_limit": ui.hub.max_clients, "sessions": len(ui.sessions),
                              "log_tails": ui.live.watched_logs()})


# -- static files -------------------------------------------------------------------------------


def static_files() -> dict[str, Path]:
    """Every file under static/, by its URL path: a request can name only these."""
    return {p.relative_to(STATIC).as_posix(): p for p in STATIC.rglob("*") if p.is_file()}


def static_handler(files: dict[str, Path]):
    async def static(request: web.Request) -> web.StreamResponse:
        problem = local_problem(request)
        if problem:
            return error(403, problem)
        path = files.get(request.match_info["path"])
        if path is None:
            raise web.HTTPNotFound()
        return web.FileResponse(path, headers={"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff"})

    return static


def add_routes(app: web.Application) -> None:
    r = app.router
    r.add_post("/ui/login-code", login_code)
    r.add_get("/ui/login", login)
    r.add_post("/ui/logout", logout)
    r.add_get("/ui", to_mesh)
    r.add_get("/ui/", mesh)
    r.add_get("/ui/panels", panels)
    r.add_get("/ui/services/{name}", service)
    r.add_get("/ui/services/{name}/ladder", service_ladder)
    r.add_get("/ui/runs", runs)
    r.add_get("/ui/runs/{run_id}", run)
    r.add_get("/ui/runs/{run_id}/spend", run_spend)
    r.add_get("/ui/tasks/{task_id}", task)
    r.add_get("/ui/tasks/{task_id}/state", task_state)
    r.add_get("/ui/tasks/{task_id}/actions", task_actions)
    r.add_get("/ui/tasks/{task_id}/calls", task_calls)
    r.add_get("/ui/charts", charts)
    r.add_get("/ui/charts/data", charts_data)
    r.add_get("/ui/settings", settings)
    r.add_get("/ui/settings/form", settings_form)
    r.add_get("/ui/events", events)
    r.add_get("/ui/stats", stats)
    r.add_get("/ui/static/{path:.+}", static_handler(static_files()))


def _peer_user(request: web.Request) -> dict:
    """The login's audit row names the Unix user whose browser opened the link, if on this machine."""
    user = unix_user(request)
    return {"unix_user": user} if user else {}
