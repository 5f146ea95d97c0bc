"""The HTTP surface: the public routes (FastAPI, mounted on the BentoML service), the direct path to
them, the page at / (BentoML's Swagger UI moves to /docs), and the one mapping from errors to HTTP answers.

The classification routes are the hot path. `Router` hands them to the public app
ahead of BentoML's per-request middleware (tracing, access log, HTTP metrics, timeout),
which cost about 2 ms of CPU per request and capped one worker at ~380 requests/s
(BENCHMARKS.md). `Limits` and `RequestMetrics` keep what those routes still need:
body-size, concurrency and time limits with clear errors, and Prometheus request metrics.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from pathlib import Path

from fastapi import FastAPI
from starlette.datastructures import FormData, UploadFile
from starlette.formparsers import MultiPartException
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from core.errors import ImageError, ImageTooLarge, UnsupportedImage
from service.drain import Drain
from service.errors import (
    BadRequest,
    BodyTooLarge,
    Overloaded,
    ShuttingDown,
    SlowRequest,
    TimedOut,
    TooManyRequests,
)
from service.metrics import REQUEST_SECONDS, REQUESTS
from service.predictor import Prediction, Predictor
from service.settings import Settings

RETRY_AFTER_S = "1"
PAGE = Path(__file__).resolve().parent / "page"  # the page at / for people to try the service (plain HTML)
MAX_PARSED_FILES = 1000  # parsed before the batch limit is checked, so its error can name the count
logger = logging.getLogger("cifar10.http")

# Most specific first: the first match gives the status.
STATUSES: tuple[tuple[type[Exception], int], ...] = (
    (ImageTooLarge, 413),
    (UnsupportedImage, 415),
    (ImageError, 400),
    (BadRequest, 400),
    (BodyTooLarge, 413),
    (SlowRequest, 408),
    (TooManyRequests, 429),
    (Overloaded, 503),
    (ShuttingDown, 503),
    (TimedOut, 504),
)
ANSWERED = tuple(kind for kind, _ in STATUSES)


def status_of(exc: Exception) -> int:
    return next((status for kind, status in STATUSES if isinstance(exc, kind)), 500)


def error_response(exc: Exception) -> JSONResponse:
    """The answer to any error: `{"error": message}` with its status, and Retry-After when retrying helps."""
    status = status_of(exc)
    message = str(exc) if status != 500 else "internal server error; the server log has the details"
    headers = {"retry-after": RETRY_AFTER_S} if status in (429, 503) else {}
    if isinstance(exc, (SlowRequest, ShuttingDown)):  # the rest of the body, or this worker, is gone
        headers["connection"] = "close"
    return JSONResponse({"error": message}, status_code=status, headers=headers)


class Limits:
    """413 for bodies over `max_body_bytes`, 408 for bodies slower than `body_timeout_s`, 429 past
    `max_concurrency` in flight, 504 after `timeout_s`.

    The body is read whole before a request counts as in flight, so clients that send slowly hold
    a connection, never a place among the requests being served.
    """

    def __init__(
        self, app: ASGIApp, max_body_bytes: int, max_concurrency: int, timeout_s: float, body_timeout_s: float = 30
    ) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.max_concurrency = max_concurrency
        self.timeout_s = timeout_s
        self.body_timeout_s = body_timeout_s
        self.running = 0  # requests past their body read, against max_concurrency

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            body = await self._body(scope, receive)
        except (BodyTooLarge, SlowRequest) as exc:
            await error_response(exc)(scope, receive, send)
            return
        if self.running >= self.max_concurrency:
            await error_response(TooManyRequests("too many requests in flight; retry shortly"))(scope, receive, send)
            return
        self.running += 1
        try:
            await self._limited(scope, _replay(body, receive), send)
        finally:
            self.running -= 1

    async def _body(self, scope: Scope, receive: Receive) -> bytes:
        too_large = BodyTooLarge(
            f"request body is larger than the {size_text(self.max_body_bytes)} limit; send a smaller image"
        )
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
            raise too_large
        chunks, size = [], 0
        try:
            async with asyncio.timeout(self.body_timeout_s):
                while True:
                    message = await receive()
                    if message["type"] != "http.request":  # the client went away
                        break
                    chunks.append(message.get("body", b""))
                    size += len(chunks[-1])
                    if size > self.max_body_bytes:
                        raise too_large
                    if not message.get("more_body"):
                        break
        except TimeoutError:
            raise SlowRequest(
                f"the request body did not arrive within {self.body_timeout_s:g} s; "
                "send it faster or send a smaller image"
            ) from None
        return b"".join(chunks)

    async def _limited(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = False

        async def noting_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            async with asyncio.timeout(self.timeout_s):
                await self.app(scope, receive, noting_send)
        except TimeoutError:
            if not started:
                timed_out = TimedOut(f"no answer within {self.timeout_s:g} s; retry later or send fewer images")
                await error_response(timed_out)(scope, receive, send)


def size_text(size: int) -> str:
    """Bytes as people write them: 10 MB, 4 KB, 900 bytes (binary units)."""
    for unit, scale in (("MB", 2**20), ("KB", 2**10)):
        if size >= scale:
            return f"{size / scale:.3g} {unit}"
    return f"{size} bytes"


def _replay(body: bytes, receive: Receive) -> Receive:
    """A receive that gives the body already read, then whatever the connection says next (a disconnect)."""
    pending = [{"type": "http.request", "body": body, "more_body": False}]

    async def replay() -> Message:
        return pending.pop() if pending else await receive()

    return replay


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


def _options(form: FormData, default_model: str) -> tuple[str, int]:
    model = form.get("model", default_model)
    top_k = form.get("top_k", "3")
    if not isinstance(model, str) or not isinstance(top_k, str):
        raise BadRequest("model and top_k are text fields, not files")
    try:
        return model, int(top_k)
    except ValueError:
        raise BadRequest(f"top_k must be a whole number, got {top_k!r}") from None


def _predictions(predictions: list[Prediction]) -> list[dict]:
    return [prediction._asdict() for prediction in predictions]


class HttpApi:
    """The public routes, answered by the Predictor given to `attach` (when the service has loaded its models)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.predictor: Predictor | None = None
        self.default_model = settings.models[0][0]  # for requests that name no model
        self.drain = Drain(settings.drain_s)
        self.routes = {"/classify": self.classify, "/classify_batch": self.classify_batch}
        self.app = self._app()

    def attach(self, predictor: Predictor) -> None:
        self.predictor = predictor

    def router(self, bentoml_app: ASGIApp, cors: dict | None) -> Router:
        """BentoML's app with the classification routes put ahead of its middleware."""
        limited = Limits(
            self._endpoint,
            self.settings.max_body_bytes,
            self.settings.max_concurrency,
            self.settings.timeout_s,
            self.settings.body_timeout_s,
        )
        return Router(bentoml_app, self.routes, RequestMetrics(limited), self.drain, cors)

    async def classify(self, request: Request) -> Response:
        """Classify one image: the top_k CIFAR-10 labels with softmax probabilities."""
        try:
            form = await _form(request, max_files=1)
            data = await _file(form.get("image"), "image")
            model, top_k = _options(form, self.default_model)
            [result] = await self.predictor.classify([data], model, top_k)
            if isinstance(result, ImageError):
                raise result
        except ANSWERED as exc:
            return error_response(exc)
        return JSONResponse(
            {"model": model, "model_version": self.predictor.version(model), "predictions": _predictions(result)}
        )

    async def classify_batch(self, request: Request) -> Response:
        """Classify several images: one result per image, in order, each `predictions` or `error`."""
        try:
            form = await _form(request, max_files=MAX_PARSED_FILES)
            values = form.getlist("images")
            if not values:
                raise BadRequest("images: missing; send one or more files in fields named images")
            items = [await _file(value, "images") for value in values]
            model, top_k = _options(form, self.default_model)
            results = await self.predictor.classify(items, model, top_k)
        except ANSWERED as exc:
            return error_response(exc)
        return JSONResponse(
            {
                "model": model,
                "model_version": self.predictor.version(model),
                "results": [
                    {"error": str(r), "status": status_of(r)}
                    if isinstance(r, ImageError)
                    else {"predictions": _predictions(r)}
                    for r in results
                ],
            }
        )

    async def models(self) -> JSONResponse:
        """The served models, their versions, input contract, accuracy and execution provider."""
        return JSONResponse(self.predictor.describe())

    async def _endpoint(self, scope: Scope, receive: Receive, send: Send) -> None:
        response = await self.routes[scope["path"]](Request(scope, receive))
        await response(scope, receive, send)

    def _app(self) -> FastAPI:
        """The public routes, mounted on the BentoML service; BentoML merges them into its OpenAPI spec."""
        app = FastAPI(title="cifar10-classifier")
        errors = {
            s: {"description": d, "content": {"application/json": {"example": {"error": "..."}}}}
            for s, d in (
                (400, "bad input"),
                (408, "headers or body too slow"),
                (413, "too large"),
                (415, "unsupported type"),
                (429, "too many requests"),
                (503, "overloaded, or shutting down"),
                (504, "timed out"),
            )
        }
        image = {"type": "string", "format": "binary", "description": "an image file (JPEG, PNG, WebP, GIF, BMP, TIFF)"}
        images = {
            "type": "array",
            "items": image,
            "description": f"repeated field; at most {self.settings.max_batch_images}",
        }
        # The routes read their form themselves: FastAPI's per-field parsing and validation cost
        # ~30% of a LeNet request. The body schemas are declared here for the docs instead.
        names = [name for name, _ in self.settings.models]
        options = {
            "model": {"type": "string", "enum": names, "default": names[0], "description": "the model to answer"},
            "top_k": {"type": "integer", "default": 3, "description": "how many labels to return, 1-10"},
        }
        for path, files in (("/classify", {"image": image}), ("/classify_batch", {"images": images})):
            body = {"type": "object", "required": list(files), "properties": {**files, **options}}
            openapi = {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": body}}}}
            app.add_api_route(path, self.routes[path], methods=["POST"], responses=errors, openapi_extra=openapi)
        app.add_api_route("/models", self.models, methods=["GET"])
        app.mount("/page", StaticFiles(directory=PAGE), name="page")  # the page's script and style sheet
        return app


class Router:
    """The worker's outermost ASGI app: every request is tracked by the drain, refused while it drains, and
    POSTs to `routes` run through `classification` (limits and metrics) ahead of BentoML's middleware;
    everything else goes to BentoML."""

    def __init__(
        self, bentoml_app: ASGIApp, routes: dict, classification: ASGIApp, drain: Drain, cors: dict | None = None
    ) -> None:
        """`cors`: CORSMiddleware options when BentoML's CORS is on (its preflights stay BentoML's)."""
        self.bentoml_app = bentoml_app
        self.paths = set(routes)
        self.classification = CORSMiddleware(classification, **cors) if cors else classification
        self.drain = drain

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.bentoml_app(scope, receive, send)
            return
        await self.drain.track(scope, receive, send, self._route)

    async def _route(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.drain.draining and scope["path"] not in STILL_SERVED_WHILE_DRAINING:
            await _refuse(scope, receive, send)
        elif scope["method"] == "GET" and scope["path"] == "/":
            await FileResponse(PAGE / "index.html")(scope, receive, send)
        elif scope["method"] == "GET" and scope["path"] == "/docs":  # BentoML's Swagger UI, which it serves at /
            await self.bentoml_app({**scope, "path": "/", "raw_path": b"/"}, receive, send)
        elif scope["method"] != "POST" or scope["path"] not in self.paths:
            await self.bentoml_app(scope, receive, _json_errors(scope, send))
        else:
            try:
                await self.classification(scope, receive, send)
            except Exception as exc:  # a bug, not bad input: log it and answer in JSON like every other error
                logger.exception("%s failed", scope["path"])
                await error_response(exc)(scope, receive, send)


def _json_errors(scope: Scope, send: Send) -> Send:
    """A send that turns BentoML's and Starlette's plain 404 and 405 answers into this API's JSON errors."""
    replaced = False

    async def replacing_send(message: Message) -> None:
        nonlocal replaced
        if message["type"] == "http.response.start" and message["status"] in (404, 405):
            replaced = True
            allow = [(k, v) for k, v in message.get("headers", []) if k.lower() == b"allow"]
            where = f"{scope['method']} {scope['path']}"
            if message["status"] == 404:
                error = f"no route for {where}; /docs lists them"
            else:
                error = f"{where} is not allowed" + (f"; use {allow[0][1].decode()}" if allow else "")
            body = json.dumps({"error": error}).encode()
            headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *allow]
            await send({"type": "http.response.start", "status": message["status"], "headers": headers})
            await send({"type": "http.response.body", "body": body})
        elif not replaced:
            await send(message)

    return replacing_send


async def _refuse(scope: Scope, receive: Receive, send: Send) -> None:
    """503 for a request that arrived while the worker drains. Its body is read first: closing a connection
    with unread data makes the kernel send a reset, which can destroy the answer before the client reads it."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(1):
            while (await receive()).get("more_body"):
                pass
    await error_response(ShuttingDown("this server is shutting down; retry, another replica will answer"))(
        scope, receive, send
    )


# While draining: liveness, readiness (503 then, from the service's __is_ready__) and metrics.
STILL_SERVED_WHILE_DRAINING = {"/livez", "/readyz", "/metrics"}
