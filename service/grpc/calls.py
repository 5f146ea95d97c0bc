"""What every gRPC call passes, as the HTTP layers do for a request: its request ID (the `x-request-id` metadata,
sent back in the trailing metadata), the API keys (`authorization: Bearer KEY` metadata), the drain,
max_concurrency and timeout_s, a trace span, Prometheus metrics and one access line; and the one mapping from the
service's errors to gRPC status codes.

A call's status in its access line and metrics is the HTTP status the same error gets on the REST routes (so the
alert rules and the dashboard read both); its gRPC code is in the answer. A call whose client cancels it, or whose
deadline passes, is cancelled where it waits: its images leave the batcher's queue uncomputed (a 499 in its line).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import grpc

from core.errors import ImageTooLarge
from service.errors import BodyTooLarge, ShuttingDown, TimedOut, TooManyRequests, Unauthorized
from service.http.access import AccessLog, RequestRecord, usable_request_id
from service.http.answers import ANSWERED, status_of
from service.http.drain import Drain
from service.http.keys import ApiKeys
from service.http.metrics import ABANDONED_REQUESTS, RouteMeters
from service.settings import Settings
from service.tracing import request_span, trace_id

T = TypeVar("T")
logger = logging.getLogger("cifar10.grpc")
Code = grpc.StatusCode
# The gRPC code of each HTTP status the service answers (service/http/answers.py).
CODES = {
    400: Code.INVALID_ARGUMENT,
    401: Code.UNAUTHENTICATED,
    403: Code.PERMISSION_DENIED,
    404: Code.NOT_FOUND,
    408: Code.DEADLINE_EXCEEDED,
    409: Code.ABORTED,
    413: Code.RESOURCE_EXHAUSTED,
    415: Code.INVALID_ARGUMENT,
    422: Code.FAILED_PRECONDITION,
    429: Code.RESOURCE_EXHAUSTED,
    503: Code.UNAVAILABLE,
    504: Code.DEADLINE_EXCEEDED,
    507: Code.RESOURCE_EXHAUSTED,
}
RETRY_AFTER = ("retry-after", "1")  # seconds, as the HTTP routes say it, on RESOURCE_EXHAUSTED and UNAVAILABLE


def code_of(exc: BaseException) -> tuple[Code, int]:
    """The gRPC code and the HTTP status of an error; a caller's image over the pixel limit is its mistake
    (INVALID_ARGUMENT), a message over the size limit a resource (RESOURCE_EXHAUSTED)."""
    status = status_of(exc)
    if isinstance(exc, ImageTooLarge):
        return Code.INVALID_ARGUMENT, status
    return CODES.get(status, Code.INTERNAL), status


class Calls:
    """The worker's gRPC calls under its HTTP stack's keys, drain and access log, and its request limits."""

    def __init__(self, settings: Settings, keys: ApiKeys | None, drain: Drain, access_log: AccessLog) -> None:
        self.settings, self.keys, self.drain, self.access_log = settings, keys, drain, access_log
        self.running = 0
        self.meters = RouteMeters()  # each method's, added by the server that answers it

    async def run(
        self,
        context: grpc.aio.ServicerContext,
        method: str,
        as_path: str,
        work: Callable[[RequestRecord], Awaitable[T]],
        counted: bool = True,
    ) -> T:
        """`work(record)` under the limits, for the RPC `method`; keys are checked as for the REST route `as_path`.
        `counted`: an inference or model-control call (not a probe): refused while draining, counted in the drain's
        summary and against max_concurrency."""
        metadata = {key: value for key, value in context.invocation_metadata() or () if isinstance(value, str)}
        record = RequestRecord(
            usable_request_id(metadata.get("x-request-id", "")),
            "POST",
            method,
            context.peer() or "-",
            time.perf_counter(),
        )
        # The ID goes back in the trailing metadata, sent with the status: initial metadata of its own would cost
        # every call a write.
        context.set_trailing_metadata((("x-request-id", record.request_id),))
        self.drain.arrived(counted)
        failure: BaseException | None = None
        try:
            # the headers as a generator: read only where tracing is on
            scope = {"method": "POST", "headers": ((k.encode(), v.encode()) for k, v in metadata.items())}
            with request_span(scope, method):
                record.trace_id = trace_id()
                try:
                    result = await self._limited(work, record, metadata.get("authorization", ""), as_path, counted)
                    record.status = 200
                    return result
                except asyncio.CancelledError:  # the client cancelled, or its deadline passed: nobody to answer
                    record.status, record.error = 499, "the client cancelled the call or its deadline passed"
                    ABANDONED_REQUESTS.labels(stage="waiting").inc()
                    raise
                except Exception as exc:
                    failure = exc
        finally:
            self.drain.in_flight -= 1
            if record.status != 499:  # answered, with its result or its error
                self.drain.answered += counted
                self._count(record, failure)
            self.access_log.write(record)
        await self._abort(context, failure, record.request_id)  # raises: gRPC sends the status

    async def _limited(
        self,
        work: Callable[[RequestRecord], Awaitable[T]],
        record: RequestRecord,
        authorization: str,
        as_path: str,
        counted: bool,
    ) -> T:
        refusal = self.keys.refusal(as_path, authorization.encode()) if self.keys else None
        if isinstance(refusal, Unauthorized):
            raise Unauthorized("a missing or wrong API key; send the metadata authorization: Bearer <key>")
        if refusal is not None:
            raise refusal
        if counted and self.drain.draining:
            raise ShuttingDown("this server is shutting down; retry, another replica will answer")
        if counted and self.running >= self.settings.max_concurrency:
            raise TooManyRequests("too many requests in flight; retry shortly")
        self.running += counted
        try:
            async with asyncio.timeout(self.settings.timeout_s):
                return await work(record)
        except TimeoutError:
            waited = self.settings.timeout_s
            raise TimedOut(f"no answer within {waited:g} s; retry later or send fewer images") from None
        finally:
            self.running -= counted

    def _count(self, record: RequestRecord, failure: BaseException | None) -> None:
        if failure is not None:
            record.status = code_of(failure)[1]
            record.error = str(failure) if isinstance(failure, ANSWERED) else "internal server error"
        self.meters.answered(record.path, record.status, time.perf_counter() - record.started)

    async def _abort(self, context: grpc.aio.ServicerContext, failure: BaseException, request_id: str) -> None:
        """End the call with the error's code and message (a bug's message stays in the log)."""
        code, _ = code_of(failure)
        if isinstance(failure, ANSWERED):
            message = str(failure)
        else:
            logger.error("gRPC call failed (request %s)", request_id, exc_info=failure)
            message = "internal server error; the server log has the details"
        trailing = [("x-request-id", request_id)]  # abort's metadata replaces what was set
        if code in (Code.RESOURCE_EXHAUSTED, Code.UNAVAILABLE):
            trailing.append(RETRY_AFTER)
        if isinstance(failure, Unauthorized):
            trailing.append(("www-authenticate", 'Bearer realm="cifar10"'))
        await context.abort(code, message, tuple(trailing))


def too_large(size: int, limit: int) -> BodyTooLarge:
    return BodyTooLarge(
        f"the request message is {size:,} bytes, over the {limit:,}-byte limit (CIFAR10_MAX_BODY_BYTES); "
        "send fewer or smaller images per call"
    )
