"""Shared fixtures: real CIFAR-10 images (or generated ones), a tiny data set, a live server."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness.samples import cifar_samples
from harness.server import serving

ROOT = Path(__file__).resolve().parent.parent


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


def run_cli(*args: str, env: dict | None = None, cwd: Path = ROOT, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "cli.main", *args],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        cwd=cwd,
        timeout=timeout,
    )


@pytest.fixture(scope="session")
def server(isolated_homes: None) -> Iterator[str]:
    """A real `bentoml serve` of the shipped models on a free localhost port."""
    with serving(os.environ) as (_, url, _):  # BENTOML_HOME: isolated_homes'
        yield url


@pytest.fixture(scope="session")
def keyed_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path, Path]]:
    """A server whose keys file holds two keys and a /metrics-only key; yields its URL, keys file and log."""
    home = tmp_path_factory.mktemp("keyed")
    keys = home / "api-keys"
    keys.write_text("# the team's keys\nkey-one\nkey-two  # the CI's\nscrape-key metrics\n")
    env = {**os.environ, "BENTOML_HOME": str(home), "CIFAR10_API_KEYS_FILE": str(keys), "CIFAR10_WORKERS": "1"}
    with serving(env) as (_, url, log):
        yield url, keys, log


def near_tied_checkpoint(folder: Path) -> Path:
    """A `cifar10 train`-style checkpoint of a LeNet whose top two logits (classes 0 and 1) differ by ~1e-6:
    any rounding decides between them."""
    import torch

    from models import get_model

    torch.manual_seed(0)
    model = get_model("lenet").eval()
    last = model.classifier[-1]
    with torch.no_grad():
        last.weight[1] = last.weight[0] * (1 + 1e-6)
        last.bias[:] = 0
        last.bias[:2] = 5
    torch.save({"model": model.state_dict(), "config": {"arch": "lenet"}, "epoch": 1}, folder / "best.pt")
    return folder / "best.pt"


def wrong_int8(source: Path, out: Path) -> Path:
    """A copy of the int8 file `source` whose weights' scales are perturbed (per channel, by up to ~2x either way):
    it loads, carries its self-check reference set, and is really wrong."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(source))
    initializers = {i.name: i for i in model.graph.initializer}
    rng = np.random.default_rng(0)
    for node in model.graph.node:
        weights = initializers.get(node.input[0])
        if node.op_type == "DequantizeLinear" and weights is not None and weights.data_type == onnx.TensorProto.INT8:
            scale = initializers[node.input[1]]
            values = numpy_helper.to_array(scale) * rng.lognormal(0, 0.5, numpy_helper.to_array(scale).shape)
            scale.CopyFrom(numpy_helper.from_array(values.astype(np.float32), scale.name))
    onnx.save(model, str(out))
    return out


def another_lenet(out: Path, seed: int = 1) -> Path:
    """The shipped LeNet with its last layer's weights moved by ~20% noise: a real, different version that agrees
    with the shipped one on most images, not all."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    from core.store import shipped_file

    model = onnx.load(str(shipped_file("lenet")))
    rng = np.random.default_rng(seed)
    last = next(n for n in reversed(model.graph.node) if n.op_type == "Gemm")
    weights = next(i for i in model.graph.initializer if i.name == last.input[1])
    values = numpy_helper.to_array(weights)
    moved = values * (1 + 0.2 * rng.standard_normal(values.shape))
    weights.CopyFrom(numpy_helper.from_array(moved.astype(np.float32), weights.name))
    onnx.save(model, str(out))
    return out
