"""Checkpoint -> self-contained ONNX file with metadata, checked for parity with PyTorch."""

from __future__ import annotations

import datetime as dt
import json
import os
from pathlib import Path

import numpy as np
import torch

from core.contract import CLASS_NAMES, INPUT_SIZE, MEAN, STD, ModelInfo
from core.errors import UserError
from core.files import refuse_existing, sha256_of, write_atomic
from core.ood import METADATA_KEY as OOD_KEY
from core.preprocess import normalization_table, normalize
from training.checkpoints import load_checkpoint, model_from_checkpoint, torch_logits
from training.fitting import SEED, VAL_SIZE, Splits, fit_file
from training.inference import onnx_runner
from training.onnx_metadata import package_version, stamp_metadata

TOLERANCE = 1e-4  # largest |logit difference| from PyTorch, relative to the largest |logit|
PARITY_IMAGES = 256


def parity_pixels(splits: Splits) -> np.ndarray:
    """Real images (uint8 NHWC) from the data's test or train split, otherwise a seeded synthetic batch."""
    for split in (splits.test, splits.train):
        if split is not None:
            return split.images[:PARITY_IMAGES]
    return np.random.default_rng(0).integers(0, 256, (64, INPUT_SIZE, INPUT_SIZE, 3), dtype=np.uint8)


def _to_onnx(model: torch.nn.Module, path: Path) -> str:
    example = torch.randn(4, 3, INPUT_SIZE, INPUT_SIZE)
    names = {"input_names": ["input"], "output_names": ["logits"]}
    try:
        torch.onnx.export(
            model,
            (example,),
            str(path),
            dynamo=True,
            external_data=False,
            dynamic_shapes=({0: torch.export.Dim("batch")},),
            **names,
        )
        return "dynamo"
    except Exception as exc:  # the legacy exporter is the documented fallback
        print(f"dynamo exporter failed ({type(exc).__name__}: {str(exc).splitlines()[0]}); using the legacy exporter")
        axes = {"input": {0: "batch"}, "logits": {0: "batch"}}
        torch.onnx.export(model, (example,), str(path), dynamo=False, dynamic_axes=axes, **names)
        return "legacy"


def export(
    checkpoint: str | os.PathLike,
    out: str | os.PathLike,
    data: str | None = None,
    register_as: str | None = None,
    tolerance: float = TOLERANCE,
    force: bool = False,
) -> Path:
    """Export, check parity, stamp metadata; the file appears at `out` only when all of that succeeded.
    `register_as`: a store name, or "" for the default one (None: not registered)."""
    checkpoint, out = Path(checkpoint), Path(out)
    refuse_existing(out, force)
    state = load_checkpoint(checkpoint)
    model = model_from_checkpoint(state)
    write_atomic(out, lambda tmp: _export_to(tmp, model, state, checkpoint, data, tolerance))
    print(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB, sha256 {sha256_of(out)[:16]}…)")
    if register_as is not None:
        from core.store import register_and_compare

        print(register_and_compare(out, register_as or None))
    return out


def _export_to(
    path: Path, model: torch.nn.Module, state: dict, checkpoint: Path, data: str | None, tolerance: float
) -> None:
    exporter = _to_onnx(model, path)
    config = state["config"]
    # Each split loaded once: the parity check's images, and what fit_file fits and measures on.
    splits = Splits.load(data, config.get("val_size") or VAL_SIZE, config.get("seed") or SEED)
    pixels = parity_pixels(splits)
    batch = normalize(pixels, normalization_table(MEAN, STD))
    expected, got = torch_logits(model, batch), onnx_runner(path)(batch)
    diff = float(np.abs(got - expected).max())
    flips = top_class_flips(expected, got)
    print(
        f"parity on {len(batch)} images ({'real' if data else 'synthetic'}): max |logit diff| {diff:.2e}, "
        f"argmax identical: {not flips}"
        + (f" ({flips} near-tied images flipped)" if flips else "")
        + f" (exporter: {exporter})"
    )
    problem = parity_problem(expected, got, tolerance)
    if problem:
        raise UserError(f"{problem}; nothing written")
    summary_file = checkpoint.parent / "summary.json"
    summary = json.loads(summary_file.read_text()) if summary_file.is_file() else {}
    # The temperature and the out-of-distribution score, fitted on the run's own validation images.
    fitted = fit_file(path, splits)
    info = ModelInfo(
        arch=config["arch"],
        class_names=CLASS_NAMES,
        input_size=INPUT_SIZE,
        mean=MEAN,
        std=STD,
        **(splits.test_figures(fitted.test_accuracy) or {"test_accuracy": summary.get("test_acc")}),
        val_accuracy=state.get("val_acc"),
        epochs=state.get("epoch"),
        checkpoint_sha256=sha256_of(checkpoint),
        export_date=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        package_version=package_version(),
        parity_max_abs_diff=diff,
        parity_images=len(batch),
        temperature=fitted.calibration["temperature"] if fitted.calibration else None,
        calibration=fitted.calibration,
    )
    stamp_metadata(path, info, {OOD_KEY: fitted.ood.to_metadata()} if fitted.ood else None)


def top_class_flips(expected: np.ndarray, got: np.ndarray) -> int:
    """Images whose top class differs between the two sets of logits."""
    return int((expected.argmax(1) != got.argmax(1)).sum())


def parity_problem(expected: np.ndarray, got: np.ndarray, tolerance: float = TOLERANCE) -> str | None:
    """Why ONNX Runtime's logits do not match PyTorch's, or None when they do.

    The logits alone decide, relative to their scale: float32 rounding grows with the logits' size (a model
    with logits near 40 differs by ~4e-4 where one near 1 differs by 1e-5). With every logit within the bound,
    the top class can only change where PyTorch's top two logits are within twice the bound: a near-tie that
    rounding may break either way, not a fault of the export.
    """
    diff = float(np.abs(got - expected).max())
    bound = tolerance * max(1.0, float(np.abs(expected).max()))
    if diff > bound:
        return (
            f"ONNX output differs from PyTorch: max |logit diff| {diff:.2e} > {bound:.2e} ({tolerance:g} x the "
            "largest logit); a larger --tolerance accepts it"
        )
    return None
