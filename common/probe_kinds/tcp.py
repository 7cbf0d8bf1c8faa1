"""``tcp``: connect; optionally send bytes and expect some in the answer (redis PING/+PONG)."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Mapping

from pydantic import Field

from tron.common.probe_kinds.base import Elsewhere, KindConfig, ProbeContext, ProbeKind, ProbeResult, register

if TYPE_CHECKING:
    from tron.services.daemon.supervisor import Service


class TcpCheck(KindConfig):
    """Connect; optionally send bytes and expect some in the answer (redis PING/+PONG)."""

    port: int | None = Field(None, ge=1, le=65535)
    send: str | None = None  # text, with \r \n escapes as in TOML
    expect: str | None = None


class Tcp(ProbeKind[TcpCheck]):
    name = "tcp"
    config = TcpCheck

    async def check(self, spec: TcpCheck, svc: Service, ctx: ProbeContext) -> ProbeResult:
        port = spec.port or svc.spec.port
        reader, writer = await asyncio.open_connection(ctx.host, port)
        try:
            if ctx.mine is not None and port == svc.spec.port and \
                    await ctx.mine(writer.get_extra_info("sockname")) is False:
                raise Elsewhere
            if spec.send:
                writer.write(spec.send.encode())
                await writer.drain()
            if not spec.expect:
                return ProbeResult(True, "connected")
            got = b""
            while spec.expect.encode() not in got:
                chunk = await reader.read(4096)
                if not chunk:
                    return ProbeResult(False, f"closed before {spec.expect!r} (got {got[:60]!r})")
                got += chunk
            return ProbeResult(True, f"got {spec.expect!r}")
        finally:
            writer.close()

    def port(self, spec: TcpCheck, svc: Service, values: Mapping[str, str]) -> int | None:
        return spec.port or svc.spec.port


register(Tcp())
