"""Gateway: where runs enter and where their outcome is reported.

It keeps no state of its own: a run is a registry row (through the daemon), its root
task is recorded before it is handed to the root, and the result (or the root's failure
notice) finishes the run. A restarted gateway loses nothing.

    POST /runs {prompt}           -> 202 {run_id}          (token)
    GET  /runs/{id}               -> the run as recorded (token)
    POST /notify_run_failed       <- the root, on permanent failure (token)
    POST /notify_run_parked       <- the daemon: a task of the run waits for its budget or an operator (token)
    POST /task_result             <- the root's result for a run, from the daemon (token)
"""

from __future__ import annotations

import logging
import re

from aiohttp import web

from tron.common import logs, telemetry
from tron.common.agent import REFUSALS, Agent
from tron.common.agent_runtime import AgentRuntime, agent_app
from tron.common.http import MeshHTTPError, error, parse, require_token
from tron.common.config import DAEMON, MeshConfig
from tron.common.models import RunCreate, RunFailed, RunParked, TaskAssign, TaskRecord, TaskResult
from tron.common.wire import ID_PATTERN
from tron.common.service import ServiceContext

log = logging.getLogger("tron.gateway")
RUN_ID = re.compile(ID_PATTERN)
ROOT = "root"


class GatewayRuntime(AgentRuntime):
    """The agent runtime, but a result that reaches the gateway is a run's end, not a
    sub-task's: nothing here waits for it."""

    @require_token
    async def _h_result(self, request: web.Request) -> web.Response:
        """The root's result for a run. The daemon has already recorded it and ended the
        run (so a run's outcome never waits for the gateway); this is the notification."""
        outcome = await parse(request, TaskResult)
        log.info("run %s", outcome.status, extra={"run": outcome.run_id, "reason": outcome.reason})
        return web.json_response({"ok": True})


class Gateway(Agent):
    """A built-in role, not a user of the SDK: it reads the runtime's context (``_tron``)."""

    role = "gateway"
    _tron_runtime = GatewayRuntime

    @property
    def ctx(self) -> ServiceContext:
        return self._tron.ctx

    @property
    def config(self) -> MeshConfig:
        return self._tron.config

    @property
    def daemon(self) -> str:
        return self._tron.daemon

    def add_routes(self, app: web.Application) -> None:
        app.router.add_post("/runs", self.h_create)
        app.router.add_get("/runs/{run_id}", self.h_get)
        app.router.add_post("/notify_run_failed", self.h_failed)
        app.router.add_post("/notify_run_parked", self.h_parked)

    def _root(self) -> str:
        roots = [n for n, s in self.config.services.items() if s.role == "root"]
        if not roots:
            raise web.HTTPServiceUnavailable(text='{"error": "this mesh has no root service"}',
                                             content_type="application/json")
        return roots[0]

    @require_token
    async def h_create(self, request: web.Request) -> web.Response:
        body = await parse(request, RunCreate)
        root = self._root()
        run = await self.ctx.client.post(f"{self.daemon}/runs", body)
        with telemetry.run_span(run["run_id"], body.prompt):  # the root of the run's trace
            return await self._start_run(run["run_id"], body, root)

    async def _start_run(self, run_id: str, body: RunCreate, root: str) -> web.Response:
        task_id = f"{run_id}.0"
        traceparent = telemetry.current_traceparent()
        try:
            await self.ctx.client.post(f"{self.daemon}/tasks", TaskRecord(
                task_id=task_id, run_id=run_id, agent=root, parent_agent=self.name, kind="run", prompt=body.prompt,
                traceparent=traceparent))
        except MeshHTTPError as err:
            refusal = err.json()
            if err.status != 409 or refusal.get("reason") not in REFUSALS:
                raise
            # The root's lane (or the root) is paused: the run fails at once, saying why.
            await self._finish_run(run_id, "failed", None, refusal["reason"], refusal)
            return error(409, refusal.get("error", refusal["reason"]), run_id=run_id, reason=refusal["reason"])
        assign = TaskAssign(task_id=task_id, run_id=run_id, kind="run", prompt=body.prompt, reply_to=self.name,
                            traceparent=traceparent)
        logs.comms("task_dispatch", src=self.name, dst=root, task=task_id, run=run_id)
        try:
            await self.ctx.client.post(self.config.url(root) + "/tasks", assign)
        except (MeshHTTPError, OSError) as err:
            log.warning("root unreachable for %s (%s): the daemon re-dispatches when it is back", run_id, err)
        return web.json_response({"run_id": run_id, "task_id": task_id}, status=202)

    @require_token  # a run holds its prompt and result: not for anyone on loopback
    async def h_get(self, request: web.Request) -> web.Response:
        run_id = request.match_info["run_id"]
        if len(run_id) > 128 or not RUN_ID.match(run_id):  # never a path into the daemon's own resources
            return error(400, "a run id is a letter or digit, then letters, digits and ._:- only")
        try:
            run = await self.ctx.client.get(f"{self.daemon}/runs/{run_id}")
        except MeshHTTPError as err:
            return error(err.status, err.json().get("error", "lookup failed"))
        return web.json_response(run)

    @require_token
    async def h_failed(self, request: web.Request) -> web.Response:
        notice = await parse(request, RunFailed)
        logs.comms("run_failed", src=ROOT, dst=self.name, run=notice.run_id, task=notice.task_id,
                   reason=notice.reason)
        log.error("run failed", extra={"run": notice.run_id, "reason": notice.reason, "detail": notice.detail})
        answer = await self._finish_run(notice.run_id, "failed", None, notice.reason, notice.detail)
        return web.json_response(answer)

    @require_token
    async def h_parked(self, request: web.Request) -> web.Response:
        """A run waits: one of its tasks parked at its budget or for an operator (the daemon
        says so; GET /runs/{id} lists the parked tasks)."""
        notice = await parse(request, RunParked)
        logs.comms("run_parked", src=DAEMON, dst=self.name, run=notice.run_id, task=notice.task_id, reason=notice.kind)
        log.warning("run parked", extra={"run": notice.run_id, "task": notice.task_id, "kind": notice.kind,
                                         "reason": notice.reason})
        return web.json_response({"ok": True})

    async def _finish_run(self, run_id: str, status: str, result: str | None, reason: str | None,
                          detail: dict) -> dict:
        body = {"status": status, "result": result, "reason": reason, "detail": detail}
        try:
            return await self.ctx.client.post(f"{self.daemon}/runs/{run_id}/finish", body)
        except MeshHTTPError as err:
            raise web.HTTPBadGateway(text=err.body, content_type="application/json") from None


def make_app(ctx: ServiceContext) -> web.Application:
    return agent_app(Gateway(ctx))
