"""The settings form: the policy's numbers, grouped and explained, drawn from the Policy
model itself so a new policy field shows up (under "More") without touching the UI. The
form is sent to the daemon's own ``PUT /settings``, which validates it with the same model
as mesh.toml; this module only describes the fields."""

from __future__ import annotations

from annotated_types import Ge, Gt, Le, Lt

from tron.common.config import Policy

GROUPS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("Detection", ("heartbeat_interval", "miss_threshold", "progress_timeout", "task_timeout")),
    ("Restarts", ("max_restarts", "restart_window", "min_uptime", "backoff_initial", "backoff_factor",
                  "backoff_max", "backoff_jitter", "spawn_failed_backoff_max")),
    ("Escalation", ("max_provider_switches",)),
    ("Processes", ("start_timeout", "stop_grace")),
)
HELP = {
    "heartbeat_interval": "seconds between two beats of an agent",
    "miss_threshold": "missed beats before an agent counts as hung",
    "progress_timeout": "seconds a task's progress marker may stand still (runaway)",
    "task_timeout": "wall-clock seconds one task attempt may take",
    "max_restarts": "restarts within the window before a service is crash-looping (and per task)",
    "restart_window": "seconds over which restarts are counted",
    "min_uptime": "seconds healthy after which an incarnation counts as stable",
    "backoff_initial": "first delay after an unstable failure (the first restart is immediate)",
    "backoff_factor": "each further unstable failure multiplies the delay by this",
    "backoff_max": "the delay's cap, in seconds",
    "backoff_jitter": "random spread of the delay (0.2 = +-20 %)",
    "spawn_failed_backoff_max": "the cap for a start that cannot succeed by retrying (a missing binary, no "
                                "execute permission, a port held by another program); `tron start` retries at once",
    "max_provider_switches": "provider switches per task at the root before it fails for good",
    "start_timeout": "seconds a new incarnation has to become healthy",
    "stop_grace": "seconds between SIGTERM and SIGKILL",
    "stale_after": "seconds of refused beats after which an agent of an earlier daemon exits",
    "alert_delivery_timeout": "seconds an ancestor has to take an alert before the next one is tried",
    "llm_advice": "a parent asks its LLM whether to restart or escalate (the bounds still hold)",
    "advice_timeout": "seconds the LLM advice may take",
}


def _field(name: str, value, overlaid: set[str]) -> dict:
    info = Policy.model_fields[name]
    kind = {bool: "bool", int: "int"}.get(info.annotation, "float")
    low = next((m.ge if isinstance(m, Ge) else m.gt for m in info.metadata if isinstance(m, (Ge, Gt))), None)
    high = next((m.le if isinstance(m, Le) else m.lt for m in info.metadata if isinstance(m, (Le, Lt))), None)
    return {"name": name, "value": value, "type": kind, "min": low, "max": high, "default": info.default,
            "overlaid": name in overlaid, "help": HELP.get(name, "")}


def form_groups(policy: Policy, overlaid: set[str]) -> list[tuple[str, list[dict]]]:
    values = policy.model_dump()
    listed = {name for _, names in GROUPS for name in names}
    groups = [(title, [_field(n, values[n], overlaid) for n in names]) for title, names in GROUPS]
    more = [_field(n, values[n], overlaid) for n in Policy.model_fields if n not in listed]
    return groups + ([("More", more)] if more else [])
