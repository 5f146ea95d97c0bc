"""Classification without HTTP: image bytes in, labels (or that image's error) out, one per input, in order.

The shape of a `@bentoml.api(batchable=True)` method (list in, list out), so it could move
behind BentoML's own API should BentoML's per-request overhead drop. Each image is decoded and
validated on its own, so a bad one fails only itself; the normalized arrays then share model
calls through one Batcher per model.

The model types, which is which: `ModelInfo` (core/contract.py) is the metadata an ONNX file carries;
`OnnxModel` (core/runtime.py) is one loaded ONNX Runtime session of a file; BentoML's `BentoModel`
names a store model (service/service.py); here `ModelFile` is a stored file and its tag, `Copies` the
fp32 and int8 files of one served model, and `ServedModel` the copy that answers, loaded.
"""

from __future__ import annotations

import functools
import threading
import time
from collections.abc import Callable, Mapping
from contextlib import nullcontext
from dataclasses import dataclass, replace
from pathlib import Path
from typing import NamedTuple

import anyio
import numpy as np

from core.errors import ImageError
from core.host import gpu_count, usable_cores
from core.preprocess import decode_plain_jpeg, normalize, open_image, to_pixels
from core.runtime import CUDA, OnnxModel, choose_providers, rank
from core.selfcheck import choose
from service.batching import Batcher, HangUpProbe, bucket_sizes
from service.cores import SharedCores
from service.drain import say
from service.errors import BadRequest
from service.metrics import BATCH_SIZES, INFERENCES, MODEL_SECONDS, OUT_OF_DISTRIBUTION
from service.settings import Settings
from service.tracing import model_span

INLINE_S = 0.0002  # a model under this many seconds an image on a CPU runs its calls in the event loop
# Images over this many pixels (after JPEG's DCT scaling) are decoded off the event loop: a
# 256x256 PNG takes ~0.3 ms, a 36-megapixel one 0.2 s, during which every connection would wait.
INLINE_PIXELS = 256 * 256
NO_OOD_SCORE = {
    "method": None,
    "reason": "this model file carries no out-of-distribution statistics, so its answers have no in_distribution "
    "flag; fit them with `cifar10 calibrate`",
}


class Prediction(NamedTuple):
    """One of an image's top-k classes (a NamedTuple: ~20x cheaper than a frozen dataclass to build and to turn
    into JSON, on a path that runs three times per request)."""

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
class Ranked:
    """A model call's answers, sliced per request by the batcher: each image's classes from the most probable down,
    (N, classes, 2) of [class index, probability] (core.runtime.rank), and its out-of-distribution score (N,), None
    for a model without one."""

    classes: np.ndarray
    ood_scores: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.classes)

    def __getitem__(self, rows: slice) -> Ranked:
        return Ranked(self.classes[rows], None if self.ood_scores is None else self.ood_scores[rows])


@dataclass(frozen=True)
class ModelFile:
    """Where a stored model comes from: its store tag (`name:version`) and ONNX file."""

    store_tag: str
    path: Path


@dataclass(frozen=True)
class Copies:
    """The stored copies of one served model: fp32, and int8 where there is one (either may be absent)."""

    fp32: ModelFile | None
    int8: ModelFile | None = None


@dataclass(frozen=True)
class ServedModel:
    """A loaded model: ONNX Runtime on every core, and on this worker's share of them while others run calls;
    `reason` says why this copy (fp32 or int8) answers."""

    store_tag: str
    all_cores: OnnxModel
    shared_cores: OnnxModel | None
    reason: str
    self_check: dict | None = None

    @property
    def version(self) -> str:
        return self.store_tag.partition(":")[2]


class Predictor:
    """The served models, their batchers and the per-image pipeline of decode, normalize, batch, top-k."""

    def __init__(
        self,
        copies: Mapping[str, Copies],
        settings: Settings,
        workers: int = 1,
        worker: int = 0,
        cores_file: Path | None = None,
    ) -> None:
        """Choose and load each model's answering copy (the int8 one only where its self-check passes on this CPU)
        and run each batch shape it will see once. `worker` is this process's 1-based index among `workers` (0: not
        under a server); with several CPU workers, `cores_file` is their shared-cores file."""
        self.settings, self.workers = settings, workers
        cores = usable_cores()
        alone = settings.ort_threads or cores
        share = settings.ort_threads or max(1, cores // workers)
        device = (worker - 1) % gpu_count() if worker and gpu_count() > 1 else 0  # workers spread over the GPUs
        on_cpu = CUDA not in choose_providers(settings.providers)

        def loader(file: ModelFile | None) -> Callable[[], OnnxModel] | None:
            return file and (lambda: OnnxModel(file.path, settings.providers, alone, workers == 1, device))

        self.models = {}
        for name, copy in copies.items():
            choice = choose(
                name, loader(copy.fp32), loader(copy.int8), settings.precision, on_cpu, settings.int8_min_agreement
            )
            file = copy.int8 if copy.int8 and choice.model.path == copy.int8.path else copy.fp32
            self.models[name] = ServedModel(
                file.store_tag, choice.model, None, choice.reason, choice.check and choice.check.as_dict()
            )
            if worker <= 1:  # one line per server, not one per worker
                if choice.check:
                    say(f"cifar10: {name} answers in {choice.model.info.precision}: {choice.reason}")
                if choice.model.fallback:
                    say(f"cifar10: {name}: {choice.model.fallback}")
        self.cores: SharedCores | None = None
        if share < alone and worker and cores_file and on_cpu:
            self.models = {
                name: replace(m, shared_cores=OnnxModel(m.all_cores.path, settings.providers, share, spin=False))
                for name, m in self.models.items()
            }
            self.cores = SharedCores(cores_file, workers, worker - 1)
        buckets = settings.batch_buckets == "on" or (settings.batch_buckets == "auto" and not on_cpu)
        self.bucket_sizes = bucket_sizes(settings.max_batch_size) if buckets else ()
        for model in self.models.values():  # every shape a call will see, before /readyz turns 200
            for session in filter(None, (model.all_cores, model.shared_cores)):
                for size in self.bucket_sizes or (1,):  # the first run allocates and picks kernels
                    session.logits(np.zeros((size, 3, 32, 32), np.float32))
        # On a CPU, a model this cheap runs its calls in the event loop (service/batching.py): the thread hand-off
        # would cost more than the call. Judged from a timed call of 16 images (the largest bucket, with buckets).
        probe = self.bucket_sizes[-1] if self.bucket_sizes else 16
        inline = {
            name: on_cpu and _seconds_per_image(m.shared_cores or m.all_cores, probe) < INLINE_S
            for name, m in self.models.items()
        }
        self.meters = {
            arch: (
                MODEL_SECONDS.labels(model=arch),
                BATCH_SIZES.labels(model=arch),
                INFERENCES.labels(model=arch),
                OUT_OF_DISTRIBUTION.labels(model=arch),
            )
            for arch in self.models
        }
        one_at_a_time = threading.Lock()  # the models share the device: never run two calls at once
        self.batchers = {
            arch: Batcher(
                arch,
                functools.partial(self._run, arch),
                settings.max_batch_size,
                settings.max_latency_ms / 1000,
                one_at_a_time,
                self.bucket_sizes,
                prepare=functools.partial(normalize, table=self.models[arch].all_cores.table),
                inline=inline[arch],
            )
            for arch in self.models
        }

    async def classify(
        self, images: list[bytes], model: str, top_k: int, hung_up: HangUpProbe | None = None
    ) -> list[Classified | ImageError]:
        """Each image's top_k labels (and out-of-distribution score), or the ImageError that image gave. `hung_up`:
        whether the client has gone, asked before its images go into a model call (see Batcher).

        Raises BadRequest for a bad option and Overloaded when the model's queue is too long.
        """
        self._check(model, top_k, len(images))
        results: list[Classified | ImageError] = [Classified([]) for _ in images]
        good, pixels = [], []
        for i, data in enumerate(images):
            try:
                pixels.append(await self._decode(data))
                good.append(i)
            except ImageError as exc:
                results[i] = exc
        if good:
            ranked = await self.ranked(model, np.stack(pixels), hung_up)  # normalized per batch by the batcher
            served = self.models[model].all_cores
            names = served.info.class_names
            scores = [None] * len(good) if ranked.ood_scores is None else ranked.ood_scores.tolist()
            for i, rows, score in zip(good, ranked.classes[:, :top_k].tolist(), scores, strict=True):
                predictions = [Prediction(names[int(j)], int(j), p) for j, p in rows]
                results[i] = Classified(predictions, score, None if score is None else score <= served.ood.threshold)
        return results

    async def ranked_images(self, images: list[bytes], model: str, hung_up: HangUpProbe | None = None) -> Ranked:
        """Each image's classes ranked (see `ranked`); the first image that cannot be used fails them all, its index
        in the error (for protocols without per-item errors)."""
        pixels = []
        for index, data in enumerate(images):
            try:
                pixels.append(await self._decode(data))
            except ImageError as exc:
                raise type(exc)(f"image {index}: {exc}") from None
        return await self.ranked(model, np.stack(pixels), hung_up)

    def class_names(self, model: str) -> tuple[str, ...]:
        return self.models[model].all_cores.info.class_names

    async def ranked(self, model: str, inputs: np.ndarray, hung_up: HangUpProbe | None = None) -> Ranked:
        """uint8 NHWC pixels (normalized here with the model's table) or normalized float32 NCHW inputs -> each
        one's classes from the most probable down and out-of-distribution score, through the model's batcher."""
        with model_span(model, len(inputs)) as span:
            rows, call_images = await self.batchers[model].call(inputs, hung_up)
            if span is not None:
                span.set_attribute("cifar10.batch_images", call_images)
        return rows

    def version(self, model: str) -> str:
        return self.models[model].version

    def scores(self, model: str) -> bool:
        """Whether the model gives an out-of-distribution score."""
        return self.models[model].all_cores.ood is not None

    def describe(self) -> dict:
        """The served models, their versions, input contract, accuracy and execution provider."""
        first = next(iter(self.models.values()))
        return {
            "default": next(iter(self.models)),
            "models": {
                arch: {
                    "store_tag": m.store_tag,
                    "version": m.version,
                    "provider": m.all_cores.provider,
                    **vars(m.all_cores.info),
                    "precision_reason": m.reason,
                    **({"int8_self_check": m.self_check} if m.self_check else {}),
                    "out_of_distribution": m.all_cores.ood.describe() if m.all_cores.ood else NO_OOD_SCORE,
                }
                for arch, m in self.models.items()
            },
            "batching": {
                "max_batch_size": self.settings.max_batch_size,
                "max_latency_ms": self.settings.max_latency_ms,
                "bucket_sizes": list(self.bucket_sizes),
            },
            "limits": {
                "max_batch_images": self.settings.max_batch_images,
                "max_body_bytes": self.settings.max_body_bytes,
                "max_pixels": self.settings.max_pixels,
            },
            "workers": self.workers,
            "onnxruntime_threads": {
                "alone": first.all_cores.threads,
                "shared": (first.shared_cores or first.all_cores).threads,
            },
        }

    def close(self) -> None:
        if self.cores:
            self.cores.close()

    def _check(self, model: str, top_k: int, images: int) -> None:
        if model not in self.models:
            raise BadRequest(f"unknown model {model!r}; choose one of: {', '.join(self.models)}")
        classes = len(self.models[model].all_cores.info.class_names)
        if not 1 <= top_k <= classes:
            raise BadRequest(f"top_k must be between 1 and {classes}, got {top_k}")
        if images > self.settings.max_batch_images:
            raise BadRequest(f"{images} images in one request; the limit is {self.settings.max_batch_images}")

    async def _decode(self, data: bytes) -> np.ndarray:
        pixels = decode_plain_jpeg(data)
        if pixels is not None:
            return pixels
        image = open_image(data, self.settings.max_pixels)  # the header only: cheap at any size
        if image.width * image.height <= INLINE_PIXELS:
            return to_pixels(image)
        return await anyio.to_thread.run_sync(to_pixels, image)

    def _run(self, arch: str, batch: np.ndarray) -> Ranked:
        started = time.perf_counter()
        model = self.models[arch]
        with self.cores.call() if self.cores else nullcontext(True) as alone:
            logits, scores = (model.all_cores if alone else model.shared_cores).logits_and_scores(batch)
        seconds, sizes, images, flagged = self.meters[arch]
        seconds.observe(time.perf_counter() - started)
        sizes.observe(len(batch))
        images.inc(len(batch))
        if scores is not None:
            flagged.inc(int((scores > model.all_cores.ood.threshold).sum()))
        # Here, once per batch, not once per request in the event loop.
        return Ranked(rank(logits, model.all_cores.temperature), scores)


def _seconds_per_image(model: OnnxModel, images: int) -> float:
    batch = np.zeros((images, 3, 32, 32), np.float32)
    model.logits(batch)
    started = time.perf_counter()
    model.logits(batch)
    return (time.perf_counter() - started) / images
