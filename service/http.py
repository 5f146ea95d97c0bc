"""The HTTP surface: the public routes (FastAPI, mounted on the BentoML service) and the direct path to them.

The classification routes are the hot path. `DirectRoutes` hands them to the public app
ahead of BentoML's per-request middleware (tracing, access log, HTTP metrics, timeout),
which cost about 2 ms of CPU per request and capped one worker at ~380 requests/s
(BENCHMARKS.md). `Limits` and `RequestMetrics` keep what those routes still need:
body-size, concurrency and time limits with clear errors, and Prometheus request metrics.
"""

import asyncio
import json
import logging
import time

import bentoml
from fastapi import FastAPI
from starlette.datastructures import FormData, UploadFile
from starlette.formparsers import MultiPartException
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.settings import SETTINGS

DEFAULT_MODEL = "resnet18"  # for requests that name no model
RETRY_AFTER_S = b"1"
MAX_PARSED_FILES = 1000  # parsed before the batch limit is checked, so its error can name the count
logger = logging.getLogger("cifar10.http")

REQUESTS = bentoml.metrics.Counter(
    name="cifar10_http_requests_total", documentation="Classification requests answered, by endpoint and status",
    labelnames=["endpoint", "status"],
)
REQUEST_SECONDS = bentoml.metrics.Histogram(
    name="cifar10_http_request_seconds", documentation="Classification request time, by endpoint",
    labelnames=["endpoint"], buckets=(0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0),
)


class BadRequest(Exception):
    """A request the routes cannot use; its message is the 400 answer."""


class _TooLarge(Exception):
    pass


class Limits:
    """413 for bodies over `max_body_bytes`; 429 past `max_concurrency` in flight; 504 after `timeout_s`.

    503 and 429 answers carry Retry-After.
    """

    def __init__(self, app: ASGIApp, max_body_bytes: int, max_concurrency: int, timeout_s: float) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.max_concurrency = max_concurrency
        self.timeout_s = timeout_s
        self.in_flight = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.in_flight >= self.max_concurrency:
            await _json(send, 429, "too many requests in flight; retry shortly", retry=True)
            return
        self.in_flight += 1
        try:
            await self._limited(scope, receive, send)
        finally:
            self.in_flight -= 1

    async def _limited(self, scope: Scope, receive: Receive, send: Send) -> None:
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
            await self._reject(send)
            return
        received = 0
        started = False

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body_bytes:
                    raise _TooLarge
            return message

        async def annotating_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                if message["status"] == 503:
                    message = {**message, "headers": [*message.get("headers", []), (b"retry-after", RETRY_AFTER_S)]}
            await send(message)

        try:
            async with asyncio.timeout(self.timeout_s):
                await self.app(scope, counting_receive, annotating_send)
        except _TooLarge:
            await self._reject(send)
        except TimeoutError:
            if not started:
                await _json(send, 504, f"no answer within {self.timeout_s:g} s; retry later or send fewer images")

    async def _reject(self, send: Send) -> None:
        limit_mb = self.max_body_bytes / (1024 * 1024)
        await _json(send, 413, f"request body is larger than the {limit_mb:g} MB limit; send a smaller image")


class RequestMetrics:
    """Counts each request by endpoint and status and observes its duration."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        status = 500
        started = time.perf_counter()

        async def recording_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, recording_send)
        finally:
            endpoint = scope["path"]
            REQUEST_SECONDS.labels(endpoint=endpoint).observe(time.perf_counter() - started)
            REQUESTS.labels(endpoint=endpoint, status=str(status)).inc()


class DirectRoutes:
    """POSTs to DIRECT_ROUTES run through limits and metrics only; everything else goes to BentoML's app."""

    def __init__(self, bentoml_app: ASGIApp, max_body_bytes: int, max_concurrency: int, timeout_s: float,
                 cors: dict | None = None) -> None:
        """`cors`: CORSMiddleware options when BentoML's CORS is on (its preflights stay BentoML's)."""
        self.bentoml_app = bentoml_app
        self.direct = RequestMetrics(Limits(_direct_endpoint, max_body_bytes, max_concurrency, timeout_s))
        if cors:
            self.direct = CORSMiddleware(self.direct, **cors)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] not in DIRECT_ROUTES:
            await self.bentoml_app(scope, receive, send)
            return
        try:
            await self.direct(scope, receive, send)
        except Exception:  # a bug, not bad input: log it and answer in JSON like every other error
            logger.exception("%s failed", scope["path"])
            await _json(send, 500, "internal server error; the server log has the details")


async def _json(send: Send, status: int, error: str, retry: bool = False) -> None:
    body = json.dumps({"error": error}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if retry:
        headers.append((b"retry-after", RETRY_AFTER_S))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def _form(request: Request, max_files: int) -> FormData:
    try:
        return await request.form(max_files=max_files, max_fields=16)
    except MultiPartException as exc:
        raise BadRequest(f"invalid multipart body: {exc.message}") from None
    except (ValueError, KeyError) as exc:  # e.g. a multipart Content-Type without a boundary
        raise BadRequest(f"invalid multipart body: {exc}") from None


async def _file(value: str | UploadFile | None, field: str) -> bytes:
    if value is None:
        raise BadRequest(f"{field}: missing; send the image as a multipart file field named {field}")
    if isinstance(value, str):
        raise BadRequest(f"{field}: a text field; send the image as a file (curl -F {field}=@cat.jpg)")
    return await value.read()


def _options(form: FormData) -> tuple[str, int]:
    model = form.get("model", DEFAULT_MODEL)
    top_k = form.get("top_k", "3")
    if not isinstance(model, str) or not isinstance(top_k, str):
        raise BadRequest("model and top_k are text fields, not files")
    try:
        return model, int(top_k)
    except ValueError:
        raise BadRequest(f"top_k must be a whole number, got {top_k!r}") from None


FORM_FIELDS = {
    "model": {"type": "string", "default": DEFAULT_MODEL, "description": "resnet18 or lenet"},
    "top_k": {"type": "integer", "default": 3, "description": "how many labels to return, 1-10"},
}


def _multipart_body(files: dict) -> dict:
    schema = {"type": "object", "required": list(files), "properties": {**files, **FORM_FIELDS}}
    return {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": schema}}}}


async def classify(request: Request) -> JSONResponse:
    """Classify one image: the top_k CIFAR-10 labels with softmax probabilities."""
    try:
        form = await _form(request, max_files=1)
        data = await _file(form.get("image"), "image")
        model, top_k = _options(form)
    except BadRequest as exc:
        return JSONResponse({"error": str(exc)}, status_code=400)
    status, body = await bentoml.get_current_service().classify(data, model, top_k)
    return JSONResponse(body, status_code=status)


async def classify_batch(request: Request) -> JSONResponse:
    """Classify several images: one result per image, in order, each `predictions` or `error`."""
    try:
        form = await _form(request, max_files=MAX_PARSED_FILES)
        values = form.getlist("images")
        if not values:
            raise BadRequest("images: missing; send one or more files in fields named images")
        items = [await _file(value, "images") for value in values]
        model, top_k = _options(form)
    except BadRequest as exc:
        return JSONResponse({"error": str(exc)}, status_code=400)
    status, body = await bentoml.get_current_service().classify_batch(items, model, top_k)
    return JSONResponse(body, status_code=status)


DIRECT_ROUTES = {"/classify": classify, "/classify_batch": classify_batch}


async def _direct_endpoint(scope: Scope, receive: Receive, send: Send) -> None:
    response = await DIRECT_ROUTES[scope["path"]](Request(scope, receive))
    await response(scope, receive, send)


def api_app() -> FastAPI:
    """The public routes, mounted on the BentoML service; BentoML merges them into its OpenAPI spec."""
    app = FastAPI(title="cifar10-classifier")
    errors = {s: {"description": d, "content": {"application/json": {"example": {"error": "..."}}}} for s, d in (
        (400, "bad input"), (413, "too large"), (415, "unsupported type"), (429, "too many requests"),
        (503, "overloaded"), (504, "timed out"))}
    image = {"type": "string", "format": "binary", "description": "an image file (JPEG, PNG, WebP, GIF, BMP, TIFF)"}
    images = {"type": "array", "items": image, "description": f"repeated field; at most {SETTINGS.max_batch_images}"}
    # The routes read their form themselves: FastAPI's per-field parsing and validation cost
    # ~30% of a LeNet request. The body schemas are declared here for the docs instead.
    for path, files in (("/classify", {"image": image}), ("/classify_batch", {"images": images})):
        app.add_api_route(path, DIRECT_ROUTES[path], methods=["POST"], responses=errors,
                          openapi_extra=_multipart_body(files))

    @app.get("/models")
    async def models() -> JSONResponse:
        """The served models, their versions, input contract, accuracy and execution provider."""
        return JSONResponse(bentoml.get_current_service().describe())

    return app
