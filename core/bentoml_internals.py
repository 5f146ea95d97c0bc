"""BentoML's model store read directly, beyond its documented API (written against BentoML 1.4.40): its home
folder, and its layout, `$BENTOML_HOME/models/NAME/latest` holding the newest version and `NAME/VERSION/` its
files (importing BentoML's store costs `predict` 0.4 s). The serving internals are in
service/bentoml_internals.py; tests/test_bentoml_internals.py fails loudly when either has moved.
"""

from __future__ import annotations

import os
from pathlib import Path


def bentoml_home() -> Path:
    """BentoML's home folder, resolved as BentoML resolves it."""
    return Path(os.path.expanduser(os.path.expandvars(os.environ.get("BENTOML_HOME", "~/bentoml"))))


def stored_file(name: str, version: str, filename: str) -> Path | None:
    """`filename` of model `name` at `version` ('latest' or '' for the newest), when the layout has it."""
    folder = bentoml_home() / "models" / name.lower()
    try:
        if version in ("", "latest"):
            version = (folder / "latest").read_text().strip()
        path = folder / version.lower() / filename
    except OSError:
        return None
    return path if path.is_file() else None


def stored_versions(name: str) -> list[tuple[str, dict]]:
    """Every version of model `name` with its BentoML model info (`model.yaml`: metadata, creation_time), newest
    first; empty when the store has no such model."""
    import yaml

    versions = []
    for info_file in (bentoml_home() / "models" / name.lower()).glob("*/model.yaml"):
        try:
            info = yaml.safe_load(info_file.read_text())
        except (OSError, yaml.YAMLError):
            continue
        if isinstance(info, dict):
            versions.append((info_file.parent.name, info))
    return sorted(versions, key=lambda item: str(item[1].get("creation_time", "")), reverse=True)


def stored_names() -> list[str]:
    """The names of the models in the store, sorted."""
    return sorted(p.name for p in (bentoml_home() / "models").glob("*") if p.is_dir())
