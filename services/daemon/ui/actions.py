"""Every button of the web UI, in one table.

A button does nothing of its own: it names an endpoint of the daemon's API (the one the
CLI calls), a confirmation that names its target, and when it applies. ``static/app.js``
asks for the confirmation, sends the request with the session's CSRF header, and shows the
answer; the API checks, acts and audits as it does for the CLI. A new operator verb is one
more row here once its endpoint exists.

Scopes and the target each button is drawn for:

    service   a service row of ``sup.rows()``: name, state, stopped, paused
    lane      a row of GET /lanes: lane, state (open | paused)
    mesh      {"spawning": "running" | "paused"}, as in the daemon's status
    task      a task row of the registry: task_id, agent, status

``applies`` only decides what is drawn: the API stays the judge (a button drawn a moment
before the state moved is refused there, with a message that says why).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from common.states import LIVE_TASK_STATES, LaneState, TaskState


@dataclass(frozen=True)
class Action:
    verb: str                      # the button's data-action
    scope: Literal["service", "task", "lane", "mesh", "provider"]
    method: str
    path: str                      # formatted with the target's fields ({name}, {task_id}, ...)
    label: str
    confirm: str                   # formatted the same way: it names the target
    applies: Callable[[dict], bool]
    target: str                    # what the result line names, formatted the same way
    danger: bool = False
    # A body field the operator types (a number input beside the button). The confirmation
    # names it as "{field}" (written "{{field}}" here, to survive the format): app.js puts
    # the typed value there.
    input: str | None = None

    def for_target(self, target: dict) -> dict:
        """What a template needs to draw this button for one target."""
        return {"verb": self.verb, "method": self.method, "url": self.path.format(**target), "label": self.label,
                "confirm": self.confirm.format(**target), "target": self.target.format(**target),
                "danger": self.danger, "input": self.input}


def _down(s: dict) -> bool:
    return bool(s["stopped"]) or s["state"] in ("stopped", "stopping")


def _not_done(t: dict) -> bool:
    # A done task has nothing to redo; a failed or cancelled one is retried within its run.
    return t["status"] != TaskState.DONE


ACTIONS: tuple[Action, ...] = (
    # -- services ---------------------------------------------------------------------------------
    Action("restart", "service", "POST", "/services/{name}/restart", "Restart",
           "Restart {name}? Its process tree is killed and a new incarnation is started.",
           lambda s: not _down(s), "{name}"),
    Action("stop", "service", "POST", "/services/{name}/stop", "Stop",
           "Stop {name}? It stays stopped, and its live tasks fail, until an operator starts it again.",
           lambda s: not (s["stopped"] and s["state"] == "stopped"), "{name}", danger=True),
    Action("start", "service", "POST", "/services/{name}/start", "Start",
           "Start {name} again?", _down, "{name}"),
    Action("pause", "service", "POST", "/services/{name}/pause", "Pause",
           "Pause {name}? It is given no new tasks; the one it is working on finishes.",
           lambda s: not s["paused"], "{name}"),
    Action("resume", "service", "POST", "/services/{name}/resume", "Resume",
           "Resume {name}? It takes new tasks again.", lambda s: bool(s["paused"]), "{name}"),
    # -- lanes and the mesh ---------------------------------------------------------------------------
    Action("pause", "lane", "POST", "/lanes/{lane}/pause", "Pause",
           "Pause lane {lane}? New tasks for its services are refused (lane_paused) until it is resumed.",
           lambda lane: lane["state"] == LaneState.OPEN, "lane {lane}", danger=True),
    Action("resume", "lane", "POST", "/lanes/{lane}/resume", "Resume",
           "Resume lane {lane}? Its services take new tasks again.",
           lambda lane: lane["state"] == LaneState.PAUSED, "lane {lane}"),
    Action("pause", "mesh", "POST", "/spawning/pause", "Pause spawning",
           "Pause spawning for the whole mesh? No new process starts anywhere: a restart waits until "
           "spawning resumes.", lambda m: m["spawning"] == "running", "spawning", danger=True),
    Action("resume", "mesh", "POST", "/spawning/resume", "Resume spawning",
           "Resume spawning? Restarts that were waiting go ahead.", lambda m: m["spawning"] == "paused", "spawning"),
    # -- providers -----------------------------------------------------------------------------------
    Action("drain", "provider", "POST", "/providers/{provider}/drain", "Drain",
           "Drain provider {provider}? No call goes to it until it is restored: tasks switch to another "
           "provider, or park when none is left.", lambda p: not (p["state"] == "open" and p["kind"] == "drained"),
           "provider {provider}", danger=True),
    Action("restore", "provider", "POST", "/providers/{provider}/restore", "Restore",
           "Restore provider {provider}? It is closed at once: calls go to it again.",
           lambda p: p["state"] != "closed", "provider {provider}"),
    # -- tasks -------------------------------------------------------------------------------------------
    Action("retry", "task", "POST", "/tasks/{task_id}/retry", "Retry",
           "Retry task {task_id} ({agent})? A live task: {agent} is restarted with it now. A failed or cancelled "
           "one: its run opens again and its failed tasks are assigned again.", _not_done, "task {task_id}"),
    Action("hard-reset", "task", "POST", "/tasks/{task_id}/hard-reset", "Hard reset",
           "Hard reset task {task_id} ({agent})? Its recorded steps are replayed in order, each hash verified "
           "(refused if one does not match), then the failing step runs again.",
           _not_done, "task {task_id}", danger=True),
    Action("resume", "task", "POST", "/tasks/{task_id}/resume", "Resume from step",
           "Resume task {task_id} ({agent}) from step {{from_step}}? The steps before it are kept (verified); "
           "the later ones are set aside.", _not_done, "task {task_id}", input="from_step"),
    Action("cancel", "task", "POST", "/tasks/{task_id}/cancel", "Cancel",
           "Cancel task {task_id} ({agent})? It and every task below it end as cancelled; a run's first task "
           "cancels the run.", lambda t: t["status"] in LIVE_TASK_STATES, "task {task_id}", danger=True),
)


def buttons(scope: str, target: dict) -> list[dict]:
    """The buttons that apply to ``target`` now, in table order."""
    return [a.for_target(target) for a in ACTIONS if a.scope == scope and a.applies(target)]
