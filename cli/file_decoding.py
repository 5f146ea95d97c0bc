"""Image files to pixels for `cifar10 predict`'s decoding processes.

A module of its own so that, where those processes are spawned (not Linux), they import
only the preprocessing path, not ONNX Runtime or BentoML.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from core.errors import ImageError
from core.preprocess import decode_rgb


def decode_file(path: str) -> np.ndarray | str:
    """Pixels, or the error text for this one file."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        return f"cannot read file: {exc.strerror or exc}"
    return decode_bytes(data)


def decode_bytes(data: bytes | None) -> np.ndarray | str:
    """Pixels, or the error text for these bytes (None: a missing value in a table of images)."""
    if data is None:
        return "no image bytes"
    try:
        return decode_rgb(data)
    except ImageError as exc:
        return str(exc)


def decode_files(paths: list[str]) -> list[np.ndarray | str]:
    return [decode_file(p) for p in paths]
