"""The HTTP room: the worker's ASGI app as a stack of small layers, outermost first, each with one job:

- the request context (request ID, trace span, access line): service/http/context.py
- the drain (requests in flight; 503 while draining): service/http/drain.py
- the API keys (401), where they are on: service/http/keys.py
- the route table: service/http/routes.py, to
  - the endpoints the service answers itself, under the request limits: service/http/endpoints.py, whose handlers
    only parse and format (/classify and /classify_batch: service/http/classify.py; v2: service/http/v2.py), calling
    the inference core (service/inference/core.py);
  - the model-control routes (/v2/repository/...: service/http/repository.py), under limits of their own;
  - the page and the API's description; and BentoML's app for everything else (/models among it).

The endpoints run ahead of BentoML's per-request middleware (tracing, access log, HTTP metrics, timeout), whose
cost per request bounded a worker's throughput (BENCHMARKS.md has the figures).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from starlette.middleware.cors import CORSMiddleware
from starlette.types import ASGIApp, Receive, Scope, Send

from service.http.access import AccessLog
from service.http.classify import classify_endpoints
from service.http.context import RequestContext
from service.http.drain import Drain
from service.http.endpoints import Endpoints
from service.http.keys import ApiKeys, KeyCheck
from service.http.repository import RepositoryHandlers, RepositoryRoutes, control_on
from service.http.routes import Routes
from service.http.v2 import INFER_ROUTE, OpenInference
from service.inference.control import PREPARE_S, SWAP_S, ModelControl
from service.inference.core import Inference
from service.settings import Settings

SERVER_NAME = "cifar10-classifier"
CONTROL_BODY_BYTES = 64 * 1024  # a repository request is a small JSON object
CONTROL_CALLS = 8  # repository calls in flight per worker (a second change of a model is a 409 anyway)


class HttpStack:
    """A worker's ASGI app: HTTP requests through the layers, anything else (lifespan) to BentoML's app."""

    def __init__(
        self,
        settings: Settings,
        bentoml_app: ASGIApp,
        inference: Callable[[], Inference | None],
        control: Callable[[], ModelControl | None],
        openapi: Callable[[], dict],
        cors: dict | None = None,
    ) -> None:
        """`inference()`, `control()`: the worker's inference core and its model control once its models are
        loaded. `cors`: CORSMiddleware options when BentoML's CORS is on (its preflights stay BentoML's)."""
        self.bentoml_app = bentoml_app
        endpoints = Endpoints(
            {}, settings.max_body_bytes, settings.max_concurrency, settings.timeout_s, settings.body_timeout_s
        )
        guarded = CORSMiddleware(endpoints, **cors) if cors else endpoints
        v2 = OpenInference(inference, guarded, lambda: self.drain.draining, SERVER_NAME)
        endpoints.add(classify_endpoints(inference) | {INFER_ROUTE: v2.infer})
        endpoints.advice[INFER_ROUTE] = "send fewer images, or a tensor of fewer rows, per request"
        changes = Endpoints(
            RepositoryHandlers(control).handlers(), CONTROL_BODY_BYTES, CONTROL_CALLS, PREPARE_S + SWAP_S + 5
        )
        repository = RepositoryRoutes(control_on(settings), changes)
        routes = Routes(bentoml_app, guarded, v2, repository, openapi)
        self.keys = ApiKeys(Path(settings.api_keys_file)) if settings.api_keys_file else None
        self.drain = Drain(KeyCheck(routes, self.keys) if self.keys else routes, settings.drain_s)
        self.access_log = AccessLog(settings.access_log, settings.access_log_sample)  # the gRPC calls' lines too
        self.app = RequestContext(self.drain, self.access_log)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await (self.app if scope["type"] == "http" else self.bentoml_app)(scope, receive, send)
