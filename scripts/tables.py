"""Tables for `tron history`."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table


def print_history(rows: list[dict], metrics: list[dict]) -> None:
    console = Console()
    t = Table(title="retry history", header_style="bold")
    for col in ("time", "agent", "task", "type", "count", "reason", "providers", "by"):
        t.add_column(col)
    for r in rows:
        providers = r["from_provider"] or "-"
        if r["to_provider"]:
            providers += f" -> {r['to_provider']}"
        t.add_row(r["timestamp"][11:23], r["agent_id"], r["task_id"] or "-", r["retry_type"], str(r["retry_count"]),
                  r["reason"], providers, r["hop"] or r["requested_by"] or "-")
    console.print(t)
    m = Table(title="failure metrics", header_style="bold")
    for col in ("scope", "key", "failures", "restarts", "escalations", "switches", "permanent", "last reason"):
        m.add_column(col)
    for r in metrics:
        m.add_row(r["scope"], r["key"], str(r["failures"]), str(r["restarts"]), str(r["escalations"]),
                  str(r["provider_switches"]), str(r["permanent_failures"]), r["last_reason"] or "-")
    console.print(m)


def print_report(checks) -> None:
    console = Console()
    t = Table(title="tron report", header_style="bold")
    for col in ("check", "verdict", "figure", "offenders"):
        t.add_column(col)
    for c in checks:
        verdict = "[green]healthy[/green]" if c.healthy else "[bold red]UNHEALTHY[/bold red]"
        t.add_row(c.name, verdict, c.figure, "; ".join(map(str, c.offenders[:3])) + (" ..." if len(c.offenders) > 3 else ""))
    console.print(t)
