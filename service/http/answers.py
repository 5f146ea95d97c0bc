"""The one mapping from errors to HTTP answers, and answers sent as bare ASGI messages (no Response objects on
the hot path): `{"error": message}` with its status, Retry-After where retrying helps."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from starlette.types import Send

from core.errors import ImageError, ImageTooLarge, UnsupportedImage
from service.errors import (
    BadRequest,
    BodyTooLarge,
    Conflict,
    Forbidden,
    LoadFailed,
    NotFound,
    Overloaded,
    ShuttingDown,
    SlowRequest,
    TimedOut,
    TooManyRequests,
    Unauthorized,
    UnsupportedMedia,
)

RETRY_AFTER_S = b"1"
# Most specific first: the first match gives the status.
STATUSES: tuple[tuple[type[Exception], int], ...] = (
    (ImageTooLarge, 413),
    (UnsupportedImage, 415),
    (UnsupportedMedia, 415),
    (ImageError, 400),
    (BadRequest, 400),
    (Unauthorized, 401),
    (Forbidden, 403),
    (NotFound, 404),
    (Conflict, 409),
    (BodyTooLarge, 413),
    (SlowRequest, 408),
    (TooManyRequests, 429),
    (Overloaded, 503),
    (ShuttingDown, 503),
    (TimedOut, 504),
)
# The errors with an answer of their own; anything else is a 500.
ANSWERED = (*(kind for kind, _ in STATUSES), LoadFailed)
JSON = (b"content-type", b"application/json")


@dataclass
class Answer:
    """A JSON answer: status, the object to send, and headers beyond content-type and content-length."""

    status: int
    body: object
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    raw: bytes = b""  # already-encoded bytes to send instead of `body` (e.g. binary tensor data)
    content_type: bytes = b"application/json"

    def encoded(self) -> bytes:
        return self.raw or json.dumps(self.body, ensure_ascii=False, separators=(",", ":")).encode()


def status_of(exc: BaseException) -> int:
    if isinstance(exc, LoadFailed):
        return exc.status
    return next((status for kind, status in STATUSES if isinstance(exc, kind)), 500)


def error_answer(exc: BaseException, request_id: str = "") -> Answer:
    """The answer to any error, naming the request's ID; a bug (500) says only that, the log has the rest."""
    status = status_of(exc)
    said = status != 500 or isinstance(exc, LoadFailed)  # a failed load's reason is the caller's to know
    message = str(exc) if said else "internal server error; the server log has the details"
    body = {"error": message, "request_id": request_id} if request_id else {"error": message}
    headers = [(b"retry-after", RETRY_AFTER_S)] if status in (429, 503) else []
    if isinstance(exc, SlowRequest | ShuttingDown):  # the rest of the body, or this worker, is gone
        headers.append((b"connection", b"close"))
    if isinstance(exc, Unauthorized):
        headers.append((b"www-authenticate", b'Bearer realm="cifar10"'))
    return Answer(status, body, headers)


async def send_answer(send: Send, answer: Answer) -> int:
    """Send `answer` as one start and one body message; returns the body's size."""
    body = answer.encoded()
    headers = [(b"content-type", answer.content_type), (b"content-length", str(len(body)).encode()), *answer.headers]
    await send({"type": "http.response.start", "status": answer.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
    return len(body)


def size_text(size: int) -> str:
    """Bytes as people write them: 10 MB, 4 KB, 900 bytes (binary units)."""
    for unit, scale in (("MB", 2**20), ("KB", 2**10)):
        if size >= scale:
            return f"{size / scale:.3g} {unit}"
    return f"{size} bytes"
