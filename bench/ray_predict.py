"""`cifar10 predict` on this machine beside `cifar10 predict --ray` (a new local Ray each run), same images.

    python -m bench.ray_predict [--images N] [--model NAME]

Unpacks N CIFAR-10 test images (default all 10,000) into a temporary folder, then runs each command end to end
as a user would, into a CSV: wall clock with start-up (interpreter, model, Ray) and the summary line's images/s.
"""

from __future__ import annotations

import argparse
import re
import tempfile
from pathlib import Path

from bench.command import timed
from bench.report import machine, machine_line, table, write_json
from harness.samples import cifar_samples

SUMMARY = re.compile(r"([\d,]+) images?, ([\d,]+) errors?")


def run(args: list[str]) -> dict:
    wall, stderr = timed(args)
    images, errors = SUMMARY.search(stderr.strip().splitlines()[-1]).groups()
    count = int(images.replace(",", ""))
    return {"images": count, "errors": int(errors), "wall_s": wall, "images_per_s_wall": count / wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=10_000)
    parser.add_argument("--model", default="resnet18")
    args = parser.parse_args()
    info = machine()
    with tempfile.TemporaryDirectory() as folder:
        for i, (label, data) in enumerate(cifar_samples(args.images // 10)):
            (Path(folder) / f"{i:05d}-{label}.jpg").write_bytes(data)
        common = ["predict", folder, "--model", args.model, "--quiet", "--force"]
        rows = [
            {"path": "local predict", **run([*common, "--out", f"{folder}.local.csv"])},
            {"path": "predict --ray (local Ray)", **run([*common, "--ray", "--out", f"{folder}.ray.csv"])},
        ]
        for suffix in ("local", "ray"):
            Path(f"{folder}.{suffix}.csv").unlink()
    print(machine_line(info))
    print(table(rows, ["path", "images", "errors", "wall_s", "images_per_s_wall"]))
    print(f"Ray / local, images/s with start-up: {rows[1]['images_per_s_wall'] / rows[0]['images_per_s_wall']:.2f}")
    write_json("ray_predict.json", {"model": args.model, "rows": rows}, info)


if __name__ == "__main__":
    main()
