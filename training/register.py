"""Store an exported ONNX file in the BentoML model store, labels and metadata from the file itself."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from service.errors import UserError
from service.runtime import OnnxModel
from service.store import MODEL_FILE


def register(onnx_file: str | os.PathLike, name: str) -> str:
    """Create model `name` in the store from `onnx_file`; returns the new tag."""
    import bentoml

    path = Path(onnx_file)
    info = OnnxModel(path, providers="cpu").info  # also proves the file loads and carries our metadata
    metadata = {key: value for key, value in vars(info).items() if value is not None}
    labels = {"arch": info.arch, "task": "cifar10-classification", "format": "onnx"}
    try:
        with bentoml.models.create(name, labels=labels, metadata=metadata) as model:
            shutil.copyfile(path, model.path_of(MODEL_FILE))
    except ValueError as exc:  # an invalid model name
        raise UserError(f"cannot register as {name!r}: {exc}") from None
    return str(model.tag)
