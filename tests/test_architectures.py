"""Every network in models/ through the whole path on real images: a few training steps, export with parity,
quantization, registration, and an answer by name from one real `bentoml serve` they all share."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from core.runtime import OnnxModel
from harness.samples import ROOT
from harness.server import free_port, start_server, stop_server
from training.export import export
from training.quantize import quantize
from training.train import TrainConfig, train

# LeNet-5 and ResNet-18 go this way in test_training and the shipped files. VGG-16 is VGG-11's class at another
# depth (models/vgg.py), the same code on every step here; test_models builds and runs it (~25 s saved).
NEW = ("alexnet", "vgg11", "googlenet")
pytestmark = pytest.mark.timeout(900)


@pytest.fixture(scope="module")
def served(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, dict]]:
    """Each new network trained one epoch (270 images, 5 steps), exported, quantized and registered in a store of
    its own, then served together with CIFAR10_MODELS naming them; yields the URL and the files made."""
    home = tmp_path_factory.mktemp("archs")
    files = {}
    for arch in NEW:
        run = home / "runs" / arch
        train(TrainConfig(arch=arch, data=str(tiny_data), out=str(run), epochs=1, batch_size=54))
        fp32 = export(run / "best.pt", home / f"{arch}.onnx", data=str(tiny_data))
        int8 = quantize(fp32, home / f"{arch}-int8.onnx", str(tiny_data), images=64, min_agreement=0.0)
        files[arch] = (fp32, int8)
    script = "import sys\nfrom core.store import register\nfor f in sys.argv[1:]:\n    print(register(f))\n"
    env = {**os.environ, "BENTOML_HOME": str(home)}
    registered = subprocess.run(
        [sys.executable, "-c", script, *(str(f) for pair in files.values() for f in pair)],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert registered.returncode == 0, registered.stderr
    port = free_port()
    process = start_server(
        ["service.service:Classifier"], {**env, "CIFAR10_MODELS": ",".join(NEW), "CIFAR10_WORKERS": "1"}, ROOT, port
    )
    try:
        yield f"http://127.0.0.1:{port}", files
    finally:
        stop_server(process)


@pytest.mark.parametrize("arch", NEW)
def test_each_network_is_trained_exported_quantized_and_answered_by_name(served, arch: str, samples) -> None:
    url, files = served
    fp32, int8 = (OnnxModel(f, providers="cpu").info for f in files[arch])
    assert fp32.arch == int8.arch == arch and fp32.precision == "fp32" and int8.precision == "int8"
    assert fp32.parity_max_abs_diff is not None and int8.parity_top1_agreement is not None
    described = httpx.get(f"{url}/models").json()
    assert list(described["models"]) == list(NEW) and described["default"] == NEW[0]
    model = described["models"][arch]
    assert model["arch"] == arch and model["store_tag"].startswith(f"cifar10-{arch}")
    assert "self-check" in model["precision_reason"]  # its int8 copy was tried on this CPU, passed or not
    answer = httpx.post(f"{url}/classify", files={"image": ("x.jpg", samples[0][1])}, data={"model": arch})
    assert answer.status_code == 200, answer.text
    assert answer.json()["model"] == arch and len(answer.json()["predictions"]) == 3


def test_a_model_the_list_does_not_name_is_a_400_that_lists_them(served, samples) -> None:
    url, _ = served
    answer = httpx.post(f"{url}/classify", files={"image": ("x.jpg", samples[0][1])}, data={"model": "resnet18"})
    assert answer.status_code == 400 and all(arch in answer.json()["error"] for arch in NEW)
    spec = httpx.get(f"{url}/docs.json").json()
    schema = spec["paths"]["/classify"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert schema["properties"]["model"]["enum"] == list(NEW)
