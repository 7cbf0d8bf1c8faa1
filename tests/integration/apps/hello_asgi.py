"""An ASGI app for uvicorn under Tron (socket = "inherit", uvicorn --fd 3): it answers with its pid.
SIGUSR1 blocks its event loop for good (a handler that never returns): it accepts nothing more,
though its process lives and sleeps as a healthy one does."""

import os
import signal
import time

signal.signal(signal.SIGUSR1, lambda *_: time.sleep(3600))


async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    body = f"{os.getpid()}\n".encode()
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"text/plain"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
