"""The Open Inference Protocol over gRPC: KServe v2's `inference.GRPCInferenceService` with Triton's model-repository
RPCs, and `grpc.health.v1` for Kubernetes' gRPC probes, on CIFAR10_GRPC_PORT in every worker (the workers, and the
several servers of each, share the port with SO_REUSEPORT; the server checks at start that no other process holds it).

Every call goes through the worker's inference core, as the REST routes do (service/http/v2.py), with the same
inputs and outputs (service/openinference.py): `image` BYTES or `input` FP32, in `raw_input_contents` or in typed
contents; the outputs always in `raw_output_contents`, as Triton sends them. The generated messages
(inference_pb2.py, from inference.proto: `make grpc-stubs`) register the package `inference` in protobuf's default
pool, as tritonclient.grpc's do: a process imports one or the other.
"""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import Coroutine

import grpc
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from core.errors import UserError
from service.errors import BadRequest, NotFound
from service.grpc import inference_pb2 as pb
from service.grpc.calls import Calls, too_large
from service.http.access import RequestRecord
from service.http.repository import TURN_ON, RepositoryHandlers, control_on
from service.inference.core import Asked, Inference
from service.openinference import (
    DEFAULT_TOP_K,
    IMAGE,
    INPUTS_TEXT,
    TENSOR,
    binary_elements,
    images_input,
    model_metadata,
    output_names,
    output_tensors,
    package_version,
    tensor_input,
    unknown_input,
)
from service.settings import Settings

SERVICE = "inference.GRPCInferenceService"
# gRPC's own limit on a message, above the service's: a message between the two gets the service's message, which
# names its limit; one past this gets gRPC's own RESOURCE_EXHAUSTED.
MESSAGE_LIMIT_FACTOR = 4
SERVERS_PER_WORKER = 8


def port_in_use(port: int) -> str:
    """Why CIFAR10_GRPC_PORT cannot be served ("" where it can): its workers share the port with SO_REUSEPORT, which
    would let a second server's workers share it silently, so a port another process holds is refused."""
    with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as probe:
        try:
            probe.bind(("::", port))
        except OSError as exc:
            return (
                f"CIFAR10_GRPC_PORT={port}: the port is in use ({exc.strerror}), by another server perhaps; set "
                "CIFAR10_GRPC_PORT to a free port, or 0 to serve no gRPC"
            )
    return ""


def check_port(port: int) -> None:
    problem = port_in_use(port) if port else ""
    if problem:
        raise UserError(problem)


# Each RPC's REST twin, whose key rules it follows (service/http/keys.py), and whether it counts as a request:
# refused while draining, under max_concurrency, in the drain's summary (probes and metadata do not).
ROUTES: dict[str, tuple[str, bool]] = {
    "ServerLive": ("/v2/health/live", False),
    "ServerReady": ("/v2/health/ready", False),
    "ModelReady": ("/v2/models/NAME/ready", False),
    "ServerMetadata": ("/v2", False),
    "ModelMetadata": ("/v2/models/NAME", False),
    "ModelInfer": ("/v2/models/NAME/infer", True),
    "RepositoryIndex": ("/v2/repository/index", True),
    "RepositoryModelLoad": ("/v2/repository/models/NAME/load", True),
    "RepositoryModelUnload": ("/v2/repository/models/NAME/unload", True),
}


class InferenceServicer:
    """The RPCs, each given its message and its access-log record, over the worker's inference core and model
    control; _handlers runs them through `calls`."""

    def __init__(self, settings: Settings, calls: Calls, inference, control, server_name: str) -> None:
        """`inference()`, `control()`: the worker's inference core and model control (None while loading)."""
        self.settings, self.calls, self.server_name = settings, calls, server_name
        self.inference = inference
        self.repository_on = control_on(settings)
        self.handlers = RepositoryHandlers(control)

    def _core(self) -> Inference:
        core = self.inference()
        if core is None:
            raise NotFound("the models are still loading; retry shortly")
        return core

    async def ServerLive(self, request: pb.ServerLiveRequest, record: RequestRecord) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: pb.ServerReadyRequest, record: RequestRecord) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self.inference() is not None and not self.calls.drain.draining)

    async def ModelReady(self, request: pb.ModelReadyRequest, record: RequestRecord) -> pb.ModelReadyResponse:
        self._core().repository.answering(request.name, request.version or None, in_path=True)
        return pb.ModelReadyResponse(ready=True)

    async def ServerMetadata(
        self, request: pb.ServerMetadataRequest, record: RequestRecord
    ) -> pb.ServerMetadataResponse:
        extensions = ["model_repository"] if self.repository_on else []
        return pb.ServerMetadataResponse(name=self.server_name, version=package_version(), extensions=extensions)

    async def ModelMetadata(self, request: pb.ModelMetadataRequest, record: RequestRecord) -> pb.ModelMetadataResponse:
        serving = self._core().repository.answering(request.name, request.version or None, in_path=True)
        described = model_metadata(request.name, serving.model)
        described.pop("parameters")  # the gRPC message has no place for them: GET /v2/models/NAME lists them
        return pb.ModelMetadataResponse(**described)

    async def ModelInfer(self, request: pb.ModelInferRequest, record: RequestRecord) -> pb.ModelInferResponse:
        core = self._core()
        core.repository.answering(request.model_name, request.model_version or None, in_path=True)  # before inputs
        asked = _asked(request)
        record.model, record.images = asked.model, asked.count
        answers = await core.classify(asked)
        names = output_names([o.name for o in request.outputs] or None, answers)
        response = pb.ModelInferResponse(model_name=answers.model, model_version=answers.version, id=request.id)
        for tensor in output_tensors(answers, asked.top_k, names):
            response.outputs.add(name=tensor.name, datatype=tensor.datatype, shape=tensor.shape)
            response.raw_output_contents.append(tensor.raw())
        return response

    async def RepositoryIndex(
        self, request: pb.RepositoryIndexRequest, record: RequestRecord
    ) -> pb.RepositoryIndexResponse:
        self._repository_on()
        answer = await self.handlers.index({}, json.dumps({"ready": request.ready}).encode())
        return pb.RepositoryIndexResponse(models=[pb.RepositoryIndexResponse.ModelIndex(**r) for r in answer.body])

    async def RepositoryModelLoad(
        self, request: pb.RepositoryModelLoadRequest, record: RequestRecord
    ) -> pb.RepositoryModelLoadResponse:
        await self._change(self.handlers.load, request)
        return pb.RepositoryModelLoadResponse()

    async def RepositoryModelUnload(
        self, request: pb.RepositoryModelUnloadRequest, record: RequestRecord
    ) -> pb.RepositoryModelUnloadResponse:
        await self._change(self.handlers.unload, request)
        return pb.RepositoryModelUnloadResponse()

    async def _change(self, handler, request: pb.RepositoryModelLoadRequest | pb.RepositoryModelUnloadRequest) -> None:
        """A load or unload, through the REST route's handler (its checks and its ModelControl change)."""
        self._repository_on()
        body = json.dumps({"parameters": _repository_parameters(request.parameters)}).encode()
        await handler({"repository_model": request.model_name}, body)

    def _repository_on(self) -> None:
        if not self.repository_on:
            raise NotFound(TURN_ON)


def _method(name: str) -> str:
    return f"/{SERVICE}/{name}"


def _asked(request: pb.ModelInferRequest) -> Asked:
    """The inference core's question from an infer request's one input, raw or typed, and its top_k parameter."""
    if len(request.inputs) != 1:
        raise BadRequest(f"send exactly one input: {INPUTS_TEXT}")
    given, raw = request.inputs[0], request.raw_input_contents
    if len(raw) > 1:
        raise BadRequest(f"raw_input_contents holds {len(raw)} entries for the request's one input; send one")
    shape = list(given.shape)
    if any(d < 0 for d in shape):
        raise BadRequest(f"input {given.name}: shape must hold whole numbers of 0 or more, got {shape}")
    named = {"version": request.model_version or None, "in_path": True, "whole": True, "one_per_pass": True}
    top_k = DEFAULT_TOP_K
    if "top_k" in request.parameters:
        parameter = request.parameters["top_k"]
        if parameter.WhichOneof("parameter_choice") not in ("int64_param", "uint64_param"):
            raise BadRequest("parameter top_k must be a whole number (int64_param)")
        top_k = getattr(parameter, parameter.WhichOneof("parameter_choice"))
    if given.name == IMAGE:
        images = binary_elements(raw[0]) if raw else list(given.contents.bytes_contents)
        return Asked(request.model_name, top_k, images=images_input(given.datatype, shape, images), **named)
    if given.name == TENSOR:
        data = raw[0] if raw else given.contents.fp32_contents
        return Asked(request.model_name, top_k, tensor=tensor_input(given.datatype, shape, data), **named)
    raise unknown_input(given.name)


def _repository_parameters(parameters) -> dict:
    """A load's or unload's parameters as the REST routes take them; `sample` may come as text (the message has no
    real numbers)."""
    values = {key: getattr(v, v.WhichOneof("parameter_choice") or "string_param") for key, v in parameters.items()}
    if isinstance(values.get("sample"), str):
        try:
            values["sample"] = float(values["sample"])
        except ValueError:
            raise BadRequest(f'"sample" is a share of requests, e.g. "0.1", got {values["sample"]!r}') from None
    return values


def _handlers(servicer: InferenceServicer, calls: Calls, max_bytes: int) -> grpc.GenericRpcHandler:
    """The service's RPCs, as the .proto declares them, each under `calls` and reading its own message: one over
    `max_bytes` gets RESOURCE_EXHAUSTED naming the limit, bytes that are no such message INVALID_ARGUMENT (gRPC's
    own deserializer would answer INTERNAL for the caller's mistake)."""

    def handler(name: str, request_type: type, response_type: type) -> grpc.RpcMethodHandler:
        method, (as_path, counted) = getattr(servicer, name), ROUTES[name]

        async def handle(data: bytes, context: grpc.aio.ServicerContext) -> object:
            async def answer(record: RequestRecord) -> object:
                record.bytes_in = len(data)
                if len(data) > max_bytes:
                    raise too_large(len(data), max_bytes)
                try:
                    request = request_type.FromString(data)
                except DecodeError as exc:
                    raise BadRequest(
                        f"the message is not an inference.{request_type.__name__} ({exc}); send one"
                    ) from None
                response = await method(request, record)
                record.bytes_out = response.ByteSize()
                return response

            return await calls.run(context, _method(name), as_path, answer, counted)

        return grpc.unary_unary_rpc_method_handler(handle, response_serializer=response_type.SerializeToString)

    service = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    calls.meters.add(_method(m.name) for m in service.methods)
    return grpc.method_handlers_generic_handler(
        SERVICE,
        {
            m.name: handler(m.name, getattr(pb, m.input_type.name), getattr(pb, m.output_type.name))
            for m in service.methods
        },
    )


class GrpcServer:
    """A worker's gRPC servers: the inference service and the health service, stopped by the drain.

    SERVERS_PER_WORKER servers share the port: a grpc.aio server takes in one call per pass of the event loop, so
    with one, concurrent single-image calls each got a model call of their own (BENCHMARKS.md)."""

    def __init__(
        self,
        settings: Settings,
        calls: Calls,
        inference,
        control,
        server_name: str,
    ) -> None:
        self.settings = settings
        limit = settings.max_body_bytes * MESSAGE_LIMIT_FACTOR
        options = [
            ("grpc.so_reuseport", 1),
            ("grpc.max_receive_message_length", limit),
            ("grpc.max_send_message_length", limit),
        ]
        servicer = InferenceServicer(settings, calls, inference, control, server_name)
        handlers = (_handlers(servicer, calls, settings.max_body_bytes),)
        self.health = health.aio.HealthServicer()
        self.servers = [grpc.aio.server(options=options) for _ in range(SERVERS_PER_WORKER)]
        for server in self.servers:
            server.add_generic_rpc_handlers(handlers)
            health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
            server.add_insecure_port(f"[::]:{settings.grpc_port}")
        self.tasks: set[asyncio.Task] = set()

    def start(self) -> None:
        """Start serving, from the worker's event loop (a task of its own)."""
        self._spawn(self._start())

    async def _start(self) -> None:
        await asyncio.gather(*(server.start() for server in self.servers))
        for name in ("", SERVICE):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)

    def draining(self) -> None:
        """The drain has begun: the health service says NOT_SERVING (new calls get UNAVAILABLE from Calls). In the
        worker's event loop."""
        self._spawn(self.health.enter_graceful_shutdown())

    def _spawn(self, work: Coroutine) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self.tasks.add(task)  # held until done: the loop keeps only weak references
        task.add_done_callback(self.tasks.discard)

    async def stop(self, grace_s: float) -> None:
        """After the drain: calls still running get `grace_s`."""
        await asyncio.gather(*(server.stop(grace_s) for server in self.servers))
