"""Accuracy of an ONNX model, a store model or a training checkpoint on a labelled split.

ONNX models run through the service's runtime and preprocessing; checkpoints run in
PyTorch eval mode on the very same input tensors, so the two can be compared.
"""

from __future__ import annotations

import functools
import json
import shlex
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np

from core.contract import CLASS_NAMES, MEAN, STD
from core.files import refuse_existing
from core.preprocess import normalization_table
from core.runtime import softmax
from training.calibration import BINS, measure, reliability_diagram
from training.data import load_split
from training.inference import logits_of


def _onnx_runner(spec: str, precision: str) -> tuple[Callable[[np.ndarray], np.ndarray], np.ndarray, str, float]:
    from core.store import load

    choice = load(spec, precision)
    model = choice.model
    for line in choice.warnings():
        print(f"cifar10 evaluate: {spec}: {line}", file=sys.stderr)
    return model.logits, model.table, f"{model.path} ({model.info.precision}, {model.provider})", model.temperature


def _checkpoint_runner(path: str, _: str) -> tuple[Callable[[np.ndarray], np.ndarray], np.ndarray, str, float]:
    from training.checkpoints import load_checkpoint, model_from_checkpoint, torch_logits

    model = model_from_checkpoint(load_checkpoint(path))
    description = f"{path} (PyTorch eval mode, CPU)"
    return functools.partial(torch_logits, model), normalization_table(MEAN, STD), description, 1.0


def evaluate(
    data: str,
    model: str = "resnet18",
    split: str = "test",
    out: str | None = None,
    precision: str = "auto",
    force: bool = False,
) -> dict:
    """Overall and per-class accuracy, confusion matrix, calibration (ECE, NLL at the model's temperature) and
    images/s; written to `out` when given, with the confusion matrix and reliability diagram drawn."""
    if out:
        refuse_existing(Path(out) / "evaluation.json", force)
    run, table, description, temperature = (_checkpoint_runner if model.endswith(".pt") else _onnx_runner)(
        model, precision
    )
    labelled = load_split(data, split)
    logits, seconds = logits_of(run, table, labelled.images)
    predicted = logits.argmax(1)
    calibration = measure(logits, labelled.labels, temperature)
    confusion = np.zeros((len(CLASS_NAMES), len(CLASS_NAMES)), dtype=np.int64)
    np.add.at(confusion, (labelled.labels, predicted), 1)
    per_class = confusion.diagonal() / np.maximum(confusion.sum(1), 1)
    report = {
        "model": description,
        "data": str(data),
        "split": split,
        "images": len(labelled),
        "accuracy": float((predicted == labelled.labels).mean()),
        "per_class": {name: float(acc) for name, acc in zip(CLASS_NAMES, per_class, strict=True)},
        "confusion_matrix": {"labels": list(CLASS_NAMES), "rows_true_cols_predicted": confusion.tolist()},
        "images_per_s": round(len(labelled) / seconds, 1),
        "calibration": {"temperature": temperature, "ece": calibration["ece"], "nll": calibration["nll"], "bins": BINS},
    }
    print(
        f"{description}: accuracy {report['accuracy']:.4f} on {len(labelled)} {split} images, "
        f"{report['images_per_s']:.0f} images/s"
    )
    for name, acc in report["per_class"].items():
        print(f"  {name:<11}{acc:.4f}")
    print(
        f"calibration: ECE {calibration['ece']:.4f} ({BINS} bins), NLL {calibration['nll']:.4f} at temperature "
        f"{temperature:g}"
    )
    if out:
        write_report(report, confusion, Path(out), (softmax(logits, temperature), labelled.labels))
    return report


def write_report(report: dict, confusion: np.ndarray, out: Path, probabilities: tuple[np.ndarray, np.ndarray]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "evaluation.json").write_text(json.dumps(report, indent=2) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # not in the serving set: `make serve` alone installs no plotting
        print(
            f"wrote {out / 'evaluation.json'}; confusion.png needs matplotlib, which this Python lacks: "
            f"{shlex.quote(sys.executable)} -m pip install matplotlib"
        )
        return
    fig, ax = plt.subplots(figsize=(7, 6))
    ax.imshow(confusion, cmap="Blues")
    ax.set(
        xticks=range(len(CLASS_NAMES)),
        yticks=range(len(CLASS_NAMES)),
        xlabel="predicted",
        ylabel="true",
        title=f"Confusion matrix (accuracy {report['accuracy']:.2%})",
    )
    ax.set_xticklabels(CLASS_NAMES, rotation=45, ha="right")
    ax.set_yticklabels(CLASS_NAMES)
    for (i, j), count in np.ndenumerate(confusion):
        ax.text(
            j,
            i,
            str(count),
            ha="center",
            va="center",
            fontsize=7,
            color="white" if count > confusion.max() / 2 else "black",
        )
    fig.tight_layout()
    fig.savefig(out / "confusion.png", dpi=100)
    plt.close(fig)
    temperature = report["calibration"]["temperature"]
    reliability_diagram(
        out / "reliability.png",
        {f"T = {temperature:g}": probabilities},
        f"Reliability on the {report['images']:,} {report['split']} images",
    )
    print(f"wrote {out / 'evaluation.json'}, {out / 'confusion.png'} and {out / 'reliability.png'}")
