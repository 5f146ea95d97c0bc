"""What the GPU defaults rest on, measured in one run on a CUDA host: cuDNN's HEURISTIC against EXHAUSTIVE search,
CUDA graphs, and the worker count.

    python -m bench.gpu_choices             # writes bench/results/gpu-choices.json
    python -m bench.gpu_choices --dry-run   # the same steps on the CPU, to check the script (writes nothing)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from bench.hey import multipart, run_load
from bench.report import machine, write_json
from core.runtime import CPU, CUDA, choose_providers
from core.store import shipped_file
from harness.samples import cifar_samples
from harness.server import Server, register_shipped

BATCHES = (1, 8, 64, 256)


def session(options: dict[str, str], dry_run: bool) -> ort.InferenceSession:
    choose_providers("cpu" if dry_run else "cuda")  # loads the pip CUDA libraries, as the service does
    providers = [CPU] if dry_run else [(CUDA, options), CPU]
    return ort.InferenceSession(str(shipped_file("resnet18")), providers=providers)


def images_per_s(run, batch: int, seconds: float = 0.5) -> float:
    """Median rate of three windows of back-to-back calls."""
    rates = []
    for _ in range(3):
        calls, began = 0, time.perf_counter()
        while time.perf_counter() - began < seconds / 3:
            run()
            calls += 1
        rates.append(calls * batch / (time.perf_counter() - began))
    return statistics.median(rates)


def cudnn_search(search: str, dry_run: bool) -> list[dict]:
    """The first call of each new batch size (what cuDNN's search costs) and the steady rate after it."""
    model = session({"cudnn_conv_algo_search": search}, dry_run)
    name, rows = model.get_inputs()[0].name, []
    for batch in BATCHES:
        x = np.random.default_rng(0).standard_normal((batch, 3, 32, 32)).astype(np.float32)
        began = time.perf_counter()
        model.run(None, {name: x})
        first_ms = (time.perf_counter() - began) * 1000
        rate = images_per_s(lambda x=x: model.run(None, {name: x}), batch)
        rows.append({"search": search, "batch": batch, "first_call_ms": first_ms, "images_per_s": rate})
        print(f"cudnn {search} batch {batch}: first call {first_ms:.1f} ms, then {rate:,.0f} images/s", flush=True)
    return rows


def cuda_graph(batch: int, dry_run: bool) -> dict:
    """Images/s of a captured CUDA graph (fixed shapes, inputs and outputs bound on the GPU, copied in and out
    each call, as a server would) against plain calls."""
    plain = session({"cudnn_conv_algo_search": "HEURISTIC"}, dry_run)
    name = plain.get_inputs()[0].name
    x = np.random.default_rng(0).standard_normal((batch, 3, 32, 32)).astype(np.float32)
    row = {"batch": batch, "plain_images_per_s": images_per_s(lambda: plain.run(None, {name: x}), batch)}
    if dry_run:
        return row
    try:
        graph = session({"cudnn_conv_algo_search": "HEURISTIC", "enable_cuda_graph": "1"}, dry_run)
        given = ort.OrtValue.ortvalue_from_numpy(x, "cuda", 0)
        binding = graph.io_binding()
        binding.bind_ortvalue_input(name, given)
        outputs = []
        for output in graph.get_outputs():
            value = ort.OrtValue.ortvalue_from_shape_and_type([batch, *output.shape[1:]], np.float32, "cuda", 0)
            binding.bind_ortvalue_output(output.name, value)
            outputs.append(value)

        def call() -> None:
            given.update_inplace(x)
            graph.run_with_iobinding(binding)
            [value.numpy() for value in outputs]

        call()  # captures the graph
        row["graph_images_per_s"] = images_per_s(call, batch)
    except Exception as exc:  # ONNX Runtime refuses a graph with nodes outside the CUDA provider: say why
        row["graph_error"] = str(exc).splitlines()[0][:300]
    print(f"cuda graph batch {batch}: {row}", flush=True)
    return row


def workers(counts: list[int], dry_run: bool, requests: int) -> list[dict]:
    """ResNet-18 /classify at 64 and 256 clients under each worker count, one server after another."""
    _, image = cifar_samples(1)[3]
    body = multipart([("image", "x.jpg", image), ("model", "", b"resnet18")])
    rows = []
    with tempfile.TemporaryDirectory() as home:
        register_shipped({**os.environ, "BENTOML_HOME": home})
        for count in counts:
            with Server(Path(home), providers="cpu" if dry_run else "cuda", workers=str(count)) as server:
                for clients in (64, 256):
                    load = run_load(f"{server.url}/classify", *body, clients, requests)
                    rows.append({"workers": count, **load})
                    print(f"workers {count} c={clients}: {load['requests_per_s']:,.0f} req/s", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, nargs="*", default=[4, 8], help="worker counts to compare")
    parser.add_argument("--requests", type=int, default=4000, help="per load")
    parser.add_argument("--dry-run", action="store_true", help="on the CPU, to check the script; writes nothing")
    args = parser.parse_args()
    result = {
        "cudnn": [row for search in ("HEURISTIC", "EXHAUSTIVE") for row in cudnn_search(search, args.dry_run)],
        "cuda_graph": [cuda_graph(batch, args.dry_run) for batch in (64, 256)],
        "workers": workers(args.workers, args.dry_run, args.requests),
    }
    if args.dry_run:
        print(json.dumps(result)[:2000])
        return
    write_json("gpu-choices.json", result, machine())


if __name__ == "__main__":
    main()
