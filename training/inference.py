"""Running an ONNX file over images in ONNX Runtime on the CPU, through the service's preprocessing: every image's
logits (and penultimate features), in batches. No torch (training/checkpoints.py runs checkpoints)."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort

from core.preprocess import normalize

BATCH = 256
Run = Callable[[np.ndarray], np.ndarray | Sequence[np.ndarray]]


def onnx_runner(onnx_path: Path, outputs: list[str] | None = None) -> Run:
    """A normalized float32 NCHW batch -> the file's first output (its logits) from ONNX Runtime on the CPU, or,
    given `outputs`, those outputs by name."""
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    if outputs is None:
        return lambda batch: session.run(None, {name: batch})[0]
    return lambda batch: session.run(outputs, {name: batch})


def outputs_of(run: Run, table: np.ndarray, images: np.ndarray) -> tuple[list[np.ndarray], float]:
    """`run`'s outputs for every uint8 NHWC image, in the service's preprocessing, each output joined over the batches,
    and the seconds spent in `run`."""
    parts: list[list[np.ndarray]] = []
    seconds = 0.0
    for start in range(0, len(images), BATCH):
        batch = normalize(images[start : start + BATCH], table)
        began = time.perf_counter()
        got = run(batch)
        seconds += time.perf_counter() - began
        parts.append([got] if isinstance(got, np.ndarray) else list(got))
    return [np.concatenate(output) for output in zip(*parts, strict=True)], seconds


def logits_of(run: Run, table: np.ndarray, images: np.ndarray) -> tuple[np.ndarray, float]:
    """Every uint8 NHWC image's logits through `run` (its only output), and the seconds in `run`."""
    (logits,), seconds = outputs_of(run, table, images)
    return logits, seconds
