"""The limits in front of the classification routes, driven in-process through ASGI, and the error answers."""

import asyncio
import json

import pytest

from core.errors import ImageError, ImageTooLarge, UnsupportedImage
from service.bentoml_internals import CONNECTION
from service.errors import BadRequest, Overloaded, TimedOut, TooManyRequests
from service.http.answers import Answer, error_answer, size_text
from service.http.endpoints import Endpoints


async def slow_echo(scope, body: bytes) -> Answer:
    """Sleeps as long as the query string says, answers 200 with the body's size."""
    await asyncio.sleep(float(scope["query_string"] or 0))
    return Answer(200, {"size": len(body)})


async def call(
    app,
    body: bytes = b"",
    delay: float = 0,
    chunk: int = 1024,
    path: str = "/classify",
    headers: list | None = None,
    pause: float = 0,
    gone_after: float | None = None,
    cut_after: int | None = None,
    connection: object | None = None,
) -> tuple[int, dict, dict] | None:
    """One POST through `app`, the body sent in chunks `pause` seconds apart; returns status, headers and JSON.
    `connection`: the request's Connection, as service/bentoml_internals.py puts it in the scope."""
    chunks = [body[i : i + chunk] for i in range(0, len(body), chunk)] or [b""]
    messages = [{"type": "http.request", "body": c, "more_body": i < len(chunks) - 1} for i, c in enumerate(chunks)]
    sent = []

    async def receive():
        if messages and pause and messages[0]["body"] is not chunks[0]:
            await asyncio.sleep(pause)
        if cut_after is not None and len(chunks) - len(messages) >= cut_after:  # gone in the middle of its body
            return {"type": "http.disconnect"}
        if messages:
            return messages.pop(0)
        if gone_after is not None:  # the client hangs up this long after its body
            await asyncio.sleep(gone_after)
            return {"type": "http.disconnect"}
        await asyncio.Event().wait()  # as uvicorn: nothing more until the connection ends

    async def send(message):
        sent.append(message)

    scope = {
        "type": "http",
        "method": "POST",
        "path": path,
        "headers": headers or [],
        "query_string": str(delay).encode(),
    }
    if connection is not None:
        scope[CONNECTION] = connection
    await app(scope, receive, send)
    if not sent:
        return None
    start = sent[0]
    body_out = b"".join(m.get("body", b"") for m in sent[1:])
    return start["status"], dict(start["headers"]), json.loads(body_out or b"{}")


def limits(**overrides) -> Endpoints:
    settings = {"max_body_bytes": 4096, "max_concurrency": 2, "timeout_s": 5.0} | overrides
    return Endpoints({"/classify": slow_echo}, **settings)


def test_a_body_over_the_limit_is_a_413_whether_declared_or_streamed() -> None:
    app = limits()
    status, _, body = asyncio.run(call(app, b"x" * 5000))  # no Content-Length: counted while read
    assert status == 413 and "limit" in body["error"]
    declared = [(b"content-length", b"5000")]
    status, _, body = asyncio.run(call(app, b"x" * 5000, headers=declared))
    assert status == 413 and body["error"].startswith("the request body (4.88 KB or more) is larger than the 4 KB")
    assert asyncio.run(call(app, b"x" * 4000))[0] == 200


def test_past_max_concurrency_is_a_429_with_retry_after() -> None:
    app = limits()

    async def main():
        return await asyncio.gather(*(call(app, delay=0.2) for _ in range(3)))

    results = asyncio.run(main())
    assert sorted(status for status, _, _ in results) == [200, 200, 429]
    refused = next(r for r in results if r[0] == 429)
    assert refused[1][b"retry-after"] == b"1" and "retry" in refused[2]["error"]
    assert not app.running


def test_a_request_past_the_timeout_is_a_504() -> None:
    status, _, body = asyncio.run(call(limits(timeout_s=0.1), delay=1))
    assert status == 504 and "0.1 s" in body["error"]


@pytest.mark.parametrize(
    ("error", "status", "retry"),
    [
        (ImageTooLarge("big"), 413, False),
        (UnsupportedImage("pdf"), 415, False),
        (ImageError("bad"), 400, False),
        (BadRequest("option"), 400, False),
        (TooManyRequests("many"), 429, True),
        (Overloaded("busy"), 503, True),
        (TimedOut("late"), 504, False),
        (RuntimeError("a bug"), 500, False),
    ],
)
def test_each_error_has_one_answer(error: Exception, status: int, retry: bool) -> None:
    answer = error_answer(error)
    assert answer.status == status and (b"retry-after" in dict(answer.headers)) == retry
    message = json.loads(answer.encoded())["error"]
    assert message == (str(error) if status != 500 else "internal server error; the server log has the details")


def test_a_body_slower_than_its_time_limit_is_a_408_that_closes_the_connection() -> None:
    status, headers, body = asyncio.run(call(limits(body_timeout_s=0.2), b"x" * 3000, pause=0.15))
    assert status == 408 and headers[b"connection"] == b"close" and "did not arrive within 0.2 s" in body["error"]


def test_a_client_still_sending_its_body_holds_no_place_among_the_requests_served() -> None:
    app = limits(max_concurrency=1)

    async def main():
        slow = asyncio.create_task(call(app, b"x" * 3000, pause=0.1))  # 0.2 s to send its body
        await asyncio.sleep(0.05)
        quick = await call(app, b"y")
        return quick, await slow

    (quick_status, _, _), (slow_status, _, _) = asyncio.run(main())
    assert quick_status == slow_status == 200


def test_a_small_body_limit_is_written_in_kb_or_bytes() -> None:
    assert [size_text(n) for n in (10 * 2**20, 4096, 1500, 900)] == ["10 MB", "4 KB", "1.46 KB", "900 bytes"]
