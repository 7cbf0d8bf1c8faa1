"""An ASGI app for uvicorn under Tron (socket = "inherit", uvicorn --fd 3): it answers with its pid."""

import os


async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    body = f"{os.getpid()}\n".encode()
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"text/plain"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
