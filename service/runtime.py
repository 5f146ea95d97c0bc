"""ONNX Runtime set-up and the model metadata schema (torch-free).

CUDA is asked for only when a GPU is actually usable, so CPU hosts print no provider errors.
"""

from __future__ import annotations

import ctypes
import json
import os
from dataclasses import asdict, dataclass
from functools import cache
from pathlib import Path

import numpy as np
import onnxruntime as ort

from service.errors import UserError
from service.preprocess import normalization_table
from service.settings import CORES, SETTINGS

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"


@dataclass(frozen=True)
class ModelInfo:
    """What travels inside the ONNX file's metadata_props: the input contract and provenance."""

    arch: str
    class_names: tuple[str, ...]
    input_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    test_accuracy: float | None = None
    val_accuracy: float | None = None
    epochs: int | None = None
    checkpoint_sha256: str = ""
    export_date: str = ""
    package_version: str = ""
    parity_max_abs_diff: float | None = None
    parity_images: int | None = None

    def to_metadata(self) -> dict[str, str]:
        return {key: json.dumps(value) for key, value in asdict(self).items()}

    @classmethod
    def from_metadata(cls, props: dict[str, str]) -> ModelInfo:
        try:
            values = {key: json.loads(props[key]) for key in cls.__dataclass_fields__ if key in props}
            values = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
            return cls(**values)
        except (TypeError, ValueError) as exc:
            raise UserError(
                f"the ONNX file lacks this project's metadata ({exc}); export it with `cifar10 export`"
            ) from None


@cache
def gpu_count() -> int:
    """GPUs the CUDA driver sees (0 when there is no driver): asked without touching ONNX Runtime."""
    try:
        cuda = ctypes.CDLL("libcuda.so.1")
        count = ctypes.c_int(0)
        if cuda.cuInit(0) != 0 or cuda.cuDeviceGetCount(ctypes.byref(count)) != 0:
            return 0
        return count.value
    except OSError:
        return 0


def choose_providers(requested: str = "auto") -> list[str]:
    """`auto`: CUDA when a GPU is usable and ONNX Runtime has the CUDA provider, else CPU; or `cpu`/`cuda`."""
    if requested not in ("auto", "cpu", "cuda"):
        raise UserError(f"unknown provider setting {requested!r}: use auto, cpu or cuda")
    wants_cuda = requested == "cuda" or (requested == "auto" and gpu_count() > 0)
    if wants_cuda and CUDA in ort.get_available_providers():
        if hasattr(ort, "preload_dlls"):
            ort.preload_dlls()  # CUDA/cuDNN from pip's nvidia-* packages, if installed
        return [CUDA, CPU]
    return [CPU]


class OnnxModel:
    """An ONNX Runtime session plus the metadata and normalization table that belong to it."""

    def __init__(self, path: str | os.PathLike, providers: str = "auto", threads: int | None = None,
                 spin: bool = True) -> None:
        """`spin=False` when other processes share the cores: idle ORT threads then sleep instead of spinning."""
        path = Path(path)
        if not path.is_file():
            raise UserError(f"model file not found: {path}")
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or SETTINGS.ort_threads or CORES
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
        try:
            self.session = ort.InferenceSession(str(path), options, providers=choose_providers(providers))
        except Exception as exc:  # ORT raises its own Fail/InvalidGraph types
            raise UserError(f"cannot load {path} as an ONNX model: {exc}") from None
        self.path = path
        self.info = ModelInfo.from_metadata(self.session.get_modelmeta().custom_metadata_map)
        self.table = normalization_table(self.info.mean, self.info.std)
        self.input_name = self.session.get_inputs()[0].name
        self.provider = self.session.get_providers()[0]

    def logits(self, batch: np.ndarray) -> np.ndarray:
        """float32 NCHW -> logits (N, classes)."""
        return self.session.run(None, {self.input_name: batch})[0]


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax in float64, so reported probabilities do not depend on float32 rounding."""
    logits = logits.astype(np.float64)
    shifted = logits - logits.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=1, keepdims=True)


def top_classes(logits: np.ndarray, k: int) -> tuple[list[list[int]], list[list[float]]]:
    """Per row of (N, classes) logits: the k most probable classes, largest first (ties keep class order),
    and their softmax probabilities."""
    probabilities = softmax(logits)
    indices = np.argsort(-probabilities, axis=1, kind="stable")[:, :k]
    return indices.tolist(), np.take_along_axis(probabilities, indices, axis=1).tolist()
