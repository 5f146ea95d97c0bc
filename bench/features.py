"""What the access log and the Open Inference Protocol cost, side by side in one run.

    python -m bench.features [--rounds 3] [--only access|v2]

Access log: LeNet `/classify` at 32 clients on a server with CIFAR10_ACCESS_LOG=json (the default) and one
with it off, alternating. v2: on one server, LeNet one image at 32 clients as `/classify` (multipart) and as
`/v2/models/lenet/infer` (JSON, base64), and 64 ResNet-18 images at 4 clients as `/classify_batch` and as v2
with the binary tensor extension. Medians of the rounds; the machine line heads the tables.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import statistics
import struct
import tempfile
from pathlib import Path

from bench.hey import multipart, run_load
from bench.report import machine, machine_line, table, write_json
from harness.samples import cifar_samples
from harness.server import Server, register_shipped

LENET_REQUESTS = 6000
BATCH_REQUESTS = 60


def v2_json(image: bytes) -> bytes:
    tensor = {"name": "image", "shape": [1], "datatype": "BYTES", "data": [base64.b64encode(image).decode()]}
    return json.dumps({"inputs": [tensor], "outputs": [{"name": "labels"}], "parameters": {"top_k": 3}}).encode()


def v2_binary(images: list[bytes]) -> tuple[bytes, int]:
    """A binary-extension infer request for `images` (a BYTES tensor) and its JSON header's length."""
    data = b"".join(struct.pack("<I", len(i)) + i for i in images)
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "image",
                    "shape": [len(images)],
                    "datatype": "BYTES",
                    "parameters": {"binary_data_size": len(data)},
                }
            ],
            "outputs": [{"name": "labels"}],
            "parameters": {"top_k": 3},
        }
    ).encode()
    return header + data, len(header)


def median_row(name: str, runs: list[dict], key: str) -> dict:
    return {
        "load": name,
        "median": statistics.median(r[key] for r in runs),
        "runs": ", ".join(f"{r[key]:,.0f}" for r in runs),
        "p99_ms": statistics.median(r["p99_ms"] for r in runs),
        "errors": sum(sum(r["errors"].values()) for r in runs),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--only", choices=("access", "v2"), help="measure one of the two")
    args = parser.parse_args()
    info = machine()
    samples = cifar_samples(7)
    image = samples[3][1]
    lenet = multipart([("image", "x.jpg", image), ("model", "", b"lenet")])
    batch = [d for _, d in samples[:64]]
    batch_form = multipart([*[("images", f"{i}.jpg", d) for i, d in enumerate(batch)], ("model", "", b"resnet18")])
    binary, header_length = v2_binary(batch)
    runs: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory() as home:
        register_shipped({**os.environ, "BENTOML_HOME": home})
        for _ in range(args.rounds):
            for form in ("json", "off") if args.only != "v2" else ():
                with Server(Path(home), access_log=form) as server:
                    runs.setdefault(f"lenet /classify c=32, access log {form}", []).append(
                        run_load(f"{server.url}/classify", *lenet, 32, LENET_REQUESTS)
                    )
            if args.only == "access":
                continue
            with Server(Path(home)) as server:
                loads = {
                    "lenet /classify c=32": (f"{server.url}/classify", *lenet, 32, LENET_REQUESTS, 1, None),
                    "lenet v2 infer (JSON) c=32": (
                        f"{server.url}/v2/models/lenet/infer",
                        v2_json(image),
                        "application/json",
                        32,
                        LENET_REQUESTS,
                        1,
                        None,
                    ),
                    "resnet18 /classify_batch x64 c=4": (
                        f"{server.url}/classify_batch",
                        *batch_form,
                        4,
                        BATCH_REQUESTS,
                        64,
                        None,
                    ),
                    "resnet18 v2 infer (binary) x64 c=4": (
                        f"{server.url}/v2/models/resnet18/infer",
                        binary,
                        "application/octet-stream",
                        4,
                        BATCH_REQUESTS,
                        64,
                        {"Inference-Header-Content-Length": str(header_length)},
                    ),
                }
                for name, (url, body, kind, clients, count, images, headers) in loads.items():
                    runs.setdefault(name, []).append(
                        run_load(url, body, kind, clients, count, images_per_request=images, headers=headers)
                    )
    rows = [median_row(name, r, "images_per_s") for name, r in runs.items()]
    print(machine_line(info))
    print(table(rows, ["load", "median", "runs", "p99_ms", "errors"]))
    median = {row["load"]: row["median"] for row in rows}
    ratios = {
        "access log json / off": ("lenet /classify c=32, access log json", "lenet /classify c=32, access log off"),
        "v2 JSON / classify": ("lenet v2 infer (JSON) c=32", "lenet /classify c=32"),
        "v2 binary / classify_batch": ("resnet18 v2 infer (binary) x64 c=4", "resnet18 /classify_batch x64 c=4"),
    }
    print("; ".join(f"{name}: {median[a] / median[b]:.3f}" for name, (a, b) in ratios.items() if a in median))
    write_json("features.json", {"runs": runs, "medians": rows}, info)


if __name__ == "__main__":
    main()
