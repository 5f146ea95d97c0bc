"""Reference endpoints that bound what the service can do over HTTP, served by the same uvicorn (uvloop,
httptools) with the same worker count, each a bare ASGI app:

- `body`: reads the request body, answers a fixed JSON (the HTTP floor);
- `multipart`: parses the multipart form with Starlette (python-multipart), answers a fixed JSON;
- `naive`: the naive classifier: multipart, then this project's decoding and normalization and one ONNX
  Runtime LeNet call per request, no batching, no limits.

    python -m bench.ceiling body|multipart|naive PORT WORKERS   # one of them, until SIGTERM
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import httpx
import numpy as np
import psutil
from starlette.requests import Request

from bench.report import ROOT
from core.preprocess import decode_rgb, normalize
from core.runtime import OnnxModel, top_classes
from core.store import shipped_file
from harness.server import free_port, stop_server

FIXED = json.dumps({"model": "lenet", "predictions": [{"label": "cat", "index": 3, "probability": 0.5}]}).encode()
HEADERS = [(b"content-type", b"application/json")]
_model: OnnxModel | None = None


async def _answer(send, body: bytes) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [*HEADERS, (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})


async def body(scope, receive, send) -> None:
    if scope["type"] != "http":
        return
    more = True
    while more:
        more = (await receive()).get("more_body", False)
    await _answer(send, FIXED)


async def multipart(scope, receive, send) -> None:
    if scope["type"] != "http":
        return
    form = await Request(scope, receive).form()
    if "image" in form:
        await form["image"].read()
    await _answer(send, FIXED)


async def naive(scope, receive, send) -> None:
    global _model
    if scope["type"] != "http":
        return
    if _model is None:  # one session per worker, one thread: the workers share the cores
        _model = OnnxModel(shipped_file("lenet"), providers="cpu", threads=1, spin=False)
    form = await Request(scope, receive).form()
    if "image" not in form:
        await _answer(send, b"{}")
        return
    pixels = decode_rgb(await form["image"].read())
    logits = _model.logits(normalize(pixels[np.newaxis], _model.table))
    [indices], [probabilities] = top_classes(logits, 3, _model.temperature)
    names = _model.info.class_names
    answer = {
        "model": "lenet",
        "predictions": [
            {"label": names[i], "index": i, "probability": p} for i, p in zip(indices, probabilities, strict=True)
        ],
    }
    await _answer(send, json.dumps(answer).encode())


ENDPOINTS = {"body": body, "multipart": multipart, "naive": naive}


def main() -> None:
    import uvicorn

    name, port, workers = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    if name not in ENDPOINTS:
        raise SystemExit(f"choose one of {', '.join(ENDPOINTS)}")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    uvicorn.run(
        f"bench.ceiling:{name}",
        host="127.0.0.1",
        port=port,
        workers=workers,
        loop="uvloop",
        http="httptools",
        log_level="warning",
        access_log=False,
    )


if __name__ == "__main__":
    main()


def serve(name: str, workers: int) -> tuple[subprocess.Popen, str]:
    """Start reference endpoint `name` on a free localhost port; returns the process and its URL once it answers."""
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "bench.ceiling", name, str(port), str(workers)], cwd=ROOT, start_new_session=True
    )
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            httpx.post(url, content=b"", timeout=2)  # any answer (even an error) means it listens
            return process, url
        except httpx.TransportError:
            time.sleep(0.2)
    stop_server(process)
    raise RuntimeError(f"reference endpoint {name} did not start")


def cpu_seconds(process: subprocess.Popen) -> float:
    """User + system CPU seconds of a server process and all its children so far."""
    tree = psutil.Process(process.pid)
    return sum(sum(p.cpu_times()[:2]) for p in [tree, *tree.children(recursive=True)])
