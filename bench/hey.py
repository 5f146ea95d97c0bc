"""Closed-loop HTTP load with `hey` against a running service on localhost, perf_analyzer style."""

from __future__ import annotations

import csv
import io
import shutil
import subprocess
import uuid

import numpy as np

from harness.samples import cifar_samples


def multipart(fields: list[tuple[str, str, bytes]]) -> tuple[bytes, str]:
    """(name, filename or '', data) parts -> body and Content-Type."""
    boundary = uuid.uuid4().hex
    body = b""
    for name, filename, data in fields:
        disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
        body += f"--{boundary}\r\nContent-Disposition: {disposition}\r\n\r\n".encode() + data + b"\r\n"
    return body + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def hey_path() -> str:
    path = shutil.which("hey")
    if path is None:
        raise SystemExit("the load benchmark needs `hey`: apt-get install hey")
    return path


def run_load(
    url: str,
    body: bytes,
    content_type: str,
    concurrency: int,
    requests: int,
    images_per_request: int = 1,
    timeout_s: int = 120,
    headers: dict[str, str] | None = None,
) -> dict:
    """One closed-loop run: `requests` requests from `concurrency` clients; latency from hey's CSV."""
    requests = max(requests, concurrency)
    extra = [arg for name, value in (headers or {}).items() for arg in ("-H", f"{name}: {value}")]
    result = subprocess.run(
        [
            hey_path(),
            "-n",
            str(requests),
            "-c",
            str(concurrency),
            "-m",
            "POST",
            "-T",
            content_type,
            "-t",
            "60",
            "-o",
            "csv",
            "-D",
            "/dev/stdin",
            *extra,
            url,
        ],
        input=body,
        capture_output=True,
        timeout=timeout_s,
        check=True,
    )
    rows = list(csv.DictReader(io.StringIO(result.stdout.decode())))
    latencies = np.array([float(r["response-time"]) for r in rows]) * 1000
    ends = [float(r["offset"]) + float(r["response-time"]) for r in rows]
    wall = max(ends) if ends else float("nan")
    statuses: dict[str, int] = {}
    for r in rows:
        statuses[r["status-code"]] = statuses.get(r["status-code"], 0) + 1
    ok = statuses.get("200", 0)
    p50, p90, p95, p99 = np.percentile(latencies, [50, 90, 95, 99]) if len(rows) else [float("nan")] * 4
    return {
        "concurrency": concurrency,
        "requests": len(rows),
        "ok": ok,
        "errors": {k: v for k, v in statuses.items() if k != "200"},
        "requests_per_s": len(rows) / wall,
        "images_per_s": ok * images_per_request / wall,
        "p50_ms": p50,
        "p90_ms": p90,
        "p95_ms": p95,
        "p99_ms": p99,
    }


def target_loads(url: str, quick: bool) -> dict:
    """The HTTP loads behind the targets, on a running server: ResNet-18 and LeNet at 1 and 32 clients, LeNet
    /classify_batch x64 at 8 clients."""
    _, image = cifar_samples(1)[3]
    bodies = {
        arch: multipart([("image", "x.jpg", image), ("model", "", arch.encode())]) for arch in ("resnet18", "lenet")
    }
    batch_body = multipart(
        [*[("images", f"{i}.jpg", d) for i, (_, d) in enumerate(cifar_samples(7)[:64])], ("model", "", b"lenet")]
    )
    return {
        "resnet18 c=1": run_load(f"{url}/classify", *bodies["resnet18"], 1, 50 if quick else 200),
        "resnet18 c=32": run_load(f"{url}/classify", *bodies["resnet18"], 32, 320 if quick else 960),
        "lenet c=1": run_load(f"{url}/classify", *bodies["lenet"], 1, 300 if quick else 1000),
        "lenet c=32": run_load(f"{url}/classify", *bodies["lenet"], 32, 1500 if quick else 6000),
        "lenet batch64 c=8": run_load(
            f"{url}/classify_batch", *batch_body, 8, 80 if quick else 400, images_per_request=64
        ),
    }
