"""What each part of WhiteNet's recipe buys: the whole recipe, then runs that each leave one part out, trained side by
side on the same images with the same seed, and their test accuracy (plain, and averaged with the flipped image).

    python -m bench.whitenet_parts --data CIFAR10_DIR --out RUNS_DIR [--epochs 6] [--per-class 1500]

A full run takes most of an hour on a 2-core CPU, so these are shorter: `--per-class` training images of each class
(a tenth held out for validation, as always) for `--epochs` epochs. The parts' effects at this scale show their
direction and rough size, not the full run's figures.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

import torch

from bench.report import machine, machine_line, table, write_json
from core.contract import CLASS_NAMES
from training.checkpoints import load_checkpoint, model_from_checkpoint
from training.data import load_split
from training.train import Augmenter, TrainConfig, train

# Each variant: the recipe with one part changed (TrainConfig fields), and what that part is.
VARIANTS: dict[str, tuple[dict, str]] = {
    "whole recipe": ({}, ""),
    "no whitening": ({"whitening": False}, "the first convolution learned from random weights, not frozen whitening"),
    "no lookahead": ({"lookahead": False}, "no running average pulled in every 5 steps"),
    "random flips": ({"alternate_flips": False}, "flips at random in each epoch, not alternating"),
    "label smoothing 0.1": ({"label_smoothing": 0.1}, "0.1 instead of 0.2"),
    "no translation": ({"pad": 0}, "no 2-pixel reflected crops"),
    "plain BatchNorm shifts": ({"bias_lr_scale": 1.0}, "BatchNorm shifts at the base learning rate, not 64x"),
}


def subset(data: Path, out: Path, per_class: int) -> Path:
    """A class-folder data set of `per_class` training images of each class and every test image, as symlinks."""
    for split, count in (("train", per_class), ("test", None)):
        for name in CLASS_NAMES:
            folder = out / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for source in sorted((data / split / name).iterdir())[:count]:
                link = folder / source.name
                if not link.exists():
                    link.symlink_to(source.resolve())
    return out


@torch.no_grad()
def test_accuracy(run: Path, data: Path) -> dict[str, float]:
    """best.pt's accuracy on the test split, plain and averaged with each image's mirror image."""
    model = model_from_checkpoint(load_checkpoint(run / "best.pt"))
    test = load_split(data, "test")
    images = Augmenter(torch.device("cpu")).normalize(torch.from_numpy(test.images))
    labels = torch.from_numpy(test.labels)
    plain, flipped = [], []
    for start in range(0, len(images), 1000):
        batch = images[start : start + 1000].contiguous()
        plain.append(model(batch))
        flipped.append(model(batch.flip(3)))
    logits, mirrored = torch.cat(plain), torch.cat(flipped)
    return {
        "test": float((logits.argmax(1) == labels).float().mean()),
        "test_with_flip": float(((logits + mirrored).argmax(1) == labels).float().mean()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="CIFAR-10 with train/ and test/ class folders")
    parser.add_argument("--out", type=Path, required=True, help="a folder for the runs (and the subset's links)")
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--per-class", type=int, default=1500)
    parser.add_argument("--only", help="comma-separated variant names (default: all)")
    args = parser.parse_args()
    info = machine()
    data = subset(args.data, args.out / "data", args.per_class)
    chosen = args.only.split(",") if args.only else list(VARIANTS)
    rows = []
    for name in chosen:
        changes, what = VARIANTS[name]
        run = args.out / name.replace(" ", "-")
        if not (run / "summary.json").exists():
            base = TrainConfig(arch="whitenet", data=str(data), out=str(run), epochs=args.epochs)
            train(replace(base, **changes))
        summary = json.loads((run / "summary.json").read_text())
        rows.append(
            {
                "variant": name,
                "changed": what,
                "val": summary["val_acc"],
                **test_accuracy(run, data),
                "train_s": summary["train_seconds"],
            }
        )
        print(rows[-1], flush=True)
    print(machine_line(info))
    print(table(rows, ["variant", "changed", "val", "test", "test_with_flip", "train_s"]))
    write_json("whitenet_parts.json", {"epochs": args.epochs, "per_class": args.per_class, "rows": rows}, info)


if __name__ == "__main__":
    main()
