"""Checkpoint -> self-contained ONNX file with metadata, checked for parity with PyTorch."""

from __future__ import annotations

import datetime as dt
import json
import os
from collections.abc import Callable
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

from core.contract import CLASS_NAMES, INPUT_SIZE, MEAN, STD, ModelInfo
from core.errors import UserError
from core.files import sha256_of, write_atomic
from core.preprocess import normalization_table, normalize
from models import get_model
from training.data import load_split
from training.evaluate import predicted_classes

PARITY_ATOL = 1e-4
PARITY_IMAGES = 256


def load_checkpoint(path: str | os.PathLike) -> dict:
    """Read a training checkpoint with weights_only=True; a clear error for anything else."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch.load fails in many ways (pickle, zip, index errors) on a damaged file
        raise UserError(f"{path} is not a readable training checkpoint ({type(exc).__name__}); "
                        "pass RUN_DIR/best.pt or last.pt from `cifar10 train`") from None
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


def parity_pixels(data: str | None) -> np.ndarray:
    """Real images (uint8 NHWC) from `data` when given, otherwise a seeded synthetic batch."""
    if data:
        for split in ("test", "train"):
            try:
                return load_split(data, split).images[:PARITY_IMAGES]
            except UserError:
                continue
        raise UserError(f"no images in {data} for the parity check")
    return np.random.default_rng(0).integers(0, 256, (64, INPUT_SIZE, INPUT_SIZE, 3), dtype=np.uint8)


def _to_onnx(model: torch.nn.Module, path: Path) -> str:
    example = torch.randn(4, 3, INPUT_SIZE, INPUT_SIZE)
    names = {"input_names": ["input"], "output_names": ["logits"]}
    try:
        torch.onnx.export(model, (example,), str(path), dynamo=True, external_data=False,
                          dynamic_shapes=({0: torch.export.Dim("batch")},), **names)
        return "dynamo"
    except Exception as exc:  # the legacy exporter is the documented fallback
        print(f"dynamo exporter failed ({type(exc).__name__}: {str(exc).splitlines()[0]}); using the legacy exporter")
        axes = {"input": {0: "batch"}, "logits": {0: "batch"}}
        torch.onnx.export(model, (example,), str(path), dynamo=False, dynamic_axes=axes, **names)
        return "legacy"


def export(checkpoint: str | os.PathLike, out: str | os.PathLike, data: str | None = None,
           register_as: str | None = None) -> Path:
    """Export, check parity, stamp metadata; the file appears at `out` only when all of that succeeded."""
    checkpoint, out = Path(checkpoint), Path(out)
    state = load_checkpoint(checkpoint)
    model = model_from_checkpoint(state)
    write_atomic(out, lambda tmp: _export_to(tmp, model, state, checkpoint, data))
    print(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB, sha256 {sha256_of(out)[:16]}…)")
    if register_as:
        from core.store import register_and_compare

        print(register_and_compare(out, register_as))
    return out


def _export_to(path: Path, model: torch.nn.Module, state: dict, checkpoint: Path, data: str | None) -> None:
    exporter = _to_onnx(model, path)
    pixels = parity_pixels(data)
    batch = normalize(pixels, normalization_table(MEAN, STD))
    onnx_run = onnx_runner(path)
    expected, got = torch_logits(model, batch), onnx_run(batch)
    diff = float(np.abs(got - expected).max())
    flips = top_class_flips(expected, got)
    print(f"parity on {len(batch)} images ({'real' if data else 'synthetic'}): max |logit diff| {diff:.2e}, "
          f"argmax identical: {not flips}" + (f" ({flips} near-tied images flipped)" if flips else "")
          + f" (exporter: {exporter})")
    problem = parity_problem(expected, got)
    if problem:
        raise UserError(f"{problem}; nothing written")
    summary_file = checkpoint.parent / "summary.json"
    summary = json.loads(summary_file.read_text()) if summary_file.is_file() else {}
    test_accuracy = onnx_test_accuracy(onnx_run, data)
    info = ModelInfo(
        arch=state["config"]["arch"], class_names=CLASS_NAMES, input_size=INPUT_SIZE, mean=MEAN, std=STD,
        test_accuracy=summary.get("test_acc") if test_accuracy is None else test_accuracy,
        val_accuracy=state.get("val_acc"), epochs=state.get("epoch"),
        checkpoint_sha256=sha256_of(checkpoint), export_date=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        package_version=package_version(), parity_max_abs_diff=diff, parity_images=len(batch),
    )
    stamp_metadata(path, info)


def stamp_metadata(path: Path, info: ModelInfo, extra: dict[str, str] | None = None) -> None:
    """Replace the ONNX file's metadata_props with `info` (and `extra` keys), and check the result."""
    proto = onnx.load(str(path))
    del proto.metadata_props[:]
    for key, value in {**info.to_metadata(), **(extra or {})}.items():
        proto.metadata_props.add(key=key, value=value)
    onnx.checker.check_model(proto, full_check=True)
    onnx.save(proto, str(path))


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


def top_class_flips(expected: np.ndarray, got: np.ndarray) -> int:
    """Images whose top class differs between the two sets of logits."""
    return int((expected.argmax(1) != got.argmax(1)).sum())


def parity_problem(expected: np.ndarray, got: np.ndarray) -> str | None:
    """Why ONNX Runtime's logits do not match PyTorch's, or None when they do.

    The logits alone decide. With every logit within PARITY_ATOL, the top class can only change
    where PyTorch's top two logits are within 2 x PARITY_ATOL of each other: a near-tie that
    rounding may break either way, not a fault of the export.
    """
    diff = float(np.abs(got - expected).max())
    if diff > PARITY_ATOL:
        return f"ONNX output differs from PyTorch: max |logit diff| {diff:.2e} > {PARITY_ATOL:g}"
    return None


def package_version() -> str:
    try:
        return version("cifar10-service")
    except PackageNotFoundError:
        return "0+unknown"
