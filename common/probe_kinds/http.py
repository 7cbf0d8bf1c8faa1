"""``http``: GET a URL of the program; a status in range passes. Never with the mesh token."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Awaitable, Callable, Iterator, Mapping
from urllib.parse import urlsplit

from pydantic import Field

from tron.common.probe_kinds.base import Elsewhere, KindConfig, ProbeContext, ProbeKind, ProbeResult, register

if TYPE_CHECKING:
    from tron.services.daemon.supervisor import Service

LOOPBACK = ("127.0.0.1", "localhost", "::1")


class HttpCheck(KindConfig):
    """GET a URL of the program (never with the mesh token); pass on a status in range."""

    url: str | None = None  # default: http://127.0.0.1:{port}{path}
    path: str = "/"
    port: int | None = Field(None, ge=1, le=65535)  # default: the service's port
    status: tuple[int, int] = (200, 399)
    headers: dict[str, str] = {}

    def templates(self) -> Iterator[tuple[str, str]]:
        if self.url:
            yield "url", self.url


class Http(ProbeKind[HttpCheck]):
    name = "http"
    config = HttpCheck

    async def check(self, spec: HttpCheck, svc: Service, ctx: ProbeContext) -> ProbeResult:
        url = (spec.url or f"http://{ctx.host}:{spec.port or svc.spec.port}{spec.path}").format(**ctx.values)
        if ctx.mine is not None and self.port(spec, svc, ctx.values) == svc.spec.port:
            return await self._on_shared_port(url, spec, ctx, ctx.mine)
        session = ctx.plain()  # no token: the program is not ours
        async with session.get(url, headers=spec.headers, allow_redirects=False) as resp:
            await resp.read()
            lo, hi = spec.status
            return ProbeResult(lo <= resp.status <= hi, f"HTTP {resp.status}")

    async def _on_shared_port(self, url: str, spec: HttpCheck, ctx: ProbeContext,
                              mine: Callable[[tuple[str, int]], Awaitable[bool | None]]) -> ProbeResult:
        """The GET on a connection of its own, asked who accepted it once it is open (before
        the request goes): a sibling replica's answer is not counted."""
        import socket

        import aiohttp

        made: list[socket.socket] = []
        whose: list[bool | None] = []

        def factory(info: tuple[Any, ...]) -> socket.socket:
            family, kind, proto, _, _ = info
            made.append(socket.socket(family, kind, proto))
            return made[-1]

        async def opened(session: object, context: object, params: object) -> None:
            whose.append(await mine(made[-1].getsockname()) if made else None)

        trace = aiohttp.TraceConfig()
        trace.on_connection_create_end.append(opened)
        connector = aiohttp.TCPConnector(socket_factory=factory, force_close=True)
        async with aiohttp.ClientSession(connector=connector, trace_configs=[trace]) as session:
            async with session.get(url, headers=spec.headers, allow_redirects=False) as resp:
                await resp.read()
        if whose and whose[-1] is False:
            raise Elsewhere
        lo, hi = spec.status
        return ProbeResult(lo <= resp.status <= hi, f"HTTP {resp.status}")

    def port(self, spec: HttpCheck, svc: Service, values: Mapping[str, str]) -> int | None:
        if spec.url:
            url = urlsplit(spec.url.format(**values))
            return (url.port or 80) if url.hostname in LOOPBACK else None
        return spec.port or svc.spec.port


register(Http())
