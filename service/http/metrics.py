"""The HTTP routes' Prometheus metrics, through prometheus_client (BentoML's /metrics collects them; each worker
writes its own files in its server's folder, service/bentoml_internals.py)."""

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
