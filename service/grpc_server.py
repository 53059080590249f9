"""The gRPC server that runs beside uvicorn: same process, same event loop, same app state.

It serves `inference.GRPCInferenceService` (service.grpc_service), the standard health-checking
service (`grpc.health.v1.Health`, what grpc_health_probe and Kubernetes gRPC probes call) and
server reflection (what grpcurl and Postman use to list and call the methods).
"""

from __future__ import annotations

import logging

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from service.grpc_service import SERVICE, InferenceServicer, register
from service.state import AppState

log = logging.getLogger(__name__)
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class GrpcBindError(RuntimeError):
    """The gRPC port could not be bound (in use, or a host this machine does not have)."""


def bind_address(host: str, port: int) -> str:
    """host:port as gRPC parses it (IPv6 literals in brackets)."""
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


class GrpcServer:
    """Start after the models have loaded; stop before the batchers are closed."""

    def __init__(self, state: AppState) -> None:
        self.state = state
        s = state.settings
        self.server = grpc.aio.server(
            options=[
                # The HTTP body limit is the message limit too: a larger message is refused by
                # gRPC itself with RESOURCE_EXHAUSTED before it reaches the servicer.
                ("grpc.max_receive_message_length", s.max_body_bytes),
                ("grpc.max_send_message_length", s.max_body_bytes),
                # gRPC sets SO_REUSEPORT by default: a second server on the same port would
                # then bind without error and take half the connections. Fail instead, unless
                # sharing the port is the point (several workers).
                ("grpc.so_reuseport", 1 if s.workers > 1 else 0),
            ]
        )
        register(InferenceServicer(state), self.server)
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        names = (SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME)
        reflection.enable_server_reflection(names, self.server)
        self.address = bind_address(s.host, s.grpc_port)
        self.port = 0

    async def start(self) -> None:
        try:
            self.port = self.server.add_insecure_port(self.address)
        except RuntimeError as exc:
            raise GrpcBindError(f"cannot listen for gRPC on {self.address}: {exc}") from exc
        if self.port == 0:  # older grpcio report a failed bind as port 0
            raise GrpcBindError(f"cannot listen for gRPC on {self.address}")
        await self.server.start()
        status = SERVING if self.state.repository.ready else NOT_SERVING
        for name in ("", SERVICE):
            await self.health.set(name, status)
        log.info("gRPC (KServe V2) on %s", self.address)

    async def stop(self, grace_s: float) -> None:
        """Health says NOT_SERVING, new calls are refused, calls in flight get `grace_s` to
        finish (then they are cancelled)."""
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace_s)
