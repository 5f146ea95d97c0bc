"""The outermost layer: every HTTP request gets its request ID (in the X-Request-ID header of its answer), a trace
span where tracing is on (service/tracing.py), and one access line when its answer has gone (service/http/access.py),
whatever layer or route answers it."""

from __future__ import annotations

import json

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.http.access import RECORD, AccessLog, RequestRecord
from service.tracing import request_span, trace_id


def header(scope: Scope, name: bytes) -> bytes:
    """A request header's value (lower-case `name`), or b""."""
    return next((v for k, v in scope["headers"] if k == name), b"")


def record_asked(scope: Scope, model: str, images: int) -> None:
    """What the access line says the request asked for."""
    record = scope.get(RECORD)
    if record is not None:
        record.model, record.images = model, images


class RequestContext:
    """Puts the request's `RequestRecord` in its scope, answers with its ID, and writes its access line."""

    def __init__(self, app: ASGIApp, access_log: AccessLog) -> None:
        self.app, self.access_log = app, access_log

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        record = scope[RECORD] = RequestRecord.begin(scope)
        request_id = record.request_id.encode()

        async def recording_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                record.status = message["status"]
                message = {**message, "headers": [*message.get("headers", ()), (b"x-request-id", request_id)]}
            elif message["type"] == "http.response.body":
                body = message.get("body", b"")
                record.bytes_out += len(body)
                if record.status >= 400 and not record.error and body.startswith(b'{"error"'):
                    record.error = _error_text(body)
            await send(message)

        try:
            with request_span(scope, scope["path"]):
                record.trace_id = trace_id()
                await self.app(scope, receive, recording_send)
        finally:
            self.access_log.write(record)


def _error_text(body: bytes) -> str:
    """The message of a JSON error body, for the access line."""
    try:
        return str(json.loads(body).get("error", ""))
    except (ValueError, AttributeError):
        return ""
