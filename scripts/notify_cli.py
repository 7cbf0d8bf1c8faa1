"""`tron notify log|test`: the notifications of the mesh file's ``[[notify]]`` receivers.

    tron notify log [--json] [--limit N]   every delivery attempt, newest first: when, entry,
                                           event kind, attempt, status, outcome
    tron notify test [--entry N]           a ``test`` notification to every entry (or entry N),
                                           through the daemon (audited)

The log is read from the registry (read-only: it works with the mesh down); the test goes
through the daemon's ``POST /notify/test``. Standard library only, like the rest of the CLI.
"""

from __future__ import annotations

import argparse
import getpass
import json
import uuid

from tron.scripts.cli_args import LIMIT
from tron.scripts.client import ClientError

DELIVERIES_SQL = ("SELECT id, ts, payload FROM events WHERE kind IN ('notify_delivery', 'notify_dropped') "
                  "ORDER BY id DESC LIMIT ?")


def add_parser(sub) -> None:
    n = sub.add_parser("notify", help="notifications to people: the delivery log, a test")
    nsub = n.add_subparsers(dest="notify_cmd", required=True)
    log = nsub.add_parser("log", help="every delivery attempt, newest first")
    log.add_argument("--json", action="store_true")
    log.add_argument("--limit", type=LIMIT, default=50)
    test = nsub.add_parser("test", help="send a test notification through the daemon")
    test.add_argument("--entry", type=int, help="the [[notify]] entry's index (0 is the first); default: every one")
    test.add_argument("--reason", help="recorded in the audit trail")


def deliveries(conn, limit: int) -> list[dict]:
    """The latest delivery attempts (and drops), newest first, payloads decoded."""
    rows = [dict(r) for r in conn.execute(DELIVERIES_SQL, (limit,))]
    for r in rows:
        if isinstance(r["payload"], str):
            r["payload"] = json.loads(r["payload"])
    return rows


def render(rows: list[dict]) -> str:
    if not rows:
        return "no notification sent yet"
    lines = [f"{'when':<19}  {'entry':<28} {'kind':<20} {'event':>7} {'try':>3}  {'status':<24} outcome"]
    for r in rows:
        p = r["payload"]
        entry = f"{p.get('notify')} {p.get('to', '')}"
        outcome = p.get("outcome", "dropped (queue full)")
        status = "" if "status" not in p else str(p["status"])
        lines.append(f"{r['ts'][:19]}  {entry[:28]:<28} {str(p.get('kind'))[:20]:<20} {str(p.get('event_id')):>7} "
                     f"{p.get('attempt', ''):>3}  {status[:24]:<24} {outcome}"
                     + (f" in {p['retry_in']}s" if p.get("retry_in") is not None else ""))
    return "\n".join(lines)


def cmd_notify(ctx, args: argparse.Namespace) -> int:
    if args.notify_cmd == "log":
        from tron.registry.read import connect

        try:
            conn = connect(ctx.mesh.registry())
        except FileNotFoundError as err:
            raise ClientError(str(err)) from None
        with conn:
            rows = deliveries(conn, args.limit)
        print(json.dumps(rows, indent=2) if args.json else render(rows))
        return 0
    mesh = ctx.require_daemon()
    body = {"entry": args.entry, "reason": args.reason or "tron notify test", "actor": f"{getpass.getuser()}@cli",
            "request_id": f"cli-{uuid.uuid4().hex[:16]}"}
    code, answer = mesh.call("POST", mesh.daemon_url + "/notify/test", body, auth=True)
    if code >= 300:
        raise ClientError(answer.get("error") if isinstance(answer, dict) else str(answer))
    print(f"test notification queued for entry {', '.join(map(str, answer['entries']))}: "
          "see `tron notify log` for its delivery")
    return 0
