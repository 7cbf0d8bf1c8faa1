"""The live view of `tron up`: a tree of services with state, pid, restarts, provider
and beat age, and an alert bar while TRON is alerting. Fits 80 columns."""

from __future__ import annotations

import time
from typing import Callable

from rich.console import Group
from rich.live import Live
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from tron.common.states import ServiceState as S

STATE_STYLE = {S.RUNNING: "green", S.STARTING: "yellow", S.BACKOFF: "yellow", S.FAILED: "red",
               S.STOPPING: "magenta", S.STOPPED: "dim"}
ALERT_SHOW_SECONDS = 15


def render(status: dict | None) -> Group:
    if not status:
        return Group(Text("waiting for the daemon...", style="yellow"))
    table = Table(box=None, pad_edge=False, expand=False, header_style="bold")
    for col, kw in (("service", {"no_wrap": True}), ("state", {}), ("pid", {"justify": "right"}),
                    ("rst", {"justify": "right"}), ("provider", {}), ("beat", {"justify": "right"})):
        table.add_column(col, **kw)
    depth = {"daemon": 0}
    for s in status["services"]:
        depth[s["name"]] = depth.get(s["parent"], 0) + 1
        beat = f"{s['last_beat_age']:.1f}s" if s["last_beat_age"] is not None else "-"
        state = Text(s["state"], style=STATE_STYLE.get(s["state"], ""))
        if s.get("crash_looping"):
            state.append(" loop", style="bold red")
        if s.get("stopped"):
            state.append(" (op)", style="dim")
        table.add_row("  " * (depth[s["name"]] - 1) + s["name"], state, str(s["pid"] or "-"),
                      str(s["restarts"]), s["provider"] or "-", beat)
    d = status["daemon"]
    parts = [Text(f"TRON daemon pid {d['pid']} :{d['port']} up {d['uptime']:.0f}s  (Ctrl-C stops the mesh)",
                  style="bold cyan")]
    registry = status.get("registry") or {}
    if registry.get("state") == "degraded":
        parts.append(Panel(Text(f"REGISTRY DEGRADED  {registry['reason']} since {registry['since']}: "
                                f"{registry['pending']} rows in memory", style="bold white on red"),
                           style="red", padding=(0, 1)))
    alert = status.get("last_alert")
    if alert and time.time() - alert["at"] < ALERT_SHOW_SECONDS:
        parts.append(Panel(Text(f"TRON ALERT  {alert['service']}: {alert['reason']}", style="bold black on orange1"),
                           style="orange1", padding=(0, 1)))
    parts.append(table)
    return Group(*parts)


def live_view(fetch: Callable[[], dict | None], *, stop_when: Callable[[], bool], period: float = 0.5) -> None:
    with Live(render(None), refresh_per_second=4, screen=False) as live:
        while not stop_when():
            try:
                live.update(render(fetch()))
            except Exception as err:  # a failed fetch must not end the view; show why
                live.update(Group(Text(f"status unavailable: {err}", style="red")))
            time.sleep(period)
