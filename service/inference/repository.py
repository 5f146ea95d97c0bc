"""The worker's model repository, after Triton's: the served models by name, each the loaded version that answers
for it and the batcher in front of it.

A worker builds it when it starts, from the sources the server found in the model store (service/plan.py); every
request asks it for the version that answers for a name, and /models for what it serves.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

from service.errors import BadRequest, NotFound
from service.inference.batcher import Batcher
from service.inference.loading import Host, load
from service.inference.model import ModelSource, ServedModel
from service.settings import Settings

INLINE_S = 0.0002  # a model under this many seconds an image on a CPU runs its calls in the event loop


@dataclass(frozen=True)
class Serving:
    """A served version and the batcher that queues its calls."""

    model: ServedModel
    batcher: Batcher


class ModelRepository:
    """The models a worker serves, loaded; the first is the default for requests that name none."""

    def __init__(self, sources: list[ModelSource], settings: Settings, host: Host) -> None:
        """Load every source on `host` (each copy chosen, its sessions made, its batch shapes run once)."""
        buckets = host.bucket_sizes
        if buckets and (
            list(buckets) != sorted(set(buckets)) or buckets[0] < 1 or buckets[-1] < settings.max_batch_size
        ):
            raise ValueError(
                f"bucket_sizes must rise from 1 or more up to max_batch_size {settings.max_batch_size}, got {buckets}"
            )
        self.settings, self.host = settings, host
        self.device_lock = threading.Lock()  # the models share the device: never run two calls at once
        self.served: dict[str, Serving] = {}
        for source in sources:
            self.served[source.name] = self._serving(load(source, settings, host))

    @property
    def default(self) -> str:
        return next(iter(self.served))

    def answering(self, name: str, version: str | None = None, in_path: bool = False) -> Serving:
        """The version that answers for `name`; with `version` (a route that names one), that version or NotFound.
        An unknown name is a BadRequest, or NotFound where the route names the model in its path (`in_path`)."""
        serving = self.served.get(name)
        if serving is None and in_path:
            raise NotFound(f"no model {name!r}; this server serves {', '.join(self.served)}")
        if serving is None:
            raise BadRequest(f"unknown model {name!r}; choose one of: {', '.join(self.served)}")
        if version is not None and version != serving.model.version:
            raise NotFound(f"model {name} has no version {version!r} here; it serves version {serving.model.version}")
        return serving

    def describe(self) -> dict[str, dict]:
        return {name: serving.model.describe() for name, serving in self.served.items()}

    def close(self) -> None:
        """Stop every batcher's thread (what is queued is answered first)."""
        for serving in self.served.values():
            serving.batcher.close()

    def _serving(self, model: ServedModel) -> Serving:
        # On a CPU, a model this cheap runs its calls in the event loop (inference/batcher.py): the thread hand-off
        # would cost more than the call. Judged from a timed call of 16 images (the largest bucket, with buckets).
        probe = self.host.bucket_sizes[-1] if self.host.bucket_sizes else 16
        inline = self.host.on_cpu and model.seconds_per_image(probe) < INLINE_S
        settings = self.settings
        batcher = Batcher(
            model.name, model, settings.max_batch_size, settings.max_latency_ms / 1000, self.device_lock, inline
        )
        return Serving(model, batcher)
