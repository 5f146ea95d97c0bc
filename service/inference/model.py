"""One served version of a model, loaded: its ONNX Runtime sessions, and the call its batcher makes on a batch of
requests' images: normalize the uint8 ones together, pad to a bucket size, run on the cores it may use, rank each
image's classes, score how unlike the training images it is (core/ood.py), and count the call in /metrics.

The model types, which is which: `ModelInfo` (core/contract.py) is the metadata an ONNX file carries; `OnnxModel`
(core/runtime.py) is one ONNX Runtime session of a file; `ModelFile` is a stored file and its store tag;
`ModelSource` a version of a served model (its fp32 file and the int8 copy made from it); `ServedModel` that version
loaded, with the copy that answers here.
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from core.contract import CLASS_NAMES
from core.preprocess import normalize
from core.runtime import OnnxModel, rank
from core.selfcheck import Choice
from service.inference.cores import SharedCores
from service.inference.metrics import (
    ABANDONED_IMAGES,
    ABANDONED_OUTCOMES,
    BATCH_SIZES,
    INFERENCES,
    MODEL_SECONDS,
    OUT_OF_DISTRIBUTION,
    PREDICTED_CLASSES,
    TOP1_PROBABILITY,
    observe_all,
)

NO_OOD_SCORE = {
    "method": None,
    "reason": "this model file carries no out-of-distribution statistics, so its answers have no in_distribution "
    "flag; fit them with `cifar10 calibrate`",
}


@dataclass(frozen=True)
class ModelFile:
    """A stored ONNX file and its store tag (`name:version`), or its path for a file outside the store."""

    store_tag: str
    path: Path

    @property
    def version(self) -> str:
        return self.store_tag.partition(":")[2]


@dataclass(frozen=True)
class ModelSource:
    """A version of a served model: its fp32 file, and the int8 copy made from it where one may answer (either may
    be absent: int8 pinned, or no copy)."""

    name: str
    version: str  # the fp32 file's store version
    fp32: ModelFile | None
    int8: ModelFile | None = None
    store_tag: str = ""  # the fp32 file's (loaded or not)


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


class CallMeters(NamedTuple):
    """A model's Prometheus children, looked up once (service/inference/metrics.py); `predicted` by class index."""

    seconds: Any
    batch_sizes: Any
    images: Any
    flagged: Any
    predicted: tuple[Any, ...]
    top1: Any

    @classmethod
    def of(cls, model: str) -> CallMeters:
        """Every series of `model` created (at 0) here, when it is loaded."""
        for outcome in ABANDONED_OUTCOMES:
            ABANDONED_IMAGES.labels(model=model, outcome=outcome)
        return cls(
            *(metric.labels(model=model) for metric in (MODEL_SECONDS, BATCH_SIZES, INFERENCES, OUT_OF_DISTRIBUTION)),
            tuple(PREDICTED_CLASSES.labels(model=model, **{"class": name}) for name in CLASS_NAMES),
            TOP1_PROBABILITY.labels(model=model),
        )

    def count(self, ranked: np.ndarray) -> None:
        """The answers of a call (core.runtime.rank's rows): their top-1 classes and probabilities."""
        if len(ranked) == 1:  # the common call, at a quarter of the arrays' cost (5 us against 20)
            self.predicted[int(ranked[0, 0, 0])].inc()
            self.top1.observe(float(ranked[0, 0, 1]))
            return
        counts = np.bincount(ranked[:, 0, 0].astype(np.intp), minlength=len(self.predicted))
        for index in np.flatnonzero(counts).tolist():
            self.predicted[index].inc(int(counts[index]))
        observe_all(self.top1, ranked[:, 0, 1])


def pad(inputs: np.ndarray, bucket_sizes: tuple[int, ...]) -> np.ndarray:
    """`inputs` with rows of zeros added up to the smallest bucket size that holds them (as they are without)."""
    size = next((b for b in bucket_sizes if b >= len(inputs)), len(inputs))
    if size == len(inputs):
        return inputs
    return np.concatenate([inputs, np.zeros((size - len(inputs), *inputs.shape[1:]), inputs.dtype)])


def bucket_sizes(max_batch_size: int) -> tuple[int, ...]:
    """Powers of two below max_batch_size, and max_batch_size itself: 1, 2, 4, ..., 64."""
    return (*(2**i for i in range(max_batch_size.bit_length()) if 2**i < max_batch_size), max_batch_size)


class ServedModel:
    """A loaded version: ONNX Runtime on every core, and on this worker's share of them while other workers run calls
    (`shared`, with `cores`); `choice` says which copy answers (fp32 or int8) and why."""

    def __init__(
        self,
        source: ModelSource,
        choice: Choice,
        shared: OnnxModel | None = None,
        cores: SharedCores | None = None,
        buckets: tuple[int, ...] = (),
    ) -> None:
        self.source, self.choice = source, choice
        self.all_cores, self.shared, self.cores, self.buckets = choice.model, shared, cores, buckets
        self.info, self.ood = choice.model.info, choice.model.ood
        answering = choice.model.path
        self.copy = next(f for f in (source.int8, source.fp32) if f is not None and f.path == answering)
        self.meters = CallMeters.of(source.name)

    @property
    def name(self) -> str:
        return self.source.name

    @property
    def version(self) -> str:
        """The answering copy's store version (the int8 copy's where it answers), as answers name it."""
        return self.copy.version

    @property
    def versions(self) -> tuple[str, ...]:
        """The versions that address this model: the answering copy's, then the fp32 version it was made from."""
        return tuple(dict.fromkeys(v for v in (self.copy.version, self.source.version) if v))

    def answers_as(self) -> str:
        """Which copy answers, under which versions, in words."""
        if len(self.versions) == 1:
            return f"it serves version {self.version}"
        return (
            f"it serves version {self.version}, the {self.info.precision} copy of version {self.source.version} "
            "(either version addresses it)"
        )

    @property
    def class_names(self) -> tuple[str, ...]:
        return self.info.class_names

    def warm(self) -> None:
        """Run every batch shape a call will see once, on each session: the first run allocates and picks kernels."""
        for session in filter(None, (self.all_cores, self.shared)):
            for size in self.buckets or (1,):
                session.logits(np.zeros((size, 3, 32, 32), np.float32))

    def seconds_per_image(self, images: int) -> float:
        """One timed call of `images` images (after a first, untimed one)."""
        session = self.shared or self.all_cores
        batch = np.zeros((images, 3, 32, 32), np.float32)
        session.logits(batch)
        started = time.perf_counter()
        session.logits(batch)
        return (time.perf_counter() - started) / images

    def __call__(self, parts: list[np.ndarray]) -> Ranked:
        """The batcher's call: the requests' uint8 NHWC pixels or normalized float32 NCHW inputs, in order -> their
        ranked classes and scores. In the model thread (or the event loop, for a cheap model)."""
        return self.run(parts, self.meters)

    def run(self, parts: list[np.ndarray], meters: CallMeters) -> Ranked:
        """The call, counted in `meters` (a shadow's calls are counted apart from the live ones)."""
        batch = pad(self._joined(parts), self.buckets)
        started = time.perf_counter()
        with self.cores.call() if self.cores else nullcontext(True) as alone:
            logits, scores = (self.all_cores if alone else self.shared).logits_and_scores(batch)
        meters.seconds.observe(time.perf_counter() - started)
        meters.batch_sizes.observe(len(batch))
        count = sum(len(part) for part in parts)
        meters.images.inc(count)  # not the padding
        if scores is not None:
            scores = scores[:count]
            meters.flagged.inc(int((scores > self.ood.threshold).sum()))
        ranked = rank(logits[:count], self.all_cores.temperature)
        meters.count(ranked)
        return Ranked(ranked, scores)

    def _joined(self, parts: list[np.ndarray]) -> np.ndarray:
        """One float32 batch: uint8 parts normalized together where every part is uint8, else one by one."""
        table = self.all_cores.table
        if all(part.dtype == np.uint8 for part in parts):
            return normalize(parts[0] if len(parts) == 1 else np.concatenate(parts), table)
        parts = [normalize(part, table) if part.dtype == np.uint8 else part for part in parts]
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def describe(self) -> dict:
        """What /models says of this version."""
        return {
            "store_tag": self.copy.store_tag,
            "version": self.copy.version,
            "versions": list(self.versions),
            "provider": self.all_cores.provider,
            **vars(self.info),
            "precision_reason": self.choice.reason,
            **({"int8_self_check": self.choice.check.as_dict()} if self.choice.check else {}),
            "out_of_distribution": self.ood.describe() if self.ood else NO_OOD_SCORE,
        }

    def close(self) -> None:
        """Nothing to release but memory, which the sessions give back when dropped."""
