"""`cifar10 calibrate`: stamp into a copy of an ONNX file what training/fitting.py fits on its validation images:
the softmax temperature with its calibration figures, and the out-of-distribution score with its threshold and
figures (weights untouched; the file gains its `features` output). An int8 file takes its fp32 source's
temperature and is measured with it.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from pathlib import Path

from core.contract import ModelInfo
from core.errors import UserError
from core.files import refuse_existing, sha256_of, write_atomic
from core.ood import METADATA_KEY as OOD_KEY
from core.runtime import OnnxModel
from training.fitting import SEED, VAL_SIZE, Splits, fit_file
from training.onnx_metadata import stamp_metadata


def calibrate(
    model: str | os.PathLike,
    data: str,
    out: str | os.PathLike,
    source: str | os.PathLike | None = None,
    val_size: int = VAL_SIZE,
    seed: int = SEED,
    diagram: str | os.PathLike | None = None,
    force: bool = False,
    outside: str | os.PathLike | None = None,
) -> Path:
    """Stamp `model`'s temperature, out-of-distribution score and their figures into a copy at `out` (which may be
    `model` itself, with `force`). An int8 file takes the temperature of `source`, the fp32 file it was made from.
    `outside`: a folder of images of none of the classes, to measure the score against."""
    model, out = Path(model), Path(out)
    refuse_existing(out, force)
    loaded = OnnxModel(model, providers="cpu")
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
    splits = Splits.load(data, val_size, seed, need_train=True)  # what is fitted, is fitted on its validation images
    # What the file carries beyond ModelInfo (the int8 self-check's reference set), less what is fitted here.
    extra = {k: v for k, v in loaded.metadata.items() if k not in ModelInfo.__dataclass_fields__ and k != OOD_KEY}

    def write(tmp: Path) -> None:
        shutil.copyfile(model, tmp)
        fitted = fit_file(tmp, splits, temperature, Path(diagram) if diagram else None, outside and Path(outside))
        changes = {}
        if loaded.info.precision == "int8":  # its source as it is now (calibrating it changed its bytes), and its own
            changes = {
                "source_sha256": sha256_of(Path(source)),
                "val_accuracy": fitted.calibration["validation"]["after"]["accuracy"],
            }
        info = dataclasses.replace(
            loaded.info,
            temperature=fitted.calibration["temperature"],
            calibration=fitted.calibration,
            **splits.test_figures(fitted.test_accuracy),
            **changes,
        )
        stamp_metadata(tmp, info, {**extra, OOD_KEY: fitted.ood.to_metadata()})

    write_atomic(out, write)
    print(f"wrote {out} (sha256 {sha256_of(out)[:16]}…)")
    return out
