"""The CPU container image, built and run the way the README says (`make image-cpu`, then `docker run` or
`podman run`): ready, right answers, a non-root user, a clean stop on SIGTERM. Skipped, with the reason,
where neither a docker engine nor podman is here; .ci/setup installs podman."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import time
import zipfile
from collections.abc import Iterator

import httpx
import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from harness.samples import REAL_IMAGES, ROOT, TEST_ZIP
from harness.server import free_port

pytestmark = [pytest.mark.server, pytest.mark.timeout(1200)]  # a fresh CI machine builds the image from nothing
TAG = f"cifar10-classifier:cpu-test-{os.getpid()}"
GRACE_S = 20  # CIFAR10_DRAIN_S's default


def engine() -> str | None:
    if shutil.which("docker") and subprocess.run(["docker", "info"], capture_output=True).returncode == 0:
        return "docker"
    return shutil.which("podman") and "podman"


def readme_command(start: str) -> list[str]:
    """The README's container command beginning with `start` (its comment dropped)."""
    section = (ROOT / "README.md").read_text().split("### Containers", 1)[1].split("```bash", 1)[1].split("```")[0]
    return shlex.split(next(line for line in section.splitlines() if line.startswith(start)), comments=True)


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The README's `make image-cpu`, under a tag of this test's own; removed afterwards."""
    tool = engine()
    if tool is None:
        pytest.skip("neither a docker engine nor podman is here (.ci/setup installs podman)")
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("MAKE")},
        "BENTOML_HOME": str(tmp_path_factory.mktemp("home")),
    }
    build = subprocess.run(
        [*readme_command("make image-cpu"), f"IMAGE_CPU={TAG}"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    last = build.stdout.strip().splitlines()[-1]
    assert last.startswith(f"{TAG}: ") and last.split()[1].isdigit(), last
    print(f"\n{last}")
    yield tool
    subprocess.run([tool, "rmi", "-f", TAG], capture_output=True)


def test_the_cpu_image_is_lean_and_runs_as_a_user(image: str) -> None:
    size_mb = (
        int(
            subprocess.run(
                [image, "image", "inspect", TAG, "--format", "{{.Size}}"], capture_output=True, text=True, check=True
            ).stdout
        )
        / 1e6
    )
    assert size_mb <= 800, size_mb
    user = subprocess.run([image, "run", "--rm", "--entrypoint", "id", TAG, "-u"], capture_output=True, text=True)
    assert user.stdout.strip() not in ("", "0"), user.stdout + user.stderr
    packages = subprocess.run(
        [image, "run", "--rm", "--entrypoint", "sh", TAG, "-c", "ls /app/.venv/lib/*/site-packages"],
        capture_output=True,
        text=True,
    ).stdout.split()
    # nvidia/ holds the CUDA and cuDNN wheels' libraries (nvidia_ml_py, a BentoML dependency, is not one of them)
    assert "onnxruntime" in packages and "nvidia" not in packages
    assert not any(name.startswith("onnxruntime_gpu") for name in packages)


def test_the_readmes_run_command_serves_and_stops_cleanly_on_sigterm(image: str, samples) -> None:
    command = readme_command("docker run --rm -p 3000:3000 -p 3001:3001 cifar10-classifier:cpu")
    port, grpc_port = free_port(), free_port()
    name = f"cifar10-test-{os.getpid()}"
    run = [image, *command[1:2], "-d", "--name", name, *(arg for arg in command[2:] if arg != "--rm")]  # logs
    run[run.index("3000:3000")] = f"127.0.0.1:{port}:3000"
    run[run.index("3001:3001")] = f"127.0.0.1:{grpc_port}:3001"
    run[run.index("cifar10-classifier:cpu")] = TAG
    started = time.monotonic()
    subprocess.run(run, check=True, capture_output=True)
    try:
        url = f"http://127.0.0.1:{port}"
        while time.monotonic() - started < 60:
            try:
                if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        ready_s = time.monotonic() - started
        assert ready_s < 60
        served = httpx.get(f"{url}/models").json()
        assert served["models"]["resnet18"]["provider"] == "CPUExecutionProvider"
        assert served["models"]["resnet18"]["precision"] == "int8"
        if REAL_IMAGES:
            with zipfile.ZipFile(TEST_ZIP) as archive:
                for label in ("cat", "ship", "truck"):
                    answer = httpx.post(
                        f"{url}/classify", files={"image": ("x.jpg", archive.read(f"test/{label}/0000.jpg"))}
                    ).json()
                    assert answer["predictions"][0]["label"] == label
        else:
            assert httpx.post(f"{url}/classify", files={"image": ("x.jpg", samples[0][1])}).status_code == 200
        # The image's gRPC port: the same answer through tritonclient.grpc.
        client = grpcclient.InferenceServerClient(f"127.0.0.1:{grpc_port}")
        assert client.is_server_ready()
        given = grpcclient.InferInput("image", [1], "BYTES")
        given.set_data_from_numpy(np.array([samples[0][1]], dtype=np.object_))
        probabilities = client.infer("resnet18", [given]).as_numpy("probabilities")[0]
        expected = httpx.post(f"{url}/classify", files={"image": ("x.jpg", samples[0][1])}).json()["predictions"][0]
        assert probabilities[expected["index"]] == pytest.approx(expected["probability"], abs=1e-5)
        began = time.monotonic()
        subprocess.run([image, "stop", "-t", str(GRACE_S + 10), name], check=True, capture_output=True)
        stopped_s = time.monotonic() - began
        logs = subprocess.run([image, "logs", name], capture_output=True, text=True)
        exit_code = subprocess.run(
            [image, "inspect", name, "--format", "{{.State.ExitCode}}"], capture_output=True, text=True
        ).stdout.strip()
        print(f"\nready {ready_s:.1f} s after run; stopped {stopped_s:.1f} s after SIGTERM, exit code {exit_code}")
        assert stopped_s < GRACE_S and exit_code == "0"
        assert "cifar10 drain: " in logs.stdout + logs.stderr
    finally:
        subprocess.run([image, "rm", "-f", name], capture_output=True)
