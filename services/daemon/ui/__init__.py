"""The web UI (HMI) the daemon serves at ``/ui`` on its own port, loopback only.

Server-rendered HTML (Jinja2, ``templates/``), live by server-sent events (``sse.py``: one
bounded queue per page, fed by the one loop in ``live.py``), small vendored scripts with
their licences (``static/vendor/``, fetched by ``vendor.sh``; no build step). Access is a
one-time login code, then a session cookie and a CSRF token (``auth.py``). The UI's
buttons (``actions.py``) and its settings form call the daemon's own API, the one the CLI
calls, which is why ``setup_ui`` installs the session check as that API's ALT_AUTH hook:
every action goes through the same checks and the same audit trail.

    setup_ui(app, daemon)   # in services/daemon/api.py's make_app
"""

from __future__ import annotations

from aiohttp import web

from tron.common.http import ALT_AUTH_KEY
from tron.services.daemon.ui.auth import Sessions
from tron.services.daemon.ui.context import UI_KEY, Ui
from tron.services.daemon.ui.feed import EventFeed
from tron.services.daemon.ui.live import Live
from tron.services.daemon.ui.pages import add_routes
from tron.services.daemon.ui.render import Templates
from tron.services.daemon.ui.sse import Hub

__all__ = ["setup_ui"]


def setup_ui(app: web.Application, daemon) -> None:
    """Add the UI's routes, its live-update loop and its session check to the daemon's app."""
    hub = Hub()
    templates = Templates()
    # The store as it is when read: the daemon opens it in start(), which may come later.
    feed = EventFeed(lambda since, limit, kind: daemon.store.events(since, limit, kind))
    ui = Ui(daemon=daemon, sessions=Sessions(daemon.clock, cookie=f"tron_ui_{daemon.config.mesh.daemon_port}"),
            hub=hub, feed=feed, live=Live(daemon, hub, feed, templates), templates=templates)
    app[UI_KEY] = ui
    app[ALT_AUTH_KEY] = ui.sessions.authorize
    daemon.access.session_of = ui.sessions.authorized  # a session is audited as its own login
    add_routes(app)

    async def start(_: web.Application) -> None:
        daemon.background(ui.live.run(), "ui live updates")  # cancelled by the daemon's shutdown

    async def end_streams(_: web.Application) -> None:
        hub.close_all()  # before the server waits for open requests: a stream never ends by itself

    app.on_startup.append(start)
    app.on_shutdown.append(end_streams)

