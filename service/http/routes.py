"""The route table: each public route to what answers it; anything else goes to BentoML's app (its probes, /metrics,
its static files), whose plain-text 404 and 405 answers become this API's JSON errors."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from starlette.responses import FileResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.http.access import RECORD
from service.http.answers import Answer, send_answer
from service.tracing import continued

PAGE = Path(__file__).resolve().parent / "page"  # the page at / for people to try the service (plain HTML)


class Routes:
    """Dispatches a request by method and path: the endpoints the service answers itself (/classify,
    /classify_batch, under `endpoints`), the model-control routes (`repository`), the v2 protocol (`v2`), the page
    and the API's description (`openapi()`); the rest to `bentoml_app` (/models, the probes, /metrics, static
    files)."""

    def __init__(
        self,
        bentoml_app: ASGIApp,
        endpoints: ASGIApp,
        v2: ASGIApp,
        repository: ASGIApp,
        openapi: Callable[[], dict],
    ) -> None:
        self.bentoml_app, self.v2, self.repository, self.openapi = bentoml_app, v2, repository, openapi
        self.table: dict[tuple[str, str], ASGIApp] = {
            ("POST", "/classify"): endpoints,
            ("PUT", "/classify"): endpoints,  # curl -T cat.jpg
            ("POST", "/classify_batch"): endpoints,
            ("GET", "/"): FileResponse(PAGE / "index.html"),
            ("GET", "/docs"): FileResponse(PAGE / "docs.html"),  # Swagger UI, from BentoML's bundled files
            ("GET", "/docs.json"): self._answering(self.openapi),
        }

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope["path"]
        app = self.table.get((scope["method"], path))
        if app is not None:
            await app(scope, receive, send)
        elif path.startswith("/v2/repository/"):
            await self.repository(scope, receive, send)
        elif path == "/v2" or path.startswith("/v2/"):
            await self.v2(scope, receive, send)
        else:
            await self.bentoml_app(continued(scope), receive, _json_errors(scope, send))

    @staticmethod
    def _answering(body: Callable[[], dict]) -> ASGIApp:
        async def answer(scope: Scope, receive: Receive, send: Send) -> None:
            await send_answer(send, Answer(200, body()))

        return answer


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
            body = json.dumps({"error": error, "request_id": scope[RECORD].request_id}).encode()
            headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *allow]
            await send({"type": "http.response.start", "status": message["status"], "headers": headers})
            await send({"type": "http.response.body", "body": body})
        elif not replaced:
            await send(message)

    return replacing_send
