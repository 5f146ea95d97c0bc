"""The Open Inference Protocol (the KServe v2 REST API, as Triton, KServe, MLServer and OpenVINO Model Server
speak it), for every model the service serves, with the binary tensor data extension.

Inputs, one per request: `image`, BYTES [N] (or [N, 1]): encoded image files, base64 text in JSON (as MLServer
and OVMS take BYTES in JSON: raw bytes are not text), raw with the binary extension; or `input`, FP32
[N, 3, 32, 32], already normalized with the model's mean and std (GET /v2/models/NAME lists them). Outputs:
`probabilities`, FP32 [N, classes], `labels`, BYTES [N, top_k] (the request parameter `top_k`, default 3), and
for a model with an out-of-distribution score, `ood_score`, FP32 [N] (core/ood.py; the threshold is in the
model's metadata); all of them unless the request names some. The protocol has no per-item errors: one bad
image fails the request with its index in the message. Infer requests run through the same limits, batcher,
drain and metrics as /classify (service/http/endpoints.py), through the same inference core.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import struct
from collections.abc import Callable
from importlib.metadata import PackageNotFoundError, version

import numpy as np
from starlette.types import ASGIApp, Receive, Scope, Send

from service.errors import BadRequest, NotFound
from service.http.access import RECORD
from service.http.answers import Answer, error_answer, send_answer
from service.http.context import header, record_asked
from service.http.endpoints import hang_up_probe
from service.inference.core import Answers, Asked, Inference

INFER_ROUTE = "/v2/models/{name}/infer"  # the route's name in /metrics and traces
_PATH = re.compile(r"/v2/models/(?P<name>[^/]+)(?:/versions/(?P<version>[^/]+))?(?P<what>/ready|/infer)?")
HEADER_LENGTH = b"inference-header-content-length"
IMAGE, TENSOR, PROBABILITIES, LABELS, OOD_SCORE = "image", "input", "probabilities", "labels", "ood_score"
DEFAULT_TOP_K = 3
# What a model's metadata passes on from /models.
METADATA_PARAMETERS = (
    "class_names",
    "mean",
    "std",
    "precision",
    "arch",
    "test_accuracy",
    "store_tag",
    "out_of_distribution",
)


def package_version() -> str:
    try:
        return version("cifar10-service")
    except PackageNotFoundError:
        return "0+unknown"


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
        described = model.describe()
        classes = len(described["class_names"])
        return Answer(
            200,
            {
                "name": name,
                "versions": list(model.versions),  # the answering copy's first
                "platform": "onnx_onnxv1",
                "inputs": [
                    {"name": IMAGE, "datatype": "BYTES", "shape": [-1]},
                    {
                        "name": TENSOR,
                        "datatype": "FP32",
                        "shape": [-1, 3, described["input_size"], described["input_size"]],
                    },
                ],
                "outputs": [
                    {"name": PROBABILITIES, "datatype": "FP32", "shape": [-1, classes]},
                    {"name": LABELS, "datatype": "BYTES", "shape": [-1, -1]},
                    *([{"name": OOD_SCORE, "datatype": "FP32", "shape": [-1]}] if model.ood else []),
                ],
                "parameters": {key: described[key] for key in METADATA_PARAMETERS},
            },
        )

    async def infer(self, scope: Scope, body: bytes) -> Answer:
        """POST /v2/models/NAME[/versions/V]/infer."""
        _, name, version = scope["v2"]
        core = self._core()
        core.repository.answering(name, version, in_path=True)  # an unknown model or version before the body's errors
        request, binary = _split(scope, body)
        top_k = _whole(request.get("parameters", {}).get("top_k", DEFAULT_TOP_K), "parameters.top_k")
        inputs = request.get("inputs")
        if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
            raise BadRequest(
                f"send exactly one input: {IMAGE} (BYTES, encoded images) or {TENSOR} (FP32 [N, 3, 32, 32], normalized)"
            )
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
        if datatype != "BYTES" or len(shape) not in (1, 2) or (len(shape) == 2 and shape[1] != 1):
            raise BadRequest(f"input {IMAGE} is BYTES with shape [N] (or [N, 1]), got {datatype} {shape}")
        images = _binary_elements(data) if isinstance(data, bytes) else _base64_elements(data)
        if len(images) != shape[0]:
            raise BadRequest(f"input {IMAGE}: shape says {shape[0]} images, the data holds {len(images)}")
        return None, images
    if name == TENSOR:
        if datatype != "FP32" or len(shape) != 4 or shape[1:] != [3, 32, 32]:
            raise BadRequest(f"input {TENSOR} is FP32 with shape [N, 3, 32, 32], got {datatype} {shape}")
        try:
            tensor = (np.frombuffer(data, "<f4") if isinstance(data, bytes) else np.asarray(data, np.float32)).reshape(
                shape
            )
        except (ValueError, TypeError) as exc:
            raise BadRequest(f"input {TENSOR}: its data does not fill shape {shape} ({exc})") from None
        if not np.isfinite(tensor).all():
            raise BadRequest(f"input {TENSOR}: its data holds NaN or infinite values")
        return np.ascontiguousarray(tensor, np.float32), None
    raise BadRequest(f"unknown input {name!r}: send {IMAGE} (BYTES, encoded images) or {TENSOR} (FP32 [N, 3, 32, 32])")


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


def _binary_elements(data: bytes) -> list[bytes]:
    """BYTES in binary: each element a 4-byte little-endian length, then its bytes."""
    images, position = [], 0
    while position < len(data):
        if position + 4 > len(data):
            raise BadRequest(f"input {IMAGE}: its binary data ends inside an element's length")
        (length,) = struct.unpack_from("<I", data, position)
        position += 4
        if position + length > len(data):
            raise BadRequest(f"input {IMAGE}: element {len(images)} says {length} bytes, fewer are left")
        images.append(data[position : position + length])
        position += length
    return images


def _response(request: dict, answers: Answers, top_k: int) -> Answer:
    ranked, classes = answers.ranked, answers.class_names
    requested = request.get("outputs")
    wanted = {PROBABILITIES: {}, LABELS: {}, **({OOD_SCORE: {}} if ranked.ood_scores is not None else {})}
    if requested is not None:
        if not isinstance(requested, list) or not all(isinstance(o, dict) for o in requested):
            raise BadRequest("outputs must be a list of objects with a name")
        unknown = [o.get("name") for o in requested if o.get("name") not in wanted]
        if unknown:
            raise BadRequest(f"unknown outputs {unknown}: this model has {', '.join(wanted)}")
        wanted = {o["name"]: o.get("parameters") or {} for o in requested}
    all_binary = bool((request.get("parameters") or {}).get("binary_data_output"))
    n = len(ranked)
    probabilities = np.empty((n, len(classes)), np.float32)
    np.put_along_axis(probabilities, ranked.classes[..., 0].astype(np.int64), ranked.classes[..., 1], axis=1)
    labels = [[classes[int(i)] for i in row] for row in ranked.classes[:, :top_k, 0]]
    floats = {PROBABILITIES: probabilities, OOD_SCORE: ranked.ood_scores}
    outputs, binary = [], []
    for output, parameters in wanted.items():
        as_binary = bool(parameters.get("binary_data", all_binary))
        if output in floats:
            values = floats[output].astype("<f4")
            entry = {"name": output, "datatype": "FP32", "shape": list(values.shape)}
            if as_binary:
                binary.append(values.tobytes())
            else:
                entry["data"] = values.ravel().tolist()
        else:
            entry = {"name": output, "datatype": "BYTES", "shape": [n, top_k]}
            if as_binary:
                binary.append(
                    b"".join(struct.pack("<I", len(t)) + t for row in labels for t in (s.encode() for s in row))
                )
            else:
                entry["data"] = [label for row in labels for label in row]
        if as_binary:
            entry["parameters"] = {"binary_data_size": len(binary[-1])}
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
