"""The one loop that turns the daemon's state into pushes to the open pages.

Every ``TICK`` seconds, and only while some page is open, it compares what it last sent
with what is true now and publishes the difference: the service rows that changed (state,
pid, incarnation, restarts, marks, task), the alert bars when they changed (TRON's
orange one, and the red one while the registry is degraded), new log lines of the
services being watched, and, once a second, the beat ages, the mesh page's lanes and
spawning panels when they changed, and a "look again" for the service pages whose ladder
history moved. Rows come from the daemon's memory; the registry is read once a second
(its open alerts, its lanes and the event feed) in a task beside the loop, so a registry
that is slow (a history read waits for the journal's flush) or locked never stops the rows,
the bars or the logs. Nothing here waits on a browser: publishing only fills bounded
queues (sse.Hub).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time

from tron.services.daemon.ui.alertbar import AlertBar, Incident
from tron.services.daemon.ui.feed import EventFeed, epoch
from tron.services.daemon.ui.logtail import LogTail, NodeLogTail
from tron.services.daemon.ui.render import Templates
from tron.services.daemon.ui.sse import Client, Hub
from tron.services.daemon.ui.views import beat_ages, lanes, log_entry, registry_notice, row_key, tree

log = logging.getLogger("tron.daemon.ui")

TICK = 0.25
SLOW_EVERY = 4  # ticks between registry reads and beat-age pushes


class Live:
    def __init__(self, daemon, hub: Hub, feed: EventFeed, templates: Templates) -> None:
        self.daemon = daemon
        self.hub = hub
        self.feed = feed
        self.templates = templates
        self.bar = AlertBar()
        self._keys: dict[str, str] = {}
        self._open_alerts: list[dict] = []
        self._last_alert: str | None = None
        self.alert_html = ""
        self._panels_sent = ""  # the mesh page's lanes and spawning panels, as last published
        self._tails: dict[str, LogTail | NodeLogTail] = {}
        self._backlogs: set[asyncio.Task] = set()  # a node's backlog on its way to a new page
        self._reading: asyncio.Task | None = None  # the registry's side of the view, read once a second

    # -- what a page shows -----------------------------------------------------------------

    def rows(self) -> list[dict]:
        return self.daemon.sup.rows()

    def row_html(self, depth: int, row: dict) -> str:
        return self.templates.render("_row.html", depth=depth, s=row)

    def mesh_html(self, rows: list[dict]) -> str:
        return "".join(self.row_html(depth, r) for depth, r in tree(rows))

    def incidents(self) -> list[Incident]:
        """The alert bar's incidents now: the registry's open alerts as last read, and the
        daemon's last alert, read from memory so a fast recovery is not missed."""
        last = self.daemon.router.last_alert
        if last and last["alert_id"] != self._last_alert:
            self._last_alert = last["alert_id"]
            since = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(last["at"]))
            self.bar.raised(last["alert_id"], last["service"], last["reason"], since, age=time.time() - last["at"])
        return self.bar.update(self.daemon.clock.now(), self._open_alerts, {r["name"]: r for r in self.rows()})

    def render_alert(self) -> str:
        self.alert_html = self.templates.render("_alert.html", incidents=self.incidents(),
                                                registry=registry_notice(self.daemon.registry_health()))
        return self.alert_html

    async def render_panels(self) -> str:
        """The mesh page's providers, lanes (every role, with its registry row) and spawning panels."""
        rows = await self.daemon.store.lanes()
        mesh = {"spawning": "paused" if self.daemon.sup.spawning_paused else "running"}
        return self.templates.render("_panels.html", lanes=lanes(rows, (r["role"] for r in self.rows())), mesh=mesh,
                                     providers=self.daemon.providers.status(),
                                     on_all_down=self.daemon.config.providers.on_all_down)

    async def refresh(self) -> None:
        """Read the registry's side (open alerts, new events); a page does this before it
        renders, the loop once a second."""
        self._open_alerts = await self.daemon.store.open_alerts()
        now = time.time()
        moved = set()
        for e in await self.feed.poll():
            if e["kind"] == "alert_raised":
                self.bar.raised(e["alert_id"], e["agent"], e["payload"].get("reason", "?"), e["ts"],
                                age=now - epoch(e["ts"]))
            if e["agent"]:
                moved.add(e["agent"])
        for name in moved:  # its page fetches its history again
            self.hub.publish(f"svc:{name}", "ladder", "events")

    def log_html(self, lines: list[str]) -> str:
        return self.templates.render("_log_lines.html", entries=[log_entry(line) for line in lines])

    def watched_logs(self) -> list[str]:
        return sorted(self._tails)

    def _tail(self, name: str) -> LogTail | NodeLogTail:
        """The service's log file here, or, on a Ray cluster, its node's through the node agent."""
        if name not in self._tails:
            on_nodes = self.daemon.cluster is not None and name in self.daemon.sup.services
            self._tails[name] = NodeLogTail(self.daemon, name) if on_nodes else LogTail(self.daemon.home.log_file(name))
        return self._tails[name]

    def _send_backlog(self, client: Client, entries: list[str]) -> None:
        self.hub.send(client, "log-backlog", self.templates.render(
            "_log_backlog.html", entries=[log_entry(line) for line in entries]))

    async def _node_backlog(self, client: Client, tail: NodeLogTail) -> None:
        self._send_backlog(client, await tail.backlog())

    def on_open(self, client: Client) -> None:
        """What a new stream is sent first: the state now (the page may be a moment old)."""
        rows = self.rows()
        by_name = {r["name"]: (depth, r) for depth, r in tree(rows)}
        self.hub.send(client, "alert", self.alert_html)
        for topic in client.topics:
            kind, _, name = topic.partition(":")
            if kind == "mesh":
                self.hub.send(client, "mesh", self.mesh_html(rows))
                self._panels_sent = ""  # the next tick sends the panels as they are then, to this page too
            elif kind == "svc" and name in by_name:
                self.hub.send(client, "row", self.row_html(*by_name[name]))
            elif kind == "log":
                tail = self._tail(name)
                if isinstance(tail, NodeLogTail):  # read on its node: sent when it comes
                    task = asyncio.get_running_loop().create_task(self._node_backlog(client, tail))
                    self._backlogs.add(task)
                    task.add_done_callback(self._backlogs.discard)
                else:
                    self._send_backlog(client, tail.backlog())

    # -- the loop ----------------------------------------------------------------------------

    async def run(self) -> None:
        ticks = 0
        try:
            while not self.daemon.stopping:
                await self.daemon.clock.sleep(TICK)
                if not self.hub.clients or self.daemon.stopping:
                    continue  # nobody is looking: nothing to compute
                try:
                    self.tick(ticks)
                except Exception:  # a template or a row that fails must not end the live view for good
                    log.exception("ui: live update failed; trying again next tick")
                try:  # the logs are files: they are followed whatever the rows or a template does
                    self._follow_logs()
                except Exception:
                    log.exception("ui: following the logs failed; trying again next tick")
                ticks += 1
        finally:
            if self._reading is not None:
                self._reading.cancel()

    def tick(self, n: int) -> None:
        """The rows, the alert bar and the beat ages, from the daemon's memory. The registry's
        side is read once a second beside it, one read at a time: a registry that is slow or
        waits on a lock delays its own panels, never the rows, the bar or the logs."""
        rows = self.rows()
        drawn = tree(rows)
        topics = self.hub.topics()
        changed = False
        for depth, r in drawn:
            key = row_key(r)
            if self._keys.get(r["name"]) != key:
                self._keys[r["name"]] = key
                changed = True
                if f"svc:{r['name']}" in topics:
                    self.hub.publish(f"svc:{r['name']}", "row", self.row_html(depth, r))
                    self.hub.publish(f"svc:{r['name']}", "ladder", "state")
        if changed:
            self.hub.publish("mesh", "mesh", "".join(self.row_html(depth, r) for depth, r in drawn))
        if n % SLOW_EVERY == 0:
            self.hub.publish("beats", "beats", json.dumps(beat_ages(rows)))
            if self._reading is None or self._reading.done():
                self._reading = asyncio.get_running_loop().create_task(self._read_registry("mesh" in topics))
        before = self.alert_html
        if self.render_alert() != before:
            self.hub.publish("alert", "alert", self.alert_html)

    async def _read_registry(self, panels: bool) -> None:
        """The open alerts and the event feed (``refresh``), then the mesh page's panels."""
        try:
            await self.refresh()
            if panels:
                shown = await self.render_panels()
                if shown != self._panels_sent:
                    self._panels_sent = shown
                    self.hub.publish("mesh", "panels", shown)
        except Exception:  # a registry hiccup: the next second reads it again
            log.exception("ui: reading the registry for the live view failed; trying again in a second")

    def _follow_logs(self) -> None:
        # The topics now: a tail a page has (on_open made it) is kept while the page is open;
        # dropping it would lose the lines until the next tick made another.
        watched = {t.removeprefix("log:") for t in self.hub.topics() if t.startswith("log:")}
        for name in set(self._tails) - watched:
            gone = self._tails.pop(name)
            if isinstance(gone, NodeLogTail):
                gone.close()
        for name in watched:
            tail = self._tail(name)
            if isinstance(tail, NodeLogTail):
                tail.poll(lambda lines, topic=f"log:{name}": self.hub.publish(topic, "log", self.log_html(lines)))
                continue
            lines = tail.read_new()
            if lines:
                self.hub.publish(f"log:{name}", "log", self.log_html(lines))
