"""The input contract shared by training, export and serving, and the ONNX metadata that carries it."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

from core.errors import UserError

CLASS_NAMES: tuple[str, ...] = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)
INPUT_SIZE = 32
# ImageNet statistics: the service reads them back from the ONNX metadata.
MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
SPLITS = ("train", "test")  # of a labelled data set
PRECISIONS = ("auto", "fp32", "int8")  # auto: int8 on a CPU host where its self-check passes (core/selfcheck.py)


@dataclass(frozen=True)
class ModelInfo:
    """What travels inside the ONNX file's metadata_props: the input contract and provenance."""

    arch: str
    class_names: tuple[str, ...]
    input_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    test_accuracy: float | None = None
    test_images: int | None = None  # what test_accuracy was measured on: how many images, of which data, and
    test_data: str = ""  # the sha256 of those images' pixels and labels (the same images under any file name)
    test_sha256: str = ""
    val_accuracy: float | None = None
    epochs: int | None = None
    checkpoint_sha256: str = ""
    export_date: str = ""
    package_version: str = ""
    parity_max_abs_diff: float | None = None  # logits, against the model it came from
    parity_images: int | None = None
    precision: str = "fp32"
    # For a quantized model: the fp32 file it came from, how, and how closely it agrees with it.
    source_sha256: str = ""
    source_test_accuracy: float | None = None
    quantization: dict | None = None
    parity_top1_agreement: float | None = None
    parity_max_probability_diff: float | None = None
    # Calibration (training/calibration.py): the softmax temperature fitted on the validation images, and the
    # ECE and NLL before and after it.
    temperature: float | None = None
    calibration: dict | None = None

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
