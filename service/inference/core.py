"""The one way from a request's images to their answers, for every route: validate the request, decode each image,
queue them for the model's batcher (which normalizes, runs, ranks and scores a whole batch at once in the model
call, inference/model.py), and cut each image's classes to the top k, flagged where the image looks like none of
them (core/ood.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import anyio
import numpy as np

from core.errors import ImageError
from core.preprocess import decode_plain_jpeg, open_image, to_pixels
from service.errors import BadRequest
from service.inference.batcher import HangUpProbe
from service.inference.model import Ranked
from service.inference.repository import ModelRepository
from service.settings import Settings
from service.tracing import model_span

# Images over this many pixels (after JPEG's DCT scaling) are decoded off the event loop, where every connection
# would wait for a large one.
INLINE_PIXELS = 256 * 256


class Prediction(NamedTuple):
    """One of an image's top-k classes (a NamedTuple: far cheaper than a frozen dataclass to build and to turn into
    JSON, on a path that runs three times per request)."""

    label: str
    index: int
    probability: float


class Classified(NamedTuple):
    """An image's answer: its top-k classes, and for a model with an out-of-distribution score (core/ood.py) the
    score and whether it is within the threshold (None for a model without one)."""

    predictions: list[Prediction]
    ood_score: float | None = None
    in_distribution: bool | None = None


@dataclass(frozen=True)
class Asked:
    """What a route asks: `images` (encoded files) or `tensor` (normalized float32 NCHW inputs) for `model`, the
    `top_k` classes of each. `version`: the one a route names (None: the one answering). `whole`: the first image
    that cannot be used fails the request, its index in the message (a protocol without per-item errors).
    `hung_up`: whether the client has gone, asked before the images go into a model call."""

    model: str
    top_k: int
    images: list[bytes] | None = None
    tensor: np.ndarray | None = None
    version: str | None = None
    in_path: bool = False  # the route names the model in its path: an unknown one is NotFound, not BadRequest
    whole: bool = False
    hung_up: HangUpProbe | None = None
    one_per_pass: bool = False  # requests like this reach the batcher one per pass of the event loop (gRPC's)

    @property
    def count(self) -> int:
        return len(self.images) if self.images is not None else len(self.tensor)


@dataclass(frozen=True)
class Answers:
    """The model's answers: each image's Classified, or the ImageError it gave, in order; and every class of the
    images that were classified (`ranked`, in their order), for protocols that return whole probability rows."""

    model: str
    version: str
    class_names: tuple[str, ...]
    items: list[Classified | ImageError]
    ranked: Ranked


class Inference:
    """The entry point every route calls, over the worker's model repository."""

    def __init__(self, repository: ModelRepository, settings: Settings) -> None:
        self.repository, self.settings = repository, settings

    async def classify(self, asked: Asked) -> Answers:
        """Raises BadRequest for a bad option, NotFound for a version the model lacks, Overloaded when the model's
        queue is too long, ClientGone when the client has gone; an image's own problem is its item's ImageError (or,
        with `whole`, raised)."""
        serving = self.repository.answering(asked.model, asked.version, asked.in_path)
        model = serving.model
        self._check(asked, len(model.class_names))
        if asked.images is not None:
            inputs, items = await self._decoded(asked.images, asked.whole)
        else:
            inputs, items = asked.tensor, [Classified([]) for _ in range(len(asked.tensor))]
        ranked = Ranked(np.empty((0, len(model.class_names), 2)))
        if len(inputs):
            with model_span(asked.model, len(inputs)) as span:
                ranked, call_images = await serving.batcher.call(inputs, asked.hung_up, asked.one_per_pass)
                if span is not None:
                    span.set_attribute("cifar10.batch_images", call_images)
            shadow = self.repository.shadow_of(asked.model) if asked.version is None else None
            if shadow is not None:
                shadow.offer(inputs, ranked, serving.batcher, model.ood.threshold if model.ood else None)
        good = [i for i, item in enumerate(items) if not isinstance(item, ImageError)]
        scores = [None] * len(good) if ranked.ood_scores is None else ranked.ood_scores.tolist()
        names = model.class_names
        for i, rows, score in zip(good, ranked.classes[:, : asked.top_k].tolist(), scores, strict=True):
            predictions = [Prediction(names[int(j)], int(j), p) for j, p in rows]
            items[i] = Classified(predictions, score, None if score is None else score <= model.ood.threshold)
        return Answers(asked.model, model.version, names, items, ranked)

    def _check(self, asked: Asked, classes: int) -> None:
        if not 1 <= asked.top_k <= classes:
            raise BadRequest(f"top_k must be between 1 and {classes}, got {asked.top_k}")
        if asked.count > self.settings.max_batch_images:
            raise BadRequest(f"{asked.count} images in one request; the limit is {self.settings.max_batch_images}")

    async def _decoded(self, images: list[bytes], whole: bool) -> tuple[np.ndarray, list[Classified | ImageError]]:
        """The decoded images' uint8 pixels, stacked, and a placeholder per image (its ImageError where it failed)."""
        pixels: list[np.ndarray] = []
        items: list[Classified | ImageError] = []
        for index, data in enumerate(images):
            try:
                pixels.append(await self._decode(data))
                items.append(Classified([]))
            except ImageError as exc:
                if whole:
                    raise type(exc)(f"image {index}: {exc}") from None
                items.append(exc)
        return (np.stack(pixels) if pixels else np.empty((0, 32, 32, 3), np.uint8)), items

    async def _decode(self, data: bytes) -> np.ndarray:
        pixels = decode_plain_jpeg(data)
        if pixels is not None:
            return pixels
        image = open_image(data, self.settings.max_pixels)  # the header only: cheap at any size
        if image.width * image.height <= INLINE_PIXELS:
            return to_pixels(image)
        return await anyio.to_thread.run_sync(to_pixels, image)

    def describe(self) -> dict:
        """The served models, their versions, input contract, accuracy, execution provider and scores; the batching
        settings and request limits."""
        models = self.repository.describe()
        first = self.repository.answering(self.repository.default).model
        return {
            "default": self.repository.default,
            "models": models,
            "batching": {
                "max_batch_size": self.settings.max_batch_size,
                "max_latency_ms": self.settings.max_latency_ms,
                "bucket_sizes": list(self.repository.host.bucket_sizes),
            },
            "limits": {
                "max_batch_images": self.settings.max_batch_images,
                "max_body_bytes": self.settings.max_body_bytes,
                "max_pixels": self.settings.max_pixels,
            },
            "workers": self.repository.host.workers,
            "onnxruntime_threads": {
                "alone": first.all_cores.threads,
                "shared": (first.shared or first.all_cores).threads,
            },
        }
