"""The HTTP surface: the public routes (FastAPI, mounted on the BentoML service) and the limits middleware."""

import json
from typing import Annotated

from fastapi import FastAPI, File, Form, UploadFile
from fastapi.exceptions import RequestValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

RETRY_AFTER_S = b"1"


# Form fields of the public routes (module level: FastAPI resolves annotations by name).
Model = Annotated[str, Form(description="resnet18 or lenet")]
TopK = Annotated[int, Form(description="how many labels to return, 1-10")]
Image = Annotated[UploadFile, File(description="an image file (JPEG, PNG, WebP, GIF, BMP, TIFF)")]
Images = Annotated[list[UploadFile], File(description="repeated field; at most CIFAR10_MAX_BATCH_IMAGES (64)")]


class _TooLarge(Exception):
    pass


class LimitsMiddleware:
    """429 past `max_concurrency` POSTs in flight; 413 for bodies over `max_body_bytes`; Retry-After on 503.

    The concurrency limit lives here rather than in BentoML's traffic settings, whose 429
    is sent outside this middleware and so could not carry Retry-After.
    """

    def __init__(self, app: ASGIApp, max_body_bytes: int, max_concurrency: int) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.max_concurrency = max_concurrency
        self.in_flight = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        if self.in_flight >= self.max_concurrency:
            await _json(send, 429, "too many requests in flight; retry shortly", retry=True)
            return
        self.in_flight += 1
        try:
            await self._limited(scope, receive, send)
        finally:
            self.in_flight -= 1

    async def _limited(self, scope: Scope, receive: Receive, send: Send) -> None:
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
            if message["type"] == "http.response.start" and message["status"] == 503:
                message = {**message, "headers": [*message.get("headers", []), (b"retry-after", RETRY_AFTER_S)]}
            await send(message)

        try:
            await self.app(scope, counting_receive, annotating_send)
        except _TooLarge:
            await self._reject(send)

    async def _reject(self, send: Send) -> None:
        limit_mb = self.max_body_bytes / (1024 * 1024)
        await _json(send, 413, f"request body is larger than the {limit_mb:g} MB limit; send a smaller image")


async def _json(send: Send, status: int, error: str, retry: bool = False) -> None:
    body = json.dumps({"error": error}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if retry:
        headers.append((b"retry-after", RETRY_AFTER_S))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
    problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'][1:]) or 'body'}: {e['msg']}" for e in exc.errors())
    return JSONResponse({"error": f"invalid request: {problems}"}, status_code=400)


def api_app() -> FastAPI:
    """The public routes, mounted on the BentoML service; BentoML merges them into its OpenAPI spec."""
    import bentoml

    app = FastAPI(title="cifar10-classifier")
    app.add_exception_handler(RequestValidationError, _validation_error)
    errors = {s: {"description": d, "content": {"application/json": {"example": {"error": "..."}}}} for s, d in (
        (400, "bad input"), (413, "too large"), (415, "unsupported type"), (429, "too many requests"),
        (503, "overloaded"), (504, "timed out"))}

    @app.post("/classify", responses=errors)
    async def classify(image: Image, model: Model = "resnet18", top_k: TopK = 3) -> JSONResponse:
        """Classify one image: the top_k CIFAR-10 labels with softmax probabilities."""
        status, body = await bentoml.get_current_service().classify(await image.read(), model, top_k)
        return JSONResponse(body, status_code=status)

    @app.post("/classify_batch", responses=errors)
    async def classify_batch(images: Images, model: Model = "resnet18", top_k: TopK = 3) -> JSONResponse:
        """Classify several images: one result per image, in order, each `predictions` or `error`."""
        items = [await image.read() for image in images]
        status, body = await bentoml.get_current_service().classify_batch(items, model, top_k)
        return JSONResponse(body, status_code=status)

    @app.get("/models")
    async def models() -> JSONResponse:
        """The served models, their versions, input contract, accuracy and execution provider."""
        return JSONResponse(bentoml.get_current_service().describe())

    return app
