"""A closed-loop HTTP load from Python clients that tells apart how each request ended: answered (with its
status), refused (no connection), or cut (connection reset or closed before a complete answer).

Every run ends by itself: when `until()` says so, or after `max_s` seconds whatever the server does (a
request in progress then waits at most REQUEST_TIMEOUT_S more).
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable

import httpx

REQUEST_TIMEOUT_S = 10


async def _client(
    url: str,
    files: dict,
    data: dict,
    keep_alive: bool,
    stop: Callable[[], bool],
    outcomes: Counter,
    latencies: list[float],
) -> None:
    limits = httpx.Limits(max_keepalive_connections=1 if keep_alive else 0, max_connections=1)
    async with httpx.AsyncClient(timeout=REQUEST_TIMEOUT_S, limits=limits) as client:
        while not stop():
            began = time.perf_counter()
            try:
                response = await client.post(url, files=files, data=data)
            except httpx.ConnectError:
                outcomes["refused"] += 1
                await asyncio.sleep(0.01)
                continue
            except (httpx.ReadError, httpx.WriteError, httpx.RemoteProtocolError, httpx.TimeoutException):
                outcomes["cut"] += 1
                continue
            outcomes[response.status_code] += 1
            if response.status_code == 200:
                latencies.append(time.perf_counter() - began)


async def run_clients(
    url: str,
    image: bytes,
    clients: int,
    until: Callable[[], bool],
    keep_alive: bool = True,
    model: str = "lenet",
    max_s: float = 60,
    outcomes: Counter | None = None,
) -> tuple[Counter, list[float]]:
    """`clients` clients POSTing `image` to `url` (a /classify URL) until `until()` or `max_s` seconds; outcomes
    (counted into `outcomes` as they happen, when given) and 200 latencies."""
    outcomes = Counter() if outcomes is None else outcomes
    latencies: list[float] = []
    deadline = time.monotonic() + max_s

    def stop() -> bool:
        return until() or time.monotonic() > deadline

    files, data = {"image": ("x.jpg", image)}, {"model": model}
    await asyncio.gather(*(_client(url, files, data, keep_alive, stop, outcomes, latencies) for _ in range(clients)))
    return outcomes, latencies


def classify_request(url: str, image: bytes) -> bytes:
    """A multipart POST /classify of `image` to the server at `url`, as the bytes a client writes."""
    request = httpx.Request("POST", f"{url}/classify", files={"image": ("x.jpg", image)})
    head = "".join(f"{k}: {v}\r\n" for k, v in request.headers.items())
    return f"POST /classify HTTP/1.1\r\n{head}\r\n".encode() + request.read()


async def send_and_hang_up(url: str, request: bytes) -> None:
    """Write `request` on a new connection to `url` and close it at once, before any answer."""
    _, writer = await asyncio.open_connection(httpx.URL(url).host, httpx.URL(url).port)
    writer.write(request)
    await writer.drain()
    writer.close()
