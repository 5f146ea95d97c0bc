"""Every use of BentoML beyond its documented API, in one place (written against BentoML 1.4.40).

On a BentoML upgrade, re-check each item below; tests/test_bentoml_internals.py fails loudly
when one of them has moved:
- the model store's layout: `$BENTOML_HOME/models/NAME/latest` holds the newest version,
  `NAME/VERSION/` its files (read directly: importing BentoML's store costs `predict` 0.4 s);
- `BentoMLContainer.http.cors` and `.access_control_options`: the CORS settings;
- the undocumented `service_class=` argument of `@bentoml.service`, and `Service.to_asgi(is_main)`,
  through which the classification routes are put ahead of BentoML's per-request middleware.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

ASGIApp = Callable[..., Any]


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


def cors_options() -> dict | None:
    """Starlette CORSMiddleware options from BentoML's `http.cors` settings, or None when CORS is off."""
    from bentoml._internal.configuration.containers import BentoMLContainer

    if not BentoMLContainer.http.cors.enabled.get():
        return None
    return BentoMLContainer.access_control_options.get()


def service_class(wrap: Callable[[ASGIApp, dict | None], ASGIApp]) -> type:
    """A `bentoml.Service` subclass whose ASGI app is `wrap(BentoML's app, cors_options())`."""
    import bentoml

    class WrappedService(bentoml.Service):
        def to_asgi(self, is_main: bool = True) -> ASGIApp:
            app = super().to_asgi(is_main)  # also loads this service's BentoML configuration
            return wrap(app, cors_options())

    return WrappedService
