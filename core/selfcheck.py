"""The int8 self-check: a quantized file carries reference images with its fp32 source's answers, and it answers
on a CPU only where it gives those answers there too.

ONNX Runtime's int8 kernels differ between CPUs (without VNNI, u8 x s8 products are summed in 16 bits and
can saturate), so an int8 file right on one host can be wrong on another. `cifar10 quantize` stores the
reference set in the file's metadata; `choose` runs it before the int8 model may answer. A file's result on a
CPU and ONNX Runtime version is kept in the cache (CIFAR10_CACHE): it is the same there every time, and a server
start or a replaced worker need not spend seconds of CPU on it again.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from core.contract import INPUT_SIZE, PRECISIONS
from core.errors import UserError
from core.files import cache_dir, sha256_of, write_atomic
from core.host import describe_cpu
from core.preprocess import normalize
from core.runtime import OnnxModel

METADATA_KEY = "self_check"  # in the ONNX file's metadata_props, beside ModelInfo's keys
MIN_AGREEMENT = 0.99


def encode_reference(pixels: np.ndarray, answers: np.ndarray) -> str:
    """uint8 (N, 32, 32, 3) images and their fp32 top-1 classes -> the metadata value `reference_of` reads."""
    return json.dumps(
        {
            "images": len(pixels),
            "pixels": base64.b64encode(pixels.astype(np.uint8).tobytes()).decode(),
            "fp32_top1": [int(a) for a in answers],
        }
    )


def reference_of(model: OnnxModel) -> tuple[np.ndarray, np.ndarray] | None:
    """The reference images and fp32 answers stored in `model`, or None when it carries none."""
    raw = model.metadata.get(METADATA_KEY)
    if raw is None:
        return None
    try:
        stored = json.loads(raw)
        pixels = np.frombuffer(base64.b64decode(stored["pixels"]), np.uint8)
        pixels = pixels.reshape(stored["images"], INPUT_SIZE, INPUT_SIZE, 3)
        return pixels, np.asarray(stored["fp32_top1"], np.int64)
    except (ValueError, KeyError, TypeError) as exc:
        raise UserError(
            f"{model.path}: its self-check reference set is unreadable ({exc}); quantize it again"
        ) from None


@dataclass(frozen=True)
class SelfCheck:
    """How an int8 model did on its reference set on this CPU."""

    images: int
    agreed: int
    min_agreement: float
    cpu: str
    missing: str = ""  # with no images: why there are none

    @property
    def agreement(self) -> float:
        return self.agreed / self.images if self.images else 0.0

    @property
    def passed(self) -> bool:
        return self.images > 0 and self.agreement >= self.min_agreement

    def summary(self) -> str:
        if not self.images:
            return self.missing
        return (
            f"{self.agreed}/{self.images} = {self.agreement:.1%} of its reference images agree with fp32, "
            f"{'meeting' if self.passed else 'below'} the {self.min_agreement:.0%} required, on {self.cpu}"
        )

    def as_dict(self) -> dict:
        return {
            "passed": self.passed,
            "agreement": round(self.agreement, 4),
            "images": self.images,
            "min_agreement": self.min_agreement,
            "cpu": self.cpu,
        }


def self_check(model: OnnxModel, min_agreement: float = MIN_AGREEMENT) -> SelfCheck:
    """Run `model`'s reference set on this CPU: the share of images whose top class is the fp32 source's."""
    reference = reference_of(model)
    if reference is None:
        missing = "it carries no reference set (quantized before self-checks existed); quantize it again"
        return SelfCheck(0, 0, min_agreement, describe_cpu(), missing)
    pixels, answers = reference
    if not len(answers):
        missing = "its reference set is empty: no held-out image had a clear fp32 answer that int8 gave too"
        return SelfCheck(0, 0, min_agreement, describe_cpu(), missing)
    cpu = describe_cpu()
    kept = _kept_result(model.path, cpu)
    agreed = _agreed(kept)
    if agreed is None:
        top1 = np.concatenate(
            [model.logits(normalize(pixels[i : i + 64], model.table)).argmax(1) for i in range(0, len(pixels), 64)]
        )
        agreed = int((top1 == answers).sum())
        with contextlib.suppress(OSError):  # a read-only cache (a container's): the check runs every time
            write_atomic(kept, lambda tmp: tmp.write_text(json.dumps({"agreed": agreed})))
    return SelfCheck(len(answers), agreed, min_agreement, cpu)


def _kept_result(path: Path, cpu: str) -> Path:
    """Where the result of the file at `path` on this CPU and ONNX Runtime version is kept."""
    key = hashlib.sha256(f"{sha256_of(Path(path))} {cpu} {ort.__version__}".encode()).hexdigest()[:32]
    return cache_dir() / "self-check" / f"{key}.json"


def _agreed(kept: Path) -> int | None:
    try:
        return int(json.loads(kept.read_text())["agreed"])
    except (OSError, ValueError, KeyError, TypeError):  # not kept yet, or unreadable: run the check
        return None


@dataclass(frozen=True)
class Choice:
    """The model that answers for a name, and why that precision."""

    model: OnnxModel
    reason: str
    check: SelfCheck | None = None
    notes: tuple[str, ...] = ()  # anything else its user should know (a version less accurate than the shipped one)

    def warnings(self) -> list[str]:
        """What a command should tell its user: a failed self-check, a GPU it could not use, its notes."""
        failed = [self.reason] if self.check and not self.check.passed else []
        return failed + ([self.model.fallback] if self.model.fallback else []) + list(self.notes)


def choose(
    name: str,
    fp32: Callable[[], OnnxModel] | None,
    int8: Callable[[], OnnxModel] | None,
    precision: str,
    on_cpu: bool,
    min_agreement: float = MIN_AGREEMENT,
) -> Choice:
    """Load the model that answers for `name`: `fp32` or `int8` (loaders; None where there is no such copy).

    `auto`: int8 on a CPU host when its self-check passes there, else fp32. `int8` serves int8 whatever the
    check says (the check is still reported); `fp32` never loads int8.
    """
    if precision not in PRECISIONS:
        raise UserError(f"unknown precision {precision!r}: use {', '.join(PRECISIONS)}")
    if precision == "int8" or (precision == "auto" and on_cpu and int8 is not None):
        if int8 is None:
            raise UserError(f"{name} has no int8 copy; quantize one with `cifar10 quantize`, or use precision auto")
        model = int8()
        check = self_check(model, min_agreement)
        if check.passed:
            return Choice(model, f"the int8 copy passed its self-check: {check.summary()}", check)
        if precision == "int8":
            return Choice(model, f"int8 is pinned, though it failed its self-check: {check.summary()}", check)
        if fp32 is None:
            raise UserError(
                f"{name}: the int8 copy failed its self-check and there is no fp32 copy to answer "
                f"instead: {check.summary()}"
            )
        return Choice(fp32(), f"the int8 copy failed its self-check, so fp32 answers: {check.summary()}", check)
    if fp32 is None:
        raise UserError(f"{name} has no fp32 copy; register one, or use precision int8")
    why = "fp32 is pinned" if precision == "fp32" else "a GPU serves fp32" if not on_cpu else "there is no int8 copy"
    return Choice(fp32(), why)
