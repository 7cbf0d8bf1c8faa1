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
    task      a task row of the registry (task_id, agent, status, parked_reason), with
              next_step (where a resume goes on by default) and chain (the providers)
    run       a run row of the registry (run_id, status), with budget (what it is now, as
              words) and suggest_usd (a raised budget to start from)

``applies`` only decides what is drawn: the API stays the judge (a button drawn a moment
before the state moved is refused there, with a message that says why).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from tron.common.states import LIVE_TASK_STATES, LaneState, RunState, TaskState


@dataclass(frozen=True)
class Input:
    """A body field the operator fills in beside a button: a number input, or a select of
    the target's ``choices``. Left empty it is sent as null (the API's default applies), and
    the confirmation says ``blank`` where it names the field."""

    name: str                  # the body field; the confirmation names it as "{name}"
    label: str
    kind: Literal["number", "choice"] = "number"
    step: str = "1"            # a number's granularity ("any": dollars and cents)
    min: str = "1"
    value: str | None = None   # the target's field that gives its first value (None: empty)
    choices: str | None = None  # a choice's options: the target's field that lists them
    blank: str = "(none)"

    def for_target(self, target: dict) -> dict:
        value = target.get(self.value) if self.value else None
        return {"name": self.name, "label": self.label, "kind": self.kind, "step": self.step, "min": self.min,
                "value": "" if value is None else str(value), "blank": self.blank,
                "choices": list(target.get(self.choices) or []) if self.choices else []}


@dataclass(frozen=True)
class Action:
    verb: str                      # the button's data-action
    scope: Literal["service", "task", "run", "lane", "mesh", "provider"]
    method: str
    path: str                      # formatted with the target's fields ({name}, {task_id}, ...)
    label: str
    confirm: str                   # formatted the same way: it names the target
    applies: Callable[[dict], bool]
    target: str                    # what the result line names, formatted the same way
    danger: bool = False
    # Body fields the operator fills in beside the button. The confirmation names each as
    # "{field}" (written "{{field}}" here, to survive the format): app.js puts the value there.
    inputs: tuple[Input, ...] = ()

    def for_target(self, target: dict) -> dict:
        """What a template needs to draw this button for one target."""
        return {"verb": self.verb, "method": self.method, "url": self.path.format(**target), "label": self.label,
                "confirm": self.confirm.format(**target), "target": self.target.format(**target),
                "danger": self.danger, "inputs": [i.for_target(target) for i in self.inputs],
                # the first field's name: what "input" said when a button had at most one
                "input": self.inputs[0].name if self.inputs else None}


def _down(s: dict) -> bool:
    return bool(s["stopped"]) or s["state"] in ("stopped", "stopping")


def _not_done(t: dict) -> bool:
    # A done task has nothing to redo; a failed or cancelled one is retried within its run.
    return t["status"] != TaskState.DONE


def _parked(*kinds: str) -> Callable[[dict], bool]:
    return lambda t: t["status"] == TaskState.PARKED and t.get("parked_reason") in kinds


ACTIONS: tuple[Action, ...] = (
    # -- services ---------------------------------------------------------------------------------
    Action("restart", "service", "POST", "/services/{name}/restart", "Restart",
           "Restart {name}? It is stopped gracefully (its stop signal, then a kill after its grace) "
           "and a new incarnation is started.",
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
    # A task parked for an operator: the answer it waits for comes first.
    Action("approve", "task", "POST", "/tasks/{task_id}/approve", "Approve",
           "Approve task {task_id} ({agent})? It goes on, on {{provider}}, from {{from_step}}. A provider named is "
           "restored if it is open; a step named sets the later ones aside and restarts {agent} with the task.",
           _parked("awaiting_operator"), "task {task_id}",
           inputs=(Input("provider", "on", kind="choice", choices="chain", blank="its provider"),
                   Input("from_step", "from step", blank="its checkpoint"))),
    Action("fail", "task", "POST", "/tasks/{task_id}/fail", "Fail",
           "Fail task {task_id} ({agent}) for good? It is parked ({parked_reason}); it fails now, as the ladder "
           "would have failed it, and its parent hears of it.",
           _parked("awaiting_operator", "budget_exceeded"), "task {task_id}", danger=True),
    Action("retry", "task", "POST", "/tasks/{task_id}/retry", "Retry",
           "Retry task {task_id} ({agent})? A live task: {agent} is restarted with it now. A failed or cancelled "
           "one: its run opens again and its failed tasks are assigned again.", _not_done, "task {task_id}"),
    Action("hard-reset", "task", "POST", "/tasks/{task_id}/hard-reset", "Hard reset",
           "Hard reset task {task_id} ({agent})? Its recorded steps are replayed in order, each hash verified "
           "(refused if one does not match), then the failing step runs again.",
           _not_done, "task {task_id}", danger=True),
    Action("resume", "task", "POST", "/tasks/{task_id}/resume", "Resume from step",
           "Resume task {task_id} ({agent}) from step {{from_step}}? The steps before it are kept (verified); "
           "the later ones are set aside.", _not_done, "task {task_id}",
           inputs=(Input("from_step", "from step", value="next_step"),)),
    Action("cancel", "task", "POST", "/tasks/{task_id}/cancel", "Cancel",
           "Cancel task {task_id} ({agent})? It and every task below it end as cancelled; a run's first task "
           "cancels the run.", lambda t: t["status"] in LIVE_TASK_STATES, "task {task_id}", danger=True),
    # -- runs ----------------------------------------------------------------------------------------------
    Action("budget", "run", "POST", "/runs/{run_id}/budget", "Raise budget",
           "Set the budget of run {run_id} to USD {{usd}}, tokens {{tokens}} (now {budget})? A task parked at "
           "the run's budget goes on within a moment.", lambda r: r["status"] == RunState.RUNNING, "run {run_id}",
           inputs=(Input("usd", "USD", step="any", min="0", value="suggest_usd", blank="unchanged"),
                   Input("tokens", "tokens", min="0", blank="unchanged"))),
)


def buttons(scope: str, target: dict) -> list[dict]:
    """The buttons that apply to ``target`` now, in table order."""
    return [a.for_target(target) for a in ACTIONS if a.scope == scope and a.applies(target)]
