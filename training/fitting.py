"""What export, quantize and calibrate learn from a model file's own outputs, in one ONNX Runtime pass per split: its
test accuracy, its softmax temperature (training/calibration.py) and its out-of-distribution score (training/ood.py),
with how well each works. The validation images fit, the test images only measure.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from core.contract import MEAN, STD
from core.errors import UserError
from core.ood import MEANS_OUTPUT, METHOD, SQUARES_OUTPUT, OodScore
from core.preprocess import decode_rgb, normalization_table
from core.runtime import softmax
from training.calibration import fit_temperature, reliability_diagram, report
from training.data import Split, load_split
from training.inference import onnx_runner, outputs_of
from training.ood import KEEP, METHOD_NAME, Outputs, add_stage_outputs, fit, generated_sets, measure
from training.train import split_validation

VAL_SIZE, SEED = 5000, 0  # training's defaults: the validation images it held out


@dataclass(frozen=True)
class Splits:
    """A data source's labelled images as training saw them: the images it trained on, the ones it held out for
    validation, and the test split; None for what the source lacks."""

    train: Split | None
    validation: Split | None
    test: Split | None
    name: str = ""  # the data source's file or folder name

    @classmethod
    def load(cls, data: str | None, val_size: int = VAL_SIZE, seed: int = SEED, need_train: bool = False) -> Splits:
        """`need_train`: a source without a train split is refused (saying where one comes from)."""
        if not data:
            return cls(None, None, None)
        try:
            train, validation = split_validation(load_split(data, "train"), val_size, seed)
        except UserError:
            if need_train:
                raise
            train = validation = None
        try:
            test = load_split(data, "test")
        except UserError:
            test = None
        if train is None and test is None:
            raise UserError(f"no images in {data}: expected train/<class>/<image> or test/<class>/<image> files")
        return cls(train, validation, test, Path(data).name)

    def test_figures(self, accuracy: float | None) -> dict:
        """ModelInfo's test_accuracy and what it was measured on."""
        if accuracy is None:
            return {}
        digest = hashlib.sha256(self.test.images.tobytes() + self.test.labels.tobytes()).hexdigest()
        return {"test_accuracy": accuracy, "test_images": len(self.test), "test_data": self.name, "test_sha256": digest}


@dataclass(frozen=True)
class Fitted:
    """What a model file's outputs gave: None where the data lacked the split it needs."""

    test_accuracy: float | None
    calibration: dict | None
    ood: OodScore | None


def fit_file(
    path: Path,
    splits: Splits,
    temperature: float | None = None,
    diagram: Path | None = None,
    outside: Path | None = None,
) -> Fitted:
    """Give the ONNX file at `path` its stage outputs (in place), then measure its test accuracy and fit its
    temperature (unless given: an int8 file takes its source's) and out-of-distribution score on `splits`, measured
    against generated images of none of the classes and the image files in `outside`."""
    widths = add_stage_outputs(path)
    run = onnx_runner(path, ["logits", MEANS_OUTPUT, SQUARES_OUTPUT])
    table = normalization_table(MEAN, STD)

    def outputs(images: np.ndarray) -> Outputs:
        logits, means, squares = outputs_of(run, table, images)[0]
        return logits, means, squares

    test = splits.test and outputs(splits.test.images)
    test_accuracy = None
    if test:
        test_accuracy = float((test[0].argmax(1) == splits.test.labels).mean())
        print(f"test accuracy of the ONNX file on {len(splits.test):,} test images: {test_accuracy:.4f}")
    if splits.train is None:
        print(
            "no calibration or out-of-distribution score: no train split to fit them on (served with T = 1 and "
            "without an out-of-distribution flag)"
        )
        return Fitted(test_accuracy, None, None)
    validation = outputs(splits.validation.images)
    val_labels = splits.validation.labels
    fitted_temperature = fit_temperature(validation[0], val_labels) if temperature is None else temperature
    calibration = report((validation[0], val_labels), test and (test[0], splits.test.labels), fitted_temperature)
    for name in ("validation", "test"):
        if name in calibration:
            before, after = calibration[name]["before"], calibration[name]["after"]
            print(
                f"calibration on {before['images']:,} {name} images: ECE {before['ece']:.4f} -> {after['ece']:.4f}, "
                f"NLL {before['nll']:.4f} -> {after['nll']:.4f} at temperature {fitted_temperature:g}"
            )
    if diagram is not None:
        shown_logits, shown_labels = (test[0], splits.test.labels) if test else (validation[0], val_labels)
        reliability_diagram(
            diagram,
            {
                "before (T = 1)": (softmax(shown_logits), shown_labels),
                f"after (T = {fitted_temperature:g})": (softmax(shown_logits, fitted_temperature), shown_labels),
            },
            f"Reliability on the {'test' if test else 'validation'} images",
        )
        print(f"wrote {diagram}")
    fitted = {"train_images": len(splits.train), "validation_images": len(splits.validation), "kept": KEEP}
    score = fit(outputs(splits.train.images), validation, widths, fitted)
    print(
        f"out-of-distribution score ({METHOD}, {len(widths)} stages of {'/'.join(map(str, widths))} channels): "
        f"threshold {score.threshold:.4g} keeps {KEEP:.0%} of the {len(splits.validation):,} validation images"
    )
    if test:
        sets = {**generated_sets(), **(images_in(outside) if outside else {})}
        # No more of each set than the test images they are weighed against (all of each beside the 10,000).
        outside_outputs = {name: outputs(images[: len(splits.test)]) for name, images in sets.items()}
        measured = measure(test, splits.test.labels, outside_outputs, fitted_temperature, score)
        score = replace(score, fitted={**fitted, "measured": measured})
        print(_summary(measured))
    return Fitted(test_accuracy, calibration, score)


def images_in(folder: Path) -> dict[str, np.ndarray]:
    """A folder's image files (any depth), decoded as the service decodes them, named after the folder."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith("."))
    if not files:
        raise UserError(f"no image files in {folder}")
    return {folder.name: np.stack([decode_rgb(file.read_bytes()) for file in files])}


def _summary(measured: dict) -> str:
    test = measured["test"]
    lines = [
        f"  CIFAR-10 test: {test['flagged']:.1%} flagged; accuracy {test['accuracy']:.2%}, "
        f"{test['accuracy_kept']:.2%} on the kept"
    ]
    for name, found in measured["sets"].items():
        lines.append(
            f"  {name} ({found['images']:,}): {found['flagged']:.1%} flagged; AUROC {found['auroc'][METHOD_NAME]:.3f}, "
            f"FPR95 {found['fpr95'][METHOD_NAME]:.1%} (top-1 probability: {found['auroc']['max probability']:.3f}, "
            f"{found['fpr95']['max probability']:.1%})"
        )
    return "\n".join(lines)
