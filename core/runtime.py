"""ONNX Runtime sessions for this project's models, and the softmax and top-k shared by every caller.

CUDA is asked for only when a GPU is actually usable, so CPU hosts print no provider errors.
Threads and providers are the caller's choice, passed in: this module reads no settings.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnxruntime as ort
from threadpoolctl import threadpool_limits

from core.contract import ModelInfo
from core.errors import UserError
from core.host import gpu_count, usable_cores
from core.ood import MEANS_OUTPUT, METADATA_KEY, SQUARES_OUTPUT, OodScore
from core.preprocess import normalization_table

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"
PROVIDER_CHOICES = ("auto", "cpu", "cuda")
# cuDNN's default EXHAUSTIVE search benchmarks its algorithms on the first call of every new input
# shape: 230-465 ms each on an H100; HEURISTIC ~40 ms once, then 1.1-1.6 ms for batches 1-64 (issue 12).
CUDA_OPTIONS = {"cudnn_conv_algo_search": "HEURISTIC"}


def choose_providers(requested: str = "auto") -> list[str]:
    """`auto`: CUDA when a GPU is usable and ONNX Runtime has the CUDA provider, else CPU; `cpu`; or `cuda`, which is
    refused (a UserError) where there is no GPU or no CUDA provider."""
    if requested not in PROVIDER_CHOICES:
        raise UserError(f"unknown provider setting {requested!r}: use auto, cpu or cuda")
    if requested == "cuda" and gpu_count() == 0:
        raise UserError("cuda was asked for, but the CUDA driver sees no GPU on this host; use auto or cpu")
    if requested == "cuda" and CUDA not in ort.get_available_providers():
        raise UserError(
            "cuda was asked for, but this onnxruntime has no CUDA provider (onnxruntime-gpu has); use auto or cpu"
        )
    wants_cuda = requested == "cuda" or (requested == "auto" and gpu_count() > 0)
    if wants_cuda and CUDA in ort.get_available_providers():
        if hasattr(ort, "preload_dlls"):
            ort.preload_dlls()  # CUDA/cuDNN from pip's nvidia-* packages, if installed
        return [CUDA, CPU]
    return [CPU]


class OnnxModel:
    """An ONNX Runtime session plus the metadata and normalization table that belong to it."""

    def __init__(
        self,
        path: str | os.PathLike,
        providers: str = "auto",
        threads: int = 0,
        spin: bool = True,
        device_id: int = 0,
        optimized: bool = True,
    ) -> None:
        """`threads` 0: one per usable core. `spin=False` when other processes share the cores: idle ONNX Runtime
        threads then sleep instead of spinning. `device_id`: the GPU, when CUDA is used. `optimized=False`: no graph
        optimizations, for a session that only reads and checks the file (~20x faster to create)."""
        path = Path(path)
        if not path.is_file():
            raise UserError(f"model file not found: {path}")
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or usable_cores()
        options.inter_op_num_threads = 1
        options.graph_optimization_level = (
            ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimized else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        )
        options.log_severity_level = 3
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
        names = choose_providers(providers)
        chosen = [(CUDA, {**CUDA_OPTIONS, "device_id": device_id}) if name == CUDA else name for name in names]
        if CUDA in names:  # ONNX Runtime's own lines on a CUDA provider it cannot create: `fallback` says it once
            ort.set_default_logger_severity(4)
        try:
            self.session = ort.InferenceSession(str(path), options, providers=chosen)
        except Exception as exc:  # ORT raises its own Fail/InvalidGraph types
            raise UserError(f"cannot load {path} as an ONNX model: {exc}") from None
        finally:
            ort.set_default_logger_severity(3)
        self.path = path
        self.metadata = self.session.get_modelmeta().custom_metadata_map
        self.info = ModelInfo.from_metadata(self.metadata)
        self.table = normalization_table(self.info.mean, self.info.std)
        self.temperature = self.info.temperature or 1.0  # a file exported before calibration: as it was
        self.input_name = self.session.get_inputs()[0].name
        self.logits_name = self.session.get_outputs()[0].name
        self.scored_outputs = [self.logits_name, MEANS_OUTPUT, SQUARES_OUTPUT]
        self.ood = self._ood_score()
        if self.ood is not None:
            # ONNX Runtime's threads hold the cores (they spin between calls): the score's matrix products must not
            # start BLAS threads beside them, which made them 40x slower at 32 images (BENCHMARKS.md).
            threadpool_limits(1, user_api="blas")
        self.provider = self.session.get_providers()[0]
        # A GPU that the driver reports but ONNX Runtime cannot use (CUDA or cuDNN libraries missing): on the CPU.
        self.fallback = (
            "a GPU is present, but ONNX Runtime could not use it; running on the CPU"
            if (CUDA in names and self.provider != CUDA)
            else ""
        )
        self.threads = options.intra_op_num_threads

    def logits(self, batch: np.ndarray) -> np.ndarray:
        """float32 NCHW -> logits (N, classes)."""
        return self.session.run([self.logits_name], {self.input_name: batch})[0]

    def logits_and_scores(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """float32 NCHW -> logits (N, classes) and out-of-distribution scores (N,), or None for a model without
        them (core/ood.py), from one run."""
        if self.ood is None:
            return self.logits(batch), None
        logits, means, squares = self.session.run(self.scored_outputs, {self.input_name: batch})
        return logits, self.ood.scores(means, squares, logits)

    def _ood_score(self) -> OodScore | None:
        """The file's out-of-distribution score, checked against its stage outputs; None where it has none."""
        raw = self.metadata.get(METADATA_KEY)
        if raw is None:
            return None
        try:
            score = OodScore.from_metadata(raw)
        except UserError as exc:
            raise UserError(f"{self.path}: {exc}") from None
        outputs = {o.name: o.shape for o in self.session.get_outputs()}
        width = sum(score.widths)
        if any(outputs.get(name, [None])[-1] != width for name in (MEANS_OUTPUT, SQUARES_OUTPUT)):
            raise UserError(
                f"{self.path}: its out-of-distribution statistics are for {width} channels, but its outputs "
                f"{MEANS_OUTPUT} and {SQUARES_OUTPUT} are {[outputs.get(n) for n in (MEANS_OUTPUT, SQUARES_OUTPUT)]}; "
                "fit them again"
            )
        return score


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Row-wise softmax of logits / temperature in float64, so reported probabilities do not depend on float32
    rounding. The temperature is the model's own (OnnxModel.temperature), fitted at export."""
    logits = logits.astype(np.float64) / temperature
    shifted = logits - logits.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=1, keepdims=True)


def rank(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Per row of (N, classes) logits, every class from the most probable down (ties keep class order), as float64
    (N, classes, 2): [class index, softmax probability of logits / temperature]. One call for a whole batch."""
    logits = logits.astype(np.float64) / temperature
    order = np.argsort(-logits, axis=1, kind="stable")  # softmax keeps the order: sort the logits
    ranked = np.take_along_axis(logits, order, axis=1)
    exp = np.exp(ranked - ranked[:, :1])  # the largest first: the stable softmax for free
    out = np.empty((*order.shape, 2))
    out[..., 0] = order
    np.divide(exp, exp.sum(axis=1, keepdims=True), out=out[..., 1])
    return out


def top_classes(logits: np.ndarray, k: int, temperature: float = 1.0) -> tuple[list[list[int]], list[list[float]]]:
    """Per row of (N, classes) logits: the k most probable classes, largest first (ties keep class order),
    and their softmax probabilities (of logits / temperature)."""
    ranked = rank(logits, temperature)[:, :k]
    return ranked[..., 0].astype(np.int64).tolist(), ranked[..., 1].tolist()
