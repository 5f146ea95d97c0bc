"""ASGI pieces around the BentoML app: the body-size limit, Retry-After on overload, GET /models."""

from __future__ import annotations

import json

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

RETRY_AFTER_S = b"1"


class _TooLarge(Exception):
    pass


class LimitsMiddleware:
    """413 for bodies over `max_body_bytes` (declared or streamed); Retry-After on 429 and 503."""

    def __init__(self, app: ASGIApp, max_body_bytes: int) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
            await self._reject(send)
            return
        received = 0
        too_large = False

        async def counting_receive() -> Message:
            nonlocal received, too_large
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body_bytes:
                    too_large = True
                    raise _TooLarge
            return message

        async def annotating_send(message: Message) -> None:
            if too_large:  # the app turned our exception into a 500: answer 413 instead
                if message["type"] == "http.response.start":
                    await self._reject(send)
                return
            if message["type"] == "http.response.start" and message["status"] in (429, 503):
                message = {**message, "headers": [*message.get("headers", []), (b"retry-after", RETRY_AFTER_S)]}
            await send(message)

        try:
            await self.app(scope, counting_receive, annotating_send)
        except _TooLarge:
            await self._reject(send)

    async def _reject(self, send: Send) -> None:
        limit_mb = self.max_body_bytes / (1024 * 1024)
        body = json.dumps({"error": f"request body is larger than the {limit_mb:g} MB limit; send a smaller image"})
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body.encode()})


def models_app() -> Starlette:
    """GET /models: what the running service serves (mounted beside BentoML's routes)."""
    import bentoml

    async def models(_: Request) -> JSONResponse:
        return JSONResponse(bentoml.get_current_service().describe())

    return Starlette(routes=[Route("/models", models, methods=["GET"])])
