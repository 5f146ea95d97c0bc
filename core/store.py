"""Where models come from and go: the BentoML model store, the shipped ONNX files, or a path.

`python -m core.store` registers the shipped models in the store when the store has
none of that name (a model the user trained and registered stays).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from core.bentoml_internals import stored_file
from core.contract import CLASS_NAMES, INPUT_SIZE
from core.errors import UserError
from core.files import sha256_of
from core.runtime import CUDA, OnnxModel, choose_providers
from core.selfcheck import MIN_AGREEMENT, Choice, choose

PRETRAINED = Path(__file__).resolve().parent.parent / "models" / "pretrained"
STORE_NAMES = {"resnet18": "cifar10-resnet18", "resnet18-int8": "cifar10-resnet18-int8", "lenet": "cifar10-lenet"}
INT8_VARIANTS = {"resnet18": "resnet18-int8"}  # LeNet has none: its int8 copy agreed with fp32 on 98.70% only
MODEL_FILE = "model.onnx"


def shipped_file(arch: str) -> Path:
    return PRETRAINED / f"{arch}.onnx"


def store_path(tag: str) -> Path | None:
    """ONNX file of a model in the BentoML store, or None when the store has no such model."""
    name, _, version = tag.partition(":")
    found = stored_file(name, version, MODEL_FILE)
    if found is not None:
        return found
    # Anything else (a version prefix, a missing `latest` pointer) goes to BentoML's own lookup.
    import bentoml
    from bentoml.exceptions import NotFound

    try:
        return Path(bentoml.models.get(tag).path_of(MODEL_FILE))
    except NotFound:
        return None


def resolve(spec: str) -> Path:
    """`resnet18`/`resnet18-int8`/`lenet` (the store's latest, else the shipped file), a store tag `name:version`,
    or an .onnx path."""
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
    raise UserError(
        f"no model {spec!r}: use {', '.join(STORE_NAMES)}, a store tag (see `bentoml models list`) or FILE.onnx"
    )


def load(spec: str, precision: str = "auto", min_agreement: float = MIN_AGREEMENT, **session: Any) -> Choice:
    """The model `spec` names, loaded with OnnxModel(**session): for a name with an int8 copy (`resnet18`), the copy
    that answers in `precision` (core/selfcheck.py); anything else as `resolve` finds it."""
    if spec not in INT8_VARIANTS:
        return Choice(OnnxModel(resolve(spec), **session), "as named")

    def copy(name: str) -> Callable[[], OnnxModel] | None:
        try:
            path = resolve(name)
        except UserError:
            return None
        return lambda: OnnxModel(path, **session)

    on_cpu = CUDA not in choose_providers(session.get("providers", "auto"))
    return choose(spec, copy(spec), copy(INT8_VARIANTS[spec]), precision, on_cpu, min_agreement)


def register(onnx_file: str | os.PathLike, name: str) -> str:
    """Create model `name` in the store from `onnx_file`, labels and metadata from the file itself; returns the tag."""
    import bentoml

    path = Path(onnx_file)
    info = OnnxModel(path, providers="cpu").info  # also proves the file loads and carries our metadata
    # The file's sha256 too: the service checks the stored file against it before it serves (verify_stored).
    metadata = {**{key: value for key, value in vars(info).items() if value is not None}, "sha256": sha256_of(path)}
    labels = {"arch": info.arch, "task": "cifar10-classification", "format": "onnx"}
    try:
        with bentoml.models.create(name, labels=labels, metadata=metadata) as model:
            shutil.copyfile(path, model.path_of(MODEL_FILE))
    except ValueError as exc:  # an invalid model name
        raise UserError(f"cannot register as {name!r}: {exc}") from None
    return str(model.tag)


def verify_stored(path: Path, metadata: dict, tag: str) -> None:
    """Refuse a stored model whose file differs from the one registered, or whose input contract is not this
    service's (class names, input size); models registered before sha256 was recorded are checked on the contract."""
    recorded = metadata.get("sha256")
    if recorded and sha256_of(path) != recorded:
        raise UserError(
            f"{tag}: {path} is not the file that was registered (sha256 differs): it is corrupt or "
            f"was changed; register the model again"
        )
    classes, size = tuple(metadata.get("class_names", ())), metadata.get("input_size")
    if classes != CLASS_NAMES or size != INPUT_SIZE:
        raise UserError(
            f"{tag} does not fit this service: classes {list(classes)}, input size {size}; it expects "
            f"the {len(CLASS_NAMES)} CIFAR-10 classes at {INPUT_SIZE}x{INPUT_SIZE}"
        )


def register_and_compare(onnx_file: str | os.PathLike, name: str) -> str:
    """Register, then say what changed for the service: the new version's test accuracy beside the previous
    latest's, a warning when it is worse, and how a running service picks it up."""
    import bentoml

    previous = store_path(f"{name}:latest")
    tag = register(onnx_file, name)
    version = tag.partition(":")[2]
    # From the metadata register() recorded: no second ONNX Runtime session for either file.
    accuracy = bentoml.models.get(tag).info.metadata.get("test_accuracy")
    lines = [f"registered {tag} ({_percent(accuracy)} test accuracy)"]
    if previous is not None:
        before = bentoml.models.get(f"{name}:{previous.parent.name}").info.metadata.get("test_accuracy")
        lines.append(f"the latest before it: {name}:{previous.parent.name} ({_percent(before)})")
        if accuracy is not None and before is not None and accuracy < before:
            lines.append(
                f"warning: {name}:{version} is less accurate than {name}:{previous.parent.name} and is now the latest"
            )
    arch = next((arch for arch, stored in STORE_NAMES.items() if stored == name), None)
    if arch:
        lines.append(
            f"a running service serves it after a restart; to serve another version, set "
            f"CIFAR10_{version_setting(arch)}={version}"
        )
    return "\n".join(lines)


def version_setting(name: str) -> str:
    """The setting that pins the served version of `name`, without its CIFAR10_ prefix."""
    return f"{name.upper().replace('-', '_')}_VERSION"


def _percent(accuracy: float | None) -> str:
    return "unknown" if accuracy is None else f"{accuracy:.2%}"


def register_shipped() -> list[str]:
    """Register each shipped model whose name the store lacks; returns what it did, one line each."""
    done = []
    for arch, name in STORE_NAMES.items():
        existing = store_path(f"{name}:latest")
        if not shipped_file(arch).is_file():  # a copy without it (the int8 file is optional)
            done.append(f"{name}: not registered, {shipped_file(arch).name} is not in this copy")
        elif existing is not None:
            done.append(f"{name}: kept the store's model ({existing.parent.name})")
        else:
            done.append(f"{name}: registered {register(shipped_file(arch), name)}")
    return done


if __name__ == "__main__":
    for line in register_shipped():
        print(line)
