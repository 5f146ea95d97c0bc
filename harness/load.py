"""A closed-loop HTTP load from Python clients that tells apart how each request ended: answered (with its
status), refused (no connection), or cut (connection reset or closed before a complete answer)."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable

import httpx


async def _client(url: str, files: dict, data: dict, keep_alive: bool, until: Callable[[], bool],
                  outcomes: Counter, latencies: list[float]) -> None:
    limits = httpx.Limits(max_keepalive_connections=1 if keep_alive else 0, max_connections=1)
    async with httpx.AsyncClient(timeout=30, limits=limits) as client:
        while not until():
            began = time.perf_counter()
            try:
                response = await client.post(url, files=files, data=data)
            except httpx.ConnectError:
                outcomes["refused"] += 1
                await asyncio.sleep(0.01)
                continue
            except (httpx.ReadError, httpx.WriteError, httpx.RemoteProtocolError):
                outcomes["cut"] += 1
                continue
            outcomes[response.status_code] += 1
            if response.status_code == 200:
                latencies.append(time.perf_counter() - began)


async def run_clients(url: str, image: bytes, clients: int, until: Callable[[], bool], keep_alive: bool = True,
                      model: str = "lenet") -> tuple[Counter, list[float]]:
    """`clients` clients POSTing `image` to `url` (a /classify URL) until `until()`; outcomes and 200 latencies."""
    outcomes: Counter = Counter()
    latencies: list[float] = []
    files, data = {"image": ("x.jpg", image)}, {"model": model}
    await asyncio.gather(*(_client(url, files, data, keep_alive, until, outcomes, latencies)
                           for _ in range(clients)))
    return outcomes, latencies
