"""Shared fixtures: real CIFAR-10 images (or generated ones), a tiny data set, a live server."""

from __future__ import annotations

import io
import os
import socket
import subprocess
import sys
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from models.contract import CLASS_NAMES

ROOT = Path(__file__).resolve().parent.parent
# The real CIFAR-10 test images when present; tests fall back to generated ones without them.
TEST_ZIP = Path(os.environ.get("CIFAR10_TEST_ZIP", ROOT.parent / "shared" / "data" / "cifar10-test.zip"))
REAL_IMAGES = TEST_ZIP.exists()


def generated_image(label: int, seed: int) -> bytes:
    """A 32x32 JPEG whose colour depends on the label, for machines without the archive."""
    rng = np.random.default_rng(seed)
    base = np.array([(label * 25) % 256, (label * 70) % 256, (label * 130) % 256], dtype=np.int16)
    pixels = np.clip(base + rng.integers(-30, 30, (32, 32, 3)), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def cifar_samples(per_class: int, offset: int = 0) -> list[tuple[str, bytes]]:
    """(class name, JPEG bytes) pairs: real test images when the archive exists, generated otherwise."""
    samples = []
    if TEST_ZIP.exists():
        with zipfile.ZipFile(TEST_ZIP) as archive:
            names = sorted(n for n in archive.namelist() if n.endswith(".jpg"))
            for label in CLASS_NAMES:
                mine = [n for n in names if n.split("/")[-2] == label][offset : offset + per_class]
                samples += [(label, archive.read(n)) for n in mine]
        return samples
    for i, label in enumerate(CLASS_NAMES):
        samples += [(label, generated_image(i, offset + j)) for j in range(per_class)]
    return samples


@pytest.fixture(scope="session")
def samples() -> list[tuple[str, bytes]]:
    return cifar_samples(per_class=3)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A class-folder data set: 30 train and 5 test images per class."""
    root = tmp_path_factory.mktemp("tiny")
    for split, per_class, offset in (("train", 30, 0), ("test", 5, 30)):
        for i, (label, data) in enumerate(cifar_samples(per_class, offset)):
            folder = root / split / label
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"{i:04d}.jpg").write_bytes(data)
    return root


@pytest.fixture(scope="session", autouse=True)
def isolated_homes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Keep the user's BentoML store and decode cache out of the tests."""
    saved = {k: os.environ.get(k) for k in ("BENTOML_HOME", "CIFAR10_CACHE")}
    os.environ["BENTOML_HOME"] = str(tmp_path_factory.mktemp("bentoml"))
    os.environ["CIFAR10_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    yield
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_cli(*args: str, env: dict | None = None, cwd: Path = ROOT, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "service.cli", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, cwd=cwd, timeout=timeout)


def start_server(args: list[str], env: dict, cwd: Path, port: int, timeout: float = 120) -> subprocess.Popen:
    """Start `bentoml serve ARGS` on `port` and wait until /readyz answers 200."""
    log = open(Path(env.get("BENTOML_HOME", cwd)) / f"serve-{port}.log", "w")  # noqa: SIM115
    process = subprocess.Popen([str(Path(sys.executable).parent / "bentoml"), "serve", *args, "--port", str(port),
                                "--host", "127.0.0.1"], cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"bentoml serve exited with {process.returncode}; see {log.name}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200:
                return process
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    stop_server(process)
    raise RuntimeError(f"bentoml serve was not ready in {timeout}s; see {log.name}")


def stop_server(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@pytest.fixture(scope="session")
def server(isolated_homes: None) -> Iterator[str]:
    """A real `bentoml serve` of the shipped models on a free localhost port."""
    subprocess.run([sys.executable, "-m", "service.store"], check=True, cwd=ROOT, capture_output=True)
    port = free_port()
    process = start_server(["service.service:Classifier"], dict(os.environ), ROOT, port)
    yield f"http://127.0.0.1:{port}"
    stop_server(process)
