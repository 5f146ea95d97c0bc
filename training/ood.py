"""Fitting and measuring the out-of-distribution score (core/ood.py): the ONNX file's stage outputs, a Gaussian per
stage of the training images' descriptions, the standardization and threshold that keep 95% of the validation
images, and how well the score tells CIFAR-10 test images from images of none of its classes.
"""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import onnx
from PIL import Image

from core.ood import EPSILON, MEANS_OUTPUT, SQUARES_OUTPUT, Gaussian, OodScore, energy
from core.runtime import softmax

KEEP = 0.95  # the share of validation images the threshold keeps
RIDGE = 1e-6  # added to a covariance's diagonal, times its mean variance: a channel that never varies stays finite
FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")  # Debian's dataset-fashion-mnist
SET_SIZES = {"fashion-mnist": 2000, "uniform noise": 500, "constant colours": 200}
METHOD_NAME = "layer statistics"  # the shipped score, beside the baselines in the measured figures
# What starts a stage or the head: the inputs of these are the activations whose statistics describe an image.
STAGE_CONSUMERS = {
    "Conv",
    "MaxPool",
    "ReduceMean",
    "ReduceMax",
    "GlobalAveragePool",
    "GlobalMaxPool",
    "Flatten",
    "Reshape",
}
PASS_THROUGH = {"QuantizeLinear", "DequantizeLinear", "Cast", "Identity"}
PREFIX = "ood_stage"  # of what add_stage_outputs adds to a graph


def stage_tensors(graph: onnx.GraphProto, shapes: dict[str, list[int]]) -> list[str]:
    """The activations that describe an image at each scale: of the 4-D tensors that a stage or the head takes in,
    the first, and the last at each spatial resolution (in graph order); never the input image itself."""
    image = {graph.input[0].name}
    for node in graph.node:  # the input as an int8 file quantizes it is still the image
        if node.op_type in PASS_THROUGH and node.input and node.input[0] in image:
            image.update(node.output)
    taken = []
    for node in graph.node:
        if node.op_type in STAGE_CONSUMERS and node.input:
            name = node.input[0]
            shape = shapes.get(name, ())
            spread = len(shape) == 4 and shape[2] * shape[3] > 1  # a 1x1 map has no spatial statistics
            if name not in image and spread and name not in taken:
                taken.append(name)
    if not taken:
        raise ValueError("the graph has no 4-D activation to describe an image by")
    last = {tuple(shapes[name][2:]): name for name in taken}  # by resolution, the later one wins
    return [name for name in taken if name == taken[0] or name in last.values()]


def add_stage_outputs(path: Path) -> list[int]:
    """Give the ONNX file at `path` the outputs `stage_means` and `stage_squares`: each stage tensor's channel means
    and mean squares over the image, concatenated (computed in the graph: a few reductions, not whole activation
    maps copied out); returns each stage's channels. Outputs a file already has are made again."""
    proto = onnx.load(str(path))
    graph = proto.graph
    remove_stage_outputs(graph)
    inferred = onnx.shape_inference.infer_shapes(proto)
    shapes = {
        v.name: [d.dim_value for d in v.type.tensor_type.shape.dim]
        for v in (*inferred.graph.value_info, *inferred.graph.output)
    }
    stages = stage_tensors(graph, shapes)
    widths = [shapes[name][1] for name in stages]
    opset = next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))
    graph.initializer.append(onnx.helper.make_tensor(f"{PREFIX}axes", onnx.TensorProto.INT64, [2], [2, 3]))
    producers = {name: node for node in graph.node for name in node.output}
    means, squares = [], []
    for i, name in enumerate(stages):
        source = name
        producer = producers.get(name)
        if producer is not None and producer.op_type == "DequantizeLinear":
            # An int8 file's own copy of the dequantized tensor: a second consumer of the one its convolution reads
            # would keep ONNX Runtime from fusing that convolution into an int8 one.
            source = f"{PREFIX}{i}_float"
            graph.node.append(onnx.helper.make_node("DequantizeLinear", producer.input, [source], name=source))
        area = onnx.helper.make_tensor(
            f"{PREFIX}{i}_area", onnx.TensorProto.FLOAT, [], [1 / (shapes[name][2] * shapes[name][3])]
        )
        graph.initializer.append(area)
        summed, mean, square = f"{PREFIX}{i}_sum_square", f"{PREFIX}{i}_mean", f"{PREFIX}{i}_square"
        graph.node.extend(
            [
                reduction("ReduceMean", source, mean, opset),
                reduction("ReduceSumSquare", source, summed, opset),
                onnx.helper.make_node("Mul", [summed, area.name], [square], name=square),
            ]
        )
        means.append(mean)
        squares.append(square)
    for output, parts in ((MEANS_OUTPUT, means), (SQUARES_OUTPUT, squares)):
        graph.node.append(onnx.helper.make_node("Concat", parts, [output], name=f"{PREFIX}{output}", axis=1))
        graph.output.append(onnx.helper.make_tensor_value_info(output, onnx.TensorProto.FLOAT, ["batch", sum(widths)]))
    onnx.checker.check_model(proto, full_check=True)
    onnx.save(proto, str(path))
    return widths


def without_stage_outputs(source: Path, out: Path) -> None:
    """A copy of an ONNX file without what add_stage_outputs added."""
    proto = onnx.load(str(source))
    remove_stage_outputs(proto.graph)
    onnx.save(proto, str(out))


def reduction(op: str, source: str, out: str, opset: int) -> onnx.NodeProto:
    """`op` over a tensor's height and width, to (N, C)."""
    if opset >= 18:
        return onnx.helper.make_node(op, [source, f"{PREFIX}axes"], [out], name=out, keepdims=0)
    return onnx.helper.make_node(op, [source], [out], name=out, axes=[2, 3], keepdims=0)


def remove_stage_outputs(graph: onnx.GraphProto) -> None:
    """Take out what add_stage_outputs added to a graph (its nodes, initializer and outputs are named for it)."""
    for field, keep in (
        (graph.node, lambda node: not node.name.startswith(PREFIX)),
        (graph.initializer, lambda tensor: not tensor.name.startswith(PREFIX)),
        (graph.output, lambda output: output.name not in (MEANS_OUTPUT, SQUARES_OUTPUT)),
    ):
        kept = [item for item in field if keep(item)]
        del field[:]
        field.extend(kept)


def gaussian(descriptions: np.ndarray) -> Gaussian:
    """The mean and whitening of (N, D) descriptions, the covariance's diagonal lifted by RIDGE."""
    values = descriptions.astype(np.float64)
    mean = values.mean(0)
    centred = values - mean
    n, d = centred.shape
    ridge = RIDGE * (centred**2).sum() / (n - 1) / d  # RIDGE times the mean variance
    if n > d:
        covariance = centred.T @ centred / (n - 1) + np.eye(d) * ridge
        eigenvalues, eigenvectors = np.linalg.eigh(covariance)
        return Gaussian(mean.astype(np.float32), (eigenvectors / np.sqrt(eigenvalues)).astype(np.float32))
    # Fewer images than dimensions (a small fit of a wide network): outside the data's n directions every eigenvalue
    # is the ridge, so the data's SVD gives the inverse square root without a D x D eigendecomposition: the same
    # distances, whitened symmetrically.
    _, singular, directions = np.linalg.svd(centred, full_matrices=False)
    scale = 1 / np.sqrt(singular**2 / (n - 1) + ridge) - 1 / np.sqrt(ridge)
    whitening = (directions.T * scale) @ directions + np.eye(d) / np.sqrt(ridge)
    return Gaussian(mean.astype(np.float32), whitening.astype(np.float32))


def describe(means: np.ndarray, squares: np.ndarray, start: int, end: int) -> np.ndarray:
    """A stage's description of each image: its channels' means and log standard deviations."""
    m, q = means[:, start:end].astype(np.float64), squares[:, start:end].astype(np.float64)
    return np.concatenate([m, np.log(np.sqrt(np.maximum(q - m**2, 0.0)) + EPSILON)], 1)


Outputs = tuple[np.ndarray, np.ndarray, np.ndarray]  # logits, stage means, stage squares


def fit(train: Outputs, validation: Outputs, widths: list[int], fitted: dict) -> OodScore:
    """A Gaussian per stage of the training images' descriptions; each part's location and spread, and the
    threshold that keeps KEEP of them, on the validation images."""
    _, means, squares = train
    bounds = np.cumsum([0, *widths])
    gaussians = tuple(gaussian(describe(means, squares, a, b)) for a, b in zip(bounds, bounds[1:], strict=False))
    unscaled = OodScore(tuple(widths), gaussians, ((0.0, 1.0),) * (len(widths) + 1), 1.0, {})
    logits, val_means, val_squares = validation
    parts = unscaled.parts(val_means, val_squares, logits)
    scales = tuple(zip(parts.mean(0).tolist(), parts.std(0).tolist(), strict=True))
    scaled = OodScore(tuple(widths), gaussians, scales, 1.0, {})
    threshold = float(np.quantile(scaled.scores(val_means, val_squares, logits), KEEP))
    return OodScore(tuple(widths), gaussians, scales, threshold, fitted)


def auroc(inside: np.ndarray, outside: np.ndarray) -> float:
    """Area under the ROC curve of telling `outside` scores (higher = out of distribution) from `inside` ones: the
    chance that a random outside image scores above a random inside one, ties counted half (Mann-Whitney U)."""
    scores = np.concatenate([inside, outside])
    _, which, counts = np.unique(scores, return_inverse=True, return_counts=True)
    ranks = (np.cumsum(counts) - (counts - 1) / 2)[which]  # tied scores share the mean of the ranks they span
    above = ranks[len(inside) :].sum() - len(outside) * (len(outside) + 1) / 2
    return float(above / (len(inside) * len(outside)))


def fpr_at_95_tpr(inside: np.ndarray, outside: np.ndarray) -> float:
    """The share of `outside` images still passing at the threshold that keeps 95% of the `inside` ones."""
    return float((outside <= np.quantile(inside, 0.95)).mean())


def baseline_scores(logits: np.ndarray, temperature: float) -> dict[str, np.ndarray]:
    """The scores to beat, higher = out of distribution: the top-1 probability's complement and the energy."""
    return {"max probability": 1 - softmax(logits, temperature).max(1), "energy": energy(logits / temperature)}


def generated_sets(seed: int = 0) -> dict[str, np.ndarray]:
    """Images of none of the classes, as uint8 (N, 32, 32, 3): Fashion-MNIST's test images (28x28 grayscale,
    upscaled bilinearly to 32x32 RGB), uniform noise and constant colours."""
    rng = np.random.default_rng(seed)
    noise = rng.integers(0, 256, (SET_SIZES["uniform noise"], 32, 32, 3), dtype=np.uint8)
    colours = rng.integers(0, 256, (SET_SIZES["constant colours"], 1, 1, 3), dtype=np.uint8)
    return {
        "fashion-mnist": fashion_mnist(SET_SIZES["fashion-mnist"]),
        "uniform noise": noise,
        "constant colours": np.broadcast_to(colours, (len(colours), 32, 32, 3)).copy(),
    }


def fashion_mnist(count: int, folder: Path = FASHION_MNIST) -> np.ndarray:
    """The first `count` Fashion-MNIST test images, upscaled to 32x32 RGB."""
    file = folder / "t10k-images-idx3-ubyte.gz"
    if not file.is_file():
        raise FileNotFoundError(f"{file} is missing; install Debian's dataset-fashion-mnist")
    with gzip.open(file) as f:
        raw = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28)[:count]
    return np.stack([np.asarray(Image.fromarray(i).resize((32, 32), Image.BILINEAR).convert("RGB")) for i in raw])


def measure(
    test: Outputs, labels: np.ndarray, outside: dict[str, Outputs], temperature: float, score: OodScore
) -> dict:
    """How the score and the baselines tell the test images from each set of images of none of the classes: AUROC
    and FPR at 95% TPR per method, the share each set has flagged at the fitted threshold, and the test images
    flagged and the accuracy on those kept."""
    logits = test[0]
    inside = {**baseline_scores(logits, temperature), METHOD_NAME: score.scores(test[1], test[2], logits)}
    kept = inside[METHOD_NAME] <= score.threshold
    right = logits.argmax(1) == labels
    found = {
        "test": {
            "images": len(labels),
            "flagged": round(float(1 - kept.mean()), 4),
            "accuracy": round(float(right.mean()), 4),
            "accuracy_kept": round(float(right[kept].mean()), 4),
        },
        "sets": {},
    }
    for name, (set_logits, set_means, set_squares) in outside.items():
        scores = {
            **baseline_scores(set_logits, temperature),
            METHOD_NAME: score.scores(set_means, set_squares, set_logits),
        }
        found["sets"][name] = {
            "images": len(set_logits),
            "flagged": round(float((scores[METHOD_NAME] > score.threshold).mean()), 4),
            "mean_top1_probability": round(float(softmax(set_logits, temperature).max(1).mean()), 4),
            "auroc": {m: round(auroc(inside[m], scores[m]), 4) for m in inside},
            "fpr95": {m: round(fpr_at_95_tpr(inside[m], scores[m]), 4) for m in inside},
        }
    return found
