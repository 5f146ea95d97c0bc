"""The Open Inference Protocol's (KServe v2) model, apart from its transports: what a model's metadata says, which
inputs a request may send and how they turn into the inference core's images or tensor, and which outputs an
answer carries. The REST routes (service/http/v2.py) and the gRPC service (service/grpc/) both speak it.

Inputs, one per request: `image`, BYTES [N] (or [N, 1]): encoded image files; or `input`, FP32 [N, 3, 32, 32],
already normalized with the model's mean and std (the metadata lists them). Outputs: `probabilities`, FP32
[N, classes], `labels`, BYTES [N, top_k] (the request parameter `top_k`, default 3), and for a model with an
out-of-distribution score, `ood_score`, FP32 [N] (core/ood.py); all of them unless the request names some. The
protocol has no per-item errors: one bad image fails the request with its index in the message.
"""

from __future__ import annotations

import struct
from importlib.metadata import PackageNotFoundError, version
from typing import NamedTuple

import numpy as np

from service.errors import BadRequest
from service.inference.core import Answers
from service.inference.model import ServedModel

IMAGE, TENSOR, PROBABILITIES, LABELS, OOD_SCORE = "image", "input", "probabilities", "labels", "ood_score"
INPUTS_TEXT = f"{IMAGE} (BYTES, encoded images) or {TENSOR} (FP32 [N, 3, 32, 32], normalized)"
DEFAULT_TOP_K = 3
PLATFORM = "onnx_onnxv1"
# What a model's metadata passes on from /models.
METADATA_PARAMETERS = (
    "class_names",
    "mean",
    "std",
    "precision",
    "arch",
    "test_accuracy",
    "store_tag",
    "out_of_distribution",
)


class Tensor(NamedTuple):
    """An output: FP32 values as an array, or BYTES as a flat list of strings."""

    name: str
    datatype: str
    shape: list[int]
    values: np.ndarray | list[str]

    def raw(self) -> bytes:
        """Its values as the protocol's raw bytes: little-endian FP32, or BYTES as binary_elements reads them."""
        if isinstance(self.values, np.ndarray):
            return self.values.astype("<f4").tobytes()
        return b"".join(struct.pack("<I", len(e)) + e for e in (s.encode() for s in self.values))

    def listed(self) -> list:
        """Its values as a flat list (JSON)."""
        return self.values.ravel().tolist() if isinstance(self.values, np.ndarray) else self.values


def package_version() -> str:
    try:
        return version("cifar10-service")
    except PackageNotFoundError:
        return "0+unknown"


def model_metadata(name: str, model: ServedModel) -> dict:
    """A model's v2 metadata: its versions (the answering copy's first), inputs, outputs and parameters."""
    described = model.describe()
    size, classes = described["input_size"], len(described["class_names"])
    return {
        "name": name,
        "versions": list(model.versions),
        "platform": PLATFORM,
        "inputs": [
            {"name": IMAGE, "datatype": "BYTES", "shape": [-1]},
            {"name": TENSOR, "datatype": "FP32", "shape": [-1, 3, size, size]},
        ],
        "outputs": [
            {"name": PROBABILITIES, "datatype": "FP32", "shape": [-1, classes]},
            {"name": LABELS, "datatype": "BYTES", "shape": [-1, -1]},
            *([{"name": OOD_SCORE, "datatype": "FP32", "shape": [-1]}] if model.ood else []),
        ],
        "parameters": {key: described[key] for key in METADATA_PARAMETERS},
    }


def images_input(datatype: str, shape: list[int], images: list[bytes]) -> list[bytes]:
    """The `image` input's files, checked against its datatype and shape."""
    if datatype != "BYTES" or len(shape) not in (1, 2) or (len(shape) == 2 and shape[1] != 1):
        raise BadRequest(f"input {IMAGE} is BYTES with shape [N] (or [N, 1]), got {datatype} {shape}")
    if len(images) != shape[0]:
        raise BadRequest(f"input {IMAGE}: shape says {shape[0]} images, the data holds {len(images)}")
    return images


def tensor_input(datatype: str, shape: list[int], data: bytes | list | np.ndarray) -> np.ndarray:
    """The `input` tensor: raw little-endian bytes or a flat list of numbers, checked against its datatype and
    shape and for values that are not finite."""
    if datatype != "FP32" or len(shape) != 4 or list(shape[1:]) != [3, 32, 32]:
        raise BadRequest(f"input {TENSOR} is FP32 with shape [N, 3, 32, 32], got {datatype} {list(shape)}")
    try:
        flat = np.frombuffer(data, "<f4") if isinstance(data, bytes) else np.asarray(data, np.float32)
        tensor = flat.reshape(shape)
    except (ValueError, TypeError) as exc:
        raise BadRequest(f"input {TENSOR}: its data does not fill shape {list(shape)} ({exc})") from None
    if not np.isfinite(tensor).all():
        raise BadRequest(f"input {TENSOR}: its data holds NaN or infinite values")
    return np.ascontiguousarray(tensor, np.float32)


def unknown_input(name: object) -> BadRequest:
    return BadRequest(f"unknown input {name!r}: send {INPUTS_TEXT}")


def binary_elements(data: bytes) -> list[bytes]:
    """BYTES in binary: each element a 4-byte little-endian length, then its bytes."""
    images, position = [], 0
    while position < len(data):
        if position + 4 > len(data):
            raise BadRequest(f"input {IMAGE}: its binary data ends inside an element's length")
        (length,) = struct.unpack_from("<I", data, position)
        position += 4
        if position + length > len(data):
            raise BadRequest(f"input {IMAGE}: element {len(images)} says {length} bytes, fewer are left")
        images.append(data[position : position + length])
        position += length
    return images


def output_names(requested: list[object] | None, answers: Answers) -> list[str]:
    """The outputs to send: the ones requested, else every one the model has."""
    available = [PROBABILITIES, LABELS, *([OOD_SCORE] if answers.ranked.ood_scores is not None else [])]
    if requested is None:
        return available
    unknown = [name for name in requested if name not in available]
    if unknown:
        raise BadRequest(f"unknown outputs {unknown}: this model has {', '.join(available)}")
    return [str(name) for name in requested]


def output_tensors(answers: Answers, top_k: int, names: list[str]) -> list[Tensor]:
    """The named outputs of the answers: every class's probability, the top-k labels, the scores."""
    ranked, classes = answers.ranked, answers.class_names
    n = len(ranked)
    tensors = []
    for name in names:
        if name == PROBABILITIES:
            probabilities = np.empty((n, len(classes)), np.float32)
            # indexing, not np.put_along_axis: the same, at a fraction of its Python cost on one image
            probabilities[np.arange(n)[:, None], ranked.classes[..., 0].astype(np.intp)] = ranked.classes[..., 1]
            tensors.append(Tensor(name, "FP32", [n, len(classes)], probabilities))
        elif name == OOD_SCORE:
            tensors.append(Tensor(name, "FP32", [n], ranked.ood_scores.astype(np.float32)))
        else:
            labels = [classes[int(i)] for row in ranked.classes[:, :top_k, 0] for i in row]
            tensors.append(Tensor(name, "BYTES", [n, top_k], labels))
    return tensors
