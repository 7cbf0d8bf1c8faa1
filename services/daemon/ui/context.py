"""What every UI handler reaches through the app (``UI_KEY``), and the guard in front of
every page: loopback only, then a live session (the login page, or 401 for scripts), then,
for anything that changes state, the session's CSRF header."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from aiohttp import web

from tron.common.http import error
from tron.services.daemon.ui.auth import Session, Sessions, local_problem
from tron.services.daemon.ui.feed import EventFeed
from tron.services.daemon.ui.live import Live
from tron.services.daemon.ui.render import Templates
from tron.services.daemon.ui.sse import Hub


@dataclass
class Ui:
    daemon: Any
    sessions: Sessions
    hub: Hub
    feed: EventFeed
    live: Live
    templates: Templates


UI_KEY = web.AppKey("tron_ui", Ui)


def wants_page(request: web.Request) -> bool:
    """A browser navigating (show it the login page), not a script or a stream (401)."""
    return "text/html" in request.headers.get("Accept", "") and "HX-Request" not in request.headers


def guarded(*, mutating: bool = False):
    def wrap(handler):
        async def run(request: web.Request) -> web.StreamResponse:
            ui = request.app[UI_KEY]
            problem = local_problem(request)
            if problem:
                return error(403, problem)
            session = ui.sessions.of(request)
            if session is None:
                if wants_page(request):
                    return ui.templates.response("login.html", status=401, problem=None)
                return error(401, "no valid web UI session: `tron ui` prints a login link")
            if mutating and not ui.sessions.csrf_ok(request, session):
                return error(403, "missing or wrong X-CSRF-Token header")
            return await handler(request, ui, session)

        run.__name__ = handler.__name__
        run.__doc__ = handler.__doc__
        return run

    return wrap


def page_context(ui: Ui, session: Session, topics: str, **extra) -> dict:
    """What base.html needs on every page: the session's CSRF token and actor, the alert
    bar as it is now, and the event topics the page listens to."""
    return {"session": session, "topics": topics, "alert_html": ui.live.render_alert(), **extra}
