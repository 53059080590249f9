"""KServe V2 / Open Inference Protocol over gRPC: the `inference.GRPCInferenceService` servicer.

The messages and the servicer base are the generated code that tritonclient[grpc] ships (the
same `grpc_service.proto` Triton and KServe serve), so any client generated from that proto
works. Each RPC runs the HTTP route's own steps (`service.inference`, `service.v2infer`,
`service.v2codec`) and answers errors with the `{error, field, fix}` text of the HTTP body.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import asdict
from typing import Any

import grpc
from tritonclient.grpc import model_config_pb2 as mc
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc

from service import accesslog, grpc_messages, v2extensions, v2infer
from service.call import Call
from service.errors import InvalidInput, ServeError, log_level, v2_status
from service.inference import VERSION_MAX, admit, resolve
from service.metrics import observe_one
from service.middleware import SAFE_ID, RequestIds
from service.model_control import check_parameters
from service.state import AppState
from service.tracing import grpc_carrier

log = logging.getLogger(__name__)
SERVICE = "inference.GRPCInferenceService"
Context = Any  # grpc.aio.ServicerContext (grpc ships no type hints)

_INTERNAL = {"error": "internal error; this is a bug in notsure"}


def register(servicer: InferenceServicer, server: Any) -> None:
    """Add the servicer to a grpc.aio server with the generated method table (names, message
    types, streaming kinds), its request parsers made lenient."""
    captured = grpc_messages.Captured()
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, captured)
    handlers = {
        name: h._replace(request_deserializer=grpc_messages.lenient(h.request_deserializer))
        for name, h in captured.handlers.items()
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    server.add_registered_method_handlers(SERVICE, handlers)


def _key_of(context: Context) -> tuple[str | None, str | None]:
    meta = {k.lower(): v for k, v in context.invocation_metadata() or ()}
    return _text(meta.get("authorization")), _text(meta.get("x-api-key"))


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):  # type: ignore[misc]
    """ServerLive/Ready/Metadata, ModelReady/Metadata, the model repository's Index, Load and
    Unload, Triton's ModelConfig and ModelStatistics, ModelInfer and ModelStreamInfer."""

    def __init__(self, state: AppState) -> None:
        self.state = state
        self.ids = RequestIds()

    # -- the wrapper every RPC runs in: key, metrics, errors -> status --------------------------

    async def _rpc(
        self,
        method: str,
        request: Any,
        context: Context,
        body: Callable[[Call], Awaitable[Any]],
        *,
        health: bool = False,
    ) -> Any:
        state, call, start = self.state, self._call(context), time.perf_counter()
        code, status, details = 200, grpc.StatusCode.INTERNAL, ""
        trailers: tuple[tuple[str, str], ...] = ()
        try:
            if not health or state.settings.protect_health:
                state.keys.check(*_key_of(context))
            grpc_messages.check_parsed(request, method)
            return await body(call)
        except asyncio.CancelledError:  # the client went away, or its deadline passed
            remaining = context.time_remaining()
            code = 504 if remaining is not None and remaining <= 0 else 499
            raise
        except ServeError as exc:
            code, status = v2_status(exc), grpc.StatusCode[exc.grpc_code]
            details = json.dumps(exc.body())
            trailers = tuple((k.lower(), v) for k, v in exc.headers().items() if k != "Connection")
        except Exception:  # a bug: log it, answer INTERNAL without internals
            log.exception("unhandled error in gRPC %s", method)
            code, status, details = 500, grpc.StatusCode.INTERNAL, json.dumps(_INTERNAL)
        finally:
            call.close()
            self._record(method, call, code, start)
        if trailers:
            context.set_trailing_metadata(trailers)
        await context.abort(status, details)

    def _call(self, context: Context) -> Call:
        """The call's record: its id (the `x-request-id` metadata, as over HTTP, or a new one),
        arrival time and trace context."""
        metadata = context.invocation_metadata() or ()
        rid = next((_text(v) or "" for k, v in metadata if k.lower() == "x-request-id"), "")
        call = Call(request_id=rid if SAFE_ID.match(rid) else self.ids.next(),
                    arrived_ns=time.perf_counter_ns())  # fmt: skip
        if self.state.tracing is not None:
            call.carrier = grpc_carrier(metadata)
        return call

    def _record(self, method: str, call: Call, code: int, start: float) -> None:
        model = call.model
        labels = (model, call.version if model else "")
        endpoint = f"/{SERVICE}/{method}"
        m = self.state.metrics
        m.requests_of(*labels, endpoint, str(code), "grpc").inc()
        observe_one(m.latency_of(*labels, endpoint, "grpc"), time.perf_counter() - start)
        if self.state.settings.access_log:
            accesslog.write(protocol="grpc", method="POST", path=endpoint, model=model,
                            version=labels[1], code=code, seconds=time.perf_counter() - start,
                            request_id=call.request_id)  # fmt: skip
        elif code >= 400:
            log.log(log_level(code), "gRPC %s %s -> %d (%.1f ms)", method, model or "-", code,
                    1000 * (time.perf_counter() - start))  # fmt: skip

    def _version(self, raw: str, field: str = "model_version") -> int | None:
        if not raw:
            return None
        if not raw.isdigit() or not 1 <= int(raw) <= VERSION_MAX:
            raise InvalidInput(f"model_version {raw!r} is not a version number", field=field,
                               fix="send a positive integer, or empty for the latest")  # fmt: skip
        return int(raw)

    # -- server ----------------------------------------------------------------------------------

    async def ServerLive(self, request: Any, context: Context) -> Any:
        async def body(call: Call) -> Any:
            return pb.ServerLiveResponse(live=True)

        return await self._rpc("ServerLive", request, context, body, health=True)

    async def ServerReady(self, request: Any, context: Context) -> Any:
        async def body(call: Call) -> Any:
            st = self.state
            return pb.ServerReadyResponse(ready=st.repository.ready and not st.draining)

        return await self._rpc("ServerReady", request, context, body, health=True)

    async def ServerMetadata(self, request: Any, context: Context) -> Any:
        async def body(call: Call) -> Any:
            return pb.ServerMetadataResponse(**v2infer.server_metadata())

        return await self._rpc("ServerMetadata", request, context, body, health=True)

    # -- models ----------------------------------------------------------------------------------

    async def ModelReady(self, request: Any, context: Context) -> Any:
        async def body(call: Call) -> Any:
            try:
                resolve(self.state, call, request.name, self._version(request.version, "version"))
            except ServeError as exc:
                if exc.grpc_code != "UNAVAILABLE":
                    raise
                return pb.ModelReadyResponse(ready=False)  # known, but not loaded
            return pb.ModelReadyResponse(ready=True)

        return await self._rpc("ModelReady", request, context, body)

    async def ModelMetadata(self, request: Any, context: Context) -> Any:
        async def body(call: Call) -> Any:
            version = self._version(request.version, "version")
            meta = v2infer.metadata(resolve(self.state, call, request.name, version), self.state)
            meta.pop("parameters")  # no such field in the protocol's message
            return pb.ModelMetadataResponse(**meta)

        return await self._rpc("ModelMetadata", request, context, body)

    # -- model repository (service.model_control) ----------------------------------------------

    async def RepositoryIndex(self, request: Any, context: Context) -> Any:
        async def body(call: Call) -> Any:
            grpc_messages.one_repository(request.repository_name)
            entries = await self.state.control.index(ready_only=request.ready)
            models = [pb.RepositoryIndexResponse.ModelIndex(**asdict(e)) for e in entries]
            return pb.RepositoryIndexResponse(models=models)

        return await self._rpc("RepositoryIndex", request, context, body)

    async def RepositoryModelLoad(self, request: Any, context: Context) -> Any:
        async def body(call: Call) -> Any:
            grpc_messages.one_repository(request.repository_name)
            check_parameters("load", request.parameters)
            await self.state.control.load(request.model_name)
            return pb.RepositoryModelLoadResponse()

        return await self._rpc("RepositoryModelLoad", request, context, body)

    async def RepositoryModelUnload(self, request: Any, context: Context) -> Any:
        async def body(call: Call) -> Any:
            grpc_messages.one_repository(request.repository_name)
            check_parameters("unload", request.parameters)
            await self.state.control.unload(request.model_name)
            return pb.RepositoryModelUnloadResponse()

        return await self._rpc("RepositoryModelUnload", request, context, body)

    # -- Triton's model configuration and statistics extensions ---------------------------------

    async def ModelConfig(self, request: Any, context: Context) -> Any:
        async def body(call: Call) -> Any:
            version = self._version(request.version, "version")
            model = resolve(self.state, call, request.name, version)
            config = v2extensions.model_config(model, self.state.settings)
            return pb.ModelConfigResponse(config=v2extensions.as_message(config, mc.ModelConfig()))

        return await self._rpc("ModelConfig", request, context, body)

    async def ModelStatistics(self, request: Any, context: Context) -> Any:
        """Every ready version of every model (no name), of one model (no version), or one."""

        async def body(call: Call) -> Any:
            version = self._version(request.version, "version") if request.name else None
            models = v2extensions.stats_versions(self.state, call, request.name, version)
            stats = v2extensions.model_statistics(models)
            return v2extensions.as_message(stats, pb.ModelStatisticsResponse())

        return await self._rpc("ModelStatistics", request, context, body)

    async def _infer(self, request: Any, call: Call, timeout_s: float | None) -> Any:
        state = self.state
        model = admit(state, call, request.model_name, self._version(request.model_version))
        params = {k: grpc_messages.param(v) for k, v in request.parameters.items()}
        answer = await v2infer.run(
            state, call, model, grpc_messages.inputs(request), params,
            [o.name for o in request.outputs], timeout_s,
        )  # fmt: skip
        return grpc_messages.infer_response(model.name, model.version, request, answer)

    async def ModelInfer(self, request: Any, context: Context) -> Any:
        async def body(call: Call) -> Any:
            # The client's gRPC deadline bounds the wait in the batching queue.
            return await self._infer(request, call, context.time_remaining())

        return await self._rpc("ModelInfer", request, context, body)

    async def ModelStreamInfer(self, request_iterator: Any, context: Context) -> AsyncIterator[Any]:
        """One response per request, in order; an error answers that request, not the stream
        (as Triton's stream: `error_message` set, the stream stays open)."""
        async for request in request_iterator:
            call, start, code = self._call(context), time.perf_counter(), 200
            try:
                self.state.keys.check(*_key_of(context))
                grpc_messages.check_parsed(request, "ModelInfer")
                resp = await self._infer(request, call, context.time_remaining())
                out = pb.ModelStreamInferResponse(infer_response=resp)
            except ServeError as exc:
                code = v2_status(exc)
                out = pb.ModelStreamInferResponse(error_message=json.dumps(exc.body()))
            except Exception:
                log.exception("unhandled error in gRPC ModelStreamInfer")
                code = 500
                out = pb.ModelStreamInferResponse(error_message=json.dumps(_INTERNAL))
            call.close()
            self._record("ModelStreamInfer", call, code, start)
            yield out


def _text(value: str | bytes | None) -> str | None:
    return value.decode("latin-1") if isinstance(value, bytes) else value
