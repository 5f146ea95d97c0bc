"""The out-of-distribution score, measured: how well each method tells CIFAR-10 test images from images of none of
its classes (AUROC, FPR at 95% TPR), and what the shipped score adds to a model call, side by side in one run.

    python -m bench.ood --data CIFAR10_DIR [--outside FOLDER] [--models resnet18,resnet18-int8,lenet]

Methods: the top-1 probability and the energy (the baselines), the shipped layer statistics (core/ood.py), the same
without the energy, and each stage alone. Each model's copy gets its stage outputs in a temporary folder and is fitted
there on the training split, exactly as `cifar10 calibrate` fits it: the files themselves are not changed.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from bench.report import machine, machine_line, table, write_json
from core.contract import MEAN, STD
from core.ood import MEANS_OUTPUT, SQUARES_OUTPUT, OodScore
from core.preprocess import normalization_table
from core.runtime import OnnxModel
from core.store import resolve
from training.fitting import Splits, images_in
from training.inference import onnx_runner, outputs_of
from training.ood import METHOD_NAME, add_stage_outputs, auroc, baseline_scores, fit, fpr_at_95_tpr, generated_sets


def methods(score: OodScore, temperature: float) -> dict:
    """Each method's scores of (logits, means, squares), higher = out of distribution."""

    def without_energy(outputs: tuple) -> np.ndarray:
        return score.parts(outputs[1], outputs[2], outputs[0])[:, :-1].sum(1)

    stages = {
        f"stage {i} alone ({width} channels)": (lambda o, i=i: score.parts(o[1], o[2], o[0])[:, i])
        for i, width in enumerate(score.widths)
    }
    return {
        "max probability": lambda o: baseline_scores(o[0], temperature)["max probability"],
        "energy": lambda o: baseline_scores(o[0], temperature)["energy"],
        METHOD_NAME: lambda o: score.scores(o[1], o[2], o[0]),
        "layer statistics without the energy": without_energy,
        **stages,
    }


def compare(path: Path, splits: Splits, sets: dict[str, np.ndarray]) -> tuple[list[dict], dict, list[dict]]:
    """Every method's AUROC and FPR95 per set; the share of test images each flags at the threshold that keeps 95%
    of the validation images; and the score's cost beside the model call."""
    with tempfile.TemporaryDirectory() as work:
        copy = Path(work) / path.name
        shutil.copyfile(path, copy)
        widths = add_stage_outputs(copy)
        run = onnx_runner(copy, ["logits", MEANS_OUTPUT, SQUARES_OUTPUT])
        table_ = normalization_table(MEAN, STD)
        model = OnnxModel(copy, providers="cpu")

        def outputs(images: np.ndarray) -> tuple:
            return tuple(outputs_of(run, table_, images)[0])

        validation, test = outputs(splits.validation.images), outputs(splits.test.images)
        score = fit(outputs(splits.train.images), validation, widths, {})
        scoring = methods(score, model.temperature)
        inside = {name: method(test) for name, method in scoring.items()}
        thresholds = {name: np.quantile(method(validation), 0.95) for name, method in scoring.items()}
        rows = []
        for set_name, images in sets.items():
            outside = outputs(images)
            for name, method in scoring.items():
                scores = method(outside)
                rows.append(
                    {
                        "set": set_name,
                        "method": name,
                        "auroc": round(auroc(inside[name], scores), 4),
                        "fpr95": round(fpr_at_95_tpr(inside[name], scores), 4),
                    }
                )
        flagged = {name: round(float((inside[name] > thresholds[name]).mean()), 4) for name in scoring}
        spent = cost(model, replace(score, fitted={}))
    return rows, flagged, spent


def cost(model: OnnxModel, score: OodScore, sizes: tuple[int, ...] = (1, 64), rounds: int = 5) -> list[dict]:
    """The model call with and without the score (its outputs and its arithmetic), alternating in one run: median
    seconds per call over `rounds` windows of a second."""
    scored = [model.logits_name, MEANS_OUTPUT, SQUARES_OUTPUT]

    def with_score(batch: np.ndarray) -> np.ndarray:
        logits, means, squares = model.session.run(scored, {model.input_name: batch})
        return score.scores(means, squares, logits)

    rows = []
    for size in sizes:
        batch = np.random.default_rng(0).standard_normal((size, 3, 32, 32)).astype(np.float32)
        calls = {"logits": model.logits, "with score": with_score}
        timings: dict[str, list[float]] = {name: [] for name in calls}
        for call in calls.values():
            call(batch)
        for _ in range(rounds):
            for name, call in calls.items():
                count, began = 0, time.perf_counter()
                while time.perf_counter() - began < 1.0 / rounds:
                    call(batch)
                    count += 1
                timings[name].append((time.perf_counter() - began) / count)
        plain, both = (float(np.median(timings[name])) for name in calls)
        rows.append({"batch": size, "call_ms": plain * 1000, "with_score_ms": both * 1000, "added": both / plain - 1})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="CIFAR-10 with its train and test splits")
    parser.add_argument("--outside", type=Path, help="a folder of real photographs of none of the classes")
    parser.add_argument("--models", default="resnet18,resnet18-int8,lenet")
    args = parser.parse_args()
    info = machine()
    splits = Splits.load(args.data)
    sets = {**generated_sets(), **(images_in(args.outside) if args.outside else {})}
    print(machine_line(info))
    results = {}
    for name in args.models.split(","):
        path = resolve(name)
        rows, flagged, spent = compare(path, splits, sets)
        results[name] = {"methods": rows, "test_flagged": flagged, "cost": spent}
        print(f"\n{name} ({path.name}); CIFAR-10 test images flagged at 95% of validation kept: {flagged}")
        print(table(rows, ["set", "method", "auroc", "fpr95"]))
        print(table(spent, ["batch", "call_ms", "with_score_ms", "added"]))
    write_json("ood.json", results, info)


if __name__ == "__main__":
    main()
