"""Where models come from: the BentoML model store, the shipped ONNX files, or a path.

`python -m service.store` registers the shipped models in the store when the
store has none of that name (a model the user trained and registered stays).
"""

from __future__ import annotations

import os
from pathlib import Path

from service.errors import UserError

PRETRAINED = Path(__file__).resolve().parent.parent / "models" / "pretrained"
STORE_NAMES = {"resnet18": "cifar10-resnet18", "lenet": "cifar10-lenet"}
MODEL_FILE = "model.onnx"


def shipped_file(arch: str) -> Path:
    return PRETRAINED / f"{arch}.onnx"


def store_path(tag: str) -> Path | None:
    """ONNX file of a model in the BentoML store, or None when the store has no such model."""
    # `name:latest` and `name:version` straight from the layout BentoML writes
    # ($BENTOML_HOME/models/NAME/{latest,VERSION/}): importing BentoML's store costs
    # `cifar10 predict` 0.4 s of start-up. Anything else (a version prefix, a missing
    # `latest` file) goes to BentoML's own lookup.
    name, _, version = tag.lower().partition(":")
    folder = Path(os.path.expanduser(os.path.expandvars(os.environ.get("BENTOML_HOME", "~/bentoml")))) / "models" / name
    if not folder.is_dir():
        return None
    try:
        if version in ("", "latest"):
            version = (folder / "latest").read_text().strip()
        if (folder / version / MODEL_FILE).is_file():
            return folder / version / MODEL_FILE
    except OSError:
        pass
    from bentoml._internal.configuration.containers import BentoMLContainer
    from bentoml.exceptions import NotFound

    try:
        return Path(BentoMLContainer.model_store.get().get(tag).path_of(MODEL_FILE))
    except NotFound:
        return None


def resolve(spec: str) -> Path:
    """`resnet18`/`lenet` (store, then shipped file), a store tag `name:version`, or an .onnx path."""
    if spec.endswith(".onnx") or Path(spec).is_file():
        path = Path(spec)
        if not path.is_file():
            raise UserError(f"model file not found: {path}")
        return path
    tag = STORE_NAMES.get(spec, spec)
    found = store_path(tag if ":" in tag else f"{tag}:latest")
    if found is not None:
        return found
    if spec in STORE_NAMES and shipped_file(spec).is_file():
        return shipped_file(spec)
    raise UserError(f"no model {spec!r}: use resnet18, lenet, a store tag (see `bentoml models list`) or FILE.onnx")


def register_shipped() -> list[str]:
    """Register each shipped model whose name the store lacks; returns what it did, one line each."""
    from training.register import register

    done = []
    for arch, name in STORE_NAMES.items():
        existing = store_path(f"{name}:latest")
        if existing is not None:
            done.append(f"{name}: kept the store's model ({existing.parent.name})")
        else:
            done.append(f"{name}: registered {register(shipped_file(arch), name)}")
    return done


if __name__ == "__main__":
    for line in register_shipped():
        print(line)
