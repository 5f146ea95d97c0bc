"""`make bench`: raw ONNX Runtime, the HTTP service under load, and `cifar10 predict`, in one run.

Writes CSVs under bench/results/ and prints Markdown tables for BENCHMARKS.md. Every load run
is bounded in count and time and targets only a server this script starts on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import zipfile
from pathlib import Path

import httpx

from bench import ceiling, gpu, runtime
from bench.command import timed
from bench.hey import multipart, run_load, target_loads
from bench.report import machine, machine_line, table, write_csv, write_json
from core.host import gpu_count, usable_cores
from core.runtime import OnnxModel
from core.store import shipped_file
from harness.samples import TEST_ZIP, cifar_samples
from harness.server import Server, register_shipped, stop_server

CONCURRENCY = (1, 8, 32, 64)
WORKERS = usable_cores()  # the service's default on a CPU host; the reference endpoints get as many


def requests_for(arch: str, concurrency: int, quick: bool) -> int:
    per_client = 20 if arch == "resnet18" else 150
    total = max(concurrency * per_client, 200 if arch == "resnet18" else 1500)
    return max(concurrency, total // (4 if quick else 1))


def load_runs(server: Server, raw: list[dict], quick: bool, label: str = "") -> list[dict]:
    """/classify for both models at each concurrency and /classify_batch x64; ResNet-18's images/s also as a
    ratio to the raw fp32 and int8 ceilings."""
    _, image = cifar_samples(1)[3]
    served = httpx.get(f"{server.url}/models").json()["models"]
    rows = []
    for arch in ("resnet18", "lenet"):
        body, ctype = multipart([("image", "x.jpg", image), ("model", "", arch.encode())])
        raw_name = arch if served[arch]["precision"] == "fp32" else f"{arch}-{served[arch]['precision']}"
        ceiling = runtime.best(raw, raw_name)
        batch1 = next(
            r for r in raw if r["model"] == raw_name and r["batch"] == 1 and r["threads"] == ceiling["threads"]
        )
        for c in CONCURRENCY:
            row = {
                "model": arch,
                "precision": served[arch]["precision"],
                "endpoint": "/classify",
                "server": label,
                **run_load(f"{server.url}/classify", body, ctype, c, requests_for(arch, c, quick)),
            }
            row["ratio_to_raw_best"] = row["images_per_s"] / ceiling["images_per_s"]
            row["ratio_to_raw_fp32_best"] = row["images_per_s"] / runtime.best(raw, arch)["images_per_s"]
            row["raw_batch1_p50_ms"] = batch1["p50_ms"]
            rows.append(row)
            print(
                f"load {arch:<8} {row['precision']} c={c:<3} {row['requests_per_s']:>8,.0f} req/s  "
                f"p50 {row['p50_ms']:.1f} ms  p99 {row['p99_ms']:.1f} ms  errors {row['errors']}",
                flush=True,
            )
    images = [("images", f"{i}.jpg", data) for i, (_, data) in enumerate(cifar_samples(7)[:64])]
    body, ctype = multipart([*images, ("model", "", b"lenet")])
    for c in (2, 8):
        row = {
            "model": "lenet",
            "precision": served["lenet"]["precision"],
            "endpoint": "/classify_batch x64",
            "server": label,
            **run_load(f"{server.url}/classify_batch", body, ctype, c, 40 if quick else 150, images_per_request=64),
        }
        row["ratio_to_raw_best"] = row["ratio_to_raw_fp32_best"] = (
            row["images_per_s"] / runtime.best(raw, "lenet")["images_per_s"]
        )
        row["raw_batch1_p50_ms"] = None
        rows.append(row)
        print(f"load lenet batch64 c={c}: {row['images_per_s']:,.0f} images/s errors {row['errors']}", flush=True)
    return rows


def batching_runs(home: Path, quick: bool) -> list[dict]:
    _, image = cifar_samples(1)[3]
    body, ctype = multipart([("image", "x.jpg", image), ("model", "", b"resnet18")])
    rows = []
    for size, latency in ((1, 5000), (8, 5000), (32, 5000), (64, 5000), (64, 200)):
        with Server(home, max_batch_size=str(size), max_latency_ms=str(latency)) as server:
            row = {
                "max_batch_size": size,
                "max_latency_ms": latency,
                **run_load(f"{server.url}/classify", body, ctype, 32, 200 if quick else 600),
            }
        rows.append(row)
        print(
            f"batching size={size} latency={latency}: {row['requests_per_s']:,.0f} req/s p99 "
            f"{row['p99_ms']:.0f} ms errors {row['errors']}",
            flush=True,
        )
    return rows


def worker_runs(home: Path, quick: bool) -> list[dict]:
    """1 worker against one worker per core (sharing the cores: service/inference/cores.py)."""
    _, image = cifar_samples(1)[3]
    rows = []
    for workers in (1, os.cpu_count() or 1):
        with Server(home, workers=str(workers)) as server:
            for arch, c, n in (("resnet18", 1, 200), ("resnet18", 32, 640), ("lenet", 32, 4000)):
                body, ctype = multipart([("image", "x.jpg", image), ("model", "", arch.encode())])
                row = {
                    "workers": workers,
                    "model": arch,
                    **run_load(f"{server.url}/classify", body, ctype, c, n // (4 if quick else 1)),
                }
                rows.append(row)
                print(
                    f"workers={workers} {arch} c={c}: {row['requests_per_s']:,.0f} req/s p50 {row['p50_ms']:.1f} ms",
                    flush=True,
                )
    return rows


def ceiling_runs(home: Path, quick: bool) -> list[dict]:
    """The reference endpoints (bench/ceiling.py) and the service, each at 32 clients with one CIFAR-10 JPEG per
    request, two workers everywhere: requests/s, latency and the server's CPU time per request."""
    _, image = cifar_samples(1)[3]
    requests = 2000 if quick else 8000
    rows = []
    for name in ("body", "multipart", "naive"):
        process, url = ceiling.serve(name, WORKERS)
        try:
            rows.append({"endpoint": f"reference: {name}", **cpu_load(process, url, image, "lenet", requests)})
        finally:
            stop_server(process)
    with Server(home) as server:
        for model, form in (
            ("lenet", "multipart"),
            ("lenet", "raw body"),
            ("resnet18", "multipart"),
            ("resnet18", "raw body"),
        ):
            count = requests if model == "lenet" else requests // 8
            rows.append(
                {
                    "endpoint": f"service: {model} /classify, {form}",
                    **cpu_load(server.process, f"{server.url}/classify", image, model, count, form == "raw body"),
                }
            )
    naive = next(r for r in rows if r["endpoint"] == "reference: naive")["requests_per_s"]
    for row in rows:
        row["ratio_to_naive"] = row["requests_per_s"] / naive
        print(
            f"ceiling {row['endpoint']:<36} {row['requests_per_s']:>8,.0f} req/s  CPU {row['cpu_us_per_request']:,.0f} "
            f"us/request",
            flush=True,
        )
    return rows


def cpu_load(process, url: str, image: bytes, model: str, requests: int, raw: bool = False) -> dict:
    """A 32-client load on `url` with the server's CPU seconds per request (its whole process tree)."""
    if raw:
        body, ctype, url = image, "image/jpeg", f"{url}?model={model}"
    else:
        body, ctype = multipart([("image", "x.jpg", image), ("model", "", model.encode())])
    run_load(url, body, ctype, 32, max(200, requests // 10))  # warm
    before = ceiling.cpu_seconds(process)
    load = run_load(url, body, ctype, 32, requests)
    return {
        **{k: load[k] for k in ("requests_per_s", "p50_ms", "p99_ms", "errors")},
        "cpu_us_per_request": (ceiling.cpu_seconds(process) - before) / load["requests"] * 1e6,
    }


def target_runs(home: Path, quick: bool, repeats: int = 3) -> list[dict]:
    """Issue 27's targets, each round measured side by side on fresh servers: the naive endpoint against the
    service's LeNet, raw int8 ResNet-18 at batch 64 against the service at 32 clients, and the raw batch-1
    latency of each model against the service's with 1 client."""
    _, image = cifar_samples(1)[3]
    int8, lenet = OnnxModel(shipped_file("resnet18-int8")), OnnxModel(shipped_file("lenet"))
    seconds = 2.0 if quick else 4.0
    runs = []
    for _ in range(repeats):
        raw = {b: runtime.measure(int8, b, seconds) for b in (1, 64)}
        raw_lenet = runtime.measure(lenet, 1, seconds)
        process, url = ceiling.serve("naive", WORKERS)
        try:
            naive = cpu_load(process, url, image, "lenet", 1500 if quick else 6000)
        finally:
            stop_server(process)
        with Server(home) as server:
            loads = target_loads(server.url, quick)
        runs.append(
            {
                "lenet /classify c=32 / naive endpoint (>= 1.5)": loads["lenet c=32"]["requests_per_s"]
                / naive["requests_per_s"],
                "resnet18 int8 /classify c=32 / raw int8 batch 64 (>= 0.9)": loads["resnet18 c=32"]["images_per_s"]
                / raw[64]["images_per_s"],
                "resnet18 c=1 p50 minus raw int8 batch-1 p50, ms (<= 1)": loads["resnet18 c=1"]["p50_ms"]
                - raw[1]["p50_ms"],
                "lenet c=1 p50 minus raw batch-1 p50, ms (<= 1)": loads["lenet c=1"]["p50_ms"] - raw_lenet["p50_ms"],
                "lenet /classify_batch x64 c=8 images/s": loads["lenet batch64 c=8"]["images_per_s"],
                "errors": sum(sum(load["errors"].values()) for load in loads.values()),
            }
        )
        print(f"targets run {len(runs)}: " + json.dumps(runs[-1]), flush=True)
    return runs


def target_summary(runs: list[dict]) -> list[dict]:
    return [
        {
            "measure": measure,
            "median": statistics.median(r[measure] for r in runs),
            "runs": ", ".join(f"{r[measure]:,.2f}" for r in runs),
        }
        for measure in runs[0]
    ]


def memory_run(server: Server, quick: bool) -> dict:
    _, image = cifar_samples(1)[0]
    body, ctype = multipart([("image", "x.jpg", image), ("model", "", b"lenet")])
    first, more = 1000, 2000 if quick else 9000
    run_load(f"{server.url}/classify", body, ctype, 32, first)
    before = server.rss_mb()
    run_load(f"{server.url}/classify", body, ctype, 32, more)
    after = server.rss_mb()
    print(f"memory: {before:.0f} MB after {first:,} requests, {after:.0f} MB after {first + more:,}", flush=True)
    return {"requests": [first, first + more], "rss_mb": [before, after], "growth": after / before - 1}


def predict_runs(raw: list[dict], quick: bool) -> list[dict]:
    if not TEST_ZIP.exists():
        print(f"predict benchmark skipped: {TEST_ZIP} is not here", flush=True)
        return []
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        with zipfile.ZipFile(TEST_ZIP) as archive:
            names = [n for n in archive.namelist() if n.endswith(".jpg")][: 2000 if quick else None]
            archive.extractall(folder, members=names)
        for arch, repeats in (("resnet18", 1), ("lenet", 3)):  # resnet18: int8 on a CPU host, as served
            out = Path(folder + "-out") / f"{arch}.csv"
            out.parent.mkdir(exist_ok=True)
            times = []
            for _ in range(repeats):  # wall clock of the whole command, start-up included
                args = ["predict", folder, "--recursive", "--model", arch, "--batch-size", "64", "--out", str(out)]
                times.append(timed([*args, "--quiet", "--force"])[0])
            seconds = statistics.median(times)
            raw64 = max((r for r in raw if r["model"] == arch and r["batch"] == 64), key=lambda r: r["images_per_s"])
            rows.append(
                {
                    "model": arch,
                    "images": len(names),
                    "seconds": seconds,
                    "images_per_s": len(names) / seconds,
                    "raw_fp32_batch64_images_per_s": raw64["images_per_s"],
                    "ratio_to_raw_fp32": len(names) / seconds / raw64["images_per_s"],
                }
            )
            print(
                f"predict {arch}: {rows[-1]['images_per_s']:,.0f} images/s "
                f"({rows[-1]['ratio_to_raw_fp32']:.2f} x raw fp32 batch 64)",
                flush=True,
            )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer requests and images: a smoke run")
    parser.add_argument("--gpu-quick", action="store_true", help="only the GPU section, in under 5 minutes")
    args = parser.parse_args()
    if args.gpu_quick:
        gpu.run(quick=True)
        return
    info = machine()
    print(machine_line(info), flush=True)
    raw = runtime.run(archs=("resnet18", "resnet18-int8", "lenet"), seconds=1.0 if args.quick else 3.0)
    with tempfile.TemporaryDirectory() as home:
        register_shipped({**os.environ, "BENTOML_HOME": home})
        ceilings = ceiling_runs(Path(home), args.quick)
        with Server(Path(home)) as server:
            load = load_runs(server, raw, args.quick, "defaults")
            memory = memory_run(server, args.quick)
        with Server(Path(home), precision="fp32") as server:  # side by side: ResNet-18 pinned to fp32
            load += [
                row
                for row in load_runs(server, raw, args.quick, "fp32 pinned")
                if row["model"] == "resnet18" and row["endpoint"] == "/classify"
            ]
        batching = batching_runs(Path(home), args.quick)
        workers = worker_runs(Path(home), args.quick)
        targets = target_runs(Path(home), args.quick)
    cli = predict_runs(raw, args.quick)
    sections = [
        (
            "Raw ONNX Runtime",
            "runtime",
            raw,
            ["model", "provider", "threads", "batch", "images_per_s", "p50_ms", "p99_ms"],
        ),
        (
            "Ceilings: reference endpoints and the service, 32 clients, 2 workers",
            "ceiling",
            ceilings,
            ["endpoint", "requests_per_s", "p50_ms", "p99_ms", "cpu_us_per_request", "ratio_to_naive", "errors"],
        ),
        (
            "Service under load",
            "load",
            load,
            [
                "server",
                "model",
                "precision",
                "endpoint",
                "concurrency",
                "requests",
                "errors",
                "requests_per_s",
                "images_per_s",
                "p50_ms",
                "p99_ms",
                "ratio_to_raw_best",
                "ratio_to_raw_fp32_best",
            ],
        ),
        (
            "Batching settings (ResNet-18, 32 clients)",
            "batching",
            batching,
            ["max_batch_size", "max_latency_ms", "requests_per_s", "p50_ms", "p99_ms", "errors"],
        ),
        (
            "Workers (one: ONNX Runtime on all cores; several: sharing the cores)",
            "workers",
            workers,
            ["workers", "model", "concurrency", "requests_per_s", "p50_ms", "p99_ms", "errors"],
        ),
        (
            "Targets (median of runs on fresh servers)",
            "targets",
            target_summary(targets),
            ["measure", "median", "runs"],
        ),
        (
            "cifar10 predict",
            "predict",
            cli,
            ["model", "images", "images_per_s", "raw_fp32_batch64_images_per_s", "ratio_to_raw_fp32"],
        ),
    ]
    for title, name, rows, columns in sections:
        if rows:
            write_csv(f"{name}.csv", rows)
            write_json(f"{name}.json", {"rows": rows}, info)
            print(f"\n## {title}\n\n{machine_line(info)}\n\n{table(rows, columns)}")
    write_json("summary.json", {"memory": memory}, info)
    print(f"\n## Memory\n\n{machine_line(info)}\n\n{json.dumps(memory)}")
    if gpu_count() > 0:  # on a CUDA host: the GPU section of BENCHMARKS.md too
        gpu.run(quick=args.quick)


if __name__ == "__main__":
    main()
