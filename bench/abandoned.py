"""Whether hung-up requests cost the clients that wait: their p99 with and without a burst of abandoned ones.

    python -m bench.abandoned [--rounds 3]

One server (ResNet-18 pinned to fp32, the slow copy, so the queue is long: overload), 8 clients each sending
`WAITING` requests one after another; in the `burst` runs, 300 connections meanwhile send a request each and
close at once. Medians of the rounds, alternating quiet and burst runs on the same server.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

from bench.report import machine, machine_line, table, write_json
from harness.clients import classify_request, send_and_hang_up
from harness.samples import cifar_samples
from harness.server import Server, register_shipped

WAITING = 12  # requests per waiting client
HANG_UPS = 300


async def one_run(url: str, image: bytes, burst: bool) -> dict:
    request = classify_request(url, image)

    async def wait(client: httpx.AsyncClient) -> list[tuple[int, float]]:
        answers = []
        for _ in range(WAITING):
            began = time.perf_counter()
            response = await client.post("/classify", files={"image": ("x.jpg", image)})
            answers.append((response.status_code, (time.perf_counter() - began) * 1000))
        return answers

    async with httpx.AsyncClient(base_url=url, timeout=60) as client:
        waiting = [asyncio.ensure_future(wait(client)) for _ in range(8)]
        if burst:
            await asyncio.gather(*(send_and_hang_up(url, request) for _ in range(HANG_UPS)))
        answers = [a for done in await asyncio.gather(*waiting) for a in done]
    latencies = np.array([ms for _, ms in answers])
    return {
        "ok": sum(status == 200 for status, _ in answers),
        "requests": len(answers),
        "p50_ms": float(np.percentile(latencies, 50)),
        "p99_ms": float(np.percentile(latencies, 99)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    info = machine()
    image = cifar_samples(1)[3][1]
    runs: dict[str, list[dict]] = {"quiet": [], "burst": []}
    with tempfile.TemporaryDirectory() as folder:
        register_shipped({**os.environ, "BENTOML_HOME": folder})
        with Server(Path(folder), workers="1", precision="fp32") as server:
            asyncio.run(one_run(server.url, image, False))  # warm
            for _ in range(args.rounds):
                for kind in runs:
                    runs[kind].append(asyncio.run(one_run(server.url, image, kind == "burst")))
                time.sleep(1)
            metrics = httpx.get(f"{server.url}/metrics").text
    rows = [
        {
            "waiting clients": f"8, {kind}" + (f" ({HANG_UPS} hang-ups)" if kind == "burst" else ""),
            "answered": f"{sum(r['ok'] for r in rs)}/{sum(r['requests'] for r in rs)}",
            "p50_ms": statistics.median(r["p50_ms"] for r in rs),
            "p99_ms": statistics.median(r["p99_ms"] for r in rs),
            "p99 runs": ", ".join(f"{r['p99_ms']:.0f}" for r in rs),
        }
        for kind, rs in runs.items()
    ]
    skipped = [line for line in metrics.splitlines() if line.startswith("cifar10_abandoned_images_total{")]
    print(machine_line(info))
    print(table(rows, list(rows[0])))
    print("burst / quiet p99:", f"{rows[1]['p99_ms'] / rows[0]['p99_ms']:.2f};", "; ".join(skipped))
    write_json("abandoned.json", {"runs": runs, "abandoned": skipped}, info)


if __name__ == "__main__":
    main()
