"""The model-control routes: Triton's model-repository extension (index, load, unload), with the shadow as a load
parameter, over the worker's ModelControl (service/inference/control.py).

They change what every client gets, so they are off unless asked for: with a keys file they are on for keys marked
admin (service/http/keys.py); without one only with CIFAR10_MODEL_CONTROL=on, and then open to anyone who reaches
the port.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any

import anyio
from starlette.types import ASGIApp, Receive, Scope, Send

from core.store import served_names, store_name
from service.errors import BadRequest, Conflict, NotFound
from service.http.access import RECORD
from service.http.answers import Answer, error_answer, send_answer
from service.inference.control import ModelControl
from service.inference.repository import NamePlan
from service.settings import Settings

INDEX = "/v2/repository/index"
LOAD = "/v2/repository/models/{name}/load"
UNLOAD = "/v2/repository/models/{name}/unload"
_MODEL_PATH = re.compile(r"/v2/repository/models/(?P<name>[^/]+)/(?P<what>load|unload)")
LOAD_PARAMETERS = ("version", "shadow", "sample")
UNLOAD_PARAMETERS = ("version", "unload_dependents")  # tritonclient sends unload_dependents (nothing depends here)
TURN_ON = (
    "model control is off; give an admin key in CIFAR10_API_KEYS_FILE (a line `KEY admin`), or set "
    "CIFAR10_MODEL_CONTROL=on to open it to anyone who reaches this port"
)


def control_on(settings: Settings) -> bool:
    return settings.model_control == "on" or (settings.model_control == "auto" and bool(settings.api_keys_file))


class RepositoryRoutes:
    """POST /v2/repository/index, /v2/repository/models/NAME/load and .../unload: each to its handler under
    `endpoints` (which reads the body and times the call), or a 404 where the path or the whole API is off."""

    def __init__(self, on: bool, endpoints: ASGIApp) -> None:
        self.on, self.endpoints = on, endpoints

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path, method = scope["path"], scope["method"]
        match = _MODEL_PATH.fullmatch(path)
        if not self.on:
            problem: Exception | None = NotFound(TURN_ON)
        elif path != INDEX and match is None:
            problem = NotFound(f"no route for {method} {path}; the repository's are {INDEX}, {LOAD} and {UNLOAD}")
        elif method != "POST":
            problem = BadRequest(f"{method} {path}: the repository's routes take POST")
        else:
            problem = None
        if problem is not None:
            await send_answer(send, error_answer(problem, scope[RECORD].request_id))
            return
        scope["route"] = INDEX if match is None else (LOAD if match["what"] == "load" else UNLOAD)
        scope["repository_model"] = match["name"] if match else ""
        await self.endpoints(scope, receive, send)


class RepositoryHandlers:
    """The handlers, over the worker's ModelControl once its models are loaded (`control()`)."""

    def __init__(self, control: Callable[[], ModelControl | None]) -> None:
        self._control = control

    def handlers(self) -> dict[str, Any]:
        return {INDEX: self.index, LOAD: self.load, UNLOAD: self.unload}

    def control(self) -> ModelControl:
        control = self._control()
        if control is None:
            raise NotFound("the models are still loading; retry when /readyz answers 200")
        return control

    async def index(self, scope: Scope, body: bytes) -> Answer:
        """Every cifar10-* model in the store, each version with its state here."""
        request = _request(body, ("ready",), where="the index")
        ready_only = request.get("ready", False)
        if not isinstance(ready_only, bool):
            raise BadRequest(f'"ready" must be true or false, got {ready_only!r}')
        rows = await anyio.to_thread.run_sync(_index, self.control())
        return Answer(200, [row for row in rows if row["state"] == "READY" or not ready_only])

    async def load(self, scope: Scope, body: bytes) -> Answer:
        """Load a version (default: the store's newest) to answer for NAME, or as its shadow on a sample."""
        name = scope["repository_model"]
        parameters = _parameters(body, LOAD_PARAMETERS)
        shadow = parameters.get("shadow", False)
        sample = parameters.get("sample", 1.0 if shadow else None)
        if not isinstance(shadow, bool):
            raise BadRequest(f'"shadow" must be true or false, got {shadow!r}')
        if sample is not None and not shadow:
            raise BadRequest('"sample" goes with "shadow": true; a plain load answers every request')
        if shadow and (isinstance(sample, bool) or not isinstance(sample, int | float) or not 0 < sample <= 1):
            raise BadRequest(f'"sample" is the share of requests the shadow computes, above 0 up to 1, got {sample!r}')
        version = await anyio.to_thread.run_sync(_store_version, name, parameters.get("version"))

        def planned(current: NamePlan | None) -> NamePlan:
            if shadow:
                if current is None:
                    raise BadRequest(f"{name} is not served, so nothing answers beside a shadow; load a version first")
                if version == current.version:
                    raise BadRequest(f"{name} version {version} already answers; shadow another version")
                warm = tuple(v for v in current.warm if v != version)
                return NamePlan(current.version, warm, version, float(sample))
            if current is None:
                return NamePlan(version)
            warm = tuple(v for v in (current.version, *current.warm) if v != version)
            keep_shadow = current.shadow if current.shadow != version else ""
            return NamePlan(version, warm, keep_shadow, current.sample if keep_shadow else 0.0)

        return Answer(200, await self.control().change(name, planned))

    async def unload(self, scope: Scope, body: bytes) -> Answer:
        """Unload one version kept warm or shadowing (`version`), or the whole model."""
        name = scope["repository_model"]
        version = _parameters(body, UNLOAD_PARAMETERS).get("version")
        control = self.control()
        served = list(control.repository.entries)

        def planned(current: NamePlan | None) -> NamePlan | None:
            if current is None:
                raise NotFound(f"{name} is not served here; it serves {', '.join(served)}")
            if version is None:
                if served == [name]:
                    raise Conflict(f"{name} is the only model served; load another before unloading it")
                return None
            if version == current.version:
                raise Conflict(f"{name} version {version} answers; load another version first (or unload {name} whole)")
            if version == current.shadow:
                return NamePlan(current.version, current.warm)
            if version in current.warm:
                return NamePlan(
                    current.version, tuple(v for v in current.warm if v != version), current.shadow, current.sample
                )
            raise NotFound(f"{name} version {version} is not loaded; loaded: {', '.join(current.versions)}")

        return Answer(200, await control.change(name, planned))


def _request(body: bytes, allowed: tuple[str, ...], where: str) -> dict:
    """The JSON object of a repository request ({} for an empty body), its keys among `allowed`."""
    if not body.strip():
        return {}
    try:
        request = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadRequest(f"the request is not valid JSON ({exc})") from None
    if not isinstance(request, dict):
        raise BadRequest("the request must be a JSON object")
    unknown = sorted(set(request) - set(allowed))
    if unknown:
        raise BadRequest(f"{where} takes {', '.join(allowed) or 'no fields'}; not {', '.join(unknown)}")
    return request


def _parameters(body: bytes, allowed: tuple[str, ...]) -> dict:
    """A load's or unload's `parameters` object, its keys among `allowed`."""
    parameters = _request(body, ("parameters",), where="the request").get("parameters", {})
    if not isinstance(parameters, dict):
        raise BadRequest('"parameters" must be a JSON object')
    unknown = sorted(set(parameters) - set(allowed))
    if unknown:
        raise BadRequest(f"parameters may be {', '.join(allowed)}; not {', '.join(unknown)}")
    version = parameters.get("version")
    if version is not None and (not isinstance(version, str) or not version):
        raise BadRequest(f'"version" must be a store version (text), got {version!r}')
    return parameters


def _store_versions(name: str) -> list[str]:
    """The store's versions of cifar10-NAME, newest first; NotFound, listing the store's names, without any."""
    import bentoml
    from bentoml.exceptions import NotFound as StoreLacks

    try:
        models = bentoml.models.list(store_name(name))
    except StoreLacks:
        models = []
    if not models:
        raise NotFound(f"the model store has no {store_name(name)}; it has: {', '.join(served_names()) or 'none'}")
    models.sort(key=lambda m: m.info.creation_time, reverse=True)
    return [m.tag.version for m in models]


def _store_version(name: str, version: str | None) -> str:
    """The full store version `version` names (a prefix will do; None: the newest)."""
    versions = _store_versions(name)
    if version is None:
        return versions[0]
    matches = [v for v in versions if v.startswith(version.lower())]
    if len(matches) != 1:
        problem = "no" if not matches else "more than one"
        raise NotFound(f"{store_name(name)} has {problem} version {version!r}; it has: {', '.join(versions)}")
    return matches[0]


def _index(control: ModelControl) -> list[dict]:
    """Triton's index rows: every cifar10-* model's versions with their state on this worker."""
    loading = control.loading()
    rows = []
    for name in served_names():
        plan = control.repository.plans().get(name)
        for version in _store_versions(name):
            if plan is not None and version in plan.versions:
                reason = (
                    "answers"
                    if version == plan.version
                    else f"shadow on {plan.sample:.0%} of requests"
                    if version == plan.shadow
                    else "warm: a load of it rolls back"
                )
                rows.append({"name": name, "version": version, "state": "READY", "reason": reason})
            elif (name, version) in loading:
                rows.append({"name": name, "version": version, "state": "LOADING", "reason": "being loaded"})
            else:
                rows.append({"name": name, "version": version, "state": "UNAVAILABLE", "reason": "not loaded"})
    return rows
