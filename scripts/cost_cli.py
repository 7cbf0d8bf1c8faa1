"""`tron cost`: tokens and money per run, task, service, provider and model, from the
registry's llm_usage rows (each priced by the price table when it was recorded)."""

from __future__ import annotations

import argparse
import json
import re
from datetime import datetime, timedelta, timezone

_SPAN = re.compile(r"^(\d+(?:\.\d+)?)([smhd])$")


class SpanError(ValueError):
    pass


def since_iso(span: str, now: datetime | None = None) -> str:
    """``1h``, ``30m``, ``2d``, ``90s`` before ``now``, as the registry writes times."""
    m = _SPAN.match(span.strip())
    if not m:
        raise SpanError(f"--since {span!r}: a number and a unit, s, m, h or d (for example 1h or 30m)")
    seconds = float(m.group(1)) * {"s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2)]
    try:
        moment = (now or datetime.now(timezone.utc)) - timedelta(seconds=seconds)
    except (OverflowError, ValueError):  # past the year 1: every call there is
        raise SpanError(f"--since {span!r}: reaches back before the year 1; ask for less (or leave --since out: "
                        "every call)") from None
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def add_parser(sub) -> None:
    p = sub.add_parser("cost", help="tokens and cost per run, task, service, provider and model")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--run", help="one run")
    which.add_argument("--task", help="one task")
    which.add_argument("--service", help="one service")
    p.add_argument("--since", help="only calls within this span: 1h, 30m, 2d")
    p.add_argument("--json", action="store_true")


def _tokens(row: dict) -> str:
    cache = row["cache_read_tokens"] + row["cache_write_tokens"]
    return f"{row['input_tokens']:,} in, {row['output_tokens']:,} out" + (f", {cache:,} cache" if cache else "")


def _usd(row: dict) -> str:
    text = f"${row['cost_usd']:.6f}"
    return text + (f" (+{row['unpriced_calls']} unpriced)" if row["unpriced_calls"] else "")


def render(report: dict, title: str) -> str:
    t = report["total"]
    lines = [f"{title}: {t['calls']} LLM calls, {_tokens(t)}, {_usd(t)}"]
    if not t["calls"]:
        return lines[0]
    sections = (("provider / model", "provider_model", lambda r: f"{r['provider']}/{r['model']}"),
                ("service", "service", lambda r: r["agent"]), ("run", "run", lambda r: r["run_id"] or "-"),
                ("task", "task", lambda r: r["task_id"] or "-"), ("hour (UTC)", "hour", lambda r: r["hour"] + ":00"))
    for label, key, name in sections:
        rows = report[key]
        if len(rows) <= 1 and key in ("run", "task", "service"):
            continue  # one row: the total says it
        lines.append("")
        lines.append(f"{label:<44} {'calls':>6}  {'tokens':<36} cost")
        for r in rows[:30]:
            lines.append(f"{name(r)[:44]:<44} {r['calls']:>6}  {_tokens(r)[:36]:<36} {_usd(r)}")
        if len(rows) > 30:
            lines.append(f"... {len(rows) - 30} more (--json lists them all)")
    return "\n".join(lines)


def cmd_cost(ctx, args: argparse.Namespace, registry, error) -> int:
    from tron.registry.read import cost

    try:
        since = since_iso(args.since) if args.since else None
    except SpanError as err:
        raise error(str(err)) from None
    with registry(ctx) as conn:
        report = cost(conn, run_id=args.run, task_id=args.task, agent=args.service, since=since)
    if args.json:
        print(json.dumps({"filter": {"run": args.run, "task": args.task, "service": args.service, "since": since},
                          **report}, indent=2))
        return 0
    what = (f"run {args.run}" if args.run else f"task {args.task}" if args.task
            else f"service {args.service}" if args.service else "all runs")
    print(render(report, what + (f" since {since}" if since else "")))
    return 0
