"""Where models come from and go: the BentoML model store, the shipped ONNX files, or a path.

A model is stored as `cifar10-NAME` and served as NAME; its int8 copy, where there is one, is stored as
`cifar10-NAME-int8`. `python -m core.store` registers the shipped models in the store when the store has
none of that name (a model the user trained and registered stays).
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

from core.bentoml_internals import stored_file, stored_names, stored_versions
from core.contract import CLASS_NAMES, INPUT_SIZE, ModelInfo
from core.errors import UserError
from core.files import sha256_of
from core.runtime import CUDA, OnnxModel, choose_providers
from core.selfcheck import MIN_AGREEMENT, Choice, choose

PRETRAINED = Path(__file__).resolve().parent.parent / "models" / "pretrained"
PREFIX = "cifar10-"
INT8 = "-int8"
SHIPPED = ("resnet18", "lenet")  # served by default
# Registered by `make serve`; served by name. LeNet and WhiteNet have no int8 copy: theirs agreed with fp32 on
# 98.70% and 98.60% of held-out images, below the 99% required.
SHIPPED_FILES = ("resnet18", "resnet18-int8", "lenet", "whitenet")
MODEL_FILE = "model.onnx"


def store_name(name: str) -> str:
    """The store's name for served model `name`: `resnet18` -> `cifar10-resnet18`."""
    return name if name.startswith(PREFIX) else PREFIX + name


def served_names() -> list[str]:
    """The models in the store that could be served (not the int8 copies), by served name."""
    return [n[len(PREFIX) :] for n in stored_names() if n.startswith(PREFIX) and not n.endswith(INT8)]


def shipped_file(name: str) -> Path:
    return PRETRAINED / f"{name}.onnx"


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
    """A served name (the store's latest `cifar10-NAME`, else the shipped file), a store tag `[cifar10-]NAME:VERSION`,
    or an .onnx path."""
    if spec.endswith(".onnx") or Path(spec).is_file():
        path = Path(spec)
        if not path.is_file():
            raise UserError(f"model file not found: {path}")
        return path
    name, _, version = spec.partition(":")
    found = store_path(f"{store_name(name)}:{version or 'latest'}")
    if found is not None:
        return found
    if not version and shipped_file(name).is_file():
        return shipped_file(name)
    known = sorted({*served_names(), *SHIPPED})
    raise UserError(
        f"no model {spec!r}: use one of {', '.join(known)}, a store tag (NAME:VERSION, see `bentoml "
        "models list`) or FILE.onnx"
    )


def int8_copy(
    name: str, fp32_sha256: str, stored: list[tuple[str, dict]] | None = None, shipped: bool = True
) -> str | None:
    """The int8 copy of `name` made from the fp32 file with `fp32_sha256` (its metadata's source_sha256): the tag of
    the newest such `cifar10-NAME-int8`, else (if `shipped`) the shipped file's path.

    `stored`: that model's versions as (tag, metadata), newest first; default: read from the store's layout.
    """
    if stored is None:
        int8_name = store_name(name) + INT8
        stored = [(f"{int8_name}:{v}", info.get("metadata", {})) for v, info in stored_versions(int8_name)]
    for tag, metadata in stored:
        if metadata.get("source_sha256") == fp32_sha256:
            return tag
    file, card = shipped_file(name + INT8), PRETRAINED / f"{name}{INT8}.json"
    if (
        shipped
        and file.is_file()
        and card.is_file()
        and json.loads(card.read_text())["source"]["sha256"] == fp32_sha256
    ):
        return str(file)
    return None


@dataclass(frozen=True)
class ModelFiles:
    """The files that may answer for a model spec: one named outright (`named`: loaded as it is), or an fp32 file
    and, where it was asked for and exists, the int8 copy made from it."""

    spec: str
    main: Path
    int8: Path | None = None
    named: bool = False

    def load(self, precision: str = "auto", min_agreement: float = MIN_AGREEMENT, **session: Any) -> Choice:
        """The copy that answers here with OnnxModel(**session) (core/selfcheck.py: int8 on a CPU host where its
        self-check passes, for `auto`)."""
        if self.named:
            return Choice(OnnxModel(self.main, **session), "as named")
        on_cpu = CUDA not in choose_providers(session.get("providers", "auto"))
        int8 = partial(OnnxModel, self.int8, **session) if self.int8 else None
        choice = choose(self.spec, partial(OnnxModel, self.main, **session), int8, precision, on_cpu, min_agreement)
        note = below_shipped(self.spec, choice.model.info)  # the store's newest version answers for the name
        return replace(choice, notes=(note,)) if note else choice


def model_files(spec: str, with_int8: bool = True) -> ModelFiles:
    """What `spec` names: a served name (`resnet18`: its fp32 file, and its int8 copy if `with_int8`), or a store tag,
    FILE.onnx or -int8 copy (that file alone)."""
    path = resolve(spec)
    if spec.endswith((".onnx", INT8)) or ":" in spec or Path(spec).is_file():
        return ModelFiles(spec, path, named=True)
    copy = int8_copy(spec, sha256_of(path)) if with_int8 else None
    return ModelFiles(spec, path, resolve(copy) if copy else None)


def load(spec: str, precision: str = "auto", min_agreement: float = MIN_AGREEMENT, **session: Any) -> Choice:
    """The model `spec` names, loaded with OnnxModel(**session): for a served name (`resnet18`), the copy that
    answers in `precision` on this host; for a store tag or FILE.onnx that file."""
    on_cpu = CUDA not in choose_providers(session.get("providers", "auto"))
    wants_int8 = precision == "int8" or (precision == "auto" and on_cpu)
    return model_files(spec, wants_int8).load(precision, min_agreement, **session)


def checked_name(name: str | None, info: ModelInfo) -> str:
    """The store name for a file with ModelInfo `info`: `name`, refused in one line when it does not say what the
    file is (cifar10-ARCH[-ANYTHING][-int8], -int8 exactly for int8 files); default cifar10-ARCH[-int8]."""
    int8 = info.precision == "int8"
    if name is None:
        return f"{PREFIX}{info.arch}{INT8 if int8 else ''}"
    served = name[len(PREFIX) :] if name.startswith(PREFIX) else None
    example = f"{PREFIX}{info.arch}{INT8 if int8 else ''}"
    if served is None:
        raise UserError(
            f"cannot register as {name!r}: store names start with {PREFIX} (the service serves "
            f"{PREFIX}NAME as NAME); e.g. {example}"
        )
    if served.endswith(INT8) != int8:
        rule = "its name must end in -int8" if int8 else "only int8 files' names end in -int8"
        raise UserError(f"cannot register an {info.precision} file as {name!r}: {rule}; e.g. {example}")
    base = served.removesuffix(INT8) if int8 else served
    if base != info.arch and not base.startswith(info.arch + "-"):
        raise UserError(
            f"cannot register as {name!r}: the file is a {info.arch}, so its name starts with "
            f"{PREFIX}{info.arch}; e.g. {example}"
        )
    return name


def register(onnx_file: str | os.PathLike, name: str | None = None) -> str:
    """Create a store model from `onnx_file` (named from its metadata unless `name` is given, which must agree with
    it), labels and metadata from the file itself; returns the tag."""
    import bentoml

    path = Path(onnx_file)
    info = OnnxModel(path, providers="cpu").info  # also proves the file loads and carries our metadata
    name = checked_name(name, info)
    # The file's sha256 too: the service checks the stored file against it before it serves (verify_stored).
    metadata = {**{key: value for key, value in vars(info).items() if value is not None}, "sha256": sha256_of(path)}
    labels = {"arch": info.arch, "task": "cifar10-classification", "format": "onnx", "precision": info.precision}
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


def register_and_compare(onnx_file: str | os.PathLike, name: str | None = None) -> str:
    """Register, then say what changed for the service: the new version's test accuracy beside the previous
    latest's, a warning when it is worse, and how a running service picks it up or keeps the previous one."""
    import bentoml

    name = checked_name(name, OnnxModel(Path(onnx_file), providers="cpu").info)
    previous = store_path(f"{name}:latest")
    tag = register(onnx_file, name)
    version = tag.partition(":")[2]
    # From the metadata register() recorded: no second ONNX Runtime session for either file.
    new = bentoml.models.get(tag).info.metadata
    lines = [f"registered {tag} ({measured(new)})"]
    served = name[len(PREFIX) :]
    if previous is not None:
        before_version = previous.parent.name
        before = bentoml.models.get(f"{name}:{before_version}").info.metadata
        lines.append(f"the latest before it: {name}:{before_version} ({measured(before)})")
        same_set = bool(new.get("test_sha256")) and new.get("test_sha256") == before.get("test_sha256")
        if not same_set:
            lines.append(
                f"the two figures are not from the same test images; compare them on one set: cifar10 evaluate "
                f"--data TEST.zip --model {name}:{version} (and {name}:{before_version})"
            )
        elif new.get("test_accuracy") is not None and new["test_accuracy"] < before.get("test_accuracy", 0):
            lines.append(
                f"warning: {name}:{version} is less accurate than {name}:{before_version} and is now the latest"
            )
        if not served.endswith(INT8):
            pinned = ",".join(f"{n}:{before_version}" if n == served else n for n in _serving(served))
            lines.append(
                f"a running service serves it after a restart; to keep serving the previous one, pin it: "
                f"CIFAR10_MODELS={pinned}"
            )
    elif not served.endswith(INT8):
        lines.append(f"serve it with CIFAR10_MODELS={','.join(_serving(served))}")
    return "\n".join(lines)


def _serving(served: str) -> list[str]:
    """The default list of served models, with `served` in it."""
    return [*SHIPPED, *([] if served in SHIPPED else [served])]


def measured(metadata: dict) -> str:
    """A model's test accuracy and what it was measured on, as far as its metadata says."""
    accuracy = metadata.get("test_accuracy")
    if accuracy is None:
        return "test accuracy unknown"
    if not metadata.get("test_data"):
        return f"{accuracy:.2%} test accuracy, on test images it does not record"
    return f"{accuracy:.2%} on the {metadata['test_images']:,} test images of {metadata['test_data']}"


def register_shipped() -> list[str]:
    """Register each shipped model whose name the store lacks; returns what it did, one line each."""
    done = []
    for name in SHIPPED_FILES:
        stored = store_name(name)
        existing = store_path(f"{stored}:latest")
        if not shipped_file(name).is_file():  # a copy without it (the int8 file is optional)
            done.append(f"{stored}: not registered, {shipped_file(name).name} is not in this copy")
        elif existing is not None:
            done.append(f"{stored}: kept the store's model ({existing.parent.name})")
        else:
            done.append(f"{stored}: registered {register(shipped_file(name), stored)}")
    return done


if __name__ == "__main__":
    for line in register_shipped():
        print(line)


def below_shipped(name: str, info: ModelInfo) -> str | None:
    """A warning where a model served as `name` is less accurate than the shipped file of that name and precision,
    measured on the same test images; None otherwise (no such file, no comparable figure, or not less accurate)."""
    shipped = shipped_file(name + (INT8 if info.precision == "int8" else ""))
    if not shipped.is_file() or info.test_accuracy is None or not info.test_sha256:
        return None
    ours = OnnxModel(shipped, providers="cpu", threads=1, optimized=False).info
    if info.test_sha256 != ours.test_sha256 or info.test_accuracy >= ours.test_accuracy:
        return None
    return (
        f"{name}'s {info.test_accuracy:.2%} is below the shipped {name}'s {ours.test_accuracy:.2%} on the same test "
        f"images; choose a version with --model {name}:VERSION or CIFAR10_MODELS={name}:VERSION (`bentoml models "
        "list` shows them)"
    )
