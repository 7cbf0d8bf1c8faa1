"""Every button of the web UI, in one table.

A button does nothing of its own: it names an endpoint of the daemon's API (the one the
CLI calls), a confirmation that names its target, and when it applies. ``static/app.js``
asks for the confirmation, sends the request with the session's CSRF header, and shows the
answer; the API checks, acts and audits as it does for the CLI. A new operator verb (pause
and resume a service, resume a lane; retry, hard-reset, resume-from-step and cancel a
task) is one more row here once its endpoint exists.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class Action:
    verb: str                      # the button's data-action
    scope: Literal["service", "task", "lane"]
    method: str
    path: str                      # formatted with the target's fields ({name}, {task_id}, ...)
    label: str
    confirm: str                   # formatted the same way: it names the target
    applies: Callable[[dict], bool]
    danger: bool = False

    def for_target(self, target: dict) -> dict:
        """What a template needs to draw this button for one target."""
        return {"verb": self.verb, "method": self.method, "url": self.path.format(**target), "label": self.label,
                "confirm": self.confirm.format(**target), "danger": self.danger}


def _down(s: dict) -> bool:
    return bool(s["stopped"]) or s["state"] in ("stopped", "stopping")


ACTIONS: tuple[Action, ...] = (
    Action("restart", "service", "POST", "/services/{name}/restart", "Restart",
           "Restart {name}? Its process tree is killed and a new incarnation is started.",
           lambda s: not _down(s)),
    Action("stop", "service", "POST", "/services/{name}/stop", "Stop",
           "Stop {name}? It stays stopped, and its live tasks fail, until an operator starts it again.",
           lambda s: not (s["stopped"] and s["state"] == "stopped"), danger=True),
    Action("start", "service", "POST", "/services/{name}/start", "Start",
           "Start {name} again?", _down),
)


def buttons(scope: str, target: dict) -> list[dict]:
    """The buttons that apply to ``target`` now, in table order."""
    return [a.for_target(target) for a in ACTIONS if a.scope == scope and a.applies(target)]
