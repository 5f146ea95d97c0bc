"""The Open Inference Protocol (KServe v2) against a real `bentoml serve`, driven by tritonclient's own calls;
its answers equal /classify's for the same images. (KServe's own InferenceRESTClient wants psutil<6 and
protobuf<7, which would downgrade the serving set's; the protocol is the same, so tritonclient and plain
HTTP stand for it.)"""

from __future__ import annotations

import base64
import json

import bentoml
import httpx
import numpy as np
import pytest
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException

from core.contract import CLASS_NAMES
from core.preprocess import decode_rgb, normalize
from core.runtime import OnnxModel
from core.store import shipped_file

pytestmark = pytest.mark.server


@pytest.fixture(scope="module")
def client(server: str) -> triton.InferenceServerClient:
    return triton.InferenceServerClient(server.removeprefix("http://"))


def classify(server: str, data: bytes, model: str) -> dict[str, float]:
    answer = httpx.post(f"{server}/classify", files={"image": ("x.jpg", data)}, data={"model": model, "top_k": "10"})
    return {p["label"]: p["probability"] for p in answer.json()["predictions"]}


def test_health_and_metadata_through_tritonclient(client: triton.InferenceServerClient, server: str) -> None:
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("resnet18") and client.is_model_ready("lenet")
    assert not client.is_model_ready("vgg99")
    server_metadata = client.get_server_metadata()
    assert "binary_tensor_data" in server_metadata["extensions"]
    metadata = client.get_model_metadata("lenet")
    assert metadata["platform"] == "onnx_onnxv1" and metadata["parameters"]["class_names"] == list(CLASS_NAMES)
    assert {i["name"]: (i["datatype"], i["shape"]) for i in metadata["inputs"]} == {
        "image": ("BYTES", [-1]),
        "input": ("FP32", [-1, 3, 32, 32]),
    }
    assert {o["name"]: (o["datatype"], o["shape"]) for o in metadata["outputs"]} == {
        "probabilities": ("FP32", [-1, 10]),
        "labels": ("BYTES", [-1, -1]),
        "ood_score": ("FP32", [-1]),
    }
    assert metadata["parameters"]["out_of_distribution"]["method"] == "layer-statistics"
    version = metadata["versions"][0]
    assert client.get_model_metadata("lenet", version)["name"] == "lenet"
    with pytest.raises(InferenceServerException, match="has no version"):
        client.get_model_metadata("lenet", "nosuchversion")


def test_the_fp32_store_version_addresses_the_copy_that_answers(client: triton.InferenceServerClient, samples) -> None:
    """#41: the version `bentoml models list` shows for cifar10-resnet18 works in v2 paths, whichever copy answers;
    the answering copy's version comes first and names the answers."""
    fp32 = bentoml.models.get("cifar10-resnet18:latest").tag.version
    versions = client.get_model_metadata("resnet18")["versions"]
    assert fp32 in versions and client.get_model_metadata("resnet18", fp32)["versions"] == versions
    given = triton.InferInput("image", [1], "BYTES")
    given.set_data_from_numpy(np.array([samples[0][1]], dtype=object))
    assert client.infer("resnet18", [given], model_version=fp32).get_response()["model_version"] == versions[0]
    with pytest.raises(InferenceServerException, match=f"it serves version {versions[0]}"):
        client.get_model_metadata("resnet18", "nosuchversion")


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
@pytest.mark.parametrize("model", ["resnet18", "lenet"])
def test_bytes_input_answers_as_classify_does(client, server: str, samples, binary: bool, model: str) -> None:
    """Encoded images as a BYTES tensor: raw with the binary extension, base64 text in JSON."""
    images = [data for _, data in samples[:5]]
    elements = images if binary else [base64.b64encode(data) for data in images]
    given = triton.InferInput("image", [len(images)], "BYTES")
    given.set_data_from_numpy(np.array(elements, dtype=object), binary_data=binary)
    outputs = [
        triton.InferRequestedOutput("probabilities", binary_data=binary),
        triton.InferRequestedOutput("labels", binary_data=binary),
    ]
    result = client.infer(model, [given], outputs=outputs, parameters={"top_k": 2})
    probabilities = result.as_numpy("probabilities")
    labels = result.as_numpy("labels")
    assert probabilities.shape == (5, 10) and labels.shape == (5, 2)
    for row, top, data in zip(probabilities, labels, images, strict=True):
        expected = classify(server, data, model)
        assert row == pytest.approx([expected[name] for name in CLASS_NAMES], abs=1e-6)
        best = top[0].decode() if isinstance(top[0], bytes) else top[0]  # JSON BYTES come back as text
        assert best == max(expected, key=expected.get)
    assert result.get_response()["model_name"] == model


def test_the_ood_score_is_the_one_classify_answers(client, server: str, samples) -> None:
    images = [data for _, data in samples[:4]]
    given = triton.InferInput("image", [len(images)], "BYTES")
    given.set_data_from_numpy(np.array(images, dtype=object), binary_data=True)
    result = client.infer("resnet18", [given])
    for score, data in zip(result.as_numpy("ood_score"), images, strict=True):
        answer = httpx.post(f"{server}/classify", files={"image": ("x.jpg", data)}).json()
        assert score == pytest.approx(answer["ood_score"], rel=1e-6)


def test_fp32_input_normalized_by_the_client(client, server: str, samples) -> None:
    lenet = OnnxModel(shipped_file("lenet"), providers="cpu")  # the mean and std /v2/models/lenet lists
    data = samples[3][1]
    tensor = normalize(decode_rgb(data)[np.newaxis], lenet.table)
    for binary in (True, False):
        given = triton.InferInput("input", list(tensor.shape), "FP32")
        given.set_data_from_numpy(tensor, binary_data=binary)
        result = client.infer("lenet", [given], outputs=[triton.InferRequestedOutput("probabilities")])
        expected = classify(server, data, "lenet")
        assert result.as_numpy("probabilities")[0] == pytest.approx([expected[n] for n in CLASS_NAMES], abs=1e-5)
        assert result.as_numpy("labels") is None  # only what was asked for


@pytest.mark.parametrize(
    ("request_body", "path", "status", "words"),
    [
        (
            {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": ["***not base64***"]}]},
            "lenet",
            400,
            "element 0: not base64 text",
        ),
        (
            {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [2], "data": ["SAMPLE", "%PDF"]}]},
            "lenet",
            415,
            "image 1: PDF is not a supported image type",
        ),
        (
            {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [3], "data": ["SAMPLE"]}]},
            "lenet",
            400,
            "shape says 3 images, the data holds 1",
        ),
        (
            {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 3, 32, 32], "data": [0.5]}]},
            "lenet",
            400,
            "does not fill shape",
        ),
        (
            {"inputs": [{"name": "pixels", "datatype": "UINT8", "shape": [1], "data": [1]}]},
            "lenet",
            400,
            "unknown input 'pixels'",
        ),
        ({"inputs": []}, "lenet", 400, "send exactly one input"),
        (
            {
                "inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": ["SAMPLE"]}],
                "outputs": [{"name": "logits"}],
            },
            "lenet",
            400,
            "unknown outputs ['logits']",
        ),
        (
            {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": ["SAMPLE"]}]},
            "vgg99",
            404,
            "no model 'vgg99'",
        ),
        (
            {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": ["SAMPLE"]}]},
            "lenet/versions/nosuchversion",
            404,
            "has no version",
        ),
    ],
)
def test_bad_inference_requests_get_the_protocols_json_error(
    server: str, samples, request_body, path, status, words
) -> None:
    sample = base64.b64encode(samples[0][1]).decode()
    text = (
        json.dumps(request_body)
        .replace('"SAMPLE"', json.dumps(sample))
        .replace('"%PDF"', json.dumps(base64.b64encode(b"%PDF-1.7\n").decode()))
    )
    answer = httpx.post(f"{server}/v2/models/{path}/infer", content=text, headers={"content-type": "application/json"})
    assert answer.status_code == status and words in answer.json()["error"], answer.text


def test_a_broken_binary_request_is_a_400_not_a_500(server: str) -> None:
    head = json.dumps(
        {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "parameters": {"binary_data_size": 10}}]}
    ).encode()
    answer = httpx.post(
        f"{server}/v2/models/lenet/infer",
        content=head + b"\x05\x00",
        headers={"inference-header-content-length": str(len(head))},
    )
    assert answer.status_code == 400 and "binary_data_size 10 is more than the 2 bytes sent" in answer.json()["error"]
    headless = httpx.post(f"{server}/v2/models/lenet/infer", content=head + b"\xcd\x05\x00")
    assert headless.status_code == 400
    assert "needs the header Inference-Header-Content-Length: the JSON part's length" in headless.json()["error"]
    wrong_method = httpx.get(f"{server}/v2/models/lenet/infer")
    assert wrong_method.status_code == 405 and wrong_method.json()["error"]
    unknown = httpx.get(f"{server}/v2/repository/index")
    assert unknown.status_code == 404 and unknown.json()["error"]


def test_a_tensor_over_the_size_limit_is_told_its_size(client: triton.InferenceServerClient) -> None:
    tensor = triton.InferInput("input", [1000, 3, 32, 32], "FP32")  # 12 MB of floats
    tensor.set_data_from_numpy(np.zeros((1000, 3, 32, 32), np.float32), binary_data=True)
    with pytest.raises(InferenceServerException) as refused:
        client.infer("resnet18", [tensor])
    said = refused.value.message()
    assert "is larger than the 10 MB limit" in said and "a tensor of fewer rows" in said, said
    assert "smaller image" not in said
