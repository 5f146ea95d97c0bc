"""The deployable bento: what it holds, that it serves, and that serving needs no torch."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import yaml

from core.runtime import CUDA, choose_providers
from harness.samples import REAL_IMAGES, ROOT
from harness.server import free_port, register_shipped, start_server, stop_server


def readme_deployment_command(start: str) -> list[str]:
    """The README's deployment command that starts with `start`, as arguments (its comment dropped)."""
    section = (ROOT / "README.md").read_text().split("## Deployment", 1)[1].split("```bash", 1)[1].split("```")[0]
    return shlex.split(next(line for line in section.splitlines() if line.startswith(start)), comments=True)


@pytest.fixture(scope="module")
def bento(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path, dict]:
    """The README's `make bento`, in a fresh BENTOML_HOME: registers the shipped models and builds."""
    # As from a user's shell: under `make test`, the inherited MAKELEVEL makes make name its directory last.
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("MAKE")},
        "BENTOML_HOME": str(tmp_path_factory.mktemp("bento-home")),
    }
    result = subprocess.run(readme_deployment_command("make bento"), env=env, cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    tag = result.stdout.strip().splitlines()[-1]
    assert re.fullmatch(r"cifar10-classifier:[a-z0-9]+", tag), result.stdout
    name, version = tag.split(":")
    return tag, Path(env["BENTOML_HOME"]) / "bentos" / name / version, env


def test_bento_holds_the_service_its_models_and_no_training_code(bento) -> None:
    _, path, _ = bento
    files = {str(p.relative_to(path / "src")) for p in (path / "src").rglob("*") if p.is_file()}
    assert {"service/service.py", "core/preprocess.py", "core/contract.py"} <= files
    assert not any(
        f.startswith(("tests/", "training/", "cli/", "models/", "data/")) or f.endswith((".pt", ".onnx", ".zip"))
        for f in files
    )
    models = {
        m["tag"].split(":")[0]
        for s in yaml.safe_load((path / "bento.yaml").read_text())["services"]
        for m in s["models"]
    }
    # The copies that may answer on this host, no other: on a CPU host int8 where its self-check passes, else fp32.
    resnet18 = (
        {"cifar10-resnet18"} if choose_providers("auto")[0] == CUDA else {"cifar10-resnet18", "cifar10-resnet18-int8"}
    )
    assert models == {*resnet18, "cifar10-lenet"}


def test_bento_requirements_name_onnxruntime_gpu_and_no_torch(bento) -> None:
    _, path, _ = bento
    requirements = (path / "env" / "python" / "requirements.txt").read_text().lower()
    assert "onnxruntime-gpu[cuda,cudnn]" in requirements
    assert not any(word in requirements for word in ("torch", "onnxscript", "\nonnx=="))
    assert (path / "env" / "docker" / "Dockerfile").is_file()


def test_readme_serve_command_serves_the_bento_from_another_directory(bento, samples, tmp_path: Path) -> None:
    _, _, env = bento
    command = readme_deployment_command(".venv/bin/bentoml serve")
    assert command[:2] == [".venv/bin/bentoml", "serve"] and command[-2] == "--port"
    port = free_port()  # instead of the README's fixed one
    process = start_server(command[2:-2], env, tmp_path, port)
    try:
        label, data = samples[0]
        for model in ("resnet18", "lenet"):
            response = httpx.post(
                f"http://127.0.0.1:{port}/classify", files={"image": ("x.jpg", data)}, data={"model": model}, timeout=60
            )
            assert response.status_code == 200, response.text
            if REAL_IMAGES:
                assert response.json()["predictions"][0]["label"] == label
    finally:
        stop_server(process)


def test_serving_code_runs_with_torch_unimportable(samples, tmp_path: Path) -> None:
    image = tmp_path / "x.jpg"
    image.write_bytes(samples[0][1])
    script = (
        "import sys; sys.modules['torch'] = None\n"
        "import service.service, cli.predict, core.store\n"
        "from cli.main import main\n"
        f"sys.exit(main(['predict', {str(image)!r}, '--model', 'lenet', '--format', 'jsonl']))\n"
    )
    env = {**os.environ, "BENTOML_HOME": str(tmp_path / "home")}  # the service checks its models at import
    register_shipped(env)
    result = subprocess.run([sys.executable, "-c", script], env=env, cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert '"label": ' in result.stdout and "torch" not in result.stderr
