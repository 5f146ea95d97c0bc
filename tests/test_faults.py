"""Faults, on real `bentoml serve` processes on 127.0.0.1: SIGTERM under load, a killed worker, slow clients,
a corrupt or mismatched model. Each load is bounded in time."""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from contextlib import AbstractContextManager
from pathlib import Path

import httpx
import psutil
import pytest
from PIL import Image

from core.store import MODEL_FILE
from harness.clients import run_clients
from harness.samples import ROOT
from harness.server import register_shipped, serve_expecting_exit, serving

pytestmark = pytest.mark.server
GRACE_S = 3
ANSWERS_BEFORE_SIGTERM = 32


def server(home: Path, **settings: str) -> AbstractContextManager[tuple[subprocess.Popen, str, Path]]:
    """A server of the shipped models with CIFAR10_* settings; yields the process, its URL and its log."""
    return serving(
        {**os.environ, "BENTOML_HOME": str(home), **{f"CIFAR10_{k.upper()}": v for k, v in settings.items()}}
    )


def test_sigterm_under_load_answers_every_request_it_received(samples, tmp_path: Path) -> None:
    """32 clients keep sending through the drain, 16 on keep-alive connections and 16 on a new connection per
    request. Every request a worker received is answered (its count of answers equals what the clients got complete,
    200 or 503), and the server exits within the grace period. Connections that no worker ever read (queued in the
    kernel when the listener closes) may be reset or refused: the count check shows none of them was received.
    SIGTERM comes once both kinds of client have had answers, however slow the host; every wait here is bounded."""
    with server(tmp_path, drain_s=str(GRACE_S)) as (process, url, log):
        seen: dict = {}
        outcomes = {True: Counter(), False: Counter()}  # by keep_alive

        async def stop_midway() -> None:
            try:
                began = time.monotonic()
                while (
                    min(kind[200] for kind in outcomes.values()) < ANSWERS_BEFORE_SIGTERM
                    and time.monotonic() - began < 30
                ):
                    await asyncio.sleep(0.05)
                process.send_signal(signal.SIGTERM)
                began = time.monotonic()
                while process.poll() is None and time.monotonic() - began < 30:
                    await asyncio.sleep(0.01)
                seen["exit_s"] = time.monotonic() - began
                await asyncio.sleep(0.3)
            finally:  # whatever happened above, the clients stop
                seen["done"] = True

        async def main() -> None:
            stopper = asyncio.create_task(stop_midway())
            image, stopped = samples[0][1], lambda: "done" in seen
            await asyncio.gather(
                *(
                    run_clients(f"{url}/classify", image, 16, stopped, keep_alive, max_s=90, outcomes=kind)
                    for keep_alive, kind in outcomes.items()
                )
            )
            await stopper

        asyncio.run(main())
    received, answered = drain_counts(log)
    print(
        f"\nclients: keep-alive {dict(outcomes[True])}, new connections {dict(outcomes[False])}; workers: received "
        f"{received}, answered {answered}; exit {seen['exit_s']:.2f} s after SIGTERM"
    )
    assert received == answered == sum(kind[200] + kind[503] for kind in outcomes.values())
    for kind in outcomes.values():
        assert set(kind) <= {200, 503, "refused", "cut"} and kind[200] >= ANSWERS_BEFORE_SIGTERM
    assert seen["exit_s"] < GRACE_S + 3  # the grace period, and the process manager's teardown


def drain_counts(log: Path) -> tuple[int, int]:
    """POST requests received and answered, from the line each worker prints when its drain ends (both must)."""
    summaries = [
        tuple(map(int, m))
        for m in re.findall(r"cifar10 drain: (\d+) POST requests received, (\d+) answered", log.read_text())
    ]
    assert len(summaries) == 2, summaries  # both workers drained to the end (none forced past the grace period)
    received, answered = (sum(column) for column in zip(*summaries, strict=True))
    return received, answered


def slow_batch(images: int = 30) -> list[tuple[str, tuple[str, bytes]]]:
    """A /classify_batch body that takes seconds to decode (9-megapixel PNGs of a few KB each)."""
    buffer = io.BytesIO()
    Image.new("RGB", (3000, 3000), (90, 140, 200)).save(buffer, "PNG")
    return [("images", (f"{i}.png", buffer.getvalue())) for i in range(images)]


def test_while_draining_readyz_is_503_and_new_requests_are_refused_with_retry_after(samples, tmp_path: Path) -> None:
    """A request decoding for seconds holds the drain open, however fast or slow the host: meanwhile /readyz
    answers 503 and a new request 503 + Retry-After + Connection: close; then the slow one is answered."""
    with server(tmp_path, drain_s="20", workers="1") as (process, url, log):

        async def main() -> tuple[httpx.Response, int, httpx.Response]:
            async with httpx.AsyncClient(base_url=url, timeout=60) as client:
                slow = asyncio.create_task(client.post("/classify_batch", files=slow_batch(), data={"model": "lenet"}))
                await asyncio.sleep(0.5)  # in flight: its body is read at once, its decoding takes seconds
                process.send_signal(signal.SIGTERM)
                began, readyz = time.monotonic(), 200
                while readyz == 200 and time.monotonic() - began < 5:  # until the worker has the signal
                    readyz = (await client.get("/readyz")).status_code
                    await asyncio.sleep(0.02)
                new = await client.post("/classify", files={"image": ("x.jpg", samples[0][1])})
                return await slow, readyz, new

        slow, readyz, new = asyncio.run(main())
        process.wait(timeout=30)
    assert readyz == 503
    assert new.status_code == 503 and new.headers["retry-after"] == "1" and new.headers["connection"] == "close"
    assert "shutting down" in new.json()["error"]
    assert slow.status_code == 200 and all("predictions" in r for r in slow.json()["results"])
    assert re.search(r"cifar10 drain: 2 POST requests received, 2 answered", log.read_text())


def workers_of(process: subprocess.Popen) -> list[psutil.Process]:
    children = [p for p in psutil.Process(process.pid).children(recursive=True) if p.status() != psutil.STATUS_ZOMBIE]
    return [p for p in children if any("worker" in part for part in p.cmdline())]


def test_a_killed_worker_is_replaced_and_ready_within_10_s(samples, tmp_path: Path) -> None:
    with server(tmp_path, workers="2") as (process, url, log):
        began = time.monotonic()
        while log.read_text().count("initialized") < 2 and time.monotonic() - began < 60:  # both workers started
            time.sleep(0.05)
        victim = workers_of(process)[0]
        state: dict = {}

        async def kill_midway() -> None:
            try:
                await asyncio.sleep(1.0)
                victim.kill()
                began = time.monotonic()
                while log.read_text().count("initialized") < 3 and time.monotonic() - began < 30:
                    await asyncio.sleep(0.05)
                state["recovered_s"] = time.monotonic() - began
                await asyncio.sleep(1.0)  # served by both workers again
            finally:
                state["done"] = True

        async def main():
            killer = asyncio.create_task(kill_midway())
            result = await run_clients(f"{url}/classify", samples[0][1], 8, lambda: "done" in state, max_s=60)
            await killer
            return result

        outcomes, _ = asyncio.run(main())
        print(f"\nclients: {dict(outcomes)}; a new worker was ready {state['recovered_s']:.1f} s after the kill")
        assert state["recovered_s"] < 10
        assert httpx.get(f"{url}/readyz").status_code == 200 and len(workers_of(process)) == 2
        assert set(outcomes) <= {200, "cut"} and outcomes["cut"] <= 8  # only what the killed worker held


async def slowly(port: int, head: bytes, seconds: float) -> bytes:
    """A slowloris: `head` at once, then one byte every 0.2 s for `seconds`; returns what the server answered."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)

    async def trickle() -> None:
        writer.write(head)
        with contextlib.suppress(ConnectionError):
            for _ in range(int(seconds / 0.2)):
                await writer.drain()
                writer.write(b"a")
                await asyncio.sleep(0.2)

    sender = asyncio.create_task(trickle())
    answer = b""
    try:
        async with asyncio.timeout(seconds + 10):  # a server without time limits never answers
            while chunk := await reader.read(65536):  # until the server closes the connection
                answer += chunk
    except (ConnectionError, TimeoutError):  # a reset after the answer, for the bytes still arriving; no answer
        pass
    finally:
        sender.cancel()
        writer.close()
    return answer


SLOW_HEADERS = b"POST /classify HTTP/1.1\r\nHost: x\r\nX-Slow: "
SLOW_BODY = (
    b"POST /classify HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
    b"Content-Length: 100000\r\n\r\n"
)


def test_slow_clients_are_cut_while_normal_ones_are_served(samples, tmp_path: Path) -> None:
    """200 slow connections (half in their headers, half in their bodies) beside 8 normal clients: the slow
    ones get a 408 at their time limit, the normal ones are all answered (their p99 is printed)."""
    with server(tmp_path, header_timeout_s="2", body_timeout_s="2") as (_, url, _log):
        port = int(url.rsplit(":", 1)[1])
        alone, quiet_latencies = asyncio.run(run_clients(f"{url}/classify", samples[0][1], 8, _for(2.0)))

        async def main():
            slow = [slowly(port, head, 6) for head in [SLOW_HEADERS] * 100 + [SLOW_BODY] * 100]
            slow_task = asyncio.gather(*slow)
            normal = await run_clients(f"{url}/classify", samples[0][1], 8, _for(4.0))
            return normal, await slow_task

        (beside, latencies), answers = asyncio.run(main())
    p99 = sorted(latencies)[int(0.99 * len(latencies))]
    quiet_p99 = sorted(quiet_latencies)[int(0.99 * len(quiet_latencies))]
    print(
        f"\nnormal clients: alone {dict(alone)} p99 {quiet_p99 * 1000:.1f} ms; beside 200 slow connections "
        f"{dict(beside)} p99 {p99 * 1000:.1f} ms"
    )
    assert set(alone) == set(beside) == {200}  # the latencies are figures for BENCHMARKS.md, not a guarantee
    assert all(answer.startswith(b"HTTP/1.1 408 ") for answer in answers), {a[:40] for a in answers}
    assert sum(b"request headers did not arrive within 2 s" in a for a in answers) == 100
    assert sum(b"request body did not arrive within 2 s" in a for a in answers) == 100


def _for(seconds: float):
    deadline = time.monotonic() + seconds
    return lambda: time.monotonic() > deadline


def serve_and_fail(home: Path) -> list[str]:
    """`bentoml serve` that is expected to stop before serving: its output lines."""
    result = serve_expecting_exit(["service.service:Classifier"], {**os.environ, "BENTOML_HOME": str(home)}, ROOT)
    assert result.returncode not in (0, -9)  # -9: it served, and was killed
    return (result.stdout + result.stderr).strip().splitlines()


@pytest.fixture
def store(tmp_path: Path) -> Path:
    register_shipped({**os.environ, "BENTOML_HOME": str(tmp_path)})
    return tmp_path


def test_a_corrupt_model_file_stops_the_server_with_one_line(store: Path) -> None:
    stored = next((store / "models" / "cifar10-lenet").glob("*/" + MODEL_FILE))
    data = bytearray(stored.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte in the weights: the file still loads
    stored.write_bytes(bytes(data))
    lines = serve_and_fail(store)
    assert len(lines) == 1 and "is not the file that was registered (sha256 differs)" in lines[0], lines


def test_a_model_for_other_classes_stops_the_server_with_one_line(store: Path) -> None:
    other_classes = (  # in its own process: BentoML keeps the first model store a process used
        "import bentoml\nfrom core.store import MODEL_FILE, register, shipped_file\n"
        "tag = register(shipped_file('lenet'), 'cifar10-lenet')\n"
        "metadata = {**bentoml.models.get(tag).info.metadata, 'class_names': ['cat', 'dog']}\n"
        "with bentoml.models.create('cifar10-lenet', metadata=metadata) as model:\n"
        "    open(model.path_of(MODEL_FILE), 'wb').write(shipped_file('lenet').read_bytes())\n"
    )
    subprocess.run(
        [sys.executable, "-c", other_classes], env={**os.environ, "BENTOML_HOME": str(store)}, cwd=ROOT, check=True
    )
    lines = serve_and_fail(store)
    assert len(lines) == 1 and "does not fit this service: classes ['cat', 'dog']" in lines[0], lines
