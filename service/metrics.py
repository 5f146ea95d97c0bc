"""The service's Prometheus metrics, through prometheus_client (BentoML's /metrics collects them).

BentoML starts each worker with PROMETHEUS_MULTIPROC_DIR set, so these are created in
multiprocess mode and every worker's samples reach /metrics.
"""

from prometheus_client import Counter, Histogram

INFERENCES = Counter("cifar10_inference_images_total", "Images classified, by model", ["model"])
BATCH_SIZES = Histogram(
    "cifar10_inference_batch_size",
    "Images per model call, by model",
    ["model"],
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
)
OUT_OF_DISTRIBUTION = Counter(
    "cifar10_out_of_distribution_images_total",
    "Images whose out-of-distribution score is above the model's threshold (answered, flagged), by model",
    ["model"],
)
MODEL_SECONDS = Histogram(
    "cifar10_inference_seconds",
    "ONNX Runtime time per model call, by model",
    ["model"],
    buckets=(0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0),
)
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
ABANDONED_IMAGES = Counter(
    "cifar10_abandoned_images_total",
    "Images of abandoned requests: left out of a model call (skipped) or computed and dropped (discarded)",
    ["model", "outcome"],
)
