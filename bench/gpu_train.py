"""Train on a lent CUDA host inside a wall-clock budget: time the recipe's epochs, then train the most that fit.

    python -m bench.gpu_train --data cifar10-train.zip --out /tmp/run --seconds 240

A 3-epoch probe of the same recipe gives the wall time of one epoch (checkpoints and curves included); the run then
gets `seconds // that` epochs (10 to 200), so its schedule spans the whole run. Prints `chose N epochs`.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

PROBE_EPOCHS = 3


def train_command(args: argparse.Namespace, out: Path, epochs: int) -> list[str]:
    return [
        *[sys.executable, "-m", "cli.main", "train", "--arch", args.arch, "--data", args.data, "--out", str(out)],
        *["--epochs", str(epochs), "--cutout", str(args.cutout), "--device", args.device],
    ]


def epoch_seconds(args: argparse.Namespace, out: Path) -> float:
    """Wall seconds between the ends of the probe's epochs (its first one pays for start-up and cuDNN's search)."""
    ends = []
    with subprocess.Popen(train_command(args, out, PROBE_EPOCHS), stdout=subprocess.PIPE, text=True) as probe:
        for line in probe.stdout:
            print(line, end="", flush=True)
            if line.startswith("epoch "):
                ends.append(time.perf_counter())
    if probe.returncode or len(ends) < 2:
        sys.exit(f"the probe run failed (exit {probe.returncode}): see its output above")
    return (ends[-1] - ends[0]) / (len(ends) - 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="the training images (zip or class-folder tree)")
    parser.add_argument("--out", required=True, type=Path, help="the run folder (the probe's goes beside it)")
    parser.add_argument("--seconds", type=float, required=True, help="wall-clock budget of the run after the probe")
    parser.add_argument("--cutout", type=int, default=16)
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--device", default="cuda", help="cpu: to rehearse the script on a host without a GPU")
    args = parser.parse_args()
    per_epoch = epoch_seconds(args, args.out.with_name(args.out.name + "-probe"))
    epochs = max(10, min(200, int(args.seconds // per_epoch)))
    print(f"chose {epochs} epochs: {per_epoch:.2f} s per epoch, {args.seconds:.0f} s budget", flush=True)
    sys.exit(subprocess.run(train_command(args, args.out, epochs)).returncode)


if __name__ == "__main__":
    main()
