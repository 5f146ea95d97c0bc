"""Execution-provider selection: CUDA only where a GPU is usable, and no CUDA noise on CPU hosts."""

import os
import subprocess
import sys

import pytest

from core import host, runtime
from core.errors import UserError
from harness.samples import ROOT


def test_cpu_only_host_gets_the_cpu_provider(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runtime, "gpu_count", lambda: 0)
    assert runtime.choose_providers("auto") == [runtime.CPU]
    assert runtime.choose_providers("cpu") == [runtime.CPU]


def test_a_usable_gpu_gets_cuda_first(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runtime, "gpu_count", lambda: 1)
    monkeypatch.setattr(runtime.ort, "get_available_providers", lambda: [runtime.CUDA, runtime.CPU])
    monkeypatch.setattr(runtime.ort, "preload_dlls", lambda: None, raising=False)
    assert runtime.choose_providers("auto") == [runtime.CUDA, runtime.CPU]


def test_unknown_provider_setting_is_a_user_error() -> None:
    with pytest.raises(UserError, match="auto, cpu or cuda"):
        runtime.choose_providers("tpu")


def test_loading_a_model_on_this_host_prints_no_cuda_errors() -> None:
    script = (
        "from core.runtime import OnnxModel, gpu_count; from core.store import shipped_file;"
        "m = OnnxModel(shipped_file('lenet')); print(gpu_count(), m.provider)"
    )
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    if result.stdout.split()[0] == "0":
        assert result.stdout.split()[1] == runtime.CPU
        assert "cuda" not in result.stderr.lower()


@pytest.mark.parametrize(
    ("cpu_max", "expected"),
    [("max 100000", 2), ("150000 100000", 2), ("100000 100000", 1), ("50000 100000", 1), ("garbage", 2)],
)
def test_usable_cores_follow_a_cgroup_cpu_quota(tmp_path, monkeypatch, cpu_max: str, expected: int) -> None:
    """`docker run --cpus 1` or a Kubernetes limit of 1 CPU on a big host: one worker, one ONNX Runtime thread."""
    monkeypatch.setattr(host.os, "sched_getaffinity", lambda _: {0, 1})
    (tmp_path / "cpu.max").write_text(cpu_max + "\n")
    assert host.usable_cores(tmp_path / "cpu.max") == expected
    assert host.usable_cores(tmp_path / "absent") == 2


def test_cuda_where_the_driver_sees_no_gpu_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runtime, "gpu_count", lambda: 0)
    with pytest.raises(UserError, match="the CUDA driver sees no GPU on this host; use auto or cpu"):
        runtime.choose_providers("cuda")


def test_a_gpu_onnx_runtime_cannot_use_falls_back_to_the_cpu_in_one_line_of_ours() -> None:
    """The driver is made to report a GPU that ONNX Runtime cannot open (CUDA_VISIBLE_DEVICES hides every real one):
    `auto` runs on the CPU, says so in `fallback`, and ONNX Runtime prints none of its own errors."""
    script = (
        "from core import runtime; from core.store import shipped_file\n"
        "runtime.gpu_count = lambda: 1\n"
        "m = runtime.OnnxModel(shipped_file('lenet'))\n"
        "print(m.provider, '|', m.fallback)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "CUDA_VISIBLE_DEVICES": ""},
    )
    assert result.returncode == 0, result.stderr
    provider, fallback = result.stdout.strip().split(" | ")
    if runtime.CUDA in runtime.ort.get_available_providers():  # onnxruntime-gpu: it tried CUDA, and fell back
        assert provider == runtime.CPU and "ONNX Runtime could not use it; running on the CPU" in fallback
    assert "CUDAExecutionProvider" not in result.stderr and "[E:onnxruntime" not in result.stderr
