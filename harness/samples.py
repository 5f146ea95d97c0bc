"""CIFAR-10 test images from ../shared/data/cifar10-test.zip, or generated stand-ins where it is missing."""

from __future__ import annotations

import functools
import io
import os
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image

from core.contract import CLASS_NAMES
from core.preprocess import decode_rgb, normalize
from core.runtime import OnnxModel

ROOT = Path(__file__).resolve().parent.parent
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


@functools.cache
def first_test_images(per_class: int = 200) -> tuple[np.ndarray, np.ndarray]:
    """The archive's first `per_class` test images of each class, decoded as the service decodes them, and their
    labels (once per process: several tests measure on them)."""
    with zipfile.ZipFile(TEST_ZIP) as archive:
        names = sorted(n for n in archive.namelist() if n.endswith(".jpg"))
        chosen = [
            (i, n)
            for i, label in enumerate(CLASS_NAMES)
            for n in [n for n in names if n.split("/")[-2] == label][:per_class]
        ]
        pixels = np.stack([decode_rgb(archive.read(n)) for _, n in chosen])
    return pixels, np.array([i for i, _ in chosen])


@functools.cache
def logits_on_test_images(onnx_file: Path, per_class: int = 200) -> tuple[np.ndarray, np.ndarray]:
    """An ONNX file's logits on first_test_images, through the service's preprocessing, and their labels."""
    model = OnnxModel(onnx_file, providers="cpu")
    pixels, labels = first_test_images(per_class)
    batches = range(0, len(pixels), 250)
    return np.concatenate([model.logits(normalize(pixels[s : s + 250], model.table)) for s in batches]), labels
