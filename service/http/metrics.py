"""The HTTP routes' and gRPC methods' Prometheus metrics, through prometheus_client (BentoML's /metrics collects
them; each worker writes its own files in its server's folder, service/bentoml_internals.py)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from prometheus_client import Counter, Histogram

REQUESTS = Counter(
    "cifar10_http_requests_total", "Classification requests answered, by endpoint and status", ["endpoint", "status"]
)
REQUEST_SECONDS = Histogram(
    "cifar10_http_request_seconds",
    "Classification request time, by endpoint",
    ["endpoint"],
    buckets=(0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0),
)
ABANDONED_REQUESTS = Counter(
    "cifar10_abandoned_requests_total",
    "Requests whose client disconnected before the answer: while sending the body (reading) or waiting for it",
    ["stage"],
)
# The statuses the alert rules (deploy/monitoring/) watch, each route's series created at 0 for them at start.
ALERTED_STATUSES = (200, 429, 500, 503, 504)


class RouteMeters:
    """Each route's request time and answered count by status, its Prometheus children looked up once (a lookup
    costs more than the update)."""

    def __init__(self) -> None:
        self.children: dict[tuple[str, int], tuple[Any, Any]] = {}

    def add(self, routes: Iterable[str]) -> None:
        """Count these routes too, their series created at 0 for the statuses the alert rules watch (a rate() over a
        series that appears with its first event misses that event)."""
        for route in routes:
            for status in ALERTED_STATUSES:
                self._children(route, status)

    def answered(self, route: str, status: int, seconds: float) -> None:
        time_taken, answered = self.children.get((route, status)) or self._children(route, status)
        time_taken.observe(seconds)
        answered.inc()

    def _children(self, route: str, status: int) -> tuple[Any, Any]:
        children = self.children[route, status] = (
            REQUEST_SECONDS.labels(endpoint=route),
            REQUESTS.labels(endpoint=route, status=str(status)),
        )
        return children
