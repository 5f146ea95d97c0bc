"""The API's description: every public route with its bodies and errors, as the OpenAPI document at /docs.json
that the Swagger UI at /docs shows (the page loads BentoML's bundled Swagger UI files from this server only).

FastAPI writes the document from the routes declared here, for the document only: the route table answers them
(service/http/routes.py), or BentoML's app (/livez, /readyz, /metrics), which also runs this app's /models.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi import FastAPI
from fastapi.responses import JSONResponse
from starlette.staticfiles import StaticFiles

from service.http.routes import PAGE
from service.openinference import package_version
from service.settings import Settings

TITLE = "CIFAR-10 classifier"
DESCRIPTION = (
    "Classifies images into the ten CIFAR-10 classes (airplane, automobile, bird, cat, deer, dog, frog, horse, "
    "ship, truck) with the models the server lists at `GET /models`. Every answer says whether the image looks like "
    "one of the ten classes at all (`in_distribution`, from `ood_score`). Two ways in: this service's own routes "
    "(`/classify`, `/classify_batch`), and the Open Inference Protocol (KServe v2) that Triton's and KServe's "
    'clients speak (`/v2/...`). Every error is JSON: `{"error": "...", "request_id": "..."}`.'
)
ERRORS = {
    400: "bad input: not an image, a corrupt one, a bad option or field",
    401: "API keys are on and the request has no valid `Authorization: Bearer KEY`",
    403: "the key may not use this route (a /metrics-only key; a key not marked admin on /v2/repository)",
    404: "no such model or model version (on /v2/repository: also model control is off)",
    409: "a change of this model is under way, or the change would leave nothing to answer",
    408: "the headers or the body arrived too slowly",
    413: "the body is over the size limit, or the image over the pixel limit",
    415: "a type the route does not take (SVG, PDF, text; JSON on /classify)",
    422: "the version cannot serve: a corrupt or changed file, another contract or network than its name says",
    429: "too many requests in flight; retry after Retry-After",
    503: "overloaded, or shutting down; retry after Retry-After",
    504: "no answer in time",
    507: "the host lacks the memory to load the version",
}
PREDICTION = {
    "type": "object",
    "properties": {
        "predictions": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {
                    "label": {"type": "string"},
                    "index": {"type": "integer"},
                    "probability": {"type": "number"},
                },
            },
            "description": "the top_k classes, most probable first (calibrated probabilities)",
        },
        "in_distribution": {
            "type": "boolean",
            "description": "false: the image looks like none of the ten classes (absent for a model without a score)",
        },
        "ood_score": {
            "type": "number",
            "description": "how unlike the training images the image is; above the model's threshold (GET /models) "
            "is out of distribution",
        },
    },
}
V2_TENSOR = {
    "type": "object",
    "required": ["name", "datatype", "shape"],
    "properties": {
        "name": {"type": "string", "enum": ["image", "input"]},
        "datatype": {"type": "string", "enum": ["BYTES", "FP32"]},
        "shape": {"type": "array", "items": {"type": "integer"}},
        "data": {"type": "array", "items": {}, "description": "base64 image files (BYTES) or numbers (FP32)"},
        "parameters": {"type": "object", "description": "binary_data_size with the binary tensor data extension"},
    },
}
V2_INFER = {
    "type": "object",
    "required": ["inputs"],
    "properties": {
        "id": {"type": "string"},
        "inputs": {
            "type": "array",
            "items": V2_TENSOR,
            "description": "exactly one: `image`, BYTES [N], encoded image files; or `input`, FP32 [N, 3, 32, 32], "
            "normalized with the mean and std of GET /v2/models/NAME",
        },
        "outputs": {
            "type": "array",
            "items": {"type": "object", "properties": {"name": {"type": "string"}}},
            "description": "any of probabilities (FP32 [N, 10]), labels (BYTES [N, top_k]) and ood_score (FP32 [N]); "
            "default: all",
        },
        "parameters": {"type": "object", "description": "top_k (default 3), binary_data_output"},
    },
}


def json_answer(description: str, schema: dict | None = None) -> dict:
    return {"description": description, "content": {"application/json": {"schema": schema or {"type": "object"}}}}


def errors(*statuses: int) -> dict:
    body = {"type": "object", "properties": {"error": {"type": "string"}, "request_id": {"type": "string"}}}
    return {status: json_answer(ERRORS[status], body) for status in statuses}


class Document:
    """A FastAPI app whose routes exist for the OpenAPI document only."""

    def __init__(self) -> None:
        self.app = FastAPI(
            title=TITLE, version=package_version(), description=DESCRIPTION, docs_url=None, redoc_url=None
        )

    def route(self, path: str, method: str, summary: str, responses: dict, **openapi: Any) -> None:
        self.app.add_api_route(
            path, _documented, methods=[method], summary=summary, responses=responses, openapi_extra=openapi or None
        )


async def _documented() -> None:
    """Stands in for a route the route table answers itself."""


def documented_app(settings: Settings) -> FastAPI:
    """The FastAPI app mounted on the BentoML service: every public route, declared for the document."""
    document = Document()
    classify_routes(document, settings)
    plain_routes(document)
    v2_routes(document)
    repository_routes(document)
    return document.app


def classify_routes(document: Document, settings: Settings) -> None:
    image = {"type": "string", "format": "binary", "description": "an image file (JPEG, PNG, WebP, GIF, BMP, TIFF)"}
    names = [name for name, _ in settings.models]
    options = {
        "model": {"type": "string", "enum": names, "default": names[0], "description": "the model to answer"},
        "top_k": {"type": "integer", "default": 3, "description": "how many labels to return, 1-10"},
    }
    query = [{"name": n, "in": "query", "required": False, "schema": schema} for n, schema in options.items()]
    answered_by = {"model": {"type": "string"}, "model_version": {"type": "string"}}
    classified = {"type": "object", "properties": {**answered_by, **PREDICTION["properties"]}}
    document.route(
        "/classify",
        "POST",
        "Classify one image (a multipart field `image`, or the whole body)",
        {200: json_answer("the image's classes", classified), **errors(400, 401, 408, 413, 415, 429, 503, 504)},
        requestBody={
            "required": True,
            "content": {
                "multipart/form-data": {
                    "schema": {"type": "object", "required": ["image"], "properties": {"image": image, **options}}
                },
                "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
            },
        },
        parameters=query,
    )
    result = {"oneOf": [PREDICTION, {"type": "object", "properties": {"error": {}, "status": {}}}]}
    batch = {"type": "object", "required": ["images"], "properties": {"images": {"type": "array", "items": image}}}
    document.route(
        "/classify_batch",
        "POST",
        f"Classify up to {settings.max_batch_images} images (the repeated multipart field `images`)",
        {
            200: json_answer(
                "one result per image, in order: its classes, or its own error and status",
                {"type": "object", "properties": {**answered_by, "results": {"type": "array", "items": result}}},
            ),
            **errors(400, 401, 408, 413, 415, 429, 503, 504),
        },
        requestBody={
            "required": True,
            "content": {"multipart/form-data": {"schema": {**batch, "properties": {**batch["properties"], **options}}}},
        },
    )


def plain_routes(document: Document) -> None:
    for path, summary in (
        ("/livez", "Liveness: 200 while the process runs"),
        ("/readyz", "Readiness: 200 once the models are loaded and warm, 503 while draining"),
        ("/metrics", "Prometheus metrics"),
        ("/v2", "Open Inference Protocol: server metadata"),
        ("/v2/health/live", "Open Inference Protocol: liveness"),
        ("/v2/health/ready", "Open Inference Protocol: readiness"),
    ):
        document.route(path, "GET", summary, {200: json_answer("see the summary")})


def v2_routes(document: Document) -> None:
    for versioned in ("", "/versions/{version}"):
        base = "/v2/models/{name}" + versioned
        named = [
            {"name": part, "in": "path", "required": True, "schema": {"type": "string"}}
            for part in ("name", "version")
            if "{" + part + "}" in base
        ]
        document.route(
            base, "GET", "A model's metadata: inputs, outputs, parameters", errors(401, 404), parameters=named
        )
        document.route(base + "/ready", "GET", "Whether a model is ready", errors(401, 404), parameters=named)
        document.route(
            base + "/infer",
            "POST",
            "Infer (JSON, or JSON then binary tensor data with Inference-Header-Content-Length)",
            {200: json_answer("the outputs asked for"), **errors(400, 401, 404, 408, 413, 415, 429, 503, 504)},
            requestBody={"required": True, "content": {"application/json": {"schema": V2_INFER}}},
            parameters=named,
        )


def repository_routes(document: Document) -> None:
    """Triton's model-repository extension (service/http/repository.py)."""
    named = [{"name": "name", "in": "path", "required": True, "schema": {"type": "string"}}]
    document.route(
        "/v2/repository/index",
        "POST",
        "Every cifar10-* model in the store: each version and its state here (READY, LOADING, UNAVAILABLE)",
        {200: json_answer("[{name, version, state, reason}]"), **errors(400, 401, 403, 404)},
        requestBody=_json_body({"ready": {"type": "boolean", "description": "only the READY versions"}}),
    )
    document.route(
        "/v2/repository/models/{name}/load",
        "POST",
        "Load a version (default: the store's newest) to answer on every worker, or as a shadow on a sample; the "
        "version it replaces stays warm: loading it again rolls back",
        {200: json_answer("what each worker serves"), **errors(400, 401, 403, 404, 409, 422, 503, 507)},
        requestBody=_json_body(
            {
                "parameters": {
                    "type": "object",
                    "properties": {
                        "version": {"type": "string", "description": "a store version (a prefix will do)"},
                        "shadow": {"type": "boolean", "description": "compute it beside the live one, answer none"},
                        "sample": {"type": "number", "description": "with shadow: the share of requests, (0, 1]"},
                    },
                }
            }
        ),
        parameters=named,
    )
    document.route(
        "/v2/repository/models/{name}/unload",
        "POST",
        "Unload a warm or shadow version, or (without one) the whole model",
        {200: json_answer("what each worker serves"), **errors(400, 401, 403, 404, 409)},
        requestBody=_json_body(
            {"parameters": {"type": "object", "properties": {"version": {"type": "string"}}}},
        ),
        parameters=named,
    )


def _json_body(properties: dict) -> dict:
    schema = {"type": "object", "properties": properties}
    return {"required": False, "content": {"application/json": {"schema": schema}}}


def mounted_app(settings: Settings, models: Callable[[], dict]) -> FastAPI:
    """What the service mounts on BentoML's app (its middleware sees these): the routes declared for the document,
    /models (answered with `models()`), and the page's files."""
    app = documented_app(settings)

    async def served_models() -> JSONResponse:
        return JSONResponse(models())

    app.add_api_route(
        "/models",
        served_models,
        methods=["GET"],
        summary="The served models: versions, precision, input contract, accuracy, out-of-distribution threshold",
        responses={200: json_answer("the served models, their batching settings and request limits"), **errors(401)},
    )
    app.mount("/page", StaticFiles(directory=PAGE), name="page")  # the page's script and style sheet
    return app
