"""Whether hung-up requests cost the clients that wait: their p99 with and without a burst of abandoned ones.

    python -m bench.abandoned [--rounds 3]

One server (ResNet-18 pinned to fp32, the slow copy, so the queue is long: overload), 8 clients each sending
`WAITING` requests one after another. In the burst runs, 300 connections meanwhile send a request each and
close at once, from another process (in the waiting clients' event loop they would delay those clients
themselves): to the service, or, as the control, to a bare listener that reads and drops them, which shows
what making and accepting 300 connections costs the waiting clients on this host by itself. Medians of the
rounds; each round runs the three kinds one after another on the same server. Last, bursts alone: the CPU
time each hang-up costs the server worker's event-loop thread and the bare listener.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import statistics
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import psutil

from bench.report import machine, machine_line, table, write_json
from harness.clients import classify_request, send_and_hang_up
from harness.samples import cifar_samples
from harness.server import Server, free_port, register_shipped

WAITING = 12  # requests per waiting client
HANG_UPS = 300
CPU_BURSTS = 5
KINDS = {
    "quiet": "8, quiet",
    "control": f"8, beside {HANG_UPS} hang-ups to a bare listener",
    "burst": f"8, beside {HANG_UPS} hang-ups to the service",
}


def hang_ups(url: str, request: bytes) -> None:
    """HANG_UPS connections that each send `request` to `url` and close at once (in the burst process)."""

    async def all_of_them() -> None:
        await asyncio.gather(*(send_and_hang_up(url, request) for _ in range(HANG_UPS)))

    asyncio.run(all_of_them())


def bare_listener(port: int) -> None:
    """Accept connections on `port`, read each to its end and close it (the control's server, in its own process)."""

    async def drop(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while await reader.read(65536):
            pass
        writer.close()

    async def serve() -> None:
        await (await asyncio.start_server(drop, "127.0.0.1", port)).serve_forever()

    asyncio.run(serve())


def main_thread_cpu_per_hang_up(pid: int, url: str, request: bytes, burst: ProcessPoolExecutor) -> float:
    """Microseconds of CPU that process `pid`'s main thread (an event loop) spends per hang-up sent to `url`."""

    def seconds() -> float:
        main = next(t for t in psutil.Process(pid).threads() if t.id == pid)
        return main.user_time + main.system_time

    before = seconds()
    for _ in range(CPU_BURSTS):
        burst.submit(hang_ups, url, request).result()
        time.sleep(0.3)  # the last hang-ups handled
    return (seconds() - before) / (CPU_BURSTS * HANG_UPS) * 1e6


async def one_run(url: str, image: bytes, burst: ProcessPoolExecutor | None, burst_url: str) -> dict:
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
        if burst is not None:
            await asyncio.get_running_loop().run_in_executor(burst, hang_ups, burst_url, request)
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
    runs: dict[str, list[dict]] = {kind: [] for kind in KINDS}
    control_port = free_port()
    control = multiprocessing.Process(target=bare_listener, args=(control_port,), daemon=True)
    control.start()
    try:
        with tempfile.TemporaryDirectory() as folder:
            register_shipped({**os.environ, "BENTOML_HOME": folder})
            with Server(Path(folder), workers="1", precision="fp32") as server, ProcessPoolExecutor(1) as burst:
                burst.submit(time.sleep, 0).result()  # its process started before any run
                asyncio.run(one_run(server.url, image, None, ""))  # warm
                targets = {"quiet": "", "control": f"http://127.0.0.1:{control_port}", "burst": server.url}
                for _ in range(args.rounds):
                    for kind, target in targets.items():
                        runs[kind].append(asyncio.run(one_run(server.url, image, burst if target else None, target)))
                        time.sleep(1)
                metrics = httpx.get(f"{server.url}/metrics").text
                request = classify_request(server.url, image)
                [worker] = psutil.Process(server.process.pid).children()
                cpu = {
                    "service": main_thread_cpu_per_hang_up(worker.pid, server.url, request, burst),
                    "bare listener": main_thread_cpu_per_hang_up(control.pid, targets["control"], request, burst),
                }
    finally:
        control.terminate()
    rows = [
        {
            "waiting clients": KINDS[kind],
            "answered": f"{sum(r['ok'] for r in rs)}/{sum(r['requests'] for r in rs)}",
            "p50_ms": statistics.median(r["p50_ms"] for r in rs),
            "p99_ms": statistics.median(r["p99_ms"] for r in rs),
            "p99 runs": ", ".join(f"{r['p99_ms']:.0f}" for r in rs),
        }
        for kind, rs in runs.items()
    ]
    abandoned = [line for line in metrics.splitlines() if line.startswith("cifar10_abandoned_")]
    p99 = {kind: row["p99_ms"] for kind, row in zip(KINDS, rows, strict=True)}
    print(machine_line(info))
    print(table(rows, list(rows[0])))
    burst, control = p99["burst"] / p99["control"], p99["control"] / p99["quiet"]
    print(f"p99 burst / control: {burst:.2f}; control / quiet: {control:.2f}")
    print("\n".join(abandoned))
    print("event-loop CPU per hang-up:", "; ".join(f"{name} {us:.0f} us" for name, us in cpu.items()))
    write_json("abandoned.json", {"runs": runs, "abandoned": abandoned, "cpu_us_per_hang_up": cpu}, info)


if __name__ == "__main__":
    main()
