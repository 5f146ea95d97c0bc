"""The app that runs the endpoints the service answers itself (/classify, /classify_batch, v2 infer), ahead of
BentoML's per-request middleware.

It reads a request's body under its size and time limits (413, 408), refuses past max_concurrency (429), gives up
after timeout_s (504), drops a request whose client has hung up (its socket's probe or uvicorn says so), sends the
handler's answer as bare ASGI messages and counts it in /metrics. A handler only parses its body into a call of the
inference core and formats what comes back (service/http/classify.py, service/http/v2.py). The body is read whole
before a request counts as running, so clients that send slowly hold a connection, never a place among the
requests being served.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

from starlette.types import Receive, Scope, Send

from service.bentoml_internals import CONNECTION
from service.errors import BodyTooLarge, ClientGone, SlowRequest, TimedOut, TooManyRequests
from service.http.access import RECORD, RequestRecord
from service.http.answers import ANSWERED, Answer, error_answer, send_answer, size_text
from service.http.metrics import ABANDONED_REQUESTS, RouteMeters
from service.inference.batcher import SWEEP_S, HangUpProbe

Handler = Callable[[Scope, bytes], Awaitable[Answer]]
logger = logging.getLogger("cifar10.http")


class Endpoints:
    """Runs the handler of each endpoint (`scope["route"]`, else its path) under the limits, as one ASGI app."""

    def __init__(
        self,
        handlers: dict[str, Handler],
        max_body_bytes: int,
        max_concurrency: int,
        timeout_s: float,
        body_timeout_s: float = 30,
    ) -> None:
        self.handlers: dict[str, Handler] = {}
        self.max_body_bytes = max_body_bytes
        self.max_concurrency = max_concurrency
        self.timeout_s = timeout_s
        self.body_timeout_s = body_timeout_s
        # Requests past their body read, against max_concurrency, each with its hang-up probe (or None).
        self.running: dict[int, HangUpProbe | None] = {}
        self.last_sweep = 0.0
        self.meters = RouteMeters()
        # What a 413 tells a route's client to send instead (default: a smaller image).
        self.advice: dict[str, str] = {"/classify_batch": "send fewer or smaller images per request"}
        for stage in ClientGone.STAGES:
            ABANDONED_REQUESTS.labels(stage=stage)
        self.add(handlers)

    def add(self, handlers: dict[str, Handler]) -> None:
        """Serve and count these routes too."""
        self.handlers |= handlers
        self.meters.add(handlers)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = time.perf_counter()
        route = scope.get("route", scope["path"])
        record: RequestRecord | None = scope.get(RECORD)
        try:
            answer = await self._answer(self.handlers[route], scope, receive, record)
        except ClientGone as gone:  # nobody to answer; counted, and (in the access log) a 499 as nginx writes it
            ABANDONED_REQUESTS.labels(stage=gone.stage).inc()
            if record is not None:
                record.status, record.error = 499, "the client disconnected before its answer"
            connection = scope.get(CONNECTION)
            if connection is not None:  # its socket said so first: uvicorn has not read the hang-up yet
                connection.end()
            return
        await send_answer(send, answer)
        self.meters.answered(route, answer.status, time.perf_counter() - started)

    async def _answer(self, handler: Handler, scope: Scope, receive: Receive, record: RequestRecord | None) -> Answer:
        request_id = record.request_id if record is not None else ""
        try:
            body = await self._body(scope, receive)
            if record is not None:
                record.bytes_in = len(body)
            hung_up = hang_up_probe(scope)
            if hung_up is not None and hung_up():  # sent its body and left (the loop has not read that yet)
                raise ClientGone("reading")
            if len(self.running) >= self.max_concurrency and self._sweep() >= self.max_concurrency:
                raise TooManyRequests("too many requests in flight; retry shortly")
            self.running[id(scope)] = hung_up
            try:
                async with asyncio.timeout(self.timeout_s):
                    return await unless_gone(handler(scope, body), receive)
            finally:
                self.running.pop(id(scope), None)
        except TimeoutError:
            timed_out = TimedOut(f"no answer within {self.timeout_s:g} s; retry later or send fewer images")
            return error_answer(timed_out, request_id)
        except ANSWERED as exc:
            return error_answer(exc, request_id)
        except ClientGone:
            raise
        except Exception as exc:  # a bug, not bad input: logged, and answered in JSON like every other error (500)
            logger.exception("%s failed (request %s)", scope["path"], request_id)
            return error_answer(exc, request_id)

    def _too_large(self, scope: Scope, size: int) -> BodyTooLarge:
        """`size`: the body's declared size, or what had arrived when it passed the limit."""
        advice = self.advice.get(scope.get("route", scope["path"]), "send a smaller image")
        return BodyTooLarge(
            f"the request body ({size_text(size)} or more) is larger than the {size_text(self.max_body_bytes)} "
            f"limit (CIFAR10_MAX_BODY_BYTES); {advice}"
        )

    def _sweep(self) -> int:
        """Stop counting the requests whose clients have hung up (their sockets say so before the event loop reads
        it): they hold no place a live client could have. Returns how many are left; checks at most once per SWEEP_S."""
        now = time.monotonic()
        if now - self.last_sweep >= SWEEP_S:
            self.last_sweep = now
            for key, hung_up in list(self.running.items()):
                if hung_up is not None and hung_up():
                    del self.running[key]
        return len(self.running)

    async def _body(self, scope: Scope, receive: Receive) -> bytes:
        declared = next((v for k, v in scope["headers"] if k == b"content-length"), None)
        if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
            raise self._too_large(scope, int(declared))
        message = await receive()  # the common case: the whole body in one message, no timer needed
        if message["type"] == "http.disconnect":
            raise ClientGone("reading")
        if not message.get("more_body"):
            body = message.get("body", b"")
            if len(body) > self.max_body_bytes:
                raise self._too_large(scope, len(body))
            return body
        chunks, size = [message.get("body", b"")], len(message.get("body", b""))
        try:
            async with asyncio.timeout(self.body_timeout_s):
                while message.get("more_body"):
                    message = await receive()
                    if message["type"] == "http.disconnect":
                        raise ClientGone("reading")
                    chunks.append(message.get("body", b""))
                    size += len(chunks[-1])
                    if size > self.max_body_bytes:
                        raise self._too_large(scope, size)
        except TimeoutError:
            raise SlowRequest(
                f"the request body did not arrive within {self.body_timeout_s:g} s; send it faster "
                "or send a smaller image"
            ) from None
        return b"".join(chunks)


def hang_up_probe(scope: Scope) -> HangUpProbe | None:
    """Whether the request's client has hung up, asked of its socket; None where the protocol is not ours."""
    connection = scope.get(CONNECTION)
    return connection.hung_up if connection is not None else None


async def unless_gone(work: Awaitable[Answer], receive: Receive) -> Answer:
    """`work`, unless the client disconnects first: then it is cancelled (a request waiting for its model call
    leaves the queue and is not computed) and ClientGone raised. The body has been read, so the next message
    the connection gives is its disconnect."""
    current = asyncio.current_task()
    gone = False

    async def watch() -> None:
        nonlocal gone
        if (await receive())["type"] == "http.disconnect":
            gone = True
            current.cancel()

    watcher = asyncio.get_running_loop().create_task(watch())
    try:
        return await work
    except asyncio.CancelledError:
        if gone:
            current.uncancel()
            raise ClientGone from None
        raise
    finally:
        watcher.cancel()
