"""Raw in-process ONNX Runtime throughput and latency: the ceiling no server on this machine can beat."""

from __future__ import annotations

import statistics
import time

import numpy as np

from core.runtime import OnnxModel
from core.store import shipped_file

BATCH_SIZES = (1, 8, 32, 64, 128)


def measure(model: OnnxModel, batch_size: int, seconds: float = 2.0, repeats: int = 3) -> dict:
    """Median images/s and per-call latency percentiles over `repeats` timed windows."""
    batch = np.random.default_rng(0).standard_normal((batch_size, 3, 32, 32)).astype(np.float32)
    for _ in range(3):
        model.logits(batch)
    rates, latencies = [], []
    for _ in range(repeats):
        calls, began = 0, time.perf_counter()
        while time.perf_counter() - began < seconds / repeats:
            t0 = time.perf_counter()
            model.logits(batch)
            latencies.append(time.perf_counter() - t0)
            calls += 1
        rates.append(calls * batch_size / (time.perf_counter() - began))
    lat = np.percentile(latencies, [50, 99]) * 1000
    return {"images_per_s": statistics.median(rates), "p50_ms": float(lat[0]), "p99_ms": float(lat[1])}


def run(
    archs: tuple[str, ...] = ("resnet18", "resnet18-int8", "lenet"),
    threads: tuple[int, ...] = (1, 2),
    seconds: float = 2.0,
    providers: str = "auto",
    batch_sizes: tuple[int, ...] = BATCH_SIZES,
) -> list[dict]:
    """Each shipped model alone, on each thread count, at each batch size."""
    rows = []
    for arch in archs:
        for n_threads in threads:
            model = OnnxModel(shipped_file(arch), providers=providers, threads=n_threads)
            for batch_size in batch_sizes:
                row = {
                    "model": arch,
                    "provider": model.provider,
                    "threads": n_threads,
                    "batch": batch_size,
                    **measure(model, batch_size, seconds),
                }
                rows.append(row)
                print(
                    f"runtime {arch:<8} threads {n_threads} batch {batch_size:>3}: "
                    f"{row['images_per_s']:>9,.0f} images/s  p50 {row['p50_ms']:.2f} ms",
                    flush=True,
                )
    return rows


def best(rows: list[dict], arch: str) -> dict:
    return max((r for r in rows if r["model"] == arch), key=lambda r: r["images_per_s"])


if __name__ == "__main__":
    run()
