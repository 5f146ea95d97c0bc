"""/classify and /classify_batch: a body parsed into the inference core's request, its answers formatted.

`/classify` takes one image, as the multipart field `image` or as the whole body (`curl --data-binary @cat.jpg`,
options in the query string); `/classify_batch` the repeated field `images`, one result per image, a bad one failing
only itself.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from urllib.parse import parse_qsl

from starlette.types import Scope

from core.errors import ImageError
from service.errors import BadRequest, UnsupportedMedia
from service.http import multipart
from service.http.answers import Answer, status_of
from service.http.context import header, record_asked
from service.http.endpoints import Handler, hang_up_probe
from service.inference.core import Asked, Classified, Inference

MAX_PARSED_PARTS = 1000  # parsed before the batch limit is checked, so its error can name the count
# An application/x-www-form-urlencoded body as forms send it: name=value pairs of URL-safe characters.
TEXT_FORM = re.compile(rb"[\w.~%+*-]+=[\w.~%+*/:,-]*(?:&[\w.~%+*-]+=[\w.~%+*/:,-]*)*")


def classify_endpoints(inference: Callable[[], Inference]) -> dict[str, Handler]:
    """The two routes' handlers, calling the inference core `inference()` returns (once the models are loaded)."""

    async def answer(scope: Scope, body: bytes, field: str, single: bool) -> Answer:
        core = inference()
        max_files = 1 if single else MAX_PARSED_PARTS
        images, model, top_k = read_form(scope, body, field, max_files, core.repository.default)
        record_asked(scope, model, len(images))
        answers = await core.classify(Asked(model, top_k, images=images, hung_up=hang_up_probe(scope)))
        head = {"model": model, "model_version": answers.version}
        if single:
            [item] = answers.items
            if isinstance(item, ImageError):
                raise item
            return Answer(200, {**head, **answered(item)})
        items = [
            {"error": str(item), "status": status_of(item)} if isinstance(item, ImageError) else answered(item)
            for item in answers.items
        ]
        return Answer(200, {**head, "results": items})

    async def classify(scope: Scope, body: bytes) -> Answer:
        return await answer(scope, body, "image", single=True)

    async def classify_batch(scope: Scope, body: bytes) -> Answer:
        return await answer(scope, body, "images", single=False)

    return {"/classify": classify, "/classify_batch": classify_batch}


def answered(classified: Classified) -> dict:
    """An image's answer as JSON: its predictions, and where the model scores it, whether it looks like one of the
    classes at all."""
    answer: dict = {"predictions": [prediction._asdict() for prediction in classified.predictions]}
    if classified.ood_score is not None:
        answer["in_distribution"], answer["ood_score"] = classified.in_distribution, classified.ood_score
    return answer


def read_form(
    scope: Scope, body: bytes, field: str, max_files: int, default_model: str
) -> tuple[list[bytes], str, int]:
    """(images, model, top_k) from a multipart form or a raw body. Options come from the query string or from form
    fields; one given in both is refused."""
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
                    raise BadRequest(f"{part.name} is given twice, in the query string and in the form; send it once")
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
        return images, options.get("model", default_model), int(top_k)
    except ValueError:
        raise BadRequest(f"top_k must be a whole number, got {top_k!r}") from None
