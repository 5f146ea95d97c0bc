"""Running trained models over images: a training checkpoint in PyTorch eval mode, an ONNX file in ONNX Runtime on
the CPU, and the top class of every image through the service's preprocessing."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from core.contract import MEAN, STD
from core.errors import UserError
from core.preprocess import normalization_table, normalize
from models import get_model
from training.data import load_split

BATCH = 256


def load_checkpoint(path: str | os.PathLike) -> dict:
    """Read a training checkpoint with weights_only=True; a clear error for anything else."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch.load fails in many ways (pickle, zip, index errors) on a damaged file
        raise UserError(
            f"{path} is not a readable training checkpoint ({type(exc).__name__}); "
            "pass RUN_DIR/best.pt or last.pt from `cifar10 train`"
        ) from None
    if not isinstance(state, dict) or "model" not in state or "config" not in state:
        raise UserError(f"{path} is not a checkpoint written by `cifar10 train` (no model/config entries)")
    return state


def model_from_checkpoint(state: dict) -> torch.nn.Module:
    model = get_model(state["config"]["arch"])
    model.load_state_dict(state["model"])
    return model.eval()


def torch_logits(model: torch.nn.Module, batch: np.ndarray) -> np.ndarray:
    """Eval-mode PyTorch logits for a normalized float32 NCHW batch."""
    with torch.no_grad():
        return model(torch.from_numpy(batch)).numpy()


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
    predicted, _ = predicted_classes(run, normalization_table(MEAN, STD), test.images)
    accuracy = float((predicted == test.labels).mean())
    print(f"test accuracy of the ONNX file on {len(test):,} test images: {accuracy:.4f}")
    return accuracy


def predicted_classes(
    run: Callable[[np.ndarray], np.ndarray], table: np.ndarray, images: np.ndarray
) -> tuple[np.ndarray, float]:
    """The top class of every uint8 NHWC image through `run`, and the seconds spent in `run`."""
    predictions, seconds = [], 0.0
    for start in range(0, len(images), BATCH):
        batch = normalize(images[start : start + BATCH], table)
        began = time.perf_counter()
        predictions.append(run(batch).argmax(1))
        seconds += time.perf_counter() - began
    return np.concatenate(predictions), seconds
