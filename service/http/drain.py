"""Graceful drain on SIGTERM and SIGINT: stop being ready, refuse new requests, answer every request
already received, then let uvicorn stop.

Who handles the signal: `bentoml serve`'s process manager (circus, in the server process) catches
SIGTERM/SIGINT and sends SIGTERM to every worker, then waits for them to exit (BentoML sets its
graceful timeout to a day) before it closes the shared listening socket. In each worker, uvicorn's
own handler would stop accepting at once: connections then queue in the kernel with nobody to read
them, and are reset when the server process exits.
So the worker's handler is this one. It marks the worker draining (`/readyz` answers 503, new
requests get a 503 with Retry-After and Connection: close while the listener stays open), waits
until nothing is in flight and no request has come for QUIET_S (a load balancer has stopped sending)
or the grace period ends, and only then calls uvicorn's handler, which closes the listener and then
the connections (service/bentoml_internals.py gives a connection without a request a last moment to
send one, so a request already on its way is answered rather than cut).
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from collections.abc import Awaitable, Callable
from types import FrameType

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.errors import ShuttingDown
from service.http.access import RECORD
from service.http.answers import error_answer, send_answer
from service.log import say

SIGNALS = (signal.SIGTERM, signal.SIGINT)
QUIET_S = 0.2  # no new request for this long: traffic has moved elsewhere
CLOSE_S = 1.0  # of the grace period, left for uvicorn to close the connections


# While draining: liveness, readiness (503 then, from the service's __is_ready__) and metrics.
STILL_SERVED_WHILE_DRAINING = {"/livez", "/readyz", "/metrics", "/v2/health/live", "/v2/health/ready"}


class Drain:
    """The layer that counts a worker's requests in flight and refuses new ones while it drains; and the drain,
    when a stop signal comes."""

    def __init__(self, app: ASGIApp, grace_s: float) -> None:
        self.app, self.grace_s = app, grace_s
        self.draining = False
        self.in_flight = 0
        self.last_request = 0.0  # time.monotonic() of the newest request
        self.received = self.answered = 0  # POST requests, for the line printed at the end of a drain
        self.previous: dict[int, Callable] = {}
        self.loop: asyncio.AbstractEventLoop | None = None
        # What else serves this worker's requests (its gRPC server): told when the drain starts, and stopped
        # (awaited, with the grace left) before uvicorn is.
        self.on_start: list[Callable[[], None]] = []
        self.before_stop: list[Callable[[float], Awaitable[None]]] = []

    def install(self) -> None:
        """Take over SIGTERM and SIGINT from uvicorn, whose handlers are called when the drain ends.

        Call it from the worker's event loop once uvicorn runs (its handlers are set by then).
        """
        self.loop = asyncio.get_running_loop()
        for sig in SIGNALS:
            self.previous[sig] = signal.signal(sig, self._on_signal)

    def _on_signal(self, sig: int, frame: FrameType | None) -> None:
        if not self.draining:
            self.draining = True
            for told in self.on_start:
                self.loop.call_soon_threadsafe(told)
            self.loop.call_soon_threadsafe(lambda: self.loop.create_task(self._drain(sig)))
        elif sig == signal.SIGINT:  # a second Ctrl-C: stop now, as uvicorn does
            self.previous[sig](sig, frame)
        # a SIGTERM while draining (circus sends one after a Ctrl-C) changes nothing

    async def _drain(self, sig: int) -> None:
        started = time.monotonic()
        handoff = started + max(0.0, self.grace_s - CLOSE_S)  # uvicorn's close gets the last second of the grace
        try:
            while time.monotonic() < handoff:
                if not self.in_flight and time.monotonic() - self.last_request >= QUIET_S:
                    break
                await asyncio.sleep(0.01)
            say(
                f"cifar10 drain: stopping after {time.monotonic() - started:.2f} s with {self.in_flight} requests "
                "in flight"
            )
            for stop in self.before_stop:
                await stop(max(0.0, handoff - time.monotonic()))
        finally:  # whatever happened above, the worker must stop
            self.previous[signal.SIGTERM](signal.SIGTERM, None)  # uvicorn: close the listener, finish, exit
            # Past the grace period uvicorn must not wait any longer (a Ctrl-C to a stopping uvicorn forces it).
            self.loop.call_at(
                self.loop.time() + started + self.grace_s - time.monotonic(),
                self.previous[signal.SIGINT],
                signal.SIGINT,
                None,
            )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """One request, counted as in flight (POSTs also as received, then answered), or refused while draining; an
        answer sent while draining closes its connection, so that no next request comes on it."""
        counted = scope["method"] == "POST"  # the summary counts requests, not probes and scrapes
        self.arrived(counted)

        async def closing_send(message: Message) -> None:
            if message["type"] == "http.response.start" and self.draining:
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != b"connection"]
                message = {**message, "headers": [*headers, (b"connection", b"close")]}
            elif message["type"] == "http.response.body" and not message.get("more_body"):
                self.answered += counted
            await send(message)

        try:
            if self.draining and scope["path"] not in STILL_SERVED_WHILE_DRAINING:
                await _refuse(receive, closing_send, scope[RECORD].request_id)
            else:
                await self.app(scope, receive, closing_send)
        finally:
            self.in_flight -= 1

    def arrived(self, counted: bool) -> None:
        """A request (`counted`: a POST, or a gRPC inference call) is in flight; the caller lowers in_flight after."""
        self.in_flight += 1
        self.received += counted
        self.last_request = time.monotonic()

    def summary(self) -> str:
        """What the drain did, for the log at the end of the worker's shutdown."""
        return f"cifar10 drain: {self.received} POST requests received, {self.answered} answered"


async def _refuse(receive: Receive, send: Send, request_id: str) -> None:
    """503 for a request that arrived while the worker drains. Its body is read first: closing a connection
    with unread data makes the kernel send a reset, which can destroy the answer before the client reads it."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(1):
            while (await receive()).get("more_body"):
                pass
    shutting_down = ShuttingDown("this server is shutting down; retry, another replica will answer")
    await send_answer(send, error_answer(shutting_down, request_id))
