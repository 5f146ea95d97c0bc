"""What a shadow costs the live answers: ResNet-18 at 32 clients with no shadow, a 10% sample and 100%, side by side.

    python -m bench.shadow [--rounds 3] [--requests 960]

One server (model control on); the shadow is another store version of the shipped ResNet-18, so it costs what the
live model does. Every round runs the three settings one right after the other (the machine drifts), and the table
gives medians and the live p99 against no shadow. Target: within 10% at the 10% sample.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import httpx

from bench.hey import multipart, run_load
from bench.report import ROOT, machine, machine_line, table, write_json
from harness.samples import cifar_samples
from harness.server import Server, register_shipped

SAMPLES = {"no shadow": 0.0, "10% sample": 0.1, "100% sample": 1.0}


def shadow(url: str, version: str, sample: float) -> None:
    """Make `version` ResNet-18's shadow on `sample` of requests (0: none)."""
    if sample:
        parameters = {"version": version, "shadow": True, "sample": sample}
        answer = httpx.post(f"{url}/v2/repository/models/resnet18/load", json={"parameters": parameters}, timeout=300)
    else:
        parameters = {"version": version}
        answer = httpx.post(f"{url}/v2/repository/models/resnet18/unload", json={"parameters": parameters}, timeout=60)
        if answer.status_code == 404:  # no shadow to unload
            return
    answer.raise_for_status()


def skipped(url: str) -> float:
    metrics = httpx.get(f"{url}/metrics").text.splitlines()
    lines = [line for line in metrics if line.startswith("cifar10_shadow_images_total") and 'outcome="skipped"' in line]
    return sum(float(line.rsplit(" ", 1)[1]) for line in lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--requests", type=int, default=960, help="per setting and round")
    args = parser.parse_args()
    _, image = cifar_samples(1)[3]
    body = multipart([("image", "x.jpg", image), ("model", "", b"resnet18")])
    runs: dict[str, list[dict]] = {name: [] for name in SAMPLES}
    with tempfile.TemporaryDirectory() as home:
        env = {**os.environ, "BENTOML_HOME": home}
        register_shipped(env)
        with Server(Path(home), model_control="on") as server:
            script = "from core.store import register, shipped_file; print(register(shipped_file('resnet18')))"
            tag = subprocess.run([sys.executable, "-c", script], env=env, cwd=ROOT, check=True, capture_output=True)
            version = tag.stdout.decode().strip().partition(":")[2]  # registered after the start: not served
            run_load(f"{server.url}/classify", *body, 32, 320)  # warm-up
            for _ in range(args.rounds):
                for name, sample in SAMPLES.items():
                    shadow(server.url, version, sample)
                    before = skipped(server.url)
                    load = run_load(f"{server.url}/classify", *body, 32, args.requests)
                    runs[name].append({**load, "skipped": skipped(server.url) - before})
    baseline = statistics.median(r["p99_ms"] for r in runs["no shadow"])
    rows = []
    for name, results in runs.items():
        p99 = statistics.median(r["p99_ms"] for r in results)
        rows.append(
            {
                "live": name,
                "p50 ms": statistics.median(r["p50_ms"] for r in results),
                "p99 ms": p99,
                "p99 / no shadow": p99 / baseline,
                "images/s": statistics.median(r["images_per_s"] for r in results),
                "non-200": sum(sum(r["errors"].values()) for r in results),
                "shadow skipped": sum(r["skipped"] for r in results),
            }
        )
    info = machine()
    print(machine_line(info))
    print(table(rows, list(rows[0])))
    write_json("shadow.json", {"rows": rows, "rounds": args.rounds}, info)


if __name__ == "__main__":
    main()
