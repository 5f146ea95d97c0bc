"""The model calls' Prometheus metrics, through prometheus_client (BentoML's /metrics collects them; each worker
writes its own files in its server's folder, service/bentoml_internals.py)."""

import numpy as np
from prometheus_client import Counter, Gauge, Histogram

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
ABANDONED_OUTCOMES = ("skipped", "discarded")
ABANDONED_IMAGES = Counter(
    "cifar10_abandoned_images_total",
    "Images of abandoned requests: left out of a model call (skipped) or computed and dropped (discarded)",
    ["model", "outcome"],
)
PREDICTED_CLASSES = Counter(
    "cifar10_predicted_class_total", "Images answered, by model and top-1 class (live answers only)", ["model", "class"]
)
TOP1_PROBABILITY = Histogram(
    "cifar10_top1_probability",
    "The top-1 class's probability of each image answered, by model",
    ["model"],
    buckets=(0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99),
)
EXPECTED_CLASS_SHARE = Gauge(
    "cifar10_expected_class_share",
    "The share of its validation images the answering version predicts as each class (its calibration metadata)",
    ["model", "class"],
    multiprocess_mode="livemax",
)
WORKERS_SERVING = Gauge(
    "cifar10_workers_serving",
    "Worker processes that serve each model, by answering copy's precision",
    ["model", "precision"],
    multiprocess_mode="livesum",
)
WORKERS_EXPECTED = Gauge(  # labelled, as every metric here: an unlabelled one would write before the worker has
    # chosen its metrics folder (service/bentoml_internals.py), at import
    "cifar10_workers_expected",
    "Worker processes the server runs (CIFAR10_WORKERS, resolved), by server process (its PID-START)",
    ["server"],
    multiprocess_mode="livemax",
)
INT8_FALLBACK = Gauge(
    "cifar10_int8_fallback",
    "1 where a model's int8 copy failed its self-check on this host and fp32 answers instead",
    ["model"],
    multiprocess_mode="livemax",
)


def observe_all(histogram: Histogram, values: np.ndarray) -> None:
    """`histogram.observe(v)` for every v in `values` (a labelled child), in one pass: one at a time, 64 values cost
    ~250 us, a sixth of a LeNet call of 64 images. Writes what Histogram.observe writes (its _sum and the bucket
    of each value; tests/test_monitoring.py checks the two agree)."""
    bounds = histogram._upper_bounds
    counts = np.bincount(np.searchsorted(bounds, values, side="left"), minlength=len(bounds))
    histogram._sum.inc(float(values.sum()))
    for index in np.flatnonzero(counts).tolist():
        histogram._buckets[index].inc(int(counts[index]))
