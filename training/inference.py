"""Running an ONNX file over images in ONNX Runtime on the CPU, through the service's preprocessing: every image's
logits, its top class, a test split's accuracy. No torch (training/checkpoints.py runs checkpoints)."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort

from core.contract import MEAN, STD
from core.errors import UserError
from core.preprocess import normalization_table, normalize
from training.data import load_split

BATCH = 256


def onnx_runner(onnx_path: Path) -> Callable[[np.ndarray], np.ndarray]:
    """Logits of a normalized float32 NCHW batch from ONNX Runtime on the CPU."""
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return lambda batch: session.run(None, {name: batch})[0]


def onnx_test_accuracy(run: Callable[[np.ndarray], np.ndarray], data: str | None) -> float | None:
    """The exported file's own accuracy on the test split of `data`, through the service's preprocessing: the
    figure `cifar10 evaluate` reproduces and `/models` reports. None without a test split."""
    try:
        test = load_split(data, "test") if data else None
    except UserError:
        return None
    if test is None:
        return None
    logits, _ = logits_of(run, normalization_table(MEAN, STD), test.images)
    accuracy = float((logits.argmax(1) == test.labels).mean())
    print(f"test accuracy of the ONNX file on {len(test):,} test images: {accuracy:.4f}")
    return accuracy


def logits_of(
    run: Callable[[np.ndarray], np.ndarray], table: np.ndarray, images: np.ndarray
) -> tuple[np.ndarray, float]:
    """Every uint8 NHWC image's logits through `run`, in the service's preprocessing, and the seconds in `run`."""
    logits, seconds = [], 0.0
    for start in range(0, len(images), BATCH):
        batch = normalize(images[start : start + BATCH], table)
        began = time.perf_counter()
        logits.append(run(batch))
        seconds += time.perf_counter() - began
    return np.concatenate(logits), seconds
