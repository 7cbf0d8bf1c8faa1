"""`tron token list|create|revoke`: the operator's named tokens (services/daemon/access.py).

    tron token list [--json]            every token's name and role (operator, viewer)
    tron token create NAME [--viewer]   a new token, printed once (the daemon keeps its hash)
    tron token revoke NAME              refused from the next request on, no restart needed

A viewer token reads (status, runs, tasks, events, metrics) and changes nothing: for
dashboards. Through the daemon, with the home's operator token. Standard library only.
"""

from __future__ import annotations

import argparse
import json
import re
import sys

from tron.common.wire import NAME_MAX, NAME_PATTERN
from tron.scripts.client import ClientError


def add_parser(sub) -> None:
    t = sub.add_parser("token", help="operator tokens: list, create (operator or --viewer), revoke")
    tsub = t.add_subparsers(dest="token_cmd", required=True)
    ls = tsub.add_parser("list", help="every token's name and role")
    ls.add_argument("--json", action="store_true")
    cr = tsub.add_parser("create", help="a new named token, printed once")
    cr.add_argument("name")
    cr.add_argument("--viewer", action="store_true", help="read-only: for dashboards and the UI's read-only mode")
    rv = tsub.add_parser("revoke", help="revoke a named token at once")
    rv.add_argument("name")


def cmd_token(ctx, args: argparse.Namespace) -> int:
    mesh = ctx.require_daemon()
    if args.token_cmd == "list":
        code, answer = mesh.call("GET", mesh.daemon_url + "/tokens", auth=True)
    elif args.token_cmd == "create":
        code, answer = mesh.call("POST", mesh.daemon_url + "/tokens", {"name": args.name, "viewer": args.viewer},
                                 auth=True)
    else:
        if not re.match(NAME_PATTERN, args.name) or len(args.name) > NAME_MAX:
            raise ClientError(f"{args.name!r} is not a token name")
        code, answer = mesh.call("POST", f"{mesh.daemon_url}/tokens/{args.name}/revoke", auth=True)
    if code >= 300:
        raise ClientError(answer.get("error") if isinstance(answer, dict) else str(answer))
    if args.token_cmd == "list":
        rows = answer["tokens"]
        if args.json:
            print(json.dumps(rows, indent=2))
        else:
            for r in rows:
                print(f"{r['name']:<24} {r['role']:<9} {r['created'] or 'the home token (run/token)'}")
    elif args.token_cmd == "create":
        print(answer["token"])
        print(f"# {answer['role']} token {answer['name']!r}: shown once; send it as the X-Tron-Token header",
              file=sys.stderr)
    else:
        print(f"token {args.name!r} revoked")
    return 0
