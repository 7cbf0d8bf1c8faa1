"""The shapes the UI's templates and charts are drawn from; pure functions of the daemon's
and the registry's own data (no I/O, no clock of their own: ``now`` comes in)."""

from __future__ import annotations

import json
import math
import statistics
from collections import Counter, defaultdict
from datetime import datetime

from tron.common.config import DAEMON
from tron.common.lanes import every_lane as lanes  # noqa: F401 - the panels' list is GET /lanes's
from tron.common.states import LIVE_TASK_STATES, RunState

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


# -- spend -------------------------------------------------------------------------------------

# What a parked task waits for, in the words its page shows beside the reason.
PARKED_WHY = {
    "providers": "Every provider of the chain is open. It goes on from its checkpoint by itself when one closes "
                 "(or fails after park_max).",
    "budget_exceeded": "A budget of the task, its run or its service is spent. Raise the run's budget and it goes "
                       "on from its checkpoint; or fail it.",
    "awaiting_operator": "The ladder would fail it for good and asks a person first. Approve it (on a provider, "
                         "from a step) or fail it; nobody answering fails it after operator_timeout.",
}
TOKEN_KINDS = ("input", "output", "cache_read", "cache_write")


def spend_totals(rows: list[dict]) -> dict:
    """What ``llm_usage`` rows add up to: calls (and how many failed or were unpriced),
    tokens by kind and in all, and USD (unpriced calls count 0, as recorded)."""
    t = {"calls": len(rows), "failed": 0, "unpriced": 0, "usd": 0.0, **dict.fromkeys(TOKEN_KINDS, 0)}
    for r in rows:
        t["failed"] += not r["ok"]
        t["unpriced"] += not r["priced"]
        t["usd"] += r["cost_usd"] or 0.0
        for kind in TOKEN_KINDS:
            t[kind] += r[f"{kind}_tokens"] or 0
    t["tokens"] = sum(t[kind] for kind in TOKEN_KINDS)
    t["usd"] = round(t["usd"], 10)  # as the store's spend() rounds it
    return t


def spend_by_task(rows: list[dict]) -> dict[str, dict]:
    """``spend_totals`` of each task's rows (a run's page reads its rows once)."""
    groups: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        groups[r["task_id"]].append(r)
    return {task_id: spend_totals(group) for task_id, group in groups.items()}


def _limit(own, default) -> tuple[float | None, str | None]:
    if own is not None:
        return own, "this run's"
    if default is not None:
        return default, "the mesh default"
    return None, None


def run_budget(run: dict, spent: dict, *, default_usd: float | None, default_tokens: int | None) -> dict:
    """A run's budget as the ladder applies it (its own, else the mesh's ``[budgets]``
    default; None: no limit), and how much of each limit is spent (a share; 1.0 or more:
    reached, where the ladder parks its next call)."""

    def share(used: float, limit: float | None) -> float | None:
        if limit is None:
            return None
        return used / limit if limit > 0 else 1.0

    usd, usd_from = _limit(run.get("budget_usd"), default_usd)
    tokens, tokens_from = _limit(run.get("budget_tokens"), default_tokens)
    out = {"usd": usd, "usd_from": usd_from, "usd_share": share(spent["usd"], usd),
           "tokens": tokens, "tokens_from": tokens_from, "tokens_share": share(spent["tokens"], tokens)}
    out["reached"] = [k for k in ("usd", "tokens") if out[f"{k}_share"] is not None and out[f"{k}_share"] >= 1.0]
    out["words"] = " and ".join(filter(None, (f"${usd:.4f}" if usd is not None else None,
                                              f"{tokens:,} tokens" if tokens is not None else None))) or "no budget"
    return out


def suggest_usd(limit: float | None, spent: float) -> str:
    """Where a raised budget starts in its input: twice the larger of the limit and what is
    spent, in whole cents (1.00 when nothing is known yet). The operator edits it."""
    base = max(limit or 0.0, spent)
    return f"{max(math.ceil(base * 200) / 100, 0.01):.2f}" if base > 0 else "1.00"


def spend_chart(rows: list[dict], now: float, *, window: float = 86400.0, bucket: float = 3600.0) -> dict:
    """USD, tokens and calls per ``bucket`` over the last ``window`` seconds of wall time,
    from ``llm_usage`` rows (each with ``ts``, ISO 8601 UTC); the last bucket is the one
    running now."""
    n = int(window // bucket)
    first = (now - window) // bucket * bucket + bucket
    usd, tokens, calls = [0.0] * n, [0] * n, [0] * n
    for r in rows:
        i = int((datetime.fromisoformat(r["ts"]).timestamp() - first) // bucket)
        if not 0 <= i < n:
            continue
        usd[i] += r["cost_usd"] or 0.0
        tokens[i] += sum(r[f"{kind}_tokens"] or 0 for kind in TOKEN_KINDS)
        calls[i] += 1
    return {"x": [first + i * bucket for i in range(n)], "usd": [round(v, 10) for v in usd], "tokens": tokens,
            "calls": calls, "summary": {"usd": round(sum(usd), 10), "tokens": sum(tokens), "calls": sum(calls)}}
