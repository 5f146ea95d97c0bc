"""What an operator sees of every request: its request ID and one access log line.

Every route's requests pass the request context layer (service/http/context.py), which makes one `RequestRecord` per
request and writes it here when the answer has gone, so BentoML's own access log is off (service/service.py): one
line per request, whatever route answered it. The ID is the client's X-Request-ID when it has a usable one (a load
balancer's), else a new one; it goes back in the X-Request-ID header and in every error body.
"""

from __future__ import annotations

import contextlib
import re
import secrets
import sys
import time
from dataclasses import dataclass
from json.encoder import encode_basestring_ascii
from typing import TextIO

from starlette.types import Scope

REQUEST_ID = re.compile(r"[!-~]{1,128}")  # printable ASCII, no spaces, bounded
RECORD = "cifar10.record"  # the scope key of a request's RequestRecord


def text(value: str) -> str:
    """A JSON string (null when empty), escaped as json.dumps escapes it."""
    return encode_basestring_ascii(value) if value else "null"


def request_id(scope: Scope) -> str:
    """The client's X-Request-ID when usable, else a new random one."""
    given = next((value.decode("latin-1") for name, value in scope["headers"] if name == b"x-request-id"), "")
    return usable_request_id(given)


def usable_request_id(given: str) -> str:
    """`given` when it is a usable request ID, else a new random one."""
    return given if REQUEST_ID.fullmatch(given) else secrets.token_hex(8)


@dataclass(slots=True)
class RequestRecord:
    """One request as the access log records it; the routes fill in what they learn (model, images, error)."""

    request_id: str
    method: str
    path: str
    client: str
    started: float  # time.perf_counter()
    bytes_in: int = 0
    bytes_out: int = 0
    status: int = 0
    model: str = ""
    images: int = 0
    error: str = ""
    trace_id: str = ""

    @classmethod
    def begin(cls, scope: Scope) -> RequestRecord:
        client = scope.get("client")
        length = next((v for k, v in scope["headers"] if k == b"content-length"), b"0")
        return cls(
            request_id(scope),
            scope["method"],
            scope["path"],
            f"{client[0]}:{client[1]}" if client else "-",
            time.perf_counter(),
            int(length) if length.isdigit() else 0,
        )


class AccessLog:
    """One line per request on stderr, as JSON or BentoML-like text; successful requests can be sampled (1 in
    `sample`), errors (status 400 and up) are always written."""

    def __init__(self, form: str, sample: int = 1, stream: TextIO | None = None) -> None:
        self.form, self.sample, self.stream = form, sample, stream or sys.stderr
        self.successes = 0
        self.second, self.stamp = -1, ""  # the time text of the current second, made once a second

    def write(self, record: RequestRecord) -> None:
        if self.form == "off":
            return
        if record.status < 400:
            self.successes += 1
            if self.successes % self.sample:
                return
        now = time.time()
        if int(now) != self.second:
            self.second = int(now)
            self.stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now))
        at = f"{self.stamp}.{int(now % 1 * 1000):03d}Z"
        latency = (time.perf_counter() - record.started) * 1000
        if self.form == "json":  # written out: the same JSON as json.dumps, at under a third of its cost
            line = (
                f'{{"time":"{at}","method":{text(record.method)},"path":{text(record.path)},'
                f'"status":{record.status},"bytes_in":{record.bytes_in},"bytes_out":{record.bytes_out},'
                f'"latency_ms":{latency:.3f},"model":{text(record.model)},"images":{record.images or "null"},'
                f'"error":{text(record.error)},"client":{text(record.client)},'
                f'"request_id":{text(record.request_id)},"trace_id":{text(record.trace_id)}}}'
            )
        else:
            line = (
                f"{at} [INFO] [cifar10.access] {record.client} (method={record.method},path={record.path},"
                f"length={record.bytes_in}) (status={record.status},length={record.bytes_out}) "
                f"{latency:.3f}ms (request_id={record.request_id},trace={record.trace_id or '-'},"
                f"model={record.model or '-'},images={record.images})"
                + (f" error={text(record.error)}" if record.error else "")
            )
        with contextlib.suppress(OSError, ValueError):  # stderr gone (its parent exited): the answer went out
            self.stream.write(line + "\n")
