"""`make soak`: 10 minutes at ~70% of measured capacity with 10% bad input, one SIGTERM-restart in the middle.

Open-loop load (requests fall due on a fixed schedule, whether or not earlier ones have finished;
latency counts from when a request fell due) sent over CONNECTIONS connections, from a client
that routes like a load balancer during a rolling update: it stops sending new requests (they wait
their turn), the server gets SIGTERM while the requests it holds are still in flight, a new server
starts on the same port, and sending resumes once it is ready. Writes per-minute requests/s,
p50/p99 latency, answers by status and server memory to bench/soak/soak.csv and soak.png.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import os
import signal
import subprocess
import tempfile
import time
from collections import Counter
from pathlib import Path

import httpx
import numpy as np
import psutil

from harness.clients import run_clients
from harness.samples import ROOT, cifar_samples
from harness.server import free_port, register_shipped, start_server

OUT = ROOT / "bench" / "soak"
BAD = [b"plain text, not an image", b"%PDF-1.7\n", b"\xff\xd8\xff\xe0 truncated"]  # 415, 415, 400
CONNECTIONS = 32  # as many as the capacity run's clients: the same cost per request


def server_rss_mb(process: subprocess.Popen) -> float:
    tree = psutil.Process(process.pid)
    return sum(p.memory_info().rss for p in [tree, *tree.children(recursive=True)]) / 2**20


class Soak:
    def __init__(self, minutes: float, load: float, model: str) -> None:
        self.minutes, self.load, self.model = minutes, load, model
        self.home = tempfile.mkdtemp(prefix="soak-")
        self.env = {**os.environ, "BENTOML_HOME": self.home}
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.images = [data for _, data in cifar_samples(5)]
        self.records: list[tuple[float, float, str]] = []  # (start offset s, latency s, status or error)
        self.rss: list[tuple[float, float]] = []
        self.routing = asyncio.Event()
        self.restart: dict[str, float] = {}

    def start(self) -> subprocess.Popen:
        return start_server(["service.service:Classifier"], self.env, ROOT, self.port)

    async def sender(self, queue: asyncio.Queue, began: float) -> None:
        """One connection's client: sends the requests that fall due, in turn."""
        limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
        async with httpx.AsyncClient(timeout=60, limits=limits) as client:
            while (job := await queue.get()) is not None:
                i, due = job
                data = BAD[i // 10 % len(BAD)] if i % 10 == 9 else self.images[i % len(self.images)]
                await self.routing.wait()  # held while no server is in rotation, like a load balancer holds it
                try:
                    response = await client.post(
                        f"{self.url}/classify", files={"image": ("x.jpg", data)}, data={"model": self.model}
                    )
                    outcome = str(response.status_code)
                except httpx.HTTPError as exc:
                    outcome = type(exc).__name__
                self.records.append((due - began, time.perf_counter() - due, outcome))

    async def run(self) -> None:
        register_shipped(self.env)
        self.process = self.start()
        until = time.monotonic() + 10
        outcomes, _ = await run_clients(
            f"{self.url}/classify", self.images[0], CONNECTIONS, lambda: time.monotonic() > until, model=self.model
        )
        capacity = outcomes[200] / 10
        rate = self.load * capacity
        print(
            f"capacity {capacity:,.0f} req/s ({CONNECTIONS} clients, closed loop); soak at {rate:,.0f} req/s",
            flush=True,
        )
        self.routing.set()
        seconds = self.minutes * 60
        queue: asyncio.Queue = asyncio.Queue()
        began = time.perf_counter()
        senders = [asyncio.create_task(self.sender(queue, began)) for _ in range(CONNECTIONS)]
        watcher = asyncio.create_task(self.watch(began, seconds))
        i = 0
        while (now := time.perf_counter() - began) < seconds:
            if watcher.done():  # a failed restart ends the run
                watcher.result()
            while i < now * rate:  # every request due by now
                queue.put_nowait((i, began + i / rate))
                i += 1
            await asyncio.sleep(0.001)
        for _ in senders:
            queue.put_nowait(None)
        await asyncio.gather(*senders, watcher)
        self.process.send_signal(signal.SIGTERM)
        self.process.wait(60)

    async def watch(self, began: float, seconds: float) -> None:
        """Samples memory each second; restarts the server half-way."""
        while (now := time.perf_counter() - began) < seconds:
            if "paused" not in self.restart and now >= seconds / 2:
                await self.rolling_restart(began)
            self.rss.append((now, server_rss_mb(self.process)))
            await asyncio.sleep(1)

    async def rolling_restart(self, began: float) -> None:
        self.routing.clear()  # the load balancer takes the server out first
        self.restart["paused"] = time.perf_counter() - began
        await asyncio.sleep(0.05)  # the requests sent just before reach the server (Kubernetes: the preStop pause)
        self.process.send_signal(signal.SIGTERM)  # while the server still works on them
        await asyncio.to_thread(self.process.wait, 60)
        self.restart["exited"] = time.perf_counter() - began
        self.process = await asyncio.to_thread(self.start)
        self.restart["resumed"] = time.perf_counter() - began
        self.routing.set()
        print(
            f"restart: SIGTERM at {self.restart['paused']:.0f} s, exited after "
            f"{self.restart['exited'] - self.restart['paused']:.2f} s, ready again after "
            f"{self.restart['resumed'] - self.restart['paused']:.1f} s",
            flush=True,
        )

    def minutes_table(self) -> list[dict]:
        rows = []
        for minute in range(int(np.ceil(self.minutes))):
            mine = [r for r in self.records if minute * 60 <= r[0] < (minute + 1) * 60]
            good = np.array([r[1] for r in mine if r[2] == "200"]) * 1000
            statuses = Counter(r[2] for r in mine)
            rss = [m for t, m in self.rss if minute * 60 <= t < (minute + 1) * 60]
            rows.append(
                {
                    "minute": minute + 1,
                    "requests": len(mine),
                    "requests_per_s": len(mine) / 60,
                    "p50_ms": float(np.percentile(good, 50)) if len(good) else float("nan"),
                    "p99_ms": float(np.percentile(good, 99)) if len(good) else float("nan"),
                    "ok": statuses["200"],
                    "4xx": sum(v for k, v in statuses.items() if k.startswith("4")),
                    "5xx": sum(v for k, v in statuses.items() if k.startswith("5")),
                    "failed": sum(v for k, v in statuses.items() if not k[0].isdigit()),
                    "rss_mb": max(rss) if rss else float("nan"),
                }
            )
        return rows


def plot(rows: list[dict], restart: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    minutes = [r["minute"] for r in rows]
    fig, axes = plt.subplots(2, 2, figsize=(11, 7))
    panels = (
        (
            axes[0, 0],
            {"200 answers/s": [r["ok"] / 60 for r in rows], "4xx/s (bad input)": [r["4xx"] / 60 for r in rows]},
            "answers per second",
            False,
        ),
        (
            axes[0, 1],
            {"p50": [r["p50_ms"] for r in rows], "p99": [r["p99_ms"] for r in rows]},
            "latency of 200s from when due, ms (log)",
            True,
        ),
        (
            axes[1, 0],
            {"5xx": [r["5xx"] for r in rows], "no answer": [r["failed"] for r in rows]},
            "failures per minute",
            False,
        ),
        (axes[1, 1], {"RSS": [r["rss_mb"] for r in rows]}, "server memory (RSS), MB", False),
    )
    for ax, series, title, log in panels:
        for label, values in series.items():
            ax.plot(minutes, values, marker="o", label=label)
        ax.axvline(restart["paused"] / 60 + 1, color="grey", linestyle=":", label="SIGTERM + restart")
        ax.set(title=title, xlabel="minute")
        if log:
            ax.set_yscale("log")
        else:
            ax.set_ylim(bottom=0, top=max(1.0, ax.get_ylim()[1]))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10)
    parser.add_argument("--load", type=float, default=0.7, help="fraction of the measured capacity")
    parser.add_argument("--model", default="resnet18")
    args = parser.parse_args()
    soak = Soak(args.minutes, args.load, args.model)
    asyncio.run(soak.run())
    rows = soak.minutes_table()
    OUT.mkdir(parents=True, exist_ok=True)
    with (OUT / "soak.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    plot(rows, soak.restart, OUT / "soak.png")
    for row in rows:
        print(" | ".join(f"{k} {v:,.1f}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()))
    second, last = rows[1], rows[-1]
    print(
        f"5xx: {sum(r['5xx'] for r in rows)}; failed: {sum(r['failed'] for r in rows)}; RSS minute 2 -> "
        f"{last['minute']}: {last['rss_mb'] / second['rss_mb'] - 1:+.1%}; p99 last minute / minute 2: "
        f"{last['p99_ms'] / second['p99_ms']:.2f}; wrote {OUT / 'soak.csv'} and {OUT / 'soak.png'}"
    )


if __name__ == "__main__":
    main()
