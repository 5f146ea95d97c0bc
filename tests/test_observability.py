"""What an operator sees, read from a real server's output: one access line per request on every route (the
classification routes, v2, the rest; 200, 4xx, 429, a drain's 503), the request ID in the header, the error
body and the line, and, with BentoML's tracing settings pointed at an in-process OTLP collector, a span per
/classify request with its model call."""

from __future__ import annotations

import asyncio
import base64
import http.server
import json
import os
import signal
import subprocess
import threading
import time
from contextlib import AbstractContextManager
from pathlib import Path

import httpx
import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from harness.server import serving
from tests.test_faults import slow_batch

pytestmark = pytest.mark.server


def serving_in(home: Path, **variables: str) -> AbstractContextManager[tuple[subprocess.Popen, str, Path]]:
    return serving({**os.environ, "BENTOML_HOME": str(home), **variables})


def access_lines(log: Path) -> list[dict]:
    return [json.loads(line) for line in log.read_text().splitlines() if line.startswith('{"time"')]


def test_every_request_leaves_one_access_line_with_its_id(tmp_path: Path, samples) -> None:
    settings = {"CIFAR10_WORKERS": "1", "CIFAR10_MAX_CONCURRENCY": "1", "CIFAR10_DRAIN_S": "20"}
    with serving_in(tmp_path, **settings) as (process, url, log):
        ok = httpx.post(
            f"{url}/classify",
            files={"image": ("x.jpg", samples[0][1])},
            data={"model": "lenet"},
            headers={"x-request-id": "lb-abc123"},
        )
        text = httpx.post(f"{url}/classify", files={"image": ("a.txt", b"just text")})
        listed = httpx.get(f"{url}/models", headers={"x-request-id": "bad id with spaces"})
        tensor = {
            "name": "image",
            "shape": [1],
            "datatype": "BYTES",
            "data": [base64.b64encode(samples[0][1]).decode()],
        }
        v2 = httpx.post(f"{url}/v2/models/lenet/infer", json={"inputs": [tensor]}, headers={"x-request-id": "v2-1"})
        unknown = httpx.get(f"{url}/v2/models/no-such-model")

        async def overload_then_drain() -> tuple[httpx.Response, httpx.Response, httpx.Response]:
            async with httpx.AsyncClient(base_url=url, timeout=60) as client:
                slow = asyncio.create_task(client.post("/classify_batch", files=slow_batch(), data={"model": "lenet"}))
                await asyncio.sleep(0.5)  # it holds the one place (CIFAR10_MAX_CONCURRENCY=1) for seconds
                busy = await client.post("/classify", files={"image": ("x.jpg", samples[0][1])})
                process.send_signal(signal.SIGTERM)
                began, ready = time.monotonic(), 200
                while ready == 200 and time.monotonic() - began < 5:
                    ready = (await client.get("/readyz")).status_code
                refused = await client.post("/classify", files={"image": ("x.jpg", samples[0][1])})
                return await slow, busy, refused

        slow, busy, refused = asyncio.run(overload_then_drain())
        process.wait(timeout=30)
    answers = [ok, text, listed, v2, unknown, busy, refused, slow]
    assert [a.status_code for a in answers] == [200, 415, 200, 200, 404, 429, 503, 200]
    assert ok.headers["x-request-id"] == "lb-abc123"  # the load balancer's ID, followed through
    assert listed.headers["x-request-id"] != "bad id with spaces"  # unusable: a new one
    for answer in (text, unknown, busy, refused):
        assert answer.json().get("request_id") == answer.headers["x-request-id"], answer.text
    lines = access_lines(log)
    by_id = {line["request_id"]: line for line in lines}
    assert len(by_id) == len(lines)  # one line per request: BentoML's own access log is off
    for answer in answers:
        line = by_id[answer.headers["x-request-id"]]
        assert line["status"] == answer.status_code and line["latency_ms"] > 0
        assert line["path"] == answer.request.url.path and line["bytes_out"] == len(answer.content)
    assert by_id["lb-abc123"]["model"] == "lenet" and by_id["lb-abc123"]["images"] == 1
    assert by_id["v2-1"]["model"] == "lenet" and by_id["v2-1"]["images"] == 1
    assert by_id[text.headers["x-request-id"]]["error"] == text.json()["error"]
    assert "too many requests" in by_id[busy.headers["x-request-id"]]["error"]
    assert "shutting down" in by_id[refused.headers["x-request-id"]]["error"]
    assert by_id[slow.headers["x-request-id"]]["images"] == 30


def test_sampled_and_text_access_logs_keep_every_error(tmp_path: Path, samples) -> None:
    settings = {"CIFAR10_WORKERS": "1", "CIFAR10_ACCESS_LOG": "text", "CIFAR10_ACCESS_LOG_SAMPLE": "5"}
    with serving_in(tmp_path, **settings) as (_, url, log):
        ids = [
            httpx.post(f"{url}/classify", files={"image": ("x.jpg", samples[0][1])}).headers["x-request-id"]
            for _ in range(10)
        ]
        bad = httpx.post(f"{url}/classify", files={"image": ("a.pdf", b"%PDF-1.7")}).headers["x-request-id"]
    lines = [line for line in log.read_text().splitlines() if "[cifar10.access]" in line and "/classify" in line]
    assert sum(any(f"request_id={i}," in line for line in lines) for i in ids) == 2  # 1 in 5 of the successes
    [error_line] = [line for line in lines if f"request_id={bad}," in line]
    assert "(status=415," in error_line and "PDF is not a supported image type" in error_line


class Collector(http.server.ThreadingHTTPServer):
    """An in-process OTLP/HTTP trace collector: keeps every span it is sent."""

    def __init__(self) -> None:
        self.spans: list[dict] = []
        collector = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                request = ExportTraceServiceRequest()
                request.ParseFromString(self.rfile.read(int(self.headers["content-length"])))
                for resource in request.resource_spans:
                    for scope in resource.scope_spans:
                        for span in scope.spans:
                            attributes = {a.key: a.value.string_value or a.value.int_value for a in span.attributes}
                            collector.spans.append(
                                {
                                    "name": span.name,
                                    "trace_id": span.trace_id.hex(),
                                    "span_id": span.span_id.hex(),
                                    "parent": span.parent_span_id.hex(),
                                    **attributes,
                                }
                            )
                self.send_response(200)
                self.end_headers()

            def log_message(self, *_: object) -> None:
                pass

        super().__init__(("127.0.0.1", 0), Handler)


def test_with_otlp_tracing_each_classify_request_has_a_span_and_a_model_call(tmp_path: Path, samples) -> None:
    collector = Collector()
    threading.Thread(target=collector.serve_forever, daemon=True).start()
    options = (
        "services.tracing.exporter_type=otlp services.tracing.sample_rate=1.0 services.tracing.otlp.protocol=http "
        f"services.tracing.otlp.endpoint=http://127.0.0.1:{collector.server_address[1]}/v1/traces"
    )
    settings = {"CIFAR10_WORKERS": "1", "BENTOML_CONFIG_OPTIONS": options, "OTEL_BSP_SCHEDULE_DELAY": "100"}
    try:
        with serving_in(tmp_path, **settings) as (_, url, log):
            answer = httpx.post(f"{url}/classify", files={"image": ("x.jpg", samples[0][1])}, data={"model": "lenet"})
            listed = httpx.get(f"{url}/models")
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline and not any(s["name"] == "cifar10.model_call" for s in collector.spans):
                time.sleep(0.1)
    finally:
        collector.shutdown()
    by_id = {line["request_id"]: line for line in access_lines(log)}
    line = by_id[answer.headers["x-request-id"]]
    [request] = [s for s in collector.spans if s["name"] == "POST /classify" and s["trace_id"] == line["trace_id"]]
    [call] = [s for s in collector.spans if s["name"] == "cifar10.model_call" and s["trace_id"] == line["trace_id"]]
    assert call["parent"] == request["span_id"] and call["cifar10.model"] == "lenet"
    assert call["cifar10.images"] == 1 and call["cifar10.batch_images"] >= 1
    models_trace = by_id[listed.headers["x-request-id"]]["trace_id"]  # BentoML's own span continues ours
    assert sum(s["trace_id"] == models_trace for s in collector.spans) >= 2
