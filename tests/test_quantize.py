"""int8 models: `cifar10 quantize` end to end, the shipped int8 ResNet-18, and which precision the service serves."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from core.files import sha256_of
from core.runtime import OnnxModel
from core.store import PRETRAINED, shipped_file
from harness.samples import ROOT
from harness.server import free_port, serve_expecting_exit, start_server, stop_server
from tests.conftest import near_tied_checkpoint, run_cli
from tests.test_shipped import accuracy_on_2000_test_images


@pytest.fixture(scope="module")
def quantized(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, object]:
    """The shipped ResNet-18 quantized on the tiny data set's training images, and registered as the int8 variant."""
    home = tmp_path_factory.mktemp("home")
    out = home / "resnet18-int8.onnx"
    result = run_cli("quantize", str(shipped_file("resnet18")), "--data", str(tiny_data), "--out", str(out),
                     "--images", "256", "--register", "cifar10-resnet18-int8",
                     "--min-agreement", "0.95", env={"BENTOML_HOME": str(home)})  # 30 held-out images: 1 may flip
    return out, home, result


def test_quantize_writes_an_int8_file_with_its_provenance(quantized) -> None:
    out, _, result = quantized
    assert result.returncode == 0, result.stderr
    info = OnnxModel(out, providers="cpu").info
    fp32 = OnnxModel(shipped_file("resnet18"), providers="cpu").info
    assert info.precision == "int8" and info.arch == "resnet18" and info.class_names == fp32.class_names
    assert info.mean == fp32.mean and info.std == fp32.std and info.source_sha256 == sha256_of(shipped_file("resnet18"))
    assert info.source_test_accuracy == fp32.test_accuracy
    assert info.quantization["calibration_images"] == 256 and info.quantization["calibration_seed"] == 0
    assert info.parity_images == 30 and info.parity_top1_agreement >= 0.95  # the tiny set holds 30 out
    assert info.test_accuracy is not None and "registered cifar10-resnet18-int8:" in result.stdout


def test_quantize_refuses_a_copy_that_disagrees_with_fp32_and_writes_nothing(tmp_path: Path, tiny_data: Path) -> None:
    """A LeNet whose top two logits tie within 1e-6: int8 rounding decides half of its answers differently."""
    checkpoint = near_tied_checkpoint(tmp_path)
    assert run_cli("export", str(checkpoint), "--out", str(tmp_path / "tied.onnx")).returncode == 0
    result = run_cli("quantize", str(tmp_path / "tied.onnx"), "--data", str(tiny_data), "--out",
                     str(tmp_path / "int8.onnx"), "--images", "64")
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and "below the 99% required" in lines[0], result.stderr
    assert not (tmp_path / "int8.onnx").exists() and not list(tmp_path.glob("*.tmp"))


def test_the_shipped_int8_file_matches_its_card() -> None:
    card = json.loads((PRETRAINED / "resnet18-int8.json").read_text())
    data = (PRETRAINED / "resnet18-int8.onnx").read_bytes()
    assert hashlib.sha256(data).hexdigest() == card["sha256"]
    info = OnnxModel(PRETRAINED / "resnet18-int8.onnx", providers="cpu").info
    assert info.precision == "int8" and info.test_accuracy == card["test"]["accuracy"]
    assert info.source_sha256 == sha256_of(shipped_file("resnet18"))  # made from the shipped fp32 file
    accuracy = accuracy_on_2000_test_images(OnnxModel(PRETRAINED / "resnet18-int8.onnx", providers="cpu"))
    assert accuracy >= card["test"]["accuracy"] - 0.015, accuracy


@pytest.mark.server
@pytest.mark.parametrize("precision", ["auto", "fp32"])
def test_the_service_serves_int8_on_this_cpu_unless_fp32_is_pinned(quantized, precision: str, samples) -> None:
    _, home, result = quantized
    assert result.returncode == 0, result.stderr
    env = {**os.environ, "BENTOML_HOME": str(home), "CIFAR10_RESNET18_PRECISION": precision, "CIFAR10_WORKERS": "1"}
    subprocess.run([sys.executable, "-m", "core.store"], env=env, cwd=ROOT, check=True, capture_output=True)
    port = free_port()
    process = start_server(["service.service:Classifier"], env, ROOT, port)
    try:
        resnet = httpx.get(f"http://127.0.0.1:{port}/models").json()["models"]["resnet18"]
        answer = httpx.post(f"http://127.0.0.1:{port}/classify", files={"image": ("x.jpg", samples[0][1])})
    finally:
        stop_server(process)
    assert answer.status_code == 200
    if precision == "fp32":
        assert resnet["precision"] == "fp32" and resnet["store_tag"].startswith("cifar10-resnet18:")
    else:  # the version registered by `quantize --register` above, on a CPU host
        registered = result.stdout.split("registered cifar10-resnet18-int8:")[1].split()[0]
        assert resnet["precision"] == "int8" and resnet["version"] == registered
        assert resnet["source_test_accuracy"] == OnnxModel(shipped_file("resnet18"), providers="cpu").info.test_accuracy


@pytest.mark.server
def test_without_an_int8_copy_the_service_serves_fp32_and_a_pinned_int8_is_a_one_line_error(tmp_path: Path) -> None:
    """As from a bento built for GPUs, which holds fp32 only."""
    env = {**os.environ, "BENTOML_HOME": str(tmp_path)}
    for arch in ("resnet18", "lenet"):
        assert run_cli("register", str(shipped_file(arch)), "--name", f"cifar10-{arch}", env=env).returncode == 0
    port = free_port()
    process = start_server(["service.service:Classifier"], env, ROOT, port)
    try:
        resnet = httpx.get(f"http://127.0.0.1:{port}/models").json()["models"]["resnet18"]
    finally:
        stop_server(process)
    assert resnet["precision"] == "fp32"
    pinned = serve_expecting_exit(["service.service:Classifier"], {**env, "CIFAR10_RESNET18_PRECISION": "int8"}, ROOT)
    lines = (pinned.stdout + pinned.stderr).strip().splitlines()
    assert pinned.returncode not in (0, -9) and len(lines) == 1 and "cifar10-resnet18-int8" in lines[0], lines
