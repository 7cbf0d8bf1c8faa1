"""`tron ui [--open]`: a one-time login link to the web UI of the running mesh.

The daemon mints the code (``POST /ui/login-code``, with the mesh token this user can
read); the link works once, for two minutes, and only on this machine. Standard library
only, like the rest of the CLI.
"""

from __future__ import annotations

import argparse
import getpass
import sys
import webbrowser

from tron.scripts.client import ClientError


def cmd_ui(ctx, args: argparse.Namespace) -> int:
    mesh = ctx.require_daemon()
    code, answer = mesh.call("POST", mesh.daemon_url + "/ui/login-code",
                             {"actor": f"{getpass.getuser()}@ui", "viewer": bool(getattr(args, "viewer", False))},
                             auth=True)
    if code != 201 or not isinstance(answer, dict):
        raise ClientError(f"the daemon refused a login code ({code}): "
                          f"{answer.get('error') if isinstance(answer, dict) else answer}")
    print(answer["url"])
    print(f"one-time link, valid for {answer['expires_in']:.0f}s, on this machine only", file=sys.stderr)
    if args.open and not webbrowser.open(answer["url"]):
        print("no browser could be opened: paste the link into one", file=sys.stderr)
    return 0
