"""Whether a model's probabilities mean what they say, and the one number that makes them: expected calibration
error (15 bins, top-1), negative log-likelihood, a reliability diagram, and a temperature fitted on held-out
validation images, never on the test set.

The service's softmax divides the logits by the model's temperature (core.runtime); label smoothing in
training leaves a model under-confident (every confident answer near 0.9), which a temperature below 1 undoes.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from core.runtime import softmax

BINS = 15
SEARCH = (0.05, 20.0)  # the temperatures looked at


def binned(probabilities: np.ndarray, labels: np.ndarray, bins: int = BINS) -> tuple[np.ndarray, ...]:
    """Each image's top-1 confidence, whether that class is right, and its bin of confidence (equal widths over
    0-1)."""
    confidence = probabilities.max(1)
    correct = probabilities.argmax(1) == labels
    return confidence, correct, np.minimum((confidence * bins).astype(np.int64), bins - 1)


def calibration_error(probabilities: np.ndarray, labels: np.ndarray, bins: int = BINS) -> float:
    """Expected calibration error: the images' share-weighted gap between confidence and accuracy, per bin of
    top-1 confidence."""
    confidence, correct, which = binned(probabilities, labels, bins)
    error = 0.0
    for b in range(bins):
        inside = which == b
        if inside.any():
            error += inside.mean() * abs(correct[inside].mean() - confidence[inside].mean())
    return float(error)


def negative_log_likelihood(probabilities: np.ndarray, labels: np.ndarray) -> float:
    return float(-np.log(np.maximum(probabilities[np.arange(len(labels)), labels], 1e-300)).mean())


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """The temperature minimising the NLL of softmax(logits / T): a golden-section search over log T (the NLL is
    convex in 1/T), to four decimals."""
    low, high = math.log(SEARCH[0]), math.log(SEARCH[1])
    ratio = (math.sqrt(5) - 1) / 2

    def loss(log_t: float) -> float:
        return negative_log_likelihood(softmax(logits, math.exp(log_t)), labels)

    a, b = high - ratio * (high - low), low + ratio * (high - low)
    loss_a, loss_b = loss(a), loss(b)
    while high - low > 1e-5:
        if loss_a < loss_b:
            high, b, loss_b = b, a, loss_a
            a = high - ratio * (high - low)
            loss_a = loss(a)
        else:
            low, a, loss_a = a, b, loss_b
            b = low + ratio * (high - low)
            loss_b = loss(b)
    return round(math.exp((low + high) / 2), 4)


def measure(logits: np.ndarray, labels: np.ndarray, temperature: float = 1.0) -> dict:
    """Accuracy, ECE, NLL, and the share of the images predicted as each class (what a server's predicted classes
    are compared against, to see its inputs drift)."""
    probabilities = softmax(logits, temperature)
    predicted = probabilities.argmax(1)
    shares = np.bincount(predicted, minlength=logits.shape[1]) / len(labels)
    return {
        "images": len(labels),
        "accuracy": float((predicted == labels).mean()),
        "ece": calibration_error(probabilities, labels),
        "nll": negative_log_likelihood(probabilities, labels),
        "predicted_shares": [round(float(share), 4) for share in shares],
    }


def report(
    validation: tuple[np.ndarray, np.ndarray], test: tuple[np.ndarray, np.ndarray] | None, temperature: float
) -> dict:
    """ECE and NLL before (T = 1) and after (the temperature) on the validation images and, when given, the test
    images: what travels in the ONNX metadata and the card."""
    found = {"temperature": temperature, "bins": BINS, "fitted_on": "validation"}
    for name, pair in (("validation", validation), ("test", test)):
        if pair is not None:
            found[name] = {"before": measure(*pair), "after": measure(*pair, temperature)}
    return found


def reliability_diagram(path: Path, curves: dict[str, tuple[np.ndarray, np.ndarray]], title: str) -> None:
    """Accuracy against confidence per bin, one line per (probabilities, labels) in `curves`, beside the diagonal."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 5))
    ax.plot([0, 1], [0, 1], color="#9aa3ad", linestyle="--", label="perfectly calibrated")
    edges = np.linspace(0, 1, BINS + 1)
    for name, (probabilities, labels) in curves.items():
        confidence, correct, which = binned(probabilities, labels)
        shown = [(confidence[which == b].mean(), correct[which == b].mean()) for b in range(BINS) if (which == b).any()]
        ece = calibration_error(probabilities, labels)
        ax.plot(*zip(*shown, strict=True), marker="o", label=f"{name} (ECE {ece:.3f})")
    ax.set(
        xlim=(0, 1),
        ylim=(0, 1),
        xticks=edges[::3],
        xlabel="confidence (top-1 probability)",
        ylabel="accuracy",
        title=title,
    )
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
