"""The ONNX metadata that training writes: the file's ModelInfo (and extra keys), and the package version."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import onnx

from core.contract import ModelInfo


def stamp_metadata(path: Path, info: ModelInfo, extra: dict[str, str] | None = None) -> None:
    """Replace the ONNX file's metadata_props with `info` (and `extra` keys), and check the result."""
    proto = onnx.load(str(path))
    del proto.metadata_props[:]
    for key, value in {**info.to_metadata(), **(extra or {})}.items():
        proto.metadata_props.add(key=key, value=value)
    onnx.checker.check_model(proto, full_check=True)
    onnx.save(proto, str(path))


def package_version() -> str:
    try:
        return version("cifar10-service")
    except PackageNotFoundError:
        return "0+unknown"
