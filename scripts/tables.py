"""Tables for `tron history`, `tron report` and `tron task show`.

Every value that came from a service (a failure reason, a task's progress, a step's id, a
decision's detail) goes through ``safe``: rich would read markup in it (a progress of ``[/]``
stopped `tron task show` with a MarkupError) and pass an ESC on to the terminal (a reason
could clear the screen or forge lines), as `tron logs` and `tron audit` do not."""

from __future__ import annotations

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from tron.services.daemon.audit import printable


def safe(value: object) -> str:
    """``value`` shown as it is: control characters as their escapes (the audit trail's
    ``printable``), rich markup escaped."""
    return escape(printable(str(value)))


def print_history(rows: list[dict], metrics: list[dict]) -> None:
    console = Console()
    t = Table(title="retry history", header_style="bold")
    for col in ("time", "agent", "task", "type", "count", "reason", "providers", "by"):
        t.add_column(col)
    for r in rows:
        providers = r["from_provider"] or "-"
        if r["to_provider"]:
            providers += f" -> {r['to_provider']}"
        t.add_row(*map(safe, (r["timestamp"][11:23], r["agent_id"], r["task_id"] or "-", r["retry_type"],
                              r["retry_count"], r["reason"], providers, r["hop"] or r["requested_by"] or "-")))
    console.print(t)
    m = Table(title="failure metrics", header_style="bold")
    for col in ("scope", "key", "failures", "restarts", "escalations", "switches", "permanent", "last reason"):
        m.add_column(col)
    for r in metrics:
        m.add_row(*map(safe, (r["scope"], r["key"], r["failures"], r["restarts"], r["escalations"],
                              r["provider_switches"], r["permanent_failures"], r["last_reason"] or "-")))
    console.print(m)


def print_report(checks) -> None:
    console = Console()
    t = Table(title="tron report", header_style="bold")
    for col in ("check", "verdict", "figure", "offenders"):
        t.add_column(col)
    for c in checks:
        verdict = "[green]healthy[/green]" if c.healthy else "[bold red]UNHEALTHY[/bold red]"
        t.add_row(safe(c.name), verdict, safe(c.figure),
                  safe("; ".join(map(str, c.offenders[:3])) + (" ..." if len(c.offenders) > 3 else "")))
    console.print(t)


def print_task(task: dict, retries: list[dict], checkpoints: list[dict], events: list[dict]) -> None:
    """`tron task show ID`: one screen with the task's whole story."""
    from rich.panel import Panel

    console = Console()
    failure = task.get("failure") or {}
    head = (f"[bold]{safe(task['task_id'])}[/bold]  run {safe(task['run_id'])}  agent {safe(task['agent'])}  "
            f"status [bold]{safe(task['status'])}[/bold]  attempt {safe(task['attempt'])}  "
            f"provider {safe(task['provider'] or '-')}\n"
            f"kind {safe(task['kind'])}  parent {safe(task['parent_task_id'] or task['parent_agent'])}  "
            f"progress {safe(task['progress'] or '-')}  created {safe(task['created_at'][:23])}  "
            f"updated {safe(task['updated_at'][:23])}")
    if failure:
        head += f"\nfailure: {safe(failure.get('reason'))}  {safe(failure.get('signals') or '')}"
    console.print(Panel(head, title="task", expand=False))
    t = Table(title="decisions (retry_history)", header_style="bold")
    for col in ("time", "type", "case", "reason", "providers", "by", "decided by"):
        t.add_column(col)
    for r in retries:
        providers = (r["from_provider"] or "-") + (f" -> {r['to_provider']}" if r["to_provider"] else "")
        t.add_row(*map(safe, (r["timestamp"][11:23], r["retry_type"], r["case_id"], r["reason"], providers,
                              r["hop"] or r["requested_by"] or "-", r["decided_by"])))
    console.print(t)
    c = Table(title="checkpoints", header_style="bold")
    for col in ("step", "id", "hash", "bytes", "incarnation", "at"):
        c.add_column(col)
    for m in checkpoints:
        c.add_row(*map(safe, (m["step"], m["step_id"], m["hash"][:19], m["bytes"], m["incarnation"] or "-",
                              m["created_at"][11:23])))
    console.print(c)
    e = Table(title="events", header_style="bold")
    for col in ("time", "event", "incarnation", "detail"):
        e.add_column(col)
    for ev in events:
        detail = {k: v for k, v in (ev["payload"] or {}).items() if v not in (None, "", {}, [])}
        e.add_row(*map(safe, (ev["ts"][11:23], ev["kind"], ev["incarnation"] or "-", str(detail)[:70])))
    console.print(e)
