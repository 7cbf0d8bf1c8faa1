"""The shapes the UI's templates and charts are drawn from; pure functions of the daemon's
and the registry's own data (no I/O, no clock of their own: ``now`` comes in)."""

from __future__ import annotations

import json
import statistics
from collections import Counter, defaultdict
from datetime import datetime

from common.config import DAEMON
from common.lanes import every_lane as lanes  # noqa: F401 - the panels' list is GET /lanes's
from common.states import LIVE_TASK_STATES, RunState

# What a row shows that only moves with time: a row is redrawn when anything else changes.
_TICKING = ("last_beat_age", "uptime")
# Fields of a log line that every line has, or that the page already says.
_LOG_PLAIN = {"ts", "level", "logger", "service", "msg"}


def tree(rows: list[dict]) -> list[tuple[int, dict]]:
    """Service rows in tree order (each parent before its children), with their depth
    below the daemon (1 for its children)."""
    children: dict[str, list[dict]] = defaultdict(list)
    names = {r["name"] for r in rows}
    for r in rows:
        children[r["parent"] if r["parent"] in names else DAEMON].append(r)
    out: list[tuple[int, dict]] = []

    def walk(parent: str, depth: int) -> None:
        for r in children.get(parent, []):
            out.append((depth, r))
            walk(r["name"], depth + 1)

    walk(DAEMON, 1)
    return out


def row_key(row: dict) -> str:
    """What decides whether a row must be redrawn: everything but the ticking ages."""
    return json.dumps({k: v for k, v in row.items() if k not in _TICKING}, sort_keys=True, default=str)


def beat_ages(rows: list[dict]) -> dict[str, float | None]:
    return {r["name"]: r["last_beat_age"] for r in rows}


def registry_notice(health: dict) -> dict | None:
    """What the red registry bar says while the registry refuses writes (the daemon's
    ``registry_health()``), or None while it is ok. ``since`` stays ISO: the template shows
    it as local time."""
    if health.get("state", "ok") == "ok":
        return None
    pending = int(health.get("pending") or 0)
    return {"reason": health.get("reason") or health.get("last_error") or "unknown", "since": health.get("since"),
            "pending": pending, "waiting": f"{pending} row{'' if pending == 1 else 's'} waiting"}


def task_moving(task: dict, run: dict | None) -> bool:
    """Whether a task page should keep looking: the task is live, or its run still runs."""
    return task["status"] in LIVE_TASK_STATES or (run is not None and run["status"] == RunState.RUNNING)


def local_time(iso: str | None, *, ms: bool = False) -> str:
    """An ISO 8601 UTC time as the local clock time. The browser is on the daemon's machine
    (the UI answers loopback only), so the daemon's local time is the reader's."""
    if not iso:
        return "-"
    moment = datetime.fromisoformat(iso).astimezone()
    return moment.strftime("%H:%M:%S.%f")[:-3] if ms else moment.strftime("%H:%M:%S")


def log_entry(line: str) -> dict:
    """One log line for display: time, level, message and the structured fields, or the
    raw text of a line that is not JSON (a traceback, a foreign program's output)."""
    try:
        data = json.loads(line)
    except json.JSONDecodeError:
        data = None
    if not isinstance(data, dict):
        return {"time": "", "level": "raw", "msg": line, "fields": ""}
    fields = " ".join(f"{k}={v if isinstance(v, str) else json.dumps(v, default=str)}"
                      for k, v in data.items() if k not in _LOG_PLAIN)
    ts = data.get("ts")
    try:
        time = local_time(ts, ms=True) if isinstance(ts, str) else ""
    except ValueError:
        time = str(ts)
    return {"time": time, "level": str(data.get("level", "")), "msg": str(data.get("msg", "")), "fields": fields}


def chart_data(events: list[dict], now: float, *, window: float = 3600.0, bucket: float = 60.0) -> dict:
    """Detections by reason, restarts and recovery times over the last ``window`` seconds,
    from the registry's events (each with ``at``, its wall time in seconds). Counts are per
    ``bucket``; recoveries are points (when, how long)."""
    n = int(window // bucket)
    first = (now - window) // bucket * bucket + bucket
    xs = [first + i * bucket for i in range(n)]
    detections: dict[str, list[int]] = {}
    restarts = {"child_restart": [0] * n, "operator_restart": [0] * n}
    recoveries: list[tuple[float, float]] = []
    for e in events:
        i = int((e["at"] - first) // bucket)
        if not 0 <= i < n:
            continue
        if e["kind"] == "alert_raised":
            detections.setdefault(str(e["payload"].get("reason")), [0] * n)[i] += 1
        elif e["kind"] in restarts:
            restarts[e["kind"]][i] += 1
        elif e["kind"] == "recovered" and isinstance(e["payload"].get("seconds"), (int, float)):
            recoveries.append((e["at"], e["payload"]["seconds"]))
    recoveries.sort()
    seconds = [s for _, s in recoveries]
    totals = Counter({reason: sum(v) for reason, v in detections.items()})
    return {
        "x": xs,
        "detections": [{"label": reason, "values": v} for reason, v in sorted(detections.items())],
        "restarts": [{"label": kind, "values": v} for kind, v in restarts.items()],
        "recoveries": {"x": [t for t, _ in recoveries], "y": seconds},
        "summary": {
            "detections": dict(totals.most_common()),
            "restarts": {kind: sum(v) for kind, v in restarts.items()},
            "recoveries": len(seconds),
            "recovery_median": round(statistics.median(seconds), 3) if seconds else None,
            "recovery_max": round(max(seconds), 3) if seconds else None,
        },
    }
