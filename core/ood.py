"""Whether an image looks like the images a model was trained on: its out-of-distribution score, and the threshold
above which an answer is flagged as none of the classes.

The network's own layers describe an image at each scale: for each stage (the last activation at each spatial
resolution, and the first), the mean and the log standard deviation of every channel over the image. Training
images' descriptions form a Gaussian per stage; an image's Mahalanobis distance to each, and the energy of its
logits (Liu et al., NeurIPS 2020), each standardized on the validation images, sum to its score (the layer-wise
Mahalanobis of Lee et al., NeurIPS 2018, without the outlier data their weights need). Noise, flat colours and
grayscale sketches differ from photographs early in the network, objects of other classes late.

The export (or `cifar10 calibrate`) gives the ONNX file two outputs, `stage_means` and `stage_squares` (each
channel's mean and mean square, computed in the graph), and stores what the score needs in its metadata (key
`ood`); training/ood.py fits it.
"""

from __future__ import annotations

import base64
import hashlib
import json
from dataclasses import dataclass, field

import numpy as np

from core.errors import UserError

METADATA_KEY = "ood"  # in the ONNX file's metadata_props, beside ModelInfo's keys
MEANS_OUTPUT, SQUARES_OUTPUT = "stage_means", "stage_squares"
METHOD = "layer-statistics"
EPSILON = 1e-2  # added to a channel's standard deviation before its log: a flat channel stays finite


def _encoded(array: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(array, "<f4").tobytes()).decode()


def _decoded(text: str, shape: tuple[int, ...]) -> np.ndarray:
    return np.frombuffer(base64.b64decode(text, validate=True), "<f4").reshape(shape)


@dataclass(frozen=True)
class Gaussian:
    """A stage's Gaussian: its mean, and `whitening`, which maps a description to a space where the covariance is
    the identity."""

    mean: np.ndarray
    whitening: np.ndarray

    def distances(self, descriptions: np.ndarray) -> np.ndarray:
        """(N, D) -> (N,) Mahalanobis distances; the product in float32, the sum of squares in float64."""
        mapped = ((descriptions - self.mean).astype(np.float32) @ self.whitening).astype(np.float64)
        return np.sqrt((mapped**2).sum(1))


@dataclass(frozen=True)
class OodScore:
    """A model's score: the channels of each stage, their Gaussians, the (mean, standard deviation) of each stage's
    distance and of the energy on the validation images, and the threshold."""

    widths: tuple[int, ...]
    gaussians: tuple[Gaussian, ...]
    scales: tuple[tuple[float, float], ...]  # one per stage, then the energy's
    threshold: float
    fitted: dict  # how it was fitted and measured, as /models and the model card show it
    bounds: tuple[int, ...] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "bounds", tuple(np.cumsum((0, *self.widths)).tolist()))

    def parts(self, means: np.ndarray, squares: np.ndarray, logits: np.ndarray) -> np.ndarray:
        """(N, stages + 1) standardized parts: each stage's distance, then the energy."""
        means, squares = means.astype(np.float64), squares.astype(np.float64)
        deviations = np.log(np.sqrt(np.maximum(squares - means**2, 0.0)) + EPSILON)
        columns = []
        for gaussian, start, end in zip(self.gaussians, self.bounds, self.bounds[1:], strict=False):
            columns.append(gaussian.distances(np.concatenate([means[:, start:end], deviations[:, start:end]], 1)))
        columns.append(energy(logits))
        location, spread = np.asarray(self.scales).T
        return (np.stack(columns, 1) - location) / spread

    def scores(self, means: np.ndarray, squares: np.ndarray, logits: np.ndarray) -> np.ndarray:
        """(N,) float64 scores: higher is less like the training images; above `threshold`, out of distribution."""
        return self.parts(means, squares, logits).sum(1)

    def describe(self) -> dict:
        return {"method": METHOD, "threshold": self.threshold, "stages": len(self.widths), **self.fitted}

    def to_metadata(self) -> str:
        arrays = {
            "means": [_encoded(g.mean) for g in self.gaussians],
            "whitenings": [_encoded(g.whitening) for g in self.gaussians],
        }
        return json.dumps(
            {
                "method": METHOD,
                "widths": list(self.widths),
                **arrays,
                "scales": [list(s) for s in self.scales],
                "threshold": self.threshold,
                "sha256": _digest(arrays, self.scales, self.threshold),
                "fitted": self.fitted,
            }
        )

    @classmethod
    def from_metadata(cls, raw: str) -> OodScore:
        """Read and check the metadata value: a UserError that says what is wrong for anything malformed or changed
        since it was fitted."""
        try:
            stored = json.loads(raw)
            if stored["method"] != METHOD:
                raise ValueError(f"unknown method {stored['method']!r} (this version scores {METHOD})")
            widths = tuple(int(w) for w in stored["widths"])
            gaussians = tuple(
                Gaussian(_decoded(mean, (2 * w,)), _decoded(whitening, (2 * w, 2 * w)))
                for w, mean, whitening in zip(widths, stored["means"], stored["whitenings"], strict=True)
            )
            scales = tuple((float(a), float(b)) for a, b in stored["scales"])
            threshold = float(stored["threshold"])
            arrays = {"means": stored["means"], "whitenings": stored["whitenings"]}
            digest = stored["sha256"]
            fitted = stored.get("fitted", {})
        except (ValueError, KeyError, TypeError) as exc:
            raise UserError(f"its out-of-distribution statistics are unreadable ({exc}); fit them again") from None
        if len(scales) != len(widths) + 1 or any(spread <= 0 for _, spread in scales):
            raise UserError("its out-of-distribution statistics have no usable scale for every part; fit them again")
        values = [*(g.mean for g in gaussians), *(g.whitening for g in gaussians), np.asarray(scales), threshold]
        if not all(np.isfinite(v).all() for v in values):
            raise UserError("its out-of-distribution statistics hold NaN or infinite values; fit them again")
        if digest != _digest(arrays, scales, threshold):
            raise UserError("its out-of-distribution statistics do not match their sha256: changed since fitted")
        return cls(widths, gaussians, scales, threshold, fitted)


def energy(logits: np.ndarray) -> np.ndarray:
    """The negative log-sum-exp of each row of logits: higher for an image the model finds nothing in."""
    logits = logits.astype(np.float64)
    top = logits.max(1)
    return -(top + np.log(np.exp(logits - top[:, None]).sum(1)))


def _digest(arrays: dict[str, list[str]], scales: tuple, threshold: float) -> str:
    """What the metadata's sha256 covers: the arrays as stored, the scales and the threshold."""
    digest = hashlib.sha256(json.dumps(arrays, sort_keys=True).encode())
    digest.update(repr([[float(a), float(b)] for a, b in scales]).encode())
    digest.update(repr(float(threshold)).encode())
    return digest.hexdigest()
