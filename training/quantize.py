"""fp32 ONNX file -> int8 (ONNX Runtime static quantization, QDQ), calibrated on training images only and
checked against the fp32 model on held-out training images before anything is written.

Weights are quantized to 7 bits (`reduce_range`): without VNNI, ONNX Runtime's u8 x s8 kernels add pairs
of products in 16 bits, and full 8-bit weights saturate there (measured on an emulated AVX2 CPU: the
agreement with fp32 fell from 99.6% to 94%); 7-bit weights cannot. The file also carries a reference set
(core/selfcheck.py) that every host runs before the int8 copy may answer there.
"""

from __future__ import annotations

import datetime as dt
import os
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np

from core.errors import UserError
from core.files import refuse_existing, sha256_of, write_atomic
from core.ood import METADATA_KEY as OOD_KEY
from core.preprocess import normalize
from core.runtime import OnnxModel, softmax
from core.selfcheck import METADATA_KEY, encode_reference
from training.fitting import Splits, fit_file
from training.inference import onnx_runner
from training.onnx_metadata import package_version, stamp_metadata
from training.ood import without_stage_outputs

MIN_AGREEMENT = 0.99  # default top-1 agreement with fp32 on the held-out images, or nothing is written
PARITY_IMAGES = 2000  # of the 5,000 training images that training holds out for validation
BATCH = 64
REFERENCE_IMAGES = 256  # held-out images in the self-check reference set
# Reference images are clear answers: fp32's top class ahead of the next by this much probability, so a host
# whose int8 kernels compute what this host's do cannot disagree by rounding.
REFERENCE_MARGIN = 0.2
SETTINGS = {
    "format": "QDQ",
    "weights": "int8 with a 7-bit range (reduce_range), per channel",
    "activations": "uint8",
    "calibration": "MinMax",
    "preprocessing": "onnxruntime quant_pre_process",
    "tool": "onnxruntime.quantization.quantize_static",
}


class Calibration:
    """ONNX Runtime's calibration data reader: normalized batches of the calibration images."""

    def __init__(self, batches: list[np.ndarray], input_name: str) -> None:
        self.batches, self.input_name = iter(batches), input_name

    def get_next(self) -> dict | None:
        batch = next(self.batches, None)
        return None if batch is None else {self.input_name: batch}


def quantize(
    source: str | os.PathLike,
    out: str | os.PathLike,
    data: str,
    images: int = 512,
    seed: int = 0,
    register_as: str | None = None,
    min_agreement: float = MIN_AGREEMENT,
    force: bool = False,
) -> Path:
    """Quantize `source`; the file appears at `out` only when its top-1 agreement with fp32 reaches min_agreement.
    `register_as`: a store name, or "" for the default one (None: not registered)."""
    source, out = Path(source), Path(out)
    refuse_existing(out, force)
    fp32 = OnnxModel(source, providers="cpu")
    if fp32.info.precision != "fp32":
        raise UserError(f"{source} is already {fp32.info.precision}; quantize the fp32 model it came from")
    # The training run's own split (seed 0): calibrate on the part it trained on, check on the part it held out.
    splits = Splits.load(data, need_train=True)
    if images > len(splits.train):
        raise UserError(f"--images {images} is more than the {len(splits.train):,} training images in {data}")
    chosen = np.sort(np.random.default_rng(seed).choice(len(splits.train), images, replace=False))
    calibration = [normalize(splits.train.images[chosen[i : i + BATCH]], fp32.table) for i in range(0, images, BATCH)]
    pixels = splits.validation.images[:PARITY_IMAGES]
    print(f"calibrating on {images} training images (seed {seed}); checking on {len(pixels):,} held-out ones")
    write_atomic(
        out, lambda tmp: _quantize_to(tmp, source, fp32, calibration, pixels, splits, images, seed, min_agreement)
    )
    print(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB, sha256 {sha256_of(out)[:16]}…)")
    if register_as is not None:
        from core.store import register_and_compare

        print(register_and_compare(out, register_as or None))
    return out


def _quantize_to(
    path: Path,
    source: Path,
    fp32: OnnxModel,
    calibration: list[np.ndarray],
    pixels: np.ndarray,
    splits: Splits,
    images: int,
    seed: int,
    min_agreement: float,
) -> None:
    # Imported here, after this project's `models` package: onnxruntime.quantization puts its own
    # transformers folder on sys.path, whose `models` would otherwise shadow ours.
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    with tempfile.TemporaryDirectory() as work:
        plain, prepared = Path(work) / "plain.onnx", Path(work) / "prepared.onnx"
        without_stage_outputs(source, plain)  # made again on the int8 graph, from its own activations
        # ONNX's own shape inference only: the symbolic one adds nothing to these networks' int8 files (LeNet's and
        # ResNet-18's came out node for node and weight for weight the same), cannot follow WhiteNet's whitening
        # Reshape, and took 17 s of GoogLeNet's 35.
        quant_pre_process(str(plain), str(prepared), skip_symbolic_shape=True)
        quantize_static(
            str(prepared),
            str(path),
            Calibration(calibration, fp32.input_name),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            reduce_range=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.MinMax,
        )
    run = onnx_runner(path)
    check = normalize(pixels, fp32.table)
    expected = np.concatenate([fp32.logits(check[i : i + 256]) for i in range(0, len(check), 256)])
    got = np.concatenate([run(check[i : i + 256]) for i in range(0, len(check), 256)])
    agreement = float((expected.argmax(1) == got.argmax(1)).mean())
    probability_diff = float(np.abs(softmax(got) - softmax(expected)).max())
    print(
        f"int8 vs fp32 on {len(check):,} held-out images: top-1 agreement {agreement:.4f}, max probability "
        f"difference {probability_diff:.4f}, max logit difference {np.abs(got - expected).max():.3f}"
    )
    if agreement < min_agreement:
        raise UserError(
            f"int8 agrees with fp32 on {agreement:.2%} of the held-out images, below the "
            f"{min_agreement:.0%} required (--min-agreement)"
        )
    chosen = reference_images(expected, got)
    print(f"self-check reference set: {len(chosen)} held-out images whose fp32 answer is clear and int8 agrees")
    if not len(chosen):
        print(
            f"warning: no held-out image has a clear fp32 answer (top class ahead by {REFERENCE_MARGIN:g}) that int8 "
            "gives too, so the self-check reference set is empty: this copy fails its self-check on every host and "
            "fp32 answers instead (CIFAR10_PRECISION=int8 or --precision int8 would serve it anyway)",
            file=sys.stderr,
        )
    # The fp32 model's temperature (1 where it has none), with this copy's own figures, and its own
    # out-of-distribution score, fitted on its own features.
    fitted = fit_file(path, splits, fp32.temperature)
    info = replace(
        fp32.info,
        precision="int8",
        calibration=fitted.calibration if fp32.info.temperature else None,
        val_accuracy=fitted.calibration["validation"]["after"]["accuracy"],
        source_sha256=sha256_of(source),
        source_test_accuracy=fp32.info.test_accuracy,
        **{
            "test_accuracy": None,
            "test_images": None,
            "test_data": "",
            "test_sha256": "",
            **splits.test_figures(fitted.test_accuracy),
        },
        quantization={
            **SETTINGS,
            "calibration_images": images,
            "calibration_seed": seed,
            "calibration_split": "train, without the 5,000 held out for validation (seed 0)",
        },
        parity_images=len(check),
        parity_max_abs_diff=float(np.abs(got - expected).max()),
        parity_top1_agreement=agreement,
        parity_max_probability_diff=probability_diff,
        export_date=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        package_version=package_version(),
    )
    reference = encode_reference(pixels[chosen], expected[chosen].argmax(1))
    stamp_metadata(path, info, {METADATA_KEY: reference, OOD_KEY: fitted.ood.to_metadata()})


def reference_images(expected: np.ndarray, got: np.ndarray) -> np.ndarray:
    """Indices of up to REFERENCE_IMAGES checked images, in order, whose fp32 top class leads by REFERENCE_MARGIN
    or more and on which int8 agrees here: a host whose int8 differs from this one's shows up as disagreement."""
    top2 = np.sort(softmax(expected), axis=1)[:, -2:]
    clear = (top2[:, 1] - top2[:, 0] >= REFERENCE_MARGIN) & (expected.argmax(1) == got.argmax(1))
    return np.flatnonzero(clear)[:REFERENCE_IMAGES]
