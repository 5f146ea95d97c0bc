"""The BentoML service: CIFAR-10 classification over HTTP with adaptive batching.

The HTTP routes (service/http.py) hand each request's bytes to this class, which
decodes and validates them on their own, so a bad image fails only its own
request. The normalized float32 arrays then share model calls through one
in-process Batcher per model (service/batching.py): BentoML's own route from one
API to a batchable one is an HTTP hop that measured 142 req/s with 13% failures
here (see the README).
"""

from __future__ import annotations

import functools
import os
import threading
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

import anyio
import bentoml
import numpy as np
from bentoml._internal.configuration.containers import BentoMLContainer

from service.batching import Batcher, Overloaded
from service.cores import SharedCores
from service.http import DEFAULT_MODEL, DirectRoutes, api_app
from service.preprocess import ImageError, decode_rgb, normalize
from service.runtime import CPU, OnnxModel, choose_providers, top_classes
from service.settings import CORES, SETTINGS
from service.store import MODEL_FILE, STORE_NAMES

# On a CPU host a worker's HTTP handling needs a core of its own (LeNet: ~1,000 req/s per worker);
# on a GPU, one worker feeds the device and more would each hold a CUDA context.
WORKERS = SETTINGS.workers or (1 if "CUDAExecutionProvider" in choose_providers(SETTINGS.providers) else CORES)
# ONNX Runtime threads for a model call while no other worker is in one, and while others are
# (service/cores.py): all cores, or this worker's share of them.
ALONE_THREADS = SETTINGS.ort_threads or CORES
SHARED_THREADS = SETTINGS.ort_threads or max(1, CORES // WORKERS)
INLINE_DECODE_BYTES = 64 * 1024  # larger uploads are decoded off the event loop

INFERENCES = bentoml.metrics.Counter(
    name="cifar10_inference_images_total", documentation="Images classified, by model", labelnames=["model"]
)


BATCH_SIZES = bentoml.metrics.Histogram(
    name="cifar10_inference_batch_size", documentation="Images per model call, by model", labelnames=["model"],
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
)
LATENCY = bentoml.metrics.Histogram(
    name="cifar10_inference_seconds", documentation="ONNX Runtime time per model call, by model",
    labelnames=["model"], buckets=(0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0),
)


class DirectRouteService(bentoml.Service):
    """A BentoML service whose classification routes skip BentoML's per-request middleware (service/http.py)."""

    def to_asgi(self, is_main: bool = True) -> Callable:
        app = super().to_asgi(is_main)  # also loads this service's BentoML configuration
        # BentoML's CORS settings (http.cors) apply to the direct routes too.
        cors = BentoMLContainer.access_control_options.get() if BentoMLContainer.http.cors.enabled.get() else None
        return DirectRoutes(app, SETTINGS.max_body_bytes, SETTINGS.max_concurrency, SETTINGS.timeout_s, cors)


@bentoml.service(
    name="cifar10-classifier",
    workers=WORKERS,
    traffic={"timeout": SETTINGS.timeout_s},
    service_class=DirectRouteService,
)
@bentoml.asgi_app(api_app(), path="/")
class Classifier:
    """ResNet-18 and LeNet-5 CIFAR-10 classifiers in ONNX Runtime."""

    resnet18_model = bentoml.models.BentoModel(f"{STORE_NAMES['resnet18']}:latest")
    lenet_model = bentoml.models.BentoModel(f"{STORE_NAMES['lenet']}:latest")

    def __init__(self) -> None:
        """Load both models and run one warm-up inference each; BentoML's /readyz turns 200 only after this."""
        stored = {"resnet18": self.resnet18_model, "lenet": self.lenet_model}
        self.models = {arch: OnnxModel(ref.path_of(MODEL_FILE), SETTINGS.providers, ALONE_THREADS, spin=WORKERS == 1)
                       for arch, ref in stored.items()}
        self.shared: dict[str, OnnxModel] = {}
        self.cores: SharedCores | None = None
        worker = bentoml.server_context.worker_index  # 1, 2, ... under `bentoml serve`
        if SHARED_THREADS < ALONE_THREADS and worker and self.models[DEFAULT_MODEL].provider == CPU:
            self.shared = {arch: OnnxModel(ref.path_of(MODEL_FILE), SETTINGS.providers, SHARED_THREADS, spin=False)
                           for arch, ref in stored.items()}
            # In BentoML's home, like its metrics files the workers share; their parent process is the server.
            home = Path(BentoMLContainer.bentoml_home.get())
            self.cores = SharedCores(home / f"cifar10-cores-{os.getppid()}", WORKERS, worker - 1)
        self.versions = {arch: str(ref.tag.version) for arch, ref in stored.items()}
        for model in [*self.models.values(), *self.shared.values()]:  # the first run allocates and picks kernels
            model.logits(np.zeros((1, 3, 32, 32), np.float32))
        one_at_a_time = threading.Lock()  # both models share the cores: never run two calls at once
        self.batched = {
            arch: Batcher(arch, functools.partial(self._run, arch), SETTINGS.max_batch_size,
                          SETTINGS.max_latency_ms / 1000, one_at_a_time)
            for arch in self.models
        }

    def _run(self, arch: str, batch: np.ndarray) -> np.ndarray:
        started = time.perf_counter()
        with self.cores.call() if self.cores else nullcontext(True) as alone:
            logits = (self.models if alone else self.shared)[arch].logits(batch)
        LATENCY.labels(model=arch).observe(time.perf_counter() - started)
        BATCH_SIZES.labels(model=arch).observe(len(batch))
        INFERENCES.labels(model=arch).inc(len(batch))
        return logits

    async def classify(self, data: bytes, model: str, top_k: int) -> tuple[int, dict]:
        """One image -> (HTTP status, body): the top_k labels with probabilities, or an error."""
        problem = self._check_options(model, top_k)
        if problem:
            return problem
        try:
            pixels = await self._decode(data)
        except ImageError as exc:
            return exc.status, {"error": str(exc)}
        status, logits = await self._logits(model, pixels[None])
        if status != 200:
            return status, logits
        return 200, {"model": model, "model_version": self.versions[model],
                     "predictions": self._top_k(model, logits, top_k)[0]}

    async def classify_batch(self, items: list[bytes], model: str, top_k: int) -> tuple[int, dict]:
        """Several images -> one result per image, in order; a bad image fails only its own entry."""
        problem = self._check_options(model, top_k)
        if problem:
            return problem
        if len(items) > SETTINGS.max_batch_images:
            return 400, {"error": f"{len(items)} images in one request; the limit is {SETTINGS.max_batch_images}"}
        results: list[dict] = [{} for _ in items]
        good, pixels = [], []
        for i, data in enumerate(items):
            try:
                pixels.append(await self._decode(data))
                good.append(i)
            except ImageError as exc:
                results[i] = {"error": str(exc), "status": exc.status}
        if good:
            status, logits = await self._logits(model, np.stack(pixels))
            if status != 200:
                return status, logits
            for i, predictions in zip(good, self._top_k(model, logits, top_k), strict=True):
                results[i] = {"predictions": predictions}
        return 200, {"model": model, "model_version": self.versions[model], "results": results}

    def describe(self) -> dict:
        """The served models, their versions, input contract, accuracy and execution provider."""
        return {
            "default": DEFAULT_MODEL,
            "models": {
                arch: {"store_tag": f"{STORE_NAMES[arch]}:{self.versions[arch]}", "version": self.versions[arch],
                       "provider": m.provider, **vars(m.info)}
                for arch, m in self.models.items()
            },
            "batching": {"max_batch_size": SETTINGS.max_batch_size, "max_latency_ms": SETTINGS.max_latency_ms},
            "workers": WORKERS,
            "onnxruntime_threads": {"alone": ALONE_THREADS, "shared": SHARED_THREADS if self.shared else ALONE_THREADS},
        }

    @bentoml.on_shutdown
    def close(self) -> None:
        if self.cores:
            self.cores.close()

    def _check_options(self, model: str, top_k: int) -> tuple[int, dict] | None:
        if model not in self.models:
            return 400, {"error": f"unknown model {model!r}; choose one of: {', '.join(self.models)}"}
        classes = len(self.models[model].info.class_names)
        if not 1 <= top_k <= classes:
            return 400, {"error": f"top_k must be between 1 and {classes}, got {top_k}"}
        return None

    async def _decode(self, data: bytes) -> np.ndarray:
        if len(data) <= INLINE_DECODE_BYTES:
            return decode_rgb(data, SETTINGS.max_pixels)
        return await anyio.to_thread.run_sync(decode_rgb, data, SETTINGS.max_pixels)

    async def _logits(self, model: str, pixels: np.ndarray) -> tuple[int, np.ndarray | dict]:
        """Normalize and send through the model's batcher."""
        try:
            return 200, await self.batched[model](normalize(pixels, self.models[model].table))
        except Overloaded:
            return 503, {"error": f"the server is overloaded (requests would wait over {SETTINGS.max_latency_ms} "
                                  "ms); retry shortly"}

    def _top_k(self, model: str, logits: np.ndarray, k: int) -> list[list[dict]]:
        """Per row of logits: the top k labels with their indices and probabilities."""
        names = self.models[model].info.class_names
        return [[{"label": names[i], "index": i, "probability": p} for i, p in zip(row_i, row_p, strict=True)]
                for row_i, row_p in zip(*top_classes(logits, k), strict=True)]
