"""The out-of-distribution flag: the score's arithmetic and metadata, the shipped models on real images (noise,
constant colours and Fashion-MNIST flagged, CIFAR-10 test images kept), and files without the statistics."""

from __future__ import annotations

import base64
import io
import json
import os
from pathlib import Path

import httpx
import numpy as np
import pytest
import yaml
from PIL import Image

from core.errors import UserError
from core.files import sha256_of
from core.ood import METADATA_KEY, OodScore
from core.preprocess import decode_rgb, normalize
from core.runtime import OnnxModel
from core.store import PRETRAINED, SHIPPED_FILES, shipped_file
from harness.samples import ROOT, cifar_samples
from harness.server import serve_expecting_exit, serving
from tests.conftest import run_cli
from training.ood import (
    RIDGE,
    auroc,
    describe,
    fashion_mnist,
    fit,
    fpr_at_95_tpr,
    gaussian,
    generated_sets,
    remove_stage_outputs,
)


def fitted_on_random_stages(seed: int = 0) -> tuple[OodScore, tuple]:
    """A score fitted on random outputs of two stages (3 and 2 channels), and fresh random outputs to score."""
    rng = np.random.default_rng(seed)

    def outputs(n: int) -> tuple:
        means = rng.normal(size=(n, 5))
        return rng.normal(size=(n, 4)), means, means**2 + rng.uniform(0.5, 2, size=(n, 5))

    return fit(outputs(400), outputs(200), [3, 2], {"train_images": 400}), outputs(50)


def test_the_score_sums_each_stages_standardized_distance_and_the_energy() -> None:
    score, (logits, means, squares) = fitted_on_random_stages()
    parts = []
    for (start, end), stage in zip(((0, 3), (3, 5)), score.gaussians, strict=True):
        description = describe(means, squares, start, end)
        deviation = (description - stage.mean) @ stage.whitening.astype(np.float64)
        parts.append(np.linalg.norm(deviation, axis=1))
    parts.append(-np.log(np.exp(logits).sum(1)))  # the energy
    location, spread = np.asarray(score.scales).T
    expected = ((np.stack(parts, 1) - location) / spread).sum(1)
    assert score.scores(means, squares, logits) == pytest.approx(expected, rel=1e-5, abs=1e-6)
    assert score.describe() == {
        "method": "layer-statistics",
        "threshold": score.threshold,
        "stages": 2,
        "train_images": 400,
    }


@pytest.mark.parametrize("images, dimensions", [(400, 30), (50, 200)])
def test_a_gaussian_gives_the_mahalanobis_distance_with_more_or_fewer_images_than_dimensions(
    images: int, dimensions: int
) -> None:
    rng = np.random.default_rng(1)
    descriptions = rng.normal(size=(images, dimensions)) * rng.uniform(0.1, 3, size=dimensions)
    covariance = np.cov(descriptions, rowvar=False)
    covariance += np.eye(dimensions) * RIDGE * np.trace(covariance) / dimensions
    deviations = rng.normal(size=(20, dimensions))
    expected = np.sqrt((deviations * np.linalg.solve(covariance, deviations.T).T).sum(1))
    fitted = gaussian(descriptions)
    assert fitted.distances(deviations + descriptions.mean(0)) == pytest.approx(expected, rel=1e-4)


def test_the_metadata_round_trips_and_refuses_what_was_changed_or_broken() -> None:
    score, (logits, means, squares) = fitted_on_random_stages()
    raw = score.to_metadata()
    back = OodScore.from_metadata(raw)
    assert back.threshold == score.threshold and back.widths == (3, 2)
    assert np.array_equal(back.scores(means, squares, logits), score.scores(means, squares, logits))
    stored = json.loads(raw)
    problems = {
        "sha256": {**stored, "threshold": stored["threshold"] + 1},  # a threshold moved by hand
        "unreadable": {**stored, "means": ["not base64!", stored["means"][1]]},
        "no usable scale": {**stored, "scales": stored["scales"][:2]},
        "NaN": {**stored, "threshold": float("nan")},
    }
    for expected, broken in problems.items():
        with pytest.raises(UserError, match=expected):
            OodScore.from_metadata(json.dumps(broken))
    with pytest.raises(UserError, match="unreadable"):
        OodScore.from_metadata("{not json")


def test_auroc_and_fpr95_match_their_definitions() -> None:
    rng = np.random.default_rng(0)
    inside, outside = rng.normal(0, 1, 300).round(1), rng.normal(1, 1, 200).round(1)  # rounded: ties
    pairs = (outside[:, None] > inside[None]).mean() + 0.5 * (outside[:, None] == inside[None]).mean()
    assert auroc(inside, outside) == pytest.approx(pairs)
    assert auroc(inside, inside + 100) == 1.0 and auroc(inside, inside) == pytest.approx(0.5)
    assert fpr_at_95_tpr(inside, outside) == pytest.approx((outside <= np.quantile(inside, 0.95)).mean())


def flagged_share(model: OnnxModel, pixels: np.ndarray) -> float:
    _, scores = model.logits_and_scores(normalize(pixels, model.table))
    return float((scores > model.ood.threshold).mean())


@pytest.fixture(scope="module")
def outside_samples() -> dict[str, np.ndarray]:
    """Images of none of the classes: 100 Fashion-MNIST test images, 50 of noise, 50 constant colours."""
    sets = generated_sets(seed=1)
    return {
        "fashion-mnist": fashion_mnist(100),
        "uniform noise": sets["uniform noise"][:50],
        "constant colours": sets["constant colours"][:50],
    }


@pytest.mark.parametrize("name", SHIPPED_FILES)
def test_images_of_none_of_the_classes_are_flagged_and_cifar10_images_kept(name: str, outside_samples) -> None:
    model = OnnxModel(PRETRAINED / f"{name}.onnx", providers="cpu")
    assert model.ood is not None and model.ood.describe()["method"] == "layer-statistics"
    for set_name, pixels in outside_samples.items():
        # ResNet-18 flags nearly all of each (README); LeNet, a far weaker network, and WhiteNet all noise and
        # colours, and 43% and 84% of Fashion-MNIST.
        least = 0.9 if name.startswith("resnet18") or set_name != "fashion-mnist" else 0.3
        assert flagged_share(model, pixels) >= least, set_name
    cifar = np.stack([decode_rgb(data) for _, data in cifar_samples(per_class=10, offset=100)])
    assert 1 - flagged_share(model, cifar) >= 0.9


def test_the_int8_copy_flags_what_fp32_flags(outside_samples) -> None:
    fp32, int8 = (OnnxModel(shipped_file(n), providers="cpu") for n in ("resnet18", "resnet18-int8"))
    pixels = np.concatenate(
        [*outside_samples.values(), np.stack([decode_rgb(d) for _, d in cifar_samples(per_class=10, offset=100)])]
    )
    flags = [model.logits_and_scores(normalize(pixels, model.table))[1] > model.ood.threshold for model in (fp32, int8)]
    assert (flags[0] == flags[1]).mean() >= 0.95


@pytest.mark.parametrize("name", SHIPPED_FILES)
def test_each_card_gives_the_scores_figures(name: str) -> None:
    card = json.loads((PRETRAINED / f"{name}.json").read_text())["out_of_distribution"]
    model = OnnxModel(PRETRAINED / f"{name}.onnx", providers="cpu")
    assert card["threshold"] == model.ood.threshold and card["method"] == "layer-statistics"
    measured = card["measured"]
    assert measured["test"]["images"] == 10_000
    assert {"fashion-mnist", "uniform noise", "constant colours"} <= set(measured["sets"])
    assert len(measured["sets"]) >= 4  # and real photographs of none of the classes


def test_a_file_without_the_statistics_has_no_score(tmp_path) -> None:
    model = OnnxModel(old_export(shipped_file("lenet"), tmp_path / "old.onnx"), providers="cpu")
    logits, scores = model.logits_and_scores(np.zeros((2, 3, 32, 32), np.float32))
    assert model.ood is None and scores is None and logits.shape == (2, 10)


def moved_statistics(source: Path, out: Path) -> Path:
    """`source` with its out-of-distribution threshold doubled by hand (its sha256 left as fitted)."""
    import onnx

    proto = onnx.load(str(source))
    entry = next(p for p in proto.metadata_props if p.key == METADATA_KEY)
    stored = json.loads(entry.value)
    entry.value = json.dumps({**stored, "threshold": stored["threshold"] * 2})
    onnx.save(proto, str(out))
    return out


def test_a_file_whose_statistics_were_changed_is_refused_naming_it(tmp_path) -> None:
    moved_statistics(shipped_file("lenet"), tmp_path / "moved.onnx")
    with pytest.raises(UserError, match=r"moved\.onnx: .*do not match their sha256"):
        OnnxModel(tmp_path / "moved.onnx", providers="cpu")


def old_export(source: Path, out: Path) -> Path:
    """`source` as an export from before the score: no stage outputs, no statistics."""
    import onnx

    proto = onnx.load(str(source))
    kept = [p for p in proto.metadata_props if p.key != METADATA_KEY]
    del proto.metadata_props[:]
    proto.metadata_props.extend(kept)
    remove_stage_outputs(proto.graph)
    onnx.save(proto, str(out))
    return out


@pytest.mark.server
def test_a_model_without_the_statistics_is_served_as_before_and_says_so(tmp_path: Path, samples) -> None:
    env = {**os.environ, "BENTOML_HOME": str(tmp_path / "home")}
    old = old_export(shipped_file("lenet"), tmp_path / "old.onnx")
    assert run_cli("register", str(old), "--name", "cifar10-lenet-old", env=env).returncode == 0
    with serving({**env, "CIFAR10_MODELS": "lenet-old,lenet"}) as (_, url, _):
        described = httpx.get(f"{url}/models").json()["models"]
        assert described["lenet-old"]["out_of_distribution"]["method"] is None
        assert "cifar10 calibrate" in described["lenet-old"]["out_of_distribution"]["reason"]
        assert described["lenet"]["out_of_distribution"]["method"] == "layer-statistics"
        answer = httpx.post(f"{url}/classify", files={"image": ("x.jpg", samples[0][1])}).json()
        assert answer["model"] == "lenet-old" and set(answer) == {"model", "model_version", "predictions"}
        with_score = httpx.post(
            f"{url}/classify", files={"image": ("x.jpg", samples[0][1])}, data={"model": "lenet"}
        ).json()
        assert answer["predictions"] == with_score["predictions"]  # the same weights: the same answer
        assert isinstance(with_score["in_distribution"], bool) and isinstance(with_score["ood_score"], float)
        outputs = httpx.get(f"{url}/v2/models/lenet-old").json()["outputs"]
        assert [o["name"] for o in outputs] == ["probabilities", "labels"]


@pytest.mark.server
def test_changed_statistics_in_the_store_stop_the_server_in_one_line_naming_the_model(tmp_path: Path) -> None:
    """A stored file whose statistics were edited after they were fitted (its store record updated to match, as a
    tool other than `cifar10 register`, which refuses such a file, could leave it)."""
    home = tmp_path / "home"
    env = {**os.environ, "BENTOML_HOME": str(home)}
    assert run_cli("register", str(shipped_file("lenet")), "--name", "cifar10-lenet-moved", env=env).returncode == 0
    [record] = (home / "models" / "cifar10-lenet-moved").glob("*/model.yaml")
    moved = record.parent / "model.onnx"
    moved_statistics(shipped_file("lenet"), moved)
    info = yaml.safe_load(record.read_text())
    info["metadata"]["sha256"] = sha256_of(moved)
    record.write_text(yaml.safe_dump(info))
    refused = run_cli("register", str(moved), "--name", "cifar10-lenet-again", env=env)
    assert refused.returncode == 2 and "do not match their sha256" in refused.stderr
    result = serve_expecting_exit(["service.service:Classifier"], {**env, "CIFAR10_MODELS": "lenet-moved"}, ROOT)
    lines = (result.stdout + result.stderr).strip().splitlines()
    assert result.returncode != 0 and len(lines) == 1, lines
    assert f"cifar10-lenet-moved:{record.parent.name}" in lines[0] and "do not match their sha256" in lines[0]


def png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return buffer.getvalue()


@pytest.mark.server
def test_every_route_and_predict_give_the_same_flag(server: str, outside_samples, tmp_path: Path) -> None:
    files = {f"noise{i}.png": png(p) for i, p in enumerate(outside_samples["uniform noise"][:3])}
    files |= {f"colour{i}.png": png(p) for i, p in enumerate(outside_samples["constant colours"][:2])}
    files |= {f"fashion{i}.png": png(p) for i, p in enumerate(outside_samples["fashion-mnist"][:3])}
    files |= {f"cifar{i}.jpg": data for i, (_, data) in enumerate(cifar_samples(per_class=1, offset=200)[:4])}
    threshold = httpx.get(f"{server}/models").json()["models"]["resnet18"]["out_of_distribution"]["threshold"]
    flagged_before = flagged_total(server)
    single = {
        name: httpx.post(f"{server}/classify", files={"image": (name, data)}).json() for name, data in files.items()
    }
    assert all(a["in_distribution"] == (a["ood_score"] <= threshold) for a in single.values())
    outside = [name for name in files if not name.startswith("cifar")]
    assert not any(single[name]["in_distribution"] for name in outside)
    assert sum(single[f"cifar{i}.jpg"]["in_distribution"] for i in range(4)) >= 2
    batch = httpx.post(f"{server}/classify_batch", files=[("images", (n, d)) for n, d in files.items()]).json()
    for name, result in zip(files, batch["results"], strict=True):
        assert result["in_distribution"] == single[name]["in_distribution"]
        # int8 kernels may sum in another order for another batch size (2e-6 apart on an AVX2-only CPU)
        assert result["ood_score"] == pytest.approx(single[name]["ood_score"], rel=1e-4)
    infer = {
        "inputs": [
            {"name": "image", "datatype": "BYTES", "shape": [len(files)], "data": [
                base64.b64encode(d).decode() for d in files.values()]}
        ],
        "outputs": [{"name": "ood_score"}],
    }  # fmt: skip
    [scores] = httpx.post(f"{server}/v2/models/resnet18/infer", json=infer).json()["outputs"]
    assert scores["data"] == pytest.approx([single[n]["ood_score"] for n in files], rel=1e-4)
    folder = tmp_path / "images"
    folder.mkdir()
    for name, data in files.items():
        (folder / name).write_bytes(data)
    for where in ([], ["--server", server]):
        out = tmp_path / f"labels{len(where)}.jsonl"
        assert run_cli("predict", str(folder), "-q", "-o", str(out), *where).returncode == 0
        for row in map(json.loads, out.read_text().splitlines()):
            name = Path(row["path"]).name
            assert row["in_distribution"] == single[name]["in_distribution"], (where, name)
            assert row["ood_score"] == pytest.approx(single[name]["ood_score"], rel=1e-4)
    flagged = sum(not a["in_distribution"] for a in single.values())
    # /classify, /classify_batch, v2 and predict --server each counted every flagged image once
    assert flagged_total(server) - flagged_before == 4 * flagged


def flagged_total(server: str) -> float:
    lines = [
        line
        for line in httpx.get(f"{server}/metrics").text.splitlines()
        if line.startswith('cifar10_out_of_distribution_images_total{model="resnet18"}')
    ]
    return float(lines[0].split()[-1]) if lines else 0.0
