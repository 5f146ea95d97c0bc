"""The GPU section of BENCHMARKS.md and bench/results/gpu-summary.json, measured on a CUDA host.

    python -m bench.run               # on a CUDA host: the CPU tables, then this section
    python -m bench.run --gpu-quick   # this section alone, in under 5 minutes
    python -m bench.gpu --dry-run     # the same steps on a CPU host, to check the script (writes nothing)

Raw ONNX Runtime on the GPU per batch size for both models; the service with its defaults under
`/classify` at 1, 64 and 256 clients for both models and `/classify_batch` x64; `cifar10 predict`
on the 10,000 test images; GPU memory per worker (nvidia-smi); errors. The load generator is hey.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import tempfile
import zipfile
from pathlib import Path

import httpx
import psutil

from bench import runtime
from bench.command import timed
from bench.hey import multipart, run_load
from bench.report import RESULTS, ROOT, machine, table
from harness.samples import TEST_ZIP, cifar_samples
from harness.server import Server, register_shipped

BENCHMARKS = ROOT / "BENCHMARKS.md"
START, END = "<!-- gpu section: written by python -m bench.gpu -->", "<!-- end of gpu section -->"
RAW_BATCHES = (1, 8, 64, 256, 1024)
# Issue 47's targets on one H100 or H200 with 16 cores.
TARGETS = {
    "resnet18 /classify c=64 req/s": 3000,
    "resnet18 /classify c=256 req/s": 10000,
    "lenet /classify c=64 req/s": 5000,
    "resnet18 /classify_batch x64 images/s": 40000,
    "predict resnet18 images/s": 5000,
}
P50_TARGET_MS = 1.5  # ResNet-18 /classify, 1 client


def gpu_memory_mb(server: Server) -> dict[int, float]:
    """GPU memory of each of the server's processes, from nvidia-smi (empty without one)."""
    pids = {p.pid for p in [psutil.Process(server.process.pid), *psutil.Process(server.process.pid).children(True)]}
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=30,
        ).stdout
    except OSError:
        return {}
    rows = (line.split(",") for line in out.strip().splitlines() if line.strip())
    return {int(pid): float(mb) for pid, mb in rows if int(pid) in pids}


def gpu_versions() -> dict[str, str]:
    """The NVIDIA driver (nvidia-smi), and the CUDA and cuDNN that the host's PyTorch carries (what ONNX Runtime
    loads through preload_dlls); empty where there are none."""
    versions = {}
    try:
        versions["driver"] = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True, text=True
        ).stdout.strip()
        import torch  # the bench only: the serving path never imports it

        versions.update(cuda=str(torch.version.cuda), cudnn=str(torch.backends.cudnn.version()))
    except (OSError, ImportError):
        pass
    return versions


def run(quick: bool, dry_run: bool = False) -> dict:
    info = {**machine(), **gpu_versions()}
    print(json.dumps(info), flush=True)
    providers = "cpu" if dry_run else "cuda"
    raw = runtime.run(
        archs=("resnet18", "lenet"),
        threads=(psutil.cpu_count() or 1,),
        providers=providers,
        seconds=0.5 if quick else 2.0,
        batch_sizes=RAW_BATCHES[:3] if dry_run else RAW_BATCHES,
    )
    _, image = cifar_samples(1)[3]
    loads, scale = [], 8 if quick else 1
    with tempfile.TemporaryDirectory() as home:
        register_shipped({**os.environ, "BENTOML_HOME": home})
        with Server(Path(home), providers=providers) as server:
            described = httpx.get(f"{server.url}/models").json()
            for arch, clients in [(a, c) for a in ("resnet18", "lenet") for c in (1, 64, 256)]:
                body = multipart([("image", "x.jpg", image), ("model", "", arch.encode())])
                count = max(clients * 20, 4000 if clients > 1 else 500) // scale
                loads.append(
                    {
                        "endpoint": "/classify",
                        "model": arch,
                        **run_load(f"{server.url}/classify", *body, clients, count),
                    }
                )
                print(f"gpu load {arch} c={clients}: {loads[-1]['requests_per_s']:,.0f} req/s", flush=True)
            batch = multipart(
                [
                    *[("images", f"{i}.jpg", d) for i, (_, d) in enumerate(cifar_samples(7)[:64])],
                    ("model", "", b"resnet18"),
                ]
            )
            loads.append(
                {
                    "endpoint": "/classify_batch x64",
                    "model": "resnet18",
                    **run_load(f"{server.url}/classify_batch", *batch, 8, 800 // scale, images_per_request=64),
                }
            )
            memory = gpu_memory_mb(server)
    predict = {}
    if TEST_ZIP.exists():
        with tempfile.TemporaryDirectory() as folder, zipfile.ZipFile(TEST_ZIP) as archive:
            archive.extractall(folder, members=[n for n in archive.namelist() if n.endswith(".jpg")])
            images = sum(1 for _ in Path(folder).rglob("*.jpg"))
            predict = {
                arch: images
                / timed(["predict", folder, "--recursive", "--model", arch, "--precision", "fp32", "--quiet"])[0]
                for arch in ("resnet18", "lenet")
            }
    figures = {
        "resnet18 /classify c=64 req/s": _find(loads, "resnet18", 64)["requests_per_s"],
        "resnet18 /classify c=256 req/s": _find(loads, "resnet18", 256)["requests_per_s"],
        "lenet /classify c=64 req/s": _find(loads, "lenet", 64)["requests_per_s"],
        "resnet18 /classify_batch x64 images/s": loads[-1]["images_per_s"],
        "predict resnet18 images/s": predict.get("resnet18", 0.0),
    }
    summary = {
        "machine": info,
        "provider": described["models"]["resnet18"]["provider"],
        "workers": described["workers"],
        "bucket_sizes": described["batching"]["bucket_sizes"],
        "raw": raw,
        "loads": loads,
        "predict_images_per_s": predict,
        "gpu_memory_mb_per_process": memory,
        "errors": sum(sum(load["errors"].values()) for load in loads),
        "resnet18 c=1 p50 ms": _find(loads, "resnet18", 1)["p50_ms"],
        "targets": {k: {"measured": figures[k], "target": v, "met": figures[k] >= v} for k, v in TARGETS.items()},
    }
    if dry_run:
        print(json.dumps(summary["targets"], indent=2))
        return summary
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "gpu-summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    write_section(summary, quick)
    return summary


def _find(loads: list[dict], model: str, clients: int) -> dict:
    return next(
        r for r in loads if r["model"] == model and r["endpoint"] == "/classify" and r["concurrency"] == clients
    )


def write_section(summary: dict, quick: bool) -> None:
    """Replace the GPU section of BENCHMARKS.md (between its markers) with this run's tables."""
    targets = [
        {"target": k, "measured": v["measured"], "needed": v["target"], "met": "met" if v["met"] else "MISSED"}
        for k, v in summary["targets"].items()
    ]
    m = summary["machine"]
    section = "\n\n".join(
        [
            START,
            f"## GPU ({'quick run' if quick else 'full run'}: {summary['machine']['gpu'].split(' (UUID')[0]}, "
            f"{summary['machine']['cores']} cores, {summary['workers']} workers, buckets "
            f"{summary['bucket_sizes']})",
            f"Driver {m.get('driver', '?')}, CUDA {m.get('cuda', '?')}, cuDNN {m.get('cudnn', '?')}, ONNX Runtime "
            f"{m['onnxruntime']}; CPU: {m['cpu']}.",
            table(targets, ["target", "measured", "needed", "met"]),
            f"ResNet-18 1 client p50: {summary['resnet18 c=1 p50 ms']:.2f} ms (target {P50_TARGET_MS} ms); "
            f"errors: {summary['errors']}; GPU memory per process (MB): "
            f"{json.dumps(summary['gpu_memory_mb_per_process'])}",
            "Raw ONNX Runtime (CUDA provider):\n\n"
            + table(summary["raw"], ["model", "batch", "images_per_s", "p50_ms"]),
            "The service:\n\n"
            + table(
                summary["loads"],
                [
                    "model",
                    "endpoint",
                    "concurrency",
                    "requests",
                    "errors",
                    "requests_per_s",
                    "images_per_s",
                    "p50_ms",
                    "p99_ms",
                ],
            ),
            END,
        ]
    )
    text = BENCHMARKS.read_text()
    if START in text:
        text = text[: text.index(START)] + section + text[text.index(END) + len(END) :]
    else:
        text = text.rstrip() + "\n\n" + section + "\n"
    BENCHMARKS.write_text(text)
    print(f"wrote the GPU section of {BENCHMARKS} and {RESULTS / 'gpu-summary.json'}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer requests: under 5 minutes")
    parser.add_argument("--dry-run", action="store_true", help="on the CPU, to check the script; writes nothing")
    args = parser.parse_args()
    run(args.quick, args.dry_run)


if __name__ == "__main__":
    main()
