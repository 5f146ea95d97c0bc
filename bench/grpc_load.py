"""gRPC against REST on one server, side by side: images/s at batch 1 and 64 with 32 concurrent clients.

    python -m bench.grpc_load [--model lenet] [--rounds 3]   # writes bench/results/grpc-MODEL.json

perf_analyzer does not run here (it comes with Triton's C++ client SDK, not pip). The load generators are compiled
closed loops, so that the client is not what is measured: h2load (nghttp2-client: `apt-get install
nghttp2-client`) for gRPC, 32 connections of one call each, a pre-serialized ModelInferRequest in gRPC's framing;
hey for REST (/classify, /classify_batch, the v2 route with binary tensor data). h2load sees HTTP statuses only, so
the gRPC calls answered OK are counted from the server's own metrics. Beside each rate: the server's CPU time per
image (all its processes), what a transport costs on a host whose cores the server fills. Every round runs every
load, one after the other.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import struct
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path

import httpx
import psutil
from tritonclient.grpc import service_pb2

from bench.hey import multipart, run_load
from bench.report import machine, machine_line, table, write_json
from harness.samples import cifar_samples
from harness.server import Server, register_shipped

INFER = "/inference.GRPCInferenceService/ModelInfer"
CLIENTS = 32


def grpc_request(model: str, images: list[bytes]) -> bytes:
    request = service_pb2.ModelInferRequest(model_name=model)
    request.inputs.add(name="image", datatype="BYTES", shape=[len(images)])
    request.raw_input_contents.append(b"".join(struct.pack("<I", len(i)) + i for i in images))
    return request.SerializeToString()


def v2_binary(images: list[bytes]) -> tuple[bytes, dict[str, str]]:
    """A REST v2 infer body with the images as binary tensor data, and its headers."""
    data = b"".join(struct.pack("<I", len(i)) + i for i in images)
    head = json.dumps(
        {
            "inputs": [
                {
                    "name": "image",
                    "datatype": "BYTES",
                    "shape": [len(images)],
                    "parameters": {"binary_data_size": len(data)},
                }
            ]
        }
    ).encode()
    return head + data, {"Inference-Header-Content-Length": str(len(head))}


def h2load_grpc(server: Server, message: bytes, clients: int, requests: int, images: int) -> dict:
    """One closed-loop gRPC run by h2load; ok from the server's count of OK ModelInfer calls."""
    ok_before = infer_ok(server)
    with tempfile.NamedTemporaryFile() as framed:
        framed.write(b"\x00" + struct.pack(">I", len(message)) + message)  # uncompressed, its length, the message
        framed.flush()
        result = subprocess.run(
            ["h2load", "-n", str(requests), "-c", str(clients), "-m", "1", "-d", framed.name]
            + ["-H", "content-type: application/grpc", "-H", "te: trailers", f"http://{server.grpc_url}{INFER}"],
            capture_output=True,
            text=True,
            timeout=300,
            check=True,
        )
    finished = re.search(r"finished in ([\d.]+)(ms|s),", result.stdout)
    seconds = float(finished[1]) / (1000 if finished[2] == "ms" else 1)
    ok = infer_ok(server) - ok_before
    return {"requests": requests, "ok": ok, "images_per_s": ok * images / seconds}


def infer_ok(server: Server) -> int:
    metrics = httpx.get(f"{server.url}/metrics").text
    found = re.search(rf'cifar10_http_requests_total{{endpoint="{INFER}",status="200"}} ([\d.e+]+)', metrics)
    return int(float(found[1])) if found else 0


def server_cpu_s(server: Server) -> float:
    tree = psutil.Process(server.process.pid)
    return sum(sum(p.cpu_times()[:2]) for p in [tree, *tree.children(recursive=True)])


def measured(server: Server, load: Callable[[], dict]) -> dict:
    """A load's images/s and the server's CPU microseconds per image it answered."""
    before = server_cpu_s(server)
    result = load()
    images = result["images_per_s"]
    spent = server_cpu_s(server) - before
    answered = result["ok"] * result.get("per_request", 1)
    return {"images_per_s": images, "server_cpu_us_per_image": spent / max(answered, 1) * 1e6}


def round_of(server: Server, model: str, one: list[bytes], batch: list[bytes], requests: int) -> dict[str, dict]:
    """Every load, once."""
    url = f"{server.url}/v2/models/{model}/infer"
    (single, single_headers), (batched, batched_headers) = v2_binary(one), v2_binary(batch)
    octets = "application/octet-stream"
    form = multipart([("image", "x.jpg", one[0]), ("model", "", model.encode())])
    batch_form = multipart([*[("images", f"{i}.jpg", d) for i, d in enumerate(batch)], ("model", "", model.encode())])
    few = max(CLIENTS, requests // 16)

    def hey(*args, **kwargs) -> Callable[[], dict]:
        def load() -> dict:
            result = run_load(*args, **kwargs)
            return {**result, "per_request": kwargs.get("images_per_request", 1)}

        return load

    loads = {
        "batch 1: /classify (hey)": hey(f"{server.url}/classify", *form, CLIENTS, requests),
        "batch 1: v2 REST binary (hey)": hey(url, single, octets, CLIENTS, requests, headers=single_headers),
        "batch 1: gRPC (h2load)": lambda: h2load_grpc(server, grpc_request(model, one), CLIENTS, requests, 1),
        "batch 64: /classify_batch (hey)": hey(
            f"{server.url}/classify_batch", *batch_form, CLIENTS, few, images_per_request=64
        ),
        "batch 64: v2 REST binary (hey)": hey(
            url, batched, octets, CLIENTS, few, images_per_request=64, headers=batched_headers
        ),
        "batch 64: gRPC (h2load)": lambda: {
            **h2load_grpc(server, grpc_request(model, batch), CLIENTS, few, 64),
            "per_request": 64,
        },
    }
    return {name: measured(server, load) for name, load in loads.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="lenet")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--requests", type=int, default=3200, help="batch-1 calls per load (batch 64: 1/16)")
    args = parser.parse_args()
    samples = [data for _, data in cifar_samples(64)[:64]]
    rounds = []
    with tempfile.TemporaryDirectory() as home:
        register_shipped({**os.environ, "BENTOML_HOME": home})
        with Server(Path(home)) as server:
            for number in range(args.rounds):
                rounds.append(round_of(server, args.model, samples[:1], samples, args.requests))
                said = {k: round(v["images_per_s"]) for k, v in rounds[-1].items()}
                print(f"round {number + 1}: " + json.dumps(said), flush=True)
    info = machine()
    rows = [
        {
            "load": load,
            "images_per_s": statistics.median(r[load]["images_per_s"] for r in rounds),
            "server_cpu_us_per_image": statistics.median(r[load]["server_cpu_us_per_image"] for r in rounds),
        }
        for load in rounds[0]
    ]
    median = {row["load"]: row["images_per_s"] for row in rows}
    ratios = {
        "gRPC / v2 REST binary, batch 64": median["batch 64: gRPC (h2load)"] / median["batch 64: v2 REST binary (hey)"],
        "gRPC / /classify_batch, batch 64": median["batch 64: gRPC (h2load)"]
        / median["batch 64: /classify_batch (hey)"],
        "gRPC / /classify, batch 1": median["batch 1: gRPC (h2load)"] / median["batch 1: /classify (hey)"],
    }
    print(machine_line(info))
    print(f"{args.model}, {CLIENTS} clients, median of {args.rounds} rounds:\n")
    print(table(rows, ["load", "images_per_s", "server_cpu_us_per_image"]))
    print("\n" + "\n".join(f"{name}: {ratio:.2f}" for name, ratio in ratios.items()))
    write_json(f"grpc-{args.model}.json", {"model": args.model, "rounds": rounds, "ratios": ratios}, info)


if __name__ == "__main__":
    main()
