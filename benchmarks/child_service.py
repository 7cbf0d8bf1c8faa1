"""The small service that benchmarks/peers.py puts under a plain respawn loop, supervisord,
circus and Tron.

An aiohttp app on 127.0.0.1 whose ``GET /health`` answers ``{"status": "ok", "pid": ...}``
as soon as it listens. It prints nothing (circus and supervisord capture or drop output
differently; the measurement must not depend on that) and exits on SIGTERM/SIGINT.
``--tag`` is ignored: it only marks the command line so the benchmark can find every
process it started.

    python benchmarks/child_service.py --port 6150 [--tag RUN]
"""

from __future__ import annotations

import argparse
import os
import time

from aiohttp import web

STARTED = time.monotonic()


async def health(_request: web.Request) -> web.Response:
    return web.json_response({"status": "ok", "pid": os.getpid(), "uptime": round(time.monotonic() - STARTED, 3)})


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--tag", default="")
    args = ap.parse_args()
    app = web.Application()
    app.router.add_get("/health", health)
    web.run_app(app, host="127.0.0.1", port=args.port, print=None, access_log=None)


if __name__ == "__main__":
    main()
