"""The BentoML service: CIFAR-10 classification over HTTP with adaptive batching.

This module is BentoML's entry point (`bentoml serve service.service:Classifier`) and only
wires the parts together at start-up: the settings (service/settings.py), the models from
the store, the Predictor (service/predictor.py) and the HTTP routes (service/http.py).
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import bentoml
from bentoml.exceptions import NotFound

from core.bentoml_internals import bentoml_home
from core.errors import UserError
from core.files import sha256_of
from core.host import gpu_count, usable_cores
from core.runtime import CUDA, OnnxModel, choose_providers
from core.store import MODEL_FILE, int8_copy, served_names, store_name, verify_stored
from service import tracing
from service.bentoml_internals import install_protocol, restart_dead_workers_within, service_class, slim_image
from service.drain import say
from service.http import HttpApi
from service.predictor import Copies, ModelFile, Predictor
from service.settings import Settings

try:
    SETTINGS = Settings.from_env()
except UserError as exc:  # one line, before BentoML sees any setting
    sys.exit(f"error: {exc}")
# A worker's HTTP handling needs a core of its own (LeNet: ~1,000 req/s per worker). On a CPU host the
# model needs the cores too: one worker per core. On a GPU the HTTP layer is the limit (one worker
# served 13,000 images/s of /classify_batch on an H100, four 39,500, eight 42,600; each holds a CUDA
# context of ~1 GB): up to 8 per GPU, at most one per two cores (BENCHMARKS.md: not yet measured with the
# batch buckets).
try:
    ON_GPU = CUDA in choose_providers(SETTINGS.providers)
except UserError as exc:
    sys.exit(f"error: CIFAR10_PROVIDERS={SETTINGS.providers}: {exc}")
WORKERS = SETTINGS.workers or (min(8 * gpu_count(), max(1, usable_cores() // 2)) if ON_GPU else usable_cores())
try:
    HTTP = HttpApi(SETTINGS)
except UserError as exc:  # e.g. an API keys file that cannot be read
    sys.exit(f"error: {exc}")
install_protocol(SETTINGS.header_timeout_s)
restart_dead_workers_within(1.0)


def checked(tag: str) -> bentoml.Model:
    """A store model, checked against its recorded sha256 and this service's input contract, and its metadata
    (out-of-distribution statistics included) read and checked, before it is served."""
    stored = bentoml.models.get(tag)
    path = Path(stored.path_of(MODEL_FILE))
    try:
        verify_stored(path, stored.info.metadata, str(stored.tag))
    except UserError as exc:
        sys.exit(f"error: {exc}")
    try:
        OnnxModel(path, providers="cpu", threads=1, optimized=False)
    except UserError as exc:
        sys.exit(f"error: {stored.tag}: {exc}")
    return stored


def stored_copies(name: str, version: str) -> dict[str, bentoml.models.BentoModel | None]:
    """The copies of `name` this service may answer with: fp32 unless int8 is pinned; on a CPU host (or pinned) the
    newest int8 copy made from that fp32 file, which answers only where its self-check passes (Predictor)."""
    tag = f"{store_name(name)}:{version}"
    try:
        fp32 = checked(tag)
    except NotFound:
        known = ", ".join(served_names()) or "none"
        sys.exit(
            f"error: CIFAR10_MODELS names {name if version == 'latest' else tag}, which the model store lacks "
            f"(it has: {known}); register the shipped ones with `.venv/bin/python -m core.store` (make serve "
            "does), or yours with `cifar10 register`"
        )
    wants_int8 = SETTINGS.precision == "int8" or (SETTINGS.precision == "auto" and not ON_GPU)
    sha256 = fp32.info.metadata.get("sha256") or sha256_of(Path(fp32.path_of(MODEL_FILE)))
    # Through BentoML's API: a bento's container serves from the bento's own store, which the layout reader misses.
    try:
        versions = bentoml.models.list(f"{store_name(name)}-int8") if wants_int8 else []
    except NotFound:  # no int8 copy of this model at all
        versions = []
    versions.sort(key=lambda m: m.info.creation_time, reverse=True)
    found = int8_copy(name, sha256, [(str(m.tag), m.info.metadata) for m in versions], shipped=False)
    if SETTINGS.precision == "int8" and found is None:
        sys.exit(
            f"error: CIFAR10_PRECISION=int8: the model store has no int8 copy of {fp32.tag} "
            f"({store_name(name)}-int8 made from it); quantize one with `cifar10 quantize`, or set "
            "CIFAR10_PRECISION=auto"
        )
    int8 = bentoml.models.BentoModel(str(checked(found).tag)) if found else None
    return {"fp32": None if SETTINGS.precision == "int8" else bentoml.models.BentoModel(str(fp32.tag)), "int8": int8}


COPIES = {name: stored_copies(name, version) for name, version in SETTINGS.models}


def declare_models(cls: type) -> type:
    """Name every copy that may answer as a class attribute: BentoML packs those into a bento built from this."""
    for name, copies in COPIES.items():
        for precision, ref in copies.items():
            setattr(cls, re.sub(r"\W", "_", f"{name}_{precision}_model"), ref)
    return cls


def model_file(stored: bentoml.Model) -> ModelFile:
    return ModelFile(str(stored.tag), Path(stored.path_of(MODEL_FILE)))


@bentoml.service(
    name="cifar10-classifier",
    image=slim_image("3.11"),  # the Python packages come from bentofile.yaml
    workers=WORKERS,
    traffic={"timeout": SETTINGS.timeout_s},
    logging={"access": {"enabled": False}},  # the Router writes one access line per request, every route's
    service_class=service_class(HTTP.router),
)
@bentoml.asgi_app(HTTP.app, path="/")
@declare_models
class Classifier:
    """The CIFAR-10 classifiers CIFAR10_MODELS names, in ONNX Runtime (each model's int8 copy on a CPU host where it
    passes its self-check, else fp32)."""

    def __init__(self) -> None:
        """Load the copy of each model that answers (int8 only where its self-check passes on this CPU) and run
        every batch shape it will see once; BentoML's /readyz turns 200 only after this. It runs in the worker's
        event loop."""
        files = {
            name: Copies(**{precision: ref and model_file(ref.resolve()) for precision, ref in copies.items()})
            for name, copies in COPIES.items()
        }
        # The workers' shared-cores file sits in BentoML's home, like their metrics files; their parent is the server.
        cores_file = bentoml_home() / f"cifar10-cores-{os.getppid()}"
        tracing.configure()  # BentoML has loaded its configuration in this worker by now
        self.predictor = Predictor(files, SETTINGS, WORKERS, bentoml.server_context.worker_index or 0, cores_file)
        HTTP.attach(self.predictor)
        HTTP.drain.install()  # after uvicorn's own signal handlers, which it calls when the drain ends

    def __is_ready__(self) -> bool:
        """BentoML's /readyz answers 503 while this worker drains."""
        return not HTTP.drain.draining

    @bentoml.on_shutdown
    def close(self) -> None:
        """Runs once uvicorn has answered every request (not when the grace period ran out)."""
        self.predictor.close()
        if HTTP.drain.draining:
            say(HTTP.drain.summary())
