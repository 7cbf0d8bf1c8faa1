"""``grpc``: the standard gRPC health checking protocol (``grpc.health.v1.Health/Check``).

SERVING passes; NOT_SERVING, SERVICE_UNKNOWN or an RPC error (UNAVAILABLE when nothing
listens, NOT_FOUND for a service name the server does not know) fail. Plaintext, no
metadata: the mesh token is never sent. ``grpc`` is imported inside ``check``: the daemon
does not load it unless a probe uses it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Mapping

from pydantic import Field

from tron.common.probe_kinds.base import KindConfig, ProbeContext, ProbeKind, ProbeResult, register

if TYPE_CHECKING:
    from tron.services.daemon.supervisor import Service


class GrpcCheck(KindConfig):
    """Ask the server's grpc.health.v1.Health service; SERVING passes."""

    port: int | None = Field(None, ge=1, le=65535)  # default: the service's port
    service: str = ""  # the name asked about; "" is the server as a whole


class Grpc(ProbeKind[GrpcCheck]):
    name = "grpc"
    config = GrpcCheck

    async def check(self, spec: GrpcCheck, svc: Service, ctx: ProbeContext) -> ProbeResult:
        import grpc
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        host = f"[{ctx.host}]" if ":" in ctx.host else ctx.host  # an IPv6 address in a target
        async with grpc.aio.insecure_channel(f"{host}:{spec.port or svc.spec.port}") as channel:
            try:
                reply = await health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(service=spec.service), timeout=ctx.timeout)
            except grpc.aio.AioRpcError as err:
                return ProbeResult(False, f"{err.code().name}: {err.details()}")
        status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
        return ProbeResult(reply.status == health_pb2.HealthCheckResponse.SERVING, status)

    def port(self, spec: GrpcCheck, svc: Service, values: Mapping[str, str]) -> int | None:
        return spec.port or svc.spec.port


register(Grpc())
