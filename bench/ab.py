"""Before/after in one run: the target loads and `cifar10 predict`, alternating between two checkouts.

    python -m bench.ab --before /tmp/before [--rounds 3] [--quick]

`--before` is another checkout of this project (e.g. `git worktree add /tmp/before HEAD~3`); both
run with this virtual environment, so only the code differs. The machine drifts, so every round
measures both, one right after the other, and the table gives medians.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import zipfile
from pathlib import Path

from bench.command import timed
from bench.hey import target_loads
from bench.report import ROOT, table
from harness.samples import TEST_ZIP
from harness.server import Server, register_shipped

RESNET_PREDICT_IMAGES = 2000  # ResNet-18 runs ~130 images/s here: the whole test set would take 80 s a round


def measure(checkout: Path, home: Path, folders: dict[str, str], quick: bool) -> dict[str, float]:
    with Server(home, checkout) as server:
        loads = target_loads(server.url, quick)
    figures = {
        "resnet18 /classify c=1 p50 ms": loads["resnet18 c=1"]["p50_ms"],
        "resnet18 /classify c=32 images/s": loads["resnet18 c=32"]["images_per_s"],
        "lenet /classify c=32 req/s": loads["lenet c=32"]["requests_per_s"],
        "lenet /classify_batch x64 c=8 images/s": loads["lenet batch64 c=8"]["images_per_s"],
        "errors": float(sum(sum(load["errors"].values()) for load in loads.values())),
    }
    for model, folder in folders.items():
        seconds, _ = timed(["predict", folder, "--recursive", "--model", model, "--out", "-", "--quiet"], checkout)
        images = sum(1 for _ in Path(folder).rglob("*.jpg"))
        figures[f"predict {model} images/s (wall clock)"] = images / seconds
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", type=Path, required=True, help="the other checkout")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    checkouts = {"before": args.before.resolve(), "after": ROOT}
    runs: dict[str, list[dict]] = {name: [] for name in checkouts}
    with tempfile.TemporaryDirectory() as home, tempfile.TemporaryDirectory() as images:
        os.environ["BENTOML_HOME"] = home  # for the servers, the store and `predict`
        register_shipped(os.environ)
        with zipfile.ZipFile(TEST_ZIP) as archive:
            names = sorted(n for n in archive.namelist() if n.endswith(".jpg"))
            archive.extractall(f"{images}/lenet", members=names)
            archive.extractall(f"{images}/resnet18", members=names[:: len(names) // RESNET_PREDICT_IMAGES])
        folders = {"lenet": f"{images}/lenet", "resnet18": f"{images}/resnet18"}
        for round_ in range(args.rounds):
            for name, checkout in checkouts.items():
                runs[name].append(measure(checkout, Path(home), folders, args.quick))
                print(f"round {round_ + 1} {name}: {runs[name][-1]}", flush=True)
    rows = [
        {
            "measure": key,
            **{
                name: f"{statistics.median(r[key] for r in runs[name]):,.1f} ("
                + ", ".join(f"{r[key]:,.1f}" for r in runs[name])
                + ")"
                for name in checkouts
            },
        }
        for key in runs["after"][0]
    ]
    print("\n" + table(rows, ["measure", *checkouts]))


if __name__ == "__main__":
    main()
