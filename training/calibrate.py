"""`cifar10 calibrate`: fit a softmax temperature on an ONNX file's validation images and stamp it, with the
calibration figures, into the file's metadata (weights untouched). `cifar10 export` and `cifar10 quantize` do
the same through `calibration_of`; an int8 file takes its fp32 source's temperature and is measured with it.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np

from core.contract import ModelInfo
from core.errors import UserError
from core.files import refuse_existing, sha256_of, write_atomic
from core.runtime import OnnxModel, softmax
from training.calibration import fit_temperature, reliability_diagram, report
from training.data import load_split
from training.inference import logits_of
from training.onnx_metadata import stamp_metadata
from training.train import split_validation

VAL_SIZE, SEED = 5000, 0  # training's defaults: the validation images it held out


def calibration_of(
    run: Callable[[np.ndarray], np.ndarray],
    table: np.ndarray,
    data: str,
    val_size: int = VAL_SIZE,
    seed: int = SEED,
    temperature: float | None = None,
    diagram: Path | None = None,
) -> dict | None:
    """The calibration figures of a model (`run`: its logits) on `data`'s validation images (as training held
    them out) and test images; the temperature is fitted on the validation images unless given. None when
    `data` has no train split to take validation images from."""
    try:
        train = load_split(data, "train")
    except UserError:
        return None
    _, held_out = split_validation(train, val_size, seed)
    validation = logits_of(run, table, held_out.images)[0], held_out.labels
    try:
        test_split = load_split(data, "test")
        test = logits_of(run, table, test_split.images)[0], test_split.labels
    except UserError:
        test = None
    fitted = fit_temperature(*validation) if temperature is None else temperature
    found = report(validation, test, fitted)
    for name in ("validation", "test"):
        if name in found:
            before, after = found[name]["before"], found[name]["after"]
            print(
                f"calibration on {before['images']:,} {name} images: ECE {before['ece']:.4f} -> {after['ece']:.4f}, "
                f"NLL {before['nll']:.4f} -> {after['nll']:.4f} at temperature {fitted:g}"
            )
    if diagram is not None:
        shown_logits, shown_labels = test or validation
        reliability_diagram(
            diagram,
            {
                "before (T = 1)": (softmax(shown_logits), shown_labels),
                f"after (T = {fitted:g})": (softmax(shown_logits, fitted), shown_labels),
            },
            f"Reliability on the {'test' if test else 'validation'} images",
        )
        print(f"wrote {diagram}")
    return found


def calibrate(
    model: str | os.PathLike,
    data: str,
    out: str | os.PathLike,
    source: str | os.PathLike | None = None,
    val_size: int = VAL_SIZE,
    seed: int = SEED,
    diagram: str | os.PathLike | None = None,
    force: bool = False,
) -> Path:
    """Stamp `model`'s temperature and calibration into a copy at `out` (which may be `model` itself, with
    `force`). An int8 file takes the temperature of `source`, the fp32 file it was made from."""
    model, out = Path(model), Path(out)
    refuse_existing(out, force)
    loaded = OnnxModel(model, providers="cpu")
    changes: dict = {}
    temperature = None
    if loaded.info.precision == "int8":
        if source is None:
            raise UserError(f"{model} is int8: it takes its fp32 source's temperature; pass --source FP32.onnx")
        fp32 = OnnxModel(source, providers="cpu")
        if fp32.info.temperature is None:
            raise UserError(f"{source} has no temperature yet; calibrate it first")
        if loaded.info.checkpoint_sha256 != fp32.info.checkpoint_sha256:
            raise UserError(f"{model} was not made from {source} (another training checkpoint); pass its fp32 source")
        temperature = fp32.info.temperature
    found = calibration_of(
        loaded.logits, loaded.table, data, val_size, seed, temperature, Path(diagram) if diagram else None
    )
    if found is None:
        raise UserError(f"{data} has no train split: the temperature is fitted on its validation images")
    if loaded.info.precision == "int8":  # its source as it is now (calibrating it changed its bytes), and its own
        changes.update(source_sha256=sha256_of(Path(source)), val_accuracy=found["validation"]["after"]["accuracy"])
    info = dataclasses.replace(loaded.info, temperature=found["temperature"], calibration=found, **changes)
    extra = {k: v for k, v in loaded.metadata.items() if k not in ModelInfo.__dataclass_fields__}  # the self-check

    def write(tmp: Path) -> None:
        shutil.copyfile(model, tmp)
        stamp_metadata(tmp, info, extra)

    write_atomic(out, write)
    print(f"wrote {out} (temperature {found['temperature']:g}, sha256 {sha256_of(out)[:16]}…)")
    return out
