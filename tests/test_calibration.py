"""Probabilities that mean what they say: the calibration measures, the temperature fit, the shipped models'
temperatures, and one softmax for every answer path."""

from __future__ import annotations

import base64
import json
import zipfile

import httpx
import numpy as np
import onnx
import pytest

from core.contract import CLASS_NAMES
from core.preprocess import decode_rgb, normalize
from core.runtime import OnnxModel, rank, softmax
from core.store import PRETRAINED, shipped_file
from harness.samples import REAL_IMAGES, TEST_ZIP
from tests.conftest import run_cli
from tests.test_shipped import logits_on_2000_test_images
from training.calibration import calibration_error, fit_temperature, negative_log_likelihood


def test_calibration_error_is_the_gap_between_confidence_and_accuracy() -> None:
    # Two confidence bins: 0.95 confident and right 95% of the time (no gap); 0.65 and right 45% (a 0.2 gap).
    high = np.tile([0.95, 0.05], (100, 1))
    low = np.tile([0.65, 0.35], (100, 1))
    labels = np.array([0] * 95 + [1] * 5 + [0] * 45 + [1] * 55)
    assert calibration_error(np.vstack([high, low]), labels) == pytest.approx(0.1)  # half the images, a 0.2 gap
    assert negative_log_likelihood(np.array([[0.5, 0.5]]), np.array([0])) == pytest.approx(np.log(2))


def test_the_fitted_temperature_is_the_one_the_labels_were_drawn_with() -> None:
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 3, (20_000, 10))
    labels = np.array([rng.choice(10, p=p) for p in softmax(logits, 0.7)])
    assert fit_temperature(logits, labels) == pytest.approx(0.7, abs=0.03)


@pytest.mark.parametrize("name", ["resnet18", "resnet18-int8", "lenet"])
def test_each_shipped_model_carries_its_temperature_and_its_card_the_figures(name: str) -> None:
    model = OnnxModel(PRETRAINED / f"{name}.onnx", providers="cpu")
    card = json.loads((PRETRAINED / f"{name}.json").read_text())["calibration"]
    assert model.temperature == card["temperature"] == model.info.calibration["temperature"] != 1.0
    test = card["test"]
    assert (
        test["after"]["images"] == 10_000
        and test["after"]["ece"] <= 0.03 < test["before"]["ece"]
        and test["after"]["nll"] < test["before"]["nll"]
    )
    assert (PRETRAINED / card["reliability_diagram"]).is_file()
    if name.endswith("int8"):  # the temperature of the fp32 file it came from
        assert model.temperature == OnnxModel(shipped_file("resnet18"), providers="cpu").temperature


def test_on_2000_test_images_the_temperature_lowers_the_calibration_error() -> None:
    model = OnnxModel(shipped_file("resnet18"), providers="cpu")
    logits, labels = logits_on_2000_test_images(shipped_file("resnet18"))
    before, after = (calibration_error(softmax(logits, t), labels) for t in (1.0, model.temperature))
    assert after < before, (before, after)


def test_a_model_exported_before_calibration_is_served_as_before(tmp_path) -> None:
    proto = onnx.load(str(shipped_file("lenet")))
    kept = [p for p in proto.metadata_props if p.key not in ("temperature", "calibration")]
    del proto.metadata_props[:]
    proto.metadata_props.extend(kept)
    onnx.save(proto, str(tmp_path / "old.onnx"))
    old = OnnxModel(tmp_path / "old.onnx", providers="cpu")
    assert old.info.temperature is None and old.temperature == 1.0
    logits = np.random.default_rng(0).normal(size=(4, 10))
    assert np.allclose(rank(logits, old.temperature)[..., 1], np.sort(softmax(logits), 1)[:, ::-1])


@pytest.mark.server
def test_every_answer_path_applies_the_same_temperature(server: str, tmp_path) -> None:
    """/classify, /v2 infer and `cifar10 predict` give one image the probabilities of softmax(logits / T) with the
    answering model's T, not those of T = 1 (the page shows /classify's: tests/test_page.py)."""
    if not REAL_IMAGES:
        pytest.skip(f"needs the CIFAR-10 test archive at {TEST_ZIP}")
    data = zipfile.ZipFile(TEST_ZIP).read("test/cat/0000.jpg")
    (tmp_path / "cat.jpg").write_bytes(data)
    for model_name in ("resnet18", "lenet"):
        answering = httpx.get(f"{server}/models").json()["models"][model_name]
        copy = model_name if answering["precision"] == "fp32" else f"{model_name}-int8"  # as the store has it
        model = OnnxModel(shipped_file(copy), providers="cpu")
        logits = model.logits(normalize(decode_rgb(data)[np.newaxis], model.table))
        expected = dict(zip(CLASS_NAMES, softmax(logits, model.temperature)[0], strict=True))
        untempered = dict(zip(CLASS_NAMES, softmax(logits)[0], strict=True))
        classified = httpx.post(
            f"{server}/classify", files={"image": ("cat.jpg", data)}, data={"model": model_name, "top_k": "10"}
        ).json()["predictions"]
        v2 = httpx.post(
            f"{server}/v2/models/{model_name}/infer",
            json={
                "inputs": [
                    {"name": "image", "datatype": "BYTES", "shape": [1], "data": [base64.b64encode(data).decode()]}
                ]
            },
        ).json()
        probabilities = next(o for o in v2["outputs"] if o["name"] == "probabilities")["data"]
        predicted = run_cli(
            "predict", str(tmp_path / "cat.jpg"), "--model", model_name, "--top-k", "10", "--format", "jsonl"
        )
        row = json.loads(predicted.stdout)
        paths = {
            "/classify": {p["label"]: p["probability"] for p in classified},
            "/v2 infer": dict(zip(CLASS_NAMES, probabilities, strict=True)),
            "cifar10 predict": dict(zip(row["top_labels"], row["top_probabilities"], strict=True)),
        }
        for path, answer in paths.items():
            assert answer == pytest.approx(expected, abs=1e-5), (model_name, path)
            assert answer[max(expected, key=expected.get)] > untempered[max(expected, key=expected.get)] + 0.01
