"""int8 models: `cifar10 quantize` end to end, the shipped int8 ResNet-18, and which precision the service serves."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import httpx
import pytest

from core import selfcheck
from core.errors import UserError
from core.files import sha256_of
from core.runtime import OnnxModel
from core.selfcheck import choose, reference_of, self_check
from core.store import PRETRAINED, shipped_file
from harness.samples import ROOT
from harness.server import free_port, serve_expecting_exit, serving, start_server, stop_server
from tests.conftest import near_tied_checkpoint, run_cli, wrong_int8
from tests.test_shipped import accuracy_on_2000_test_images


@pytest.fixture(scope="module")
def quantized(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, object]:
    """The shipped ResNet-18 quantized on the tiny data set's training images, and registered as the int8 variant."""
    home = tmp_path_factory.mktemp("home")
    out = home / "resnet18-int8.onnx"
    result = run_cli(
        "quantize",
        str(shipped_file("resnet18")),
        "--data",
        str(tiny_data),
        "--out",
        str(out),
        "--images",
        "256",
        "--register",
        "cifar10-resnet18-int8",
        "--min-agreement",
        "0.95",
        env={"BENTOML_HOME": str(home)},
    )  # 30 held-out images: 1 may flip
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
    assert "reduce_range" in info.quantization["weights"]  # 7-bit weights: no saturation without VNNI
    pixels, answers = reference_of(OnnxModel(out, providers="cpu"))
    assert pixels.shape[1:] == (32, 32, 3) and 0 < len(pixels) == len(answers) <= 30  # held-out images only
    assert self_check(OnnxModel(out, providers="cpu")).passed  # by construction on the host that quantized it


def test_a_self_check_result_is_kept_for_its_file_cpu_and_runtime(
    quantized, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Run once on this CPU, a file's check is read back after; on another CPU, or for another file, it runs."""
    monkeypatch.setenv("CIFAR10_CACHE", str(tmp_path))
    model = OnnxModel(quantized[0], providers="cpu")
    runs: list[int] = []
    logits = model.logits
    monkeypatch.setattr(model, "logits", lambda batch: runs.append(len(batch)) or logits(batch))
    first = self_check(model)
    assert runs and first.images > 0 and len(list((tmp_path / "self-check").glob("*.json"))) == 1
    runs.clear()
    assert self_check(model) == first and not runs  # kept
    this_cpu = selfcheck.describe_cpu
    monkeypatch.setattr(selfcheck, "describe_cpu", lambda: "Another CPU (avx2 fma)")
    assert self_check(model).agreed == first.agreed and runs  # another CPU: run there
    monkeypatch.setattr(selfcheck, "describe_cpu", this_cpu)
    other = OnnxModel(wrong_int8(quantized[0], tmp_path / "wrong.onnx"), providers="cpu")
    assert self_check(other) != first  # another file: its own check (its answers differ)


def test_quantize_refuses_a_copy_that_disagrees_with_fp32_and_writes_nothing(tmp_path: Path, tiny_data: Path) -> None:
    """A LeNet whose top two logits tie within 1e-6: int8 rounding decides half of its answers differently."""
    checkpoint = near_tied_checkpoint(tmp_path)
    assert run_cli("export", str(checkpoint), "--out", str(tmp_path / "tied.onnx")).returncode == 0
    result = run_cli(
        "quantize",
        str(tmp_path / "tied.onnx"),
        "--data",
        str(tiny_data),
        "--out",
        str(tmp_path / "int8.onnx"),
        "--images",
        "64",
    )
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and "below the 99% required" in lines[0], result.stderr
    assert not (tmp_path / "int8.onnx").exists() and not list(tmp_path.glob("*.tmp"))
    # Asked to accept any agreement, it writes the file, saying what a copy without a clear answer to check means.
    anyway = run_cli(
        "quantize", str(tmp_path / "tied.onnx"), "--data", str(tiny_data), "--out", str(tmp_path / "int8.onnx"),
        "--images", "64", "--min-agreement", "0",
    )  # fmt: skip
    assert anyway.returncode == 0, anyway.stderr
    assert "the self-check reference set is empty: this copy fails its self-check on every host" in anyway.stderr
    assert not self_check(OnnxModel(tmp_path / "int8.onnx", providers="cpu")).passed


def test_the_shipped_int8_file_matches_its_card() -> None:
    card = json.loads((PRETRAINED / "resnet18-int8.json").read_text())
    data = (PRETRAINED / "resnet18-int8.onnx").read_bytes()
    assert hashlib.sha256(data).hexdigest() == card["sha256"]
    info = OnnxModel(PRETRAINED / "resnet18-int8.onnx", providers="cpu").info
    assert info.precision == "int8" and info.test_accuracy == card["test"]["accuracy"]
    assert info.source_sha256 == sha256_of(shipped_file("resnet18"))  # made from the shipped fp32 file
    accuracy = accuracy_on_2000_test_images(PRETRAINED / "resnet18-int8.onnx")
    assert accuracy >= card["test"]["accuracy"] - 0.015, accuracy


def test_the_shipped_int8_file_passes_its_self_check_on_this_cpu() -> None:
    """7-bit weights make ONNX Runtime's int8 kernels compute the same on every x86-64 CPU with AVX2."""
    check = self_check(OnnxModel(PRETRAINED / "resnet18-int8.onnx", providers="cpu"))
    assert check.images == 256 and check.passed, check.summary()


def test_a_wrong_int8_file_fails_its_self_check_and_fp32_answers_instead(tmp_path: Path) -> None:
    wrong = OnnxModel(wrong_int8(PRETRAINED / "resnet18-int8.onnx", tmp_path / "wrong.onnx"), providers="cpu")
    fp32 = OnnxModel(shipped_file("resnet18"), providers="cpu")
    choice = choose("resnet18", lambda: fp32, lambda: wrong, "auto", on_cpu=True)  # runs the self-check
    assert not choice.check.passed and choice.check.agreement < 0.9, choice.check.summary()
    assert choice.model is fp32 and "failed its self-check" in choice.reason
    assert choose("resnet18", lambda: fp32, lambda: wrong, "int8", on_cpu=True).model is wrong  # pinned
    assert choose("resnet18", lambda: fp32, lambda: wrong, "fp32", on_cpu=True).check is None  # never run
    with pytest.raises(UserError, match="no fp32 copy to answer instead"):
        choose("resnet18", None, lambda: wrong, "auto", on_cpu=True)


@pytest.fixture(scope="module")
def wrong_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A store holding the shipped fp32 models and, as cifar10-resnet18-int8, a wrong int8 copy."""
    home = tmp_path_factory.mktemp("wrong-int8")
    wrong = wrong_int8(PRETRAINED / "resnet18-int8.onnx", home / "wrong.onnx")
    env = {"BENTOML_HOME": str(home)}
    for file, name in (
        (shipped_file("resnet18"), "cifar10-resnet18"),
        (shipped_file("lenet"), "cifar10-lenet"),
        (wrong, "cifar10-resnet18-int8"),
    ):
        assert run_cli("register", str(file), "--name", name, env=env).returncode == 0
    return home


@pytest.mark.server
def test_the_service_refuses_a_wrong_int8_copy_at_start_up_and_fp32_answers(wrong_store: Path, samples) -> None:
    env = {**os.environ, "BENTOML_HOME": str(wrong_store)}
    port = free_port()
    process = start_server(["service.service:Classifier"], env, ROOT, port)
    try:
        resnet = httpx.get(f"http://127.0.0.1:{port}/models").json()["models"]["resnet18"]
        answer = httpx.post(f"http://127.0.0.1:{port}/classify", files={"image": ("x.jpg", samples[0][1])})
    finally:
        stop_server(process)
    assert resnet["precision"] == "fp32" and resnet["store_tag"].startswith("cifar10-resnet18:")
    assert "failed its self-check" in resnet["precision_reason"] and not resnet["int8_self_check"]["passed"]
    assert answer.status_code == 200
    log = (wrong_store / f"serve-{port}.log").read_text()
    lines = [line for line in log.splitlines() if "self-check" in line]
    assert len(lines) == 1 and lines[0].startswith("cifar10: resnet18 answers in fp32: the int8 copy failed")
    assert "below the 99% required" in lines[0] and "avx2" in lines[0]  # the CPU's instruction sets


def test_predict_and_evaluate_fall_back_to_fp32_with_one_line(
    wrong_store: Path, samples, tmp_path: Path, tiny_data: Path
) -> None:
    env = {"BENTOML_HOME": str(wrong_store)}
    (tmp_path / "cat.jpg").write_bytes(samples[0][1])
    result = run_cli("predict", str(tmp_path / "cat.jpg"), "--format", "jsonl", env=env)
    fp32 = run_cli("predict", str(tmp_path / "cat.jpg"), "--format", "jsonl", "--precision", "fp32", env=env)
    warnings = [line for line in result.stderr.splitlines() if "self-check" in line]
    assert result.returncode == 0 and len(warnings) == 1 and "fp32 answers" in warnings[0], result.stderr
    assert result.stdout == fp32.stdout  # the fp32 model's answer
    evaluated = run_cli("evaluate", "--data", str(tiny_data), "--model", "resnet18", env=env)
    warnings = [line for line in evaluated.stderr.splitlines() if "self-check" in line]
    assert evaluated.returncode == 0 and len(warnings) == 1 and "(fp32," in evaluated.stdout, evaluated.stderr


@pytest.mark.server
@pytest.mark.parametrize("precision", ["auto", "fp32"])
def test_the_service_serves_int8_on_this_cpu_unless_fp32_is_pinned(quantized, precision: str, samples) -> None:
    _, home, result = quantized
    assert result.returncode == 0, result.stderr
    env = {**os.environ, "BENTOML_HOME": str(home), "CIFAR10_PRECISION": precision, "CIFAR10_WORKERS": "1"}
    with serving(env) as (_, url, _):
        resnet = httpx.get(f"{url}/models").json()["models"]["resnet18"]
        answer = httpx.post(f"{url}/classify", files={"image": ("x.jpg", samples[0][1])})
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
    pinned = serve_expecting_exit(["service.service:Classifier"], {**env, "CIFAR10_PRECISION": "int8"}, ROOT)
    lines = (pinned.stdout + pinned.stderr).strip().splitlines()
    assert pinned.returncode not in (0, -9) and len(lines) == 1 and "cifar10-resnet18-int8" in lines[0], lines
