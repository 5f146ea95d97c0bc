"""Runtime settings, read once from the environment; every default is documented in the README."""

from __future__ import annotations

import os
from dataclasses import dataclass

CORES = os.cpu_count() or 1


def _int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise SystemExit(f"{name}={raw!r} is not a whole number") from None


@dataclass(frozen=True)
class Settings:
    """Serving limits and tuning, from CIFAR10_* environment variables."""

    max_batch_size: int = _int("CIFAR10_MAX_BATCH_SIZE", 64)  # images per model call
    max_latency_ms: int = _int("CIFAR10_MAX_LATENCY_MS", 5000)  # queueing budget before 503
    max_body_bytes: int = _int("CIFAR10_MAX_BODY_BYTES", 10 * 1024 * 1024)
    max_pixels: int = _int("CIFAR10_MAX_PIXELS", 40_000_000)
    max_batch_images: int = _int("CIFAR10_MAX_BATCH_IMAGES", 64)  # per /classify_batch request
    max_concurrency: int = _int("CIFAR10_MAX_CONCURRENCY", 256)  # POSTs in flight per worker before 429
    timeout_s: int = _int("CIFAR10_TIMEOUT_S", 60)  # then 504
    workers: int = _int("CIFAR10_WORKERS", 0)  # 0: one per core on CPU hosts, 1 with a GPU (BENCHMARKS.md)
    ort_threads: int = _int("CIFAR10_ORT_THREADS", 0)  # 0: all cores alone, a share beside other workers
    providers: str = os.environ.get("CIFAR10_PROVIDERS", "auto")  # auto, cpu or cuda


SETTINGS = Settings()
