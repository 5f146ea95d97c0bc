"""The BentoML service: CIFAR-10 classification over HTTP with adaptive batching.

This module is BentoML's entry point (`bentoml serve service.service:Classifier`) and only
wires the parts together at start-up: the settings (service/settings.py), the models from
the store, the Predictor (service/predictor.py) and the HTTP routes (service/http.py).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import bentoml
from bentoml.exceptions import NotFound

from core.bentoml_internals import bentoml_home
from core.errors import UserError
from core.host import gpu_count, usable_cores
from core.runtime import CUDA, choose_providers
from core.store import INT8_VARIANTS, MODEL_FILE, STORE_NAMES, verify_stored, version_setting
from service.bentoml_internals import limit_request_head_time, restart_dead_workers_within, service_class, slim_image
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
ON_GPU = CUDA in choose_providers(SETTINGS.providers)
WORKERS = SETTINGS.workers or (min(8 * gpu_count(), max(1, usable_cores() // 2)) if ON_GPU else usable_cores())
HTTP = HttpApi(SETTINGS)
limit_request_head_time(SETTINGS.header_timeout_s)
restart_dead_workers_within(1.0)


def stored_model(name: str) -> bentoml.models.BentoModel | None:
    """Store model `name` (`resnet18`, `resnet18-int8`, `lenet`) at the version its CIFAR10_<NAME>_VERSION pins, or
    None when the store lacks it; checked against its recorded sha256 and this service's input contract."""
    version = getattr(SETTINGS, version_setting(name).lower())
    tag = f"{STORE_NAMES[name]}:{version}"
    try:
        stored = bentoml.models.get(tag)
        verify_stored(Path(stored.path_of(MODEL_FILE)), stored.info.metadata, str(stored.tag))
    except NotFound:
        if version == "latest":
            return None
        sys.exit(
            f"error: CIFAR10_{version_setting(name)}={version}: the model store has no {tag}; "
            f"`.venv/bin/bentoml models list {STORE_NAMES[name]}` lists its versions"
        )
    except UserError as exc:
        sys.exit(f"error: {exc}")
    return bentoml.models.BentoModel(tag)


def stored_copies(name: str) -> dict[str, bentoml.models.BentoModel | None]:
    """The copies of `name` this service may answer with: fp32 unless int8 is pinned; on a CPU host (or pinned)
    the int8 copy, which answers only where its self-check passes (Predictor). The bento holds these."""
    wants_int8 = name in INT8_VARIANTS and (
        SETTINGS.precision == "int8" or (SETTINGS.precision == "auto" and not ON_GPU)
    )
    int8 = stored_model(INT8_VARIANTS[name]) if wants_int8 else None
    fp32 = stored_model(name) if SETTINGS.precision != "int8" else None
    if SETTINGS.precision == "int8" and int8 is None:
        sys.exit(
            f"error: CIFAR10_PRECISION=int8: the model store has no {STORE_NAMES.get(INT8_VARIANTS.get(name), '')}"
            f" for {name}; quantize one with `cifar10 quantize`, or set CIFAR10_PRECISION=auto"
        )
    if fp32 is None and int8 is None:
        sys.exit(
            f"error: the model store has no {STORE_NAMES[name]}; register the shipped models with "
            "`.venv/bin/python -m core.store` (make serve does)"
        )
    return {"fp32": fp32, "int8": int8}


COPIES = {name: stored_copies(name) for name in ("resnet18", "lenet")}


def stored_file(stored: bentoml.Model) -> ModelFile:
    return ModelFile(str(stored.tag), Path(stored.path_of(MODEL_FILE)))


@bentoml.service(
    name="cifar10-classifier",
    image=slim_image("3.11"),  # the Python packages come from bentofile.yaml
    workers=WORKERS,
    traffic={"timeout": SETTINGS.timeout_s},
    service_class=service_class(HTTP.router),
)
@bentoml.asgi_app(HTTP.app, path="/")
class Classifier:
    """ResNet-18 (int8 on a CPU host where it passes its self-check, else fp32) and LeNet-5 CIFAR-10 classifiers in
    ONNX Runtime."""

    # The copies that may answer: they are what a bento built from this service holds.
    resnet18_model = COPIES["resnet18"]["fp32"]
    resnet18_int8_model = COPIES["resnet18"]["int8"]
    lenet_model = COPIES["lenet"]["fp32"]

    def __init__(self) -> None:
        """Load the copy of each model that answers (int8 only where its self-check passes on this CPU) and run
        every batch shape it will see once; BentoML's /readyz turns 200 only after this. It runs in the worker's
        event loop."""
        files = {
            name: Copies(**{precision: ref and stored_file(ref.resolve()) for precision, ref in copies.items()})
            for name, copies in COPIES.items()
        }
        # The workers' shared-cores file sits in BentoML's home, like their metrics files; their parent is the server.
        cores_file = bentoml_home() / f"cifar10-cores-{os.getppid()}"
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
