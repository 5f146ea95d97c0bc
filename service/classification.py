"""The classification routes as the service runs them, ahead of BentoML's per-request middleware.

`Limits` reads a request's body under its size and time limits (413, 408), refuses past max_concurrency
(429), gives up after timeout_s (504), drops a request whose client has hung up (its socket's probe or
uvicorn says so), sends the handler's answer as bare ASGI messages and counts it in /metrics. The
handlers here turn a body into a Predictor call: `/classify` takes one image, as the multipart field
`image` or as the whole body (`curl --data-binary @cat.jpg`, options in the query string),
`/classify_batch` the repeated field `images`.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Awaitable, Callable
from urllib.parse import parse_qsl

from starlette.types import Receive, Scope, Send

from core.errors import ImageError
from service import multipart
from service.access import Exchange
from service.answers import ANSWERED, Answer, error_answer, send_answer, size_text, status_of
from service.batching import SWEEP_S, HangUpProbe
from service.bentoml_internals import CONNECTION
from service.errors import (
    BadRequest,
    BodyTooLarge,
    ClientGone,
    SlowRequest,
    TimedOut,
    TooManyRequests,
    UnsupportedMedia,
)
from service.metrics import ABANDONED_REQUESTS, REQUEST_SECONDS, REQUESTS
from service.predictor import Classified, Predictor

MAX_PARSED_PARTS = 1000  # parsed before the batch limit is checked, so its error can name the count
# An application/x-www-form-urlencoded body as forms send it: name=value pairs of URL-safe characters.
TEXT_FORM = re.compile(rb"[\w.~%+*-]+=[\w.~%+*/:,-]*(?:&[\w.~%+*-]+=[\w.~%+*/:,-]*)*")
Handler = Callable[[Scope, bytes], Awaitable[Answer]]


class Limits:
    """Runs the handler of each classification route (`scope["route"]`) under the limits, as one ASGI app.

    The body is read whole before a request counts as running, so clients that send slowly hold a
    connection, never a place among the requests being served.
    """

    def __init__(
        self,
        handlers: dict[str, Handler],
        max_body_bytes: int,
        max_concurrency: int,
        timeout_s: float,
        body_timeout_s: float = 30,
    ) -> None:
        self.handlers = handlers
        self.max_body_bytes = max_body_bytes
        self.max_concurrency = max_concurrency
        self.timeout_s = timeout_s
        self.body_timeout_s = body_timeout_s
        # Requests past their body read, against max_concurrency, each with its hang-up probe (or None).
        self.running: dict[int, HangUpProbe | None] = {}
        self.last_sweep = 0.0
        self.meters: dict[tuple[str, int], tuple] = {}  # Prometheus children, looked up once per (route, status)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = time.perf_counter()
        route = scope.get("route", scope["path"])
        exchange: Exchange | None = scope.get("exchange")
        try:
            answer = await self._answer(self.handlers[route], scope, receive, exchange)
        except ClientGone as gone:  # nobody to answer; counted, and (in the access log) a 499 as nginx writes it
            ABANDONED_REQUESTS.labels(stage=gone.stage).inc()
            if exchange is not None:
                exchange.status, exchange.error = 499, "the client disconnected before its answer"
            connection = scope.get(CONNECTION)
            if connection is not None:  # its socket said so first: uvicorn has not read the hang-up yet
                connection.end()
            return
        await send_answer(send, answer)
        meters = self.meters.get((route, answer.status))
        if meters is None:
            meters = self.meters[route, answer.status] = (
                REQUEST_SECONDS.labels(endpoint=route),
                REQUESTS.labels(endpoint=route, status=str(answer.status)),
            )
        meters[0].observe(time.perf_counter() - started)
        meters[1].inc()

    async def _answer(self, handler: Handler, scope: Scope, receive: Receive, exchange: Exchange | None) -> Answer:
        request_id = exchange.request_id if exchange is not None else ""
        try:
            body = await self._body(scope, receive)
            if exchange is not None:
                exchange.bytes_in = len(body)
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

    def _too_large(self) -> BodyTooLarge:
        return BodyTooLarge(
            f"request body is larger than the {size_text(self.max_body_bytes)} limit; send a smaller image"
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
            raise self._too_large()
        message = await receive()  # the common case: the whole body in one message, no timer needed
        if message["type"] == "http.disconnect":
            raise ClientGone("reading")
        if not message.get("more_body"):
            body = message.get("body", b"")
            if len(body) > self.max_body_bytes:
                raise self._too_large()
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
                        raise self._too_large()
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


def header(scope: Scope, name: bytes) -> bytes:
    return next((v for k, v in scope["headers"] if k == name), b"")


class Forms:
    """What a classification request asks: its images and options, from a multipart form or a raw body."""

    def __init__(self, default_model: str) -> None:
        self.default_model = default_model

    def read(self, scope: Scope, body: bytes, field: str, max_files: int) -> tuple[list[bytes], str, int]:
        """(images, model, top_k). Options come from the query string or from form fields; one given in both is
        refused."""
        options = dict(parse_qsl(scope["query_string"].decode("latin-1")))
        content_type = header(scope, b"content-type")
        media = content_type.split(b";", 1)[0].strip().lower()
        if media == b"application/json":
            raise UnsupportedMedia(
                f"{scope['path']} does not take JSON; send the image as a multipart file field (curl -F "
                f"{field}=@cat.jpg), as the raw body (curl --data-binary @cat.jpg), or as base64 in JSON to "
                "/v2/models/NAME/infer"
            )
        if media == b"application/x-www-form-urlencoded" and TEXT_FORM.fullmatch(body):
            # A text form (`curl -d`, `httpx.post(data=...)`): no file can be in it. An image sent with
            # `curl --data-binary` carries the same Content-Type, but its bytes are not a form's.
            fields = dict(parse_qsl(body.decode("ascii")))
            if field in fields:
                raise BadRequest(f"{field}: a text field; send the image as a file (curl -F {field}=@cat.jpg)")
            raise BadRequest(f"{field}: missing; send the image as a multipart file field named {field}")
        if media == b"multipart/form-data":
            images = []
            for part in multipart.parse(body, content_type, MAX_PARSED_PARTS):
                if part.name == field:
                    if part.filename is None:
                        raise BadRequest(f"{field}: a text field; send the image as a file (curl -F {field}=@cat.jpg)")
                    images.append(part.data)
                elif part.name in ("model", "top_k"):
                    if part.filename is not None:
                        raise BadRequest("model and top_k are text fields, not files")
                    if part.name in options:
                        raise BadRequest(
                            f"{part.name} is given twice, in the query string and in the form; send it once"
                        )
                    options[part.name] = part.data.decode("utf-8", "replace")
            if not images:
                raise BadRequest(
                    f"{field}: missing; send the image as a multipart file field named {field}"
                    if max_files == 1
                    else f"{field}: missing; send one or more files in fields named {field}"
                )
            if max_files == 1 and len(images) > 1:
                raise BadRequest(f"{field}: {len(images)} files; /classify takes one (use /classify_batch)")
        elif max_files == 1:  # the whole body is the image: its Content-Type is not trusted, its bytes decide
            images = [body]
        else:
            raise BadRequest(f"send the images as a multipart form with repeated file fields named {field}")
        top_k = options.get("top_k", "3")
        try:
            return images, options.get("model", self.default_model), int(top_k)
        except ValueError:
            raise BadRequest(f"top_k must be a whole number, got {top_k!r}") from None


def noted(scope: Scope, model: str, images: int) -> None:
    """What the access line says the request asked for."""
    exchange = scope.get("exchange")
    if exchange is not None:
        exchange.model, exchange.images = model, images


def answered(classified: Classified) -> dict:
    """An image's answer as JSON: its predictions, and where the model scores it, whether it looks like one of the
    classes at all."""
    answer: dict = {"predictions": [prediction._asdict() for prediction in classified.predictions]}
    if classified.ood_score is not None:
        answer["in_distribution"], answer["ood_score"] = classified.in_distribution, classified.ood_score
    return answer


def classify_handlers(predictor: Callable[[], Predictor], forms: Forms) -> dict[str, Handler]:
    """/classify and /classify_batch, answered by the Predictor `predictor()` returns (once the models are loaded)."""

    async def classify(scope: Scope, body: bytes) -> Answer:
        images, model, top_k = forms.read(scope, body, "image", max_files=1)
        noted(scope, model, len(images))
        serving = predictor()
        [result] = await serving.classify(images, model, top_k, hang_up_probe(scope))
        if isinstance(result, ImageError):
            raise result
        return Answer(200, {"model": model, "model_version": serving.version(model), **answered(result)})

    async def classify_batch(scope: Scope, body: bytes) -> Answer:
        images, model, top_k = forms.read(scope, body, "images", max_files=MAX_PARSED_PARTS)
        noted(scope, model, len(images))
        serving = predictor()
        results = await serving.classify(images, model, top_k, hang_up_probe(scope))
        items = [
            {"error": str(r), "status": status_of(r)} if isinstance(r, ImageError) else answered(r) for r in results
        ]
        return Answer(200, {"model": model, "model_version": serving.version(model), "results": items})

    return {"/classify": classify, "/classify_batch": classify_batch}
