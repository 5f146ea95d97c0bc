"""The Open Inference Protocol (the KServe v2 REST API, as Triton, KServe, MLServer and OpenVINO Model Server
speak it), for every model the service serves, with the binary tensor data extension.

What a request may send and an answer carries is the protocol's, shared with the gRPC service
(service/openinference.py); here: JSON, BYTES in JSON as base64 text (as MLServer and OVMS take them: raw bytes
are not text), and the binary extension. Infer requests run through the same limits, batcher, drain and metrics
as /classify (service/http/endpoints.py), through the same inference core.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Callable

import numpy as np
from starlette.types import ASGIApp, Receive, Scope, Send

from service.errors import BadRequest, NotFound
from service.http.access import RECORD
from service.http.answers import Answer, error_answer, send_answer
from service.http.context import header, record_asked
from service.http.endpoints import hang_up_probe
from service.inference.core import Answers, Asked, Inference
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

INFER_ROUTE = "/v2/models/{name}/infer"  # the route's name in /metrics and traces
_PATH = re.compile(r"/v2/models/(?P<name>[^/]+)(?:/versions/(?P<version>[^/]+))?(?P<what>/ready|/infer)?")
HEADER_LENGTH = b"inference-header-content-length"


def model_route(method: str, path: str) -> tuple[str, str, str | None] | None:
    """(kind, model name, version or None) for a /v2/models/... path; kind is metadata, ready or infer."""
    match = _PATH.fullmatch(path)
    if match is None:
        return None
    kind = {None: "metadata", "/ready": "ready", "/infer": "infer"}[match["what"]]
    return kind, match["name"], match["version"]


class OpenInference:
    """The v2 routes as one ASGI app: infer through `endpoints` (the limits /classify runs under), the rest answered
    here, through the inference core `inference()` returns (None while the models load)."""

    def __init__(
        self,
        inference: Callable[[], Inference | None],
        endpoints: ASGIApp,
        draining: Callable[[], bool],
        server_name: str,
    ) -> None:
        self.inference, self.endpoints, self.draining = inference, endpoints, draining
        self.server_name = server_name

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path, method, request_id = scope["path"], scope["method"], scope[RECORD].request_id
        route = model_route(method, path)
        wanted = "POST" if route and route[0] == "infer" else "GET"
        if method != wanted:
            answer = Answer(
                405,
                {"error": f"{method} {path} is not allowed; use {wanted}", "request_id": request_id},
                [(b"allow", wanted.encode())],
            )
        elif route and route[0] == "infer":
            scope["route"], scope["v2"] = INFER_ROUTE, route
            await self.endpoints(scope, receive, send)
            return
        elif path == "/v2":
            answer = self.server()
        elif path == "/v2/health/live":
            answer = Answer(200, {"live": True})
        elif path == "/v2/health/ready":
            answer = self.ready(self.draining())
        elif route is not None:
            try:
                answer = self.model(*route)
            except NotFound as exc:
                answer = error_answer(exc, request_id)
        else:
            answer = Answer(404, {"error": f"no route for {method} {path}; /docs lists them", "request_id": request_id})
        await send_answer(send, answer)

    def server(self) -> Answer:
        return Answer(
            200, {"name": self.server_name, "version": package_version(), "extensions": ["binary_tensor_data"]}
        )

    def ready(self, draining: bool) -> Answer:
        ready = self.inference() is not None and not draining
        return Answer(200 if ready else 503, {"ready": ready})

    def model(self, kind: str, name: str, version: str | None) -> Answer:
        """GET /v2/models/NAME[/versions/V][/ready]: metadata, or readiness."""
        model = self._core().repository.answering(name, version, in_path=True).model
        if kind == "ready":
            return Answer(200, {"name": name, "ready": True})
        return Answer(200, model_metadata(name, model))

    async def infer(self, scope: Scope, body: bytes) -> Answer:
        """POST /v2/models/NAME[/versions/V]/infer."""
        _, name, version = scope["v2"]
        core = self._core()
        core.repository.answering(name, version, in_path=True)  # an unknown model or version before the body's errors
        request, binary = _split(scope, body)
        top_k = _whole(request.get("parameters", {}).get("top_k", DEFAULT_TOP_K), "parameters.top_k")
        inputs = request.get("inputs")
        if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
            raise BadRequest(f"send exactly one input: {INPUTS_TEXT}")
        tensor, images = _input(inputs[0], binary)
        asked = Asked(name, top_k, images, tensor, version, in_path=True, whole=True, hung_up=hang_up_probe(scope))
        record_asked(scope, name, asked.count)
        return _response(request, await core.classify(asked), top_k)

    def _core(self) -> Inference:
        core = self.inference()
        if core is None:
            raise NotFound("the models are still loading; retry shortly")
        return core


def _split(scope: Scope, body: bytes) -> tuple[dict, bytes]:
    """The request's JSON and the binary data after it (the binary tensor data extension)."""
    length = header(scope, HEADER_LENGTH)
    if length:
        if not length.isdigit() or int(length) > len(body):
            raise BadRequest(
                f"Inference-Header-Content-Length {length.decode('latin-1')!r} does not fit a body of {len(body)} bytes"
            )
        head, binary = body[: int(length)], body[int(length) :]
    else:
        head, binary = body, b""
    try:
        request = json.loads(head)
    except (ValueError, UnicodeDecodeError) as exc:
        needs = (
            ""
            if length
            else (
                "; a request with binary tensor data after its JSON needs the header Inference-Header-Content-Length: "
                "the JSON part's length in bytes"
            )
        )
        raise BadRequest(f"the inference request is not valid JSON ({exc}){needs}") from None
    if not isinstance(request, dict):
        raise BadRequest("the inference request must be a JSON object with inputs")
    return request, binary


def _whole(value: object, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadRequest(f"{what} must be a whole number, got {value!r}")
    return value


def _input(given: dict, binary: bytes) -> tuple[np.ndarray | None, list[bytes] | None]:
    """(FP32 tensor, None) or (None, image files) from the request's one input."""
    name, datatype, shape = given.get("name"), given.get("datatype"), given.get("shape")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise BadRequest(f"input {name}: shape must be a list of whole numbers, got {shape!r}")
    size = (given.get("parameters") or {}).get("binary_data_size")
    if size is not None:
        size = _whole(size, f"input {name}: binary_data_size")
        if size > len(binary):
            raise BadRequest(f"input {name}: binary_data_size {size} is more than the {len(binary)} bytes sent")
        data: object = binary[:size]
    elif "data" in given:
        data = given["data"]
    else:
        raise BadRequest(f"input {name}: it has neither data nor binary_data_size")
    if name == IMAGE:
        images = binary_elements(data) if isinstance(data, bytes) else _base64_elements(data)
        return None, images_input(datatype, shape, images)
    if name == TENSOR:
        return tensor_input(datatype, shape, data), None
    raise unknown_input(name)


def _base64_elements(data: object) -> list[bytes]:
    """BYTES in JSON: each element an image file as base64 text."""
    if not isinstance(data, list):
        raise BadRequest(f"input {IMAGE}: data must be a list of base64 strings")
    flat = [item for row in data for item in (row if isinstance(row, list) else [row])]
    images = []
    for index, item in enumerate(flat):
        try:
            if not isinstance(item, str):
                raise ValueError("not a string")
            images.append(base64.b64decode(item, validate=True))
        except (ValueError, binascii.Error):
            raise BadRequest(
                f"input {IMAGE}, element {index}: not base64 text; in JSON each BYTES element is an "
                "image file in base64 (raw bytes go with the binary tensor data extension)"
            ) from None
    return images


def _response(request: dict, answers: Answers, top_k: int) -> Answer:
    requested = request.get("outputs")
    if requested is not None and (not isinstance(requested, list) or not all(isinstance(o, dict) for o in requested)):
        raise BadRequest("outputs must be a list of objects with a name")
    parameters = {o.get("name"): o.get("parameters") or {} for o in requested or []}
    names = output_names(None if requested is None else list(parameters), answers)
    all_binary = bool((request.get("parameters") or {}).get("binary_data_output"))
    outputs, binary = [], []
    for tensor in output_tensors(answers, top_k, names):
        entry = {"name": tensor.name, "datatype": tensor.datatype, "shape": tensor.shape}
        if parameters.get(tensor.name, {}).get("binary_data", all_binary):
            binary.append(tensor.raw())
            entry["parameters"] = {"binary_data_size": len(binary[-1])}
        else:
            entry["data"] = tensor.listed()
        outputs.append(entry)
    body = {"model_name": answers.model, "model_version": answers.version, "outputs": outputs}
    if "id" in request:
        body["id"] = request["id"]
    if not binary:
        return Answer(200, body)
    head = json.dumps(body, separators=(",", ":")).encode()
    return Answer(
        200,
        None,
        [(HEADER_LENGTH, str(len(head)).encode())],
        raw=head + b"".join(binary),
        content_type=b"application/octet-stream",
    )
