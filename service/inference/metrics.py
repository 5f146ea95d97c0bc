"""The model calls' Prometheus metrics, through prometheus_client (BentoML's /metrics collects them; each worker
writes its own files in its server's folder, service/bentoml_internals.py)."""

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
ABANDONED_IMAGES = Counter(
    "cifar10_abandoned_images_total",
    "Images of abandoned requests: left out of a model call (skipped) or computed and dropped (discarded)",
    ["model", "outcome"],
)
