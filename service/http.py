"""The HTTP surface: the public routes (FastAPI, mounted on the BentoML service, which documents them),
the router in front of everything, and the page at / (BentoML's Swagger UI moves to /docs).

The classification routes are the hot path. `Router` answers them itself (service/classification.py),
ahead of BentoML's per-request middleware (tracing, access log, HTTP metrics, timeout), which cost
about 2 ms of CPU per request and capped one worker at ~380 requests/s (BENCHMARKS.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Callable
from pathlib import Path

from fastapi import FastAPI
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import FileResponse, JSONResponse
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.access import AccessLog, Exchange
from service.answers import Answer, error_answer, send_answer
from service.api_docs import documented_app
from service.classification import Forms, Limits, classify_handlers, header
from service.drain import Drain
from service.errors import NotFound, ShuttingDown, Unauthorized
from service.keys import ApiKeys
from service.predictor import Predictor
from service.settings import Settings
from service.tracing import continued, request_span, trace_id
from service.v2 import INFER_ROUTE, OpenInference, model_route

PAGE = Path(__file__).resolve().parent / "page"  # the page at / for people to try the service (plain HTML)
SERVER_NAME = "cifar10-classifier"
logger = logging.getLogger("cifar10.http")


class HttpApi:
    """The public routes, answered by the Predictor given to `attach` (when the service has loaded its models)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.predictor: Predictor | None = None
        self.default_model = settings.models[0][0]  # for requests that name no model
        self.drain = Drain(settings.drain_s)
        self.keys = ApiKeys(Path(settings.api_keys_file)) if settings.api_keys_file else None
        self.app = self._app()

    def attach(self, predictor: Predictor) -> None:
        self.predictor = predictor

    def router(self, bentoml_app: ASGIApp, cors: dict | None) -> Router:
        """BentoML's app with the classification routes put ahead of its middleware."""
        v2 = OpenInference(lambda: self.predictor, SERVER_NAME)
        handlers = classify_handlers(lambda: self.predictor, Forms(self.default_model)) | {INFER_ROUTE: v2.infer}
        limits = Limits(
            handlers,
            self.settings.max_body_bytes,
            self.settings.max_concurrency,
            self.settings.timeout_s,
            self.settings.body_timeout_s,
        )
        methods = {"/classify": ("POST", "PUT"), "/classify_batch": ("POST",)}  # PUT: curl -T cat.jpg
        access_log = AccessLog(self.settings.access_log, self.settings.access_log_sample)
        return Router(bentoml_app, methods, limits, self.drain, access_log, v2, self.app.openapi, self.keys, cors)

    async def models(self) -> JSONResponse:
        """The served models, their versions, input contract, accuracy and execution provider."""
        return JSONResponse(self.predictor.describe())

    def _app(self) -> FastAPI:
        """The public routes, mounted on the BentoML service, and the page's files."""
        app = documented_app(self.settings, self.models)
        app.mount("/page", StaticFiles(directory=PAGE), name="page")  # the page's script and style sheet
        return app


class Router:
    """The worker's outermost ASGI app. Every request gets a request ID, a trace span where tracing is on, one
    access line, the API-key check where keys are on, and the drain's tracking (refused while it drains). The
    classification routes (`methods`: path -> methods) run through `classification` (service/classification.py)
    ahead of BentoML's middleware; everything else goes to BentoML."""

    def __init__(
        self,
        bentoml_app: ASGIApp,
        methods: dict[str, tuple[str, ...]],
        classification: ASGIApp,
        drain: Drain,
        access_log: AccessLog,
        v2: OpenInference,
        openapi: Callable[[], dict],
        keys: ApiKeys | None = None,
        cors: dict | None = None,
    ) -> None:
        """`openapi`: the API's description (/docs.json). `cors`: CORSMiddleware options when BentoML's CORS is on
        (its preflights stay BentoML's)."""
        self.openapi = openapi
        self.v2 = v2
        self.bentoml_app = bentoml_app
        self.methods = methods
        self.classification = CORSMiddleware(classification, **cors) if cors else classification
        self.drain = drain
        self.access_log = access_log
        self.keys = keys

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.bentoml_app(scope, receive, send)
            return
        exchange = scope["exchange"] = Exchange.begin(scope)
        request_id = exchange.request_id.encode()

        async def recording_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                exchange.status = message["status"]
                message = {**message, "headers": [*message.get("headers", ()), (b"x-request-id", request_id)]}
            elif message["type"] == "http.response.body":
                body = message.get("body", b"")
                exchange.bytes_out += len(body)
                if exchange.status >= 400 and not exchange.error and body.startswith(b'{"error"'):
                    exchange.error = _error_text(body)
            await send(message)

        try:
            with request_span(scope, scope["path"]):
                exchange.trace_id = trace_id()
                await self.drain.track(scope, receive, recording_send, self._route)
        finally:
            self.access_log.write(exchange)

    async def _route(self, scope: Scope, receive: Receive, send: Send) -> None:
        path, method = scope["path"], scope["method"]
        request_id = scope["exchange"].request_id
        if self.keys is not None and not self.keys.allows(path, header(scope, b"authorization")):
            missing = Unauthorized("a missing or wrong API key; send the header Authorization: Bearer <key>")
            await send_answer(send, error_answer(missing, request_id))
        elif self.drain.draining and path not in STILL_SERVED_WHILE_DRAINING:
            await _refuse(receive, send, request_id)
        elif method in self.methods.get(path, ()):
            await self._classify(scope, receive, send)
        elif path == "/v2" or path.startswith("/v2/"):
            await self._v2(scope, receive, send)
        elif method == "GET" and path == "/":
            await FileResponse(PAGE / "index.html")(scope, receive, send)
        elif method == "GET" and path == "/docs":  # Swagger UI, from BentoML's bundled files
            await FileResponse(PAGE / "docs.html")(scope, receive, send)
        elif method == "GET" and path == "/docs.json":
            await send_answer(send, Answer(200, self.openapi()))
        else:
            await self.bentoml_app(continued(scope), receive, _json_errors(scope, send))

    async def _classify(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await self.classification(scope, receive, send)
        except Exception as exc:  # a bug, not bad input: log it and answer in JSON like every other error
            request_id = scope["exchange"].request_id
            logger.exception("%s failed (request %s)", scope["path"], request_id)
            await send_answer(send, error_answer(exc, request_id))

    async def _v2(self, scope: Scope, receive: Receive, send: Send) -> None:
        """The Open Inference Protocol's routes (service/v2.py): infer through the limits like /classify, the rest
        answered here."""
        path, method, request_id = scope["path"], scope["method"], scope["exchange"].request_id
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
            await self._classify(scope, receive, send)
            return
        elif path == "/v2":
            answer = self.v2.server()
        elif path == "/v2/health/live":
            answer = Answer(200, {"live": True})
        elif path == "/v2/health/ready":
            answer = self.v2.ready(self.drain.draining)
        elif route is not None:
            try:
                answer = self.v2.model(*route)
            except NotFound as exc:
                answer = error_answer(exc, request_id)
        else:
            answer = Answer(404, {"error": f"no route for {method} {path}; /docs lists them", "request_id": request_id})
        await send_answer(send, answer)


def _error_text(body: bytes) -> str:
    """The message of a JSON error body, for the access line."""
    try:
        return str(json.loads(body).get("error", ""))
    except (ValueError, AttributeError):
        return ""


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
            body = json.dumps({"error": error, "request_id": scope["exchange"].request_id}).encode()
            headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *allow]
            await send({"type": "http.response.start", "status": message["status"], "headers": headers})
            await send({"type": "http.response.body", "body": body})
        elif not replaced:
            await send(message)

    return replacing_send


async def _refuse(receive: Receive, send: Send, request_id: str) -> None:
    """503 for a request that arrived while the worker drains. Its body is read first: closing a connection
    with unread data makes the kernel send a reset, which can destroy the answer before the client reads it."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(1):
            while (await receive()).get("more_body"):
                pass
    shutting_down = ShuttingDown("this server is shutting down; retry, another replica will answer")
    await send_answer(send, error_answer(shutting_down, request_id))


# While draining: liveness, readiness (503 then, from the service's __is_ready__) and metrics.
STILL_SERVED_WHILE_DRAINING = {"/livez", "/readyz", "/metrics", "/v2/health/live", "/v2/health/ready"}
