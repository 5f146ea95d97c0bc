"""The shipped ONNX models: files match their cards, accuracy holds, the store keeps user models."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from core.contract import CLASS_NAMES
from core.runtime import OnnxModel
from core.store import PRETRAINED, SHIPPED_FILES, store_name
from harness.samples import ROOT, TEST_ZIP, logits_on_test_images
from tests.conftest import run_cli

ARCHS = ("resnet18", "lenet", "whitenet")


def card(arch: str) -> dict:
    return json.loads((PRETRAINED / f"{arch}.json").read_text())


@pytest.mark.parametrize("arch", ARCHS)
def test_onnx_file_matches_its_card(arch: str) -> None:
    data = (PRETRAINED / f"{arch}.onnx").read_bytes()
    assert hashlib.sha256(data).hexdigest() == card(arch)["sha256"]
    info = OnnxModel(PRETRAINED / f"{arch}.onnx", providers="cpu").info
    assert info.arch == arch and info.class_names == CLASS_NAMES
    assert info.test_accuracy == card(arch)["test"]["accuracy"]  # what /models reports is the card's figure


def logits_on_2000_test_images(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """The file's logits on the first 200 test images of each class (computed once per file), and their labels."""
    if not TEST_ZIP.exists():
        pytest.skip(f"needs the CIFAR-10 test archive at {TEST_ZIP}")
    return logits_on_test_images(path)


def accuracy_on_2000_test_images(path: Path) -> float:
    """Top-1 accuracy on the first 200 test images of each class."""
    logits, labels = logits_on_2000_test_images(path)
    return float((logits.argmax(1) == labels).mean())


@pytest.mark.parametrize("arch", ARCHS)
def test_accuracy_on_2000_test_images_holds_the_cards_figure(arch: str) -> None:
    accuracy = accuracy_on_2000_test_images(PRETRAINED / f"{arch}.onnx")
    assert accuracy >= card(arch)["test"]["accuracy"] - 0.015, accuracy


def test_shipped_models_never_replace_a_users_model(tmp_path) -> None:
    env = {**os.environ, "BENTOML_HOME": str(tmp_path / "home")}
    store = [sys.executable, "-m", "core.store"]
    first = subprocess.run(store, env=env, cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert first.count("registered") == len(SHIPPED_FILES)
    mine = run_cli("register", str(PRETRAINED / "lenet.onnx"), "--name", store_name("lenet"), env=env)
    assert mine.returncode == 0, mine.stderr
    again = subprocess.run(store, env=env, cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert again.count("kept") == len(SHIPPED_FILES) and mine.stdout.split()[1].split(":")[1] in again
